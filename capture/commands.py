"""The capture's commands, each declared beside its handler: ``pairs``, ``capture`` and ``sweep``.

``cli.py`` calls :func:`add_commands` with its sub-parsers and runs a handler with ``args.client`` set (the
dask.distributed client of ``--scheduler`` or ``--local-cluster``, or None). Imports are deferred to the
handlers, so building the parser loads neither torch nor transformers.
"""

from __future__ import annotations

import argparse
import sys


def add_commands(sub, renamed) -> None:
    """Declare this layer's commands on ``sub`` (``renamed(parser, action, old, why)`` keeps an old option name
    working)."""
    for declare in (_declare_pairs, _declare_capture, _declare_sweep):
        declare(sub, renamed)


def _given(args: argparse.Namespace) -> dict:
    """The settings the command line gives: each option whose destination is a field of
    :class:`capture.settings.CaptureSettings`, where given (one left out keeps the file's or the field's default)."""
    from capture.settings import CaptureSettings

    fields = CaptureSettings.__dataclass_fields__
    return {k: v for k, v in vars(args).items() if k in fields and v is not None}


class _CommaList(argparse.Action):
    """A repeatable option whose values (each maybe comma-separated) are kept as one comma-separated string."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{before},{values}" if before else values)


def _declare_pairs(sub, renamed) -> None:
    p = sub.add_parser("pairs", help="list the registered model pairs")
    p.set_defaults(func=_cmd_pairs)


def _cmd_pairs(args: argparse.Namespace) -> int:
    from capture.models.registry import MODEL_PAIRS

    print(f"{'pair':<16}{'base':<40}{'sft':<44}{'dtype':<10}{'est. memory':>12}")
    for spec in MODEL_PAIRS.values():
        gib = spec.memory_estimate_bytes() / 2**30
        base = f"{spec.base} (built locally)" if spec.built_locally else spec.base
        sft = f"{spec.sft} (built locally)" if spec.built_locally else spec.sft
        print(f"{spec.name:<16}{base:<40}{sft:<44}{spec.dtype:<10}{gib:>9.2f} GiB")
    print("\nest. memory = one resident model + the other model's input embeddings, in the listed dtype "
          "(activations extra).")
    return 0


def _declare_capture(sub, renamed) -> None:
    from store.units import CODECS, DEFAULT_CODEC

    p = sub.add_parser(
        "capture", help="run the four passes (BB, BS, SB, SS) and write residuals to a Zarr store",
        description="Capture the residual stream of every layer and token for each pass into a Zarr store. "
        "Pass names are embedding source then LLM: BS = base embeddings through the SFT LLM. "
        "Re-running the same command on an existing store resumes it.",
    )
    src = p.add_argument_group("models")
    src.add_argument("--config", metavar="FILE.yaml",
                     help="a legacy config (its residual_compare section); RESIDUAL_* environment variables apply "
                     "on top, command-line flags on top of both")
    src.add_argument("--pair", dest="model_pair",
                     help="registered model pair name (see `cli.py pairs`); default: tiny, built offline")
    src.add_argument("--base", help="base model: hub id or local directory (with --sft, replaces --pair)")
    src.add_argument("--sft", help="SFT model: hub id or local directory")
    src.add_argument("--tokenizer", help="tokenizer id or directory (default: the base model's)")
    src.add_argument("--trust-remote-code", action="store_true", default=None,
                     help="allow model code from the checkpoint (off by default)")
    src.add_argument("--allow-mismatched-pair", action="store_true", default=None,
                     help="go on when base and SFT are of different architectures (e.g. a Llama and a GPT-2 body "
                     "of one shape); refused by default, recorded in the store")
    src.add_argument("--allow-pickle", action="store_true", default=None,
                     help="accept checkpoints whose weights are pickle files (.bin/.pt), which can run code when "
                     "loaded; by default only safetensors are loaded")
    src.add_argument("--cache-dir", help="where the tiny pair is built (default: outputs/models or $RESDIFF_CACHE)")
    _capture_options(p, renamed)
    out = p.add_argument_group("output")
    out.add_argument("--store", help="store path or fsspec URL such as s3://bucket/run.zarr (with --storage-option "
                     "before the command); default: outputs/<pair>.zarr")
    out.add_argument("--chunk-prompts", type=int, metavar="N",
                     help="prompts per store chunk (default: chunks of about 16 MB); smaller chunks let readers "
                     "and resumes work in finer steps")
    out.add_argument("--shard-size", metavar="SIZE",
                     help="a local store's shards: prompts are grouped in rows of about SIZE per array before "
                     "compression (default 256MiB), each row one file per array and pass, written as its groups "
                     "are computed and completed at the row's end; bigger rows mean fewer files and more work "
                     "lost when a run is killed inside a row")
    out.add_argument("--store-dtype", choices=["float16", "float32"],
                     help="dtype of stored residuals (default float16)")
    out.add_argument("--codec", choices=list(CODECS),
                     help=f"compression of the stored arrays (default {DEFAULT_CODEC}: fast, saves the padding inside "
                     "chunks; zstd saves ~6%% more of float16 activations at a fifth of the speed; none)")
    out.add_argument("--overwrite", action="store_true", default=None, help="replace an existing store")
    out.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument("--plan", action="store_true",
                   help="print the pass schedule, store size and predicted peak memory, then stop (reads configs "
                   "and tokenizers only, no weights)")
    p.set_defaults(func=_cmd_capture)


def _cmd_capture(args: argparse.Namespace) -> int:
    from capture.pipeline.job import run_capture
    from capture.settings import CaptureSettings
    from store.reader import describe_store

    given = _given(args)
    from_file: dict = {}
    if args.config:
        from capture.config import load_legacy_config

        from_file, notes = load_legacy_config(args.config, model_pair=given.get("model_pair"))
        for note in notes:
            print(f"note: {note}", file=sys.stderr)
        if any(note.endswith(f"model_sweep entry {given.get('model_pair')!r}") for note in notes):
            given.pop("model_pair")  # the pair names an entry of the file's model_sweep
        elif "model_pair" in given:  # a registered pair on the command line replaces the file's models
            from_file = {k: v for k, v in from_file.items() if k not in ("base", "sft", "tokenizer")}
    settings = CaptureSettings(**{**from_file, **given})
    if args.plan:
        from capture.plan.memory import plan_capture

        print(plan_capture(settings, log=lambda msg: print(msg, file=sys.stderr)).describe())
        return 0
    path = run_capture(settings, progress=not args.quiet, client=args.client)
    print(describe_store(path))
    return 0


def _declare_sweep(sub, renamed) -> None:
    p = sub.add_parser(
        "sweep", help="capture several registered pairs, one store each, with a status manifest",
        description="Capture each pair of --pair into STORE_DIR/<pair>.zarr. A failed pair is recorded with its "
        "reason and the sweep goes on; complete stores are skipped; STORE_DIR/sweep_manifest.csv lists the "
        "outcome of every pair. Exit code 1 if any pair failed. Rerun the same command to resume.",
    )
    renamed(p, p.add_argument("--pair", dest="model_pairs", action=_CommaList, default="", metavar="NAME[,...]",
                               help="registered model pairs (repeatable or comma-separated; see `cli.py pairs`)"),
             "--pairs", "as capture names a model pair")
    p.add_argument("--store-dir", default="outputs/sweep", help="where the stores go (default outputs/sweep)")
    p.add_argument("--cache-dir", help="where the tiny pair is built (default: outputs/models or $RESDIFF_CACHE)")
    p.add_argument("--overwrite", action="store_true", default=None, help="capture again even complete stores")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _capture_options(p, renamed, pass_pairs=False)
    p.set_defaults(func=_cmd_sweep)


def _cmd_sweep(args: argparse.Namespace) -> int:
    from capture.pipeline.sweep import run_sweep
    from capture.settings import CaptureSettings

    manifest, rows = run_sweep(args.model_pairs.split(","), CaptureSettings(**_given(args)), args.store_dir,
                               log=lambda msg: print(msg, file=sys.stderr), progress=not args.quiet,
                               client=args.client)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("success", "skipped", "failed")}
    print(f"Sweep: {counts['success']} captured, {counts['skipped']} skipped (complete), {counts['failed']} failed; "
          f"manifest: {manifest}")
    return 1 if counts["failed"] else 0


def _capture_options(p: argparse.ArgumentParser, renamed, pass_pairs: bool = True) -> None:
    """The prompt, run and lens options shared by ``capture`` and ``sweep``."""
    inp = p.add_argument_group("prompts")
    inp.add_argument("--prompt", dest="prompts", action="append", metavar="TEXT",
                     help="a prompt (repeatable); after the prompts files")
    inp.add_argument("--prompts-file", dest="prompts_files", action="append", metavar="FILE",
                     help="prompts (repeatable): .txt (one per line), .jsonl/.json, .csv, .parquet, or a directory "
                     "saved by the datasets library; rows with a `messages` list of {role, content} are chat "
                     "conversations, rendered with the tokenizer's chat template; default: the four dev prompts")
    inp.add_argument("--field", dest="prompt_field", metavar="NAME",
                     help="the field or column holding each prompt (default: text, else prompt, else messages)")
    inp.add_argument("--limit", type=int, metavar="N", help="keep only the first N prompts (after --shuffle)")
    inp.add_argument("--shuffle", action="store_true", default=None,
                     help="shuffle the prompts before --limit (sampling), with --seed")
    inp.add_argument("--seed", type=int, help="seed of --shuffle and of --temperature's sampling (default 0)")
    inp.add_argument("--prompt-variant", dest="variants", action="append", metavar="NAME",
                     help="rewrite each prompt with this variant (repeatable; default identity): identity, "
                     "mirror_halves, reverse_sentences, shuffle_sentences, symmetric_concat, base_prefixed, "
                     "sft_prefixed, dual_channel")
    inp.add_argument("--normalize-length", action="store_true", default=None,
                     help="cut every prompt to the shortest prompt's token count, and say so")
    inp.add_argument("--add-bos", action="store_true", default=None, help="prepend the BOS token")
    inp.add_argument("--chat-template", nargs="?", const="always", choices=["auto", "always", "never"],
                     help="which prompts the tokenizer's chat template renders: auto (default) the chat "
                     "conversations (messages rows) only, plain texts as they are; always (the bare flag) also "
                     "wraps each plain text as a user turn; never refuses chat conversations")
    inp.add_argument("--max-tokens", type=int, help="longest prompt allowed, in tokens (default: model context)")
    inp.add_argument("--truncate", action="store_true", default=None,
                     help="cut prompts longer than --max-tokens with a warning instead of failing")
    run = p.add_argument_group("run")
    run.add_argument("--passes", help="comma-separated passes, default BB,BS,SB,SS; custom: NAME=LLM:EMB[:UNEMB]")
    run.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], help="model dtype (default: the pair's)")
    run.add_argument("--device", help="cpu, cuda, cuda:1 or auto (default: auto)")
    run.add_argument("--device-map", help="passed to transformers, e.g. auto for several GPUs")
    run.add_argument("--batch-size", type=int,
                     help="prompts per forward pass, at most (default 8 on a CPU, where small batches are fastest, "
                     "64 on a GPU)")
    run.add_argument("--batch-tokens", type=int, metavar="N",
                     help="padded tokens per forward pass, at most (default 8192); prompts are batched longest "
                     "first, so a batch holds prompts of similar length; a longer prompt runs alone")
    run.add_argument("--batch-padding", type=float, metavar="F",
                     help="padded tokens of a batch at most (1 + F) x its real tokens (default 0.05 on a CPU, where "
                     "small batches cost nothing more per token; 0.15 on a GPU, where bigger batches fill the device)")
    run.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                     help="run the passes on this dask.distributed scheduler's workers (each keeps its model "
                     "loaded; CUDA tasks ask for the worker resource GPU=1); the store must be where all "
                     "workers reach it: a shared file system or an s3:// URL")
    run.add_argument("--local-cluster", type=int, metavar="N",
                     help="run the passes on N worker processes started on this machine")
    run.add_argument("--max-memory", metavar="SIZE",
                     help="refuse before loading any weights when the predicted peak memory (process RSS on the "
                     "CPU, allocated memory on CUDA) is over SIZE, e.g. 24GB; see `capture --plan`")
    run.add_argument("--layers", metavar="LIST",
                     help="store only these layers, e.g. 0,8,16:24 (a:b is a..b-1, negatives count from the end; "
                     "the layer coordinate keeps the true numbers); default all")
    run.add_argument("--cross-layers", metavar="SPEC",
                     help="also capture crossed passes at these split layers (4,8,12 or START:STOP:STEP, 0..the "
                     "number of blocks): B>S@L runs the base model's embedding and blocks below L, then the SFT "
                     "model's blocks, final norm and unembedding; S>B@L the mirror. The lower part is the BB or SS "
                     "pass's own (its state at L carried at full precision, not recomputed)")
    run.add_argument("--positions", metavar="first:N|last:N",
                     help="store only each prompt's first N or last N token positions (default all)")
    gen = p.add_argument_group("generate, then capture (the passes over the model's own responses)")
    gen.add_argument("--generate", type=int, metavar="N",
                     help="let one model continue each prompt by up to N new tokens (batched, KV cache; stops at "
                     "its end-of-turn or EOS token; chat conversations get the template's generation prompt), then "
                     "run every pass over prompt + response; the store marks response tokens (role `response`, "
                     "response_start, stop_reason) and a killed run resumes without generating again")
    gen.add_argument("--generate-with", choices=["sft", "base"], help="which model writes the responses "
                     "(default sft)")
    gen.add_argument("--temperature", type=float, metavar="T",
                     help="sample the responses at temperature T, each prompt from its own generator seeded by "
                     "--seed and its position (default: greedy decoding)")
    lens = p.add_argument_group("logit-lens statistics (raw and norm lens, per pass and per pair)")
    lens.add_argument("--no-lens", dest="lens", action="store_false", default=None,
                      help="capture residuals only, no lens statistics")
    lens.add_argument("--lens-layers", metavar="LIST",
                      help="compute the statistics on these stored layers only, e.g. -1 or 8,16:24 (as --layers; "
                      "default every stored layer); on a CPU they cost far more than the residuals, per layer")
    lens.add_argument("--top-k", type=int, help="top-k logits, rises and falls kept per position (default 20)")
    lens.add_argument("--track", action="append", metavar="TOKEN",
                      help="tracked token: tokenizer piece such as ĠYes, or an id (repeatable)")
    if pass_pairs:
        renamed(lens, lens.add_argument(
            "--pass-pair", dest="pass_pairs", action=_CommaList, metavar="LEFT-RIGHT[,...]",
            help="pairs of passes (repeatable or comma-separated; default: all, BB-BS ... SB-SS, and with "
            "--cross-layers B>S@L-SS, S>B@L-BB, BB-B>S@L and BB-S>B@L per split, what `crossing` reads); statistics "
            "are right relative to left, KL(right || left)"), "--pairs", "one name for a pair of passes")
    lens.add_argument("--save-lens", action="store_true", default=None,
                      help="also store each model's unembedding and final norm (lens statistics of new tokens later)")
