"""resdiff command line: parse, call, print.

Run ``python cli.py --help`` for the commands, and ``python cli.py COMMAND --help``
for each command's options.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path


def _open_for_analysis(store: str, reads_lens: bool = True):
    """The store as analysis may read it (``store.completeness.usable``); the lines on what is left out printed
    first, so that nothing below them is read as covering it."""
    from store.completeness import usable
    from store.reader import open_store

    ds, notes = usable(open_store(store), reads_lens=reads_lens)
    for note in notes:
        print(f"note: {note}")
    return ds


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


def _cmd_capture(args: argparse.Namespace) -> int:
    from capture.pipeline.job import run_capture
    from capture.settings import CaptureSettings
    from store.reader import describe_store

    fields = CaptureSettings.__dataclass_fields__
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
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
    with _cluster(args.scheduler, args.local_cluster) as client:
        path = run_capture(settings, progress=not args.quiet, client=client)
    print(describe_store(path))
    return 0


def _cmd_verify(args: argparse.Namespace) -> int:
    from store.verify import verify_store

    problems = verify_store(args.store, deep=args.deep)
    if not problems:
        checked = "every chunk decoded" if args.deep else "a sample of each array's chunks decoded; --deep for all"
        print(f"OK: {args.store} is a sound, complete store ({checked})")
        return 0
    print(f"{args.store}: {len(problems)} problem(s)")
    for problem in problems:
        print(f"- {problem}")
    return 1


def _cmd_sweep(args: argparse.Namespace) -> int:
    from capture.pipeline.sweep import run_sweep
    from capture.settings import CaptureSettings

    fields = CaptureSettings.__dataclass_fields__
    given = {k: v for k, v in vars(args).items() if k in fields and v is not None}
    with _cluster(args.scheduler, args.local_cluster) as client:
        manifest, rows = run_sweep(args.model_pairs.split(","), CaptureSettings(**given), args.store_dir,
                                   log=lambda msg: print(msg, file=sys.stderr), progress=not args.quiet,
                                   client=client)
    counts = {s: sum(r["status"] == s for r in rows) for s in ("success", "skipped", "failed")}
    print(f"Sweep: {counts['success']} captured, {counts['skipped']} skipped (complete), {counts['failed']} failed; "
          f"manifest: {manifest}")
    return 1 if counts["failed"] else 0


def _cmd_info(args: argparse.Namespace) -> int:
    from store.reader import describe_store

    print(describe_store(args.store))
    return 0


def _cmd_export_json(args: argparse.Namespace) -> int:
    from store.conversions.export_json import export_json

    path = export_json(args.store, args.out, lens=args.lens)
    print(f"Wrote comparison JSON to: {path}")
    return 0


def _cmd_export_netcdf(args: argparse.Namespace) -> int:
    from store.conversions.export_netcdf import export_netcdf

    path = export_netcdf(args.store, args.out, args.sel, args.vars, log=lambda line: print(f"note: {line}"))
    print(f"Wrote netCDF to: {path}")
    return 0


def _cmd_import_json(args: argparse.Namespace) -> int:
    from store.conversions.import_json import import_json
    from store.reader import describe_store

    path = import_json(args.file, args.store, overwrite=bool(args.overwrite))
    print(describe_store(path))
    return 0


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report.export_rows import check_export_path, export_rows
    from analysis.report.text import build_report

    if args.export:
        check_export_path(args.export)  # before any work
    ds = _open_for_analysis(args.store)
    with _compute_context(args, ds) as where:
        if not args.quiet and (args.scheduler or args.local_cluster or args.memory_limit):
            print(f"computing on {where}", file=sys.stderr)
        text, rows = build_report(
            ds, metrics=args.metric, axis=args.axis, record_type=args.record_type, top_n=args.top_n, lens=args.lens,
            labels=args.pass_pair if args.record_type == "pairwise" else args.pass_, token_ids=args.token_id,
            logit_source=args.logit_source, prompt=args.prompt, include_massive=args.include_massive,
            massive_factor=args.massive_factor,
        )
    print(text)
    if args.export:
        print(f"Exported {len(rows)} rows to {export_rows(rows, args.export)}")
    return 0


def _cmd_factorial(args: argparse.Namespace) -> int:
    import dask
    import numpy as np

    from analysis.geometry.outliers import describe_massive, massive_positions
    from analysis.readouts.factorial import factorial_shares
    from analysis.report.text import table

    ds = _open_for_analysis(args.store, reads_lens=False)
    by = args.by
    if by == "kind":  # special and chat-template tokens against the rest
        from analysis.readouts.tokens import token_kinds

        by = token_kinds(ds)
    with _compute_context(args, ds):  # graphs built here follow the memory limit
        found = massive_positions(ds, args.massive_factor)
        keep = None if args.include_massive else ~found.massive
        # one computation: the massive positions and the shares come from the same read of the residuals
        found, shares = dask.compute(found, factorial_shares(ds, where=keep, by=by))
    print("\n".join(describe_massive(ds, found, args.include_massive)))
    columns = ["embedding_share", "body_share", "cross_share", "interaction_ratio"]
    groups = [None] if args.by is None else [str(g) for g in shares[args.by].values]
    print("Factorial attribution of D = h_SS - h_BB = E (embeddings) + B (body), per layer over real positions: "
          "shares of sum |D|^2 (embedding + body + cross = 1), interaction = sum |I|^2 / sum |D|^2")
    for group in groups:
        part = shares if group is None else shares.sel({args.by: group})
        if group is not None:
            print(f"\n{args.by} = {group}:")
        rows = [[int(layer), *(float(part[c].sel(layer=layer)) if float(part.total_sq.sel(layer=layer)) > 0
                               else "-" for c in columns),
                 float(np.sqrt(part.total_sq.sel(layer=layer)))] for layer in part.layer.values]
        if any("-" in row for row in rows):  # shares of nothing are not numbers
            print("(-: no change at this layer, sum |D|^2 = 0, so no shares)")
        print(table(["layer", "embedding", "body", "cross", "interaction", "sqrt sum |D|^2"], rows))
    return 0


def _cmd_diff_lens(args: argparse.Namespace) -> int:
    import numpy as np

    from analysis.readouts.difflens import diff_lens
    from analysis.readouts.tokens import token_texts

    ds = _open_for_analysis(args.store, reads_lens=False)
    with _compute_context(args, ds):
        result = diff_lens(ds, k=args.k, top=args.top, include_massive=args.include_massive, pairs=args.pass_pair,
                           layers=args.layer)
    pairs = [str(p) for p in result.pair.values]
    layers = [int(la) for la in result.layer.values]
    print(f"Mean difference h_right - h_left, read through each side's normed lens ({result.attrs['lens_source']}); "
          f"windows: the first {args.k} real positions of each prompt, and all real positions"
          + ("" if args.include_massive else "; massive-activation positions left out"))
    texts = {}
    for kind in ("promoted", "suppressed"):  # decoded once, all cells together
        ids = result[f"{kind}_id"].values
        texts[kind] = np.array(token_texts(ds, ids.ravel()), dtype=object).reshape(ids.shape)
    for q, pair in enumerate(pairs):
        for la, layer in enumerate(layers):
            for w, window in enumerate(result.window.values):
                if (result.promoted_id.values[q, la, w] < 0).all():
                    print(f"{pair} layer {layer} {window}: no difference (the mean of h_right - h_left is exactly 0, "
                          "or the window holds no position)")
                    continue
                for s, side in enumerate(("left", "right")):
                    up = ", ".join(repr(t) for t in texts["promoted"][q, la, w, s])
                    down = ", ".join(repr(t) for t in texts["suppressed"][q, la, w, s])
                    print(f"{pair} layer {layer} {window} ({side} lens): promoted {up}; suppressed {down}")
    return 0


def _cmd_loader_stats(args: argparse.Namespace) -> int:
    from analysis.loader.activations import activation_loader
    from analysis.loader.stats import loader_stats

    _open_for_analysis(args.store, reads_lens=False)  # refuses unfinished residuals in one line
    passes = args.passes.split(",") if args.passes else None
    positions = "all" if args.positions == "all" else int(args.positions)
    loader = activation_loader(args.store, layer=args.layer if len(args.layer) > 1 else args.layer[0], passes=passes,
                               pair=args.pass_pair, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                               positions=positions, include_massive=args.include_massive,
                               massive_factor=args.massive_factor, kinds=args.kind, roles=args.role,
                               normalize=args.normalize, world_size=args.world_size)
    stats = loader_stats(loader)
    layout = "differences " + args.pass_pair if args.pass_pair else "passes " + ",".join(stats["passes"])
    print(f"{args.store}: {stats['rows']} rows ({layout}, batch shape (batch, "
          f"{', '.join(map(str, stats['row_shape']))})) in {stats['units']} units of up to {stats['unit_read']} "
          f"read each; {stats['excluded_massive']} massive-activation positions left out")
    print(f"per epoch and rank (world size {args.world_size}): {stats['batches_per_epoch']} batches of "
          f"{args.batch_size}; shuffle buffer {stats['shuffle_buffer']} ({stats['shuffle_buffer_rows']} rows)")
    if stats["expected_rows_per_s"] is not None:
        print(f"expected read throughput: {stats['expected_rows_per_s']} rows/s ({stats['expected_read_MBps']} MB/s "
              f"of chunks), about {stats['expected_epoch_s']} s per epoch on one process")
    if stats["scales"] is not None:
        print(f"normalisation factors (layer x pass): {stats['scales']}")
    return 0


class _OldSpelling(argparse.Action):
    """An option's former name: does what the new one does and says once per run what it is called now."""

    def __init__(self, option_strings, dest, target: argparse.Action, why: str, **kwargs):
        self.target, self.why, self.said = target, why, False
        super().__init__(option_strings, dest, **kwargs)

    def __call__(self, parser, namespace, values, option_string=None):
        if not self.said:
            self.said = True
            print(f"note: {option_string} is now {self.target.option_strings[0]} ({self.why}); "
                  "the old spelling still works", file=sys.stderr)
        self.target(parser, namespace, values, option_string)


def _renamed(p, action: argparse.Action, old: str, why: str) -> argparse.Action:
    """Keep ``old`` working as a hidden spelling of ``action`` (one name per concept across the commands)."""
    p.add_argument(old, dest=action.dest, action=_OldSpelling, target=action, why=why, default=argparse.SUPPRESS,
                   nargs=0 if action.nargs == 0 else action.nargs, type=action.type, choices=action.choices,
                   metavar=action.metavar, help=argparse.SUPPRESS)
    return action


class _CommaList(argparse.Action):
    """A repeatable option whose values (each maybe comma-separated) are kept as one comma-separated string."""

    def __call__(self, parser, namespace, values, option_string=None):
        before = getattr(namespace, self.dest, None)
        setattr(namespace, self.dest, f"{before},{values}" if before else values)


def _pass_pair_arg(p, help_text: str, repeat: bool = True) -> None:
    """``--pass-pair LEFT-RIGHT``, the one name of a pair of passes (``--pair`` names a model pair)."""
    action = p.add_argument("--pass-pair", dest="pass_pair", action="append" if repeat else "store",
                            metavar="LEFT-RIGHT", help=help_text)
    _renamed(p, action, "--pair", "--pair names a model pair, in capture")


def _massive_args(p: argparse.ArgumentParser, where: str, factor: bool = True) -> None:
    p.add_argument("--include-massive", action="store_true",
                   help=f"keep massive-activation positions (attention sinks) in {where}; by default they are "
                   "listed and left out")
    if factor:
        p.add_argument("--massive-factor", type=float, default=10.0, metavar="X",
                       help="a position is massive when its norm is over X times its layer's median norm (default 10)")


def _scale_args(p: argparse.ArgumentParser) -> None:
    scale = p.add_argument_group("where to compute (default: threads on this machine)")
    scale.add_argument("--memory-limit", metavar="SIZE",
                       help="bound the computation's memory, e.g. 1GB (the process's own ~0.4 GB of libraries "
                       "comes on top; default: a quarter of this machine's memory); sets the threads and the "
                       "blocks read at once, or each --local-cluster worker's limit")
    scale.add_argument("--scheduler", metavar="tcp://HOST:PORT",
                       help="run on an existing dask.distributed scheduler (workers need resdiff importable and "
                       "the store path readable)")
    scale.add_argument("--local-cluster", type=int, metavar="N",
                       help="start N single-threaded worker processes on loopback and run there")


@contextlib.contextmanager
def _cluster(scheduler: str | None, local_cluster: int | None, memory_limit: int | None = None):
    """The dask.distributed client of ``--scheduler`` or of ``--local-cluster N`` new worker processes on loopback
    (one thread each, ``memory_limit`` split between them, each with the resource GPU=1), or None; closed on exit."""
    from store.errors import UsageError

    if not scheduler and local_cluster is None:
        yield None
        return
    if scheduler and local_cluster is not None:
        raise UsageError("give either --scheduler or --local-cluster, not both")
    if local_cluster is not None and local_cluster < 1:
        raise UsageError(f"--local-cluster needs at least 1 worker, got {local_cluster}")
    from distributed import Client, LocalCluster

    if local_cluster is not None:
        with LocalCluster(n_workers=local_cluster, threads_per_worker=1, processes=True, dashboard_address=None,
                          memory_limit=memory_limit // local_cluster if memory_limit else "auto",
                          resources={"GPU": 1}) as cluster, Client(cluster) as client:
            yield client
        return
    try:
        client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as exc:
        raise UsageError(f"could not reach the Dask scheduler at {scheduler} ({exc.__class__.__name__}); start "
                         "one with `dask scheduler` and workers with `dask worker ADDRESS`, or use --local-cluster N"
                         ) from None
    with client:
        yield client


@contextlib.contextmanager
def _compute_context(args: argparse.Namespace, ds):
    from analysis.compute.context import compute_on, default_memory_limit, parse_memory, tile_bytes

    limit = parse_memory(args.memory_limit) if args.memory_limit else default_memory_limit()
    with _cluster(args.scheduler, args.local_cluster, limit) as client:
        with compute_on(client, limit, tile_bytes(ds)) as where:
            yield where


def _tucker_ranks(text: str | None):
    from store.errors import UsageError

    if not text:
        return None
    try:
        ranks = tuple(int(x) for x in text.split(","))
    except ValueError:
        raise UsageError(f"--tucker-ranks takes three integers like 2,4,8, got {text!r}") from None
    if len(ranks) != 3:
        raise UsageError(f"--tucker-ranks takes three integers (pair, layer, dim ranks), got {text!r}")
    return ranks


def _cmd_decompose(args: argparse.Namespace) -> int:
    import xarray as xr

    from analysis.geometry.decompose import decompose_store, summary_lines

    ds = _open_for_analysis(args.store, reads_lens=False)
    with _compute_context(args, ds):
        path, reused = decompose_store(args.store, top_k=args.top_k, cp_rank=args.cp_rank,
                                       tucker_ranks=_tucker_ranks(args.tucker_ranks), pairs=args.pass_pair,
                                       out=args.out, force=args.force, progress=not args.quiet,
                                       include_massive=args.include_massive)
    res = xr.open_zarr(str(path)).load()  # small: a few numbers per pair and layer
    print(f"{'Reused' if reused else 'Wrote'} decomposition: {path}")
    print("\n".join(summary_lines(ds, res)))
    print(f"CP rank {res.sizes['cp_rank']}: relative error {res.attrs['cp_relative_error']:.3e}; "
          f"Tucker ranks {tuple(res.attrs['tucker_ranks'])}: relative error {res.attrs['tucker_relative_error']:.3e}")
    print(f"open with: xr.open_zarr({str(path)!r})")
    return 0


def _cmd_plot(args: argparse.Namespace) -> int:
    import warnings
    from pathlib import Path

    import dask
    import xarray as xr

    from analysis.geometry.decompose import decompose_store
    from analysis.geometry.outliers import massive_positions
    from analysis.report import plots
    from analysis.report.text import check_prompt
    from store.atomic import staged_directory
    from store.location import local_sibling

    ds = _open_for_analysis(args.store)
    check_prompt(ds, args.prompt)
    final = Path(args.out) if args.out else local_sibling(args.store, "-plots")
    with staged_directory(final) as out:  # a run that fails adds nothing to the folder
        with _compute_context(args, ds):
            # the curves' numbers and the massive positions (for the heatmaps, the spectra and the page) in one
            # computation, the page's tables in another: two reads of the residuals, not one per section (all
            # at once held 2 GB under a 1 GB limit)
            lazy = {"found": massive_positions(ds), "curves": plots.layer_curve_inputs(ds, args.lens)}
            with warnings.catch_warnings():  # a layer without values has no mean: NaN, not drawn
                warnings.filterwarnings("ignore", "(invalid value|Mean of empty|All-NaN)", RuntimeWarning)
                (computed,) = dask.compute(lazy)
                found = computed["found"]
                if args.html:
                    (computed["page"],) = dask.compute(_page_inputs(args, ds, found))
            images = [plots.layer_curves(ds, out, args.lens, computed["curves"])]
            massive = None if args.include_massive else found.massive.sel(prompt=args.prompt).values
            images.append(plots.heatmaps(ds, out, args.metric, args.prompt, args.lens, massive))
            if args.pass_metric:
                images.append(plots.heatmaps(ds, out, args.pass_metric, args.prompt, args.lens, massive))
            path, _ = decompose_store(args.store, top_k=args.top_k, progress=not args.quiet,
                                      include_massive=args.include_massive, massive=found.massive.values)
        result = xr.open_zarr(str(path)).load()
        images += plots.spectra_plots(result, out)
        images.append(plots.cp_plot(result, out))
        written = [*images, _plot_page(args, ds, out, images, result, found, computed["page"])] if args.html \
            else images
    for image in written:
        print(f"Wrote {final / Path(image).relative_to(out)}")
    return 0


def _page_inputs(args: argparse.Namespace, ds, found) -> dict:
    """The lazy numbers of the HTML page's opening and summary (``found``: the massive positions, computed)."""
    from analysis.geometry.metrics import pair_metrics
    from analysis.report.answer import page_inputs
    from store.completeness import without_lens

    keep = None if args.include_massive else ~found.massive
    # the opening's metrics are geometric: built without graphs over the statistics variables
    return page_inputs(ds, pair_metrics(without_lens(ds), "norm"), keep)


def _plot_page(args: argparse.Namespace, ds, out, images: list, result, found, computed: dict):
    """report.html of ``plot --html``: the opening (what changed first), the summary, the figures; ``computed``:
    :func:`_page_inputs`, computed."""
    import html

    import numpy as np

    from analysis.geometry.metrics import pair_metrics
    from analysis.report import plots
    from analysis.report.answer import chat_templating, opening
    from analysis.report.summary import summary_sentences
    from store.completeness import LEFT_OUT_ATTR, UNFINISHED_LENS_ATTR, left_out, without_lens

    def ratio(q) -> str:
        value = float(result.participation_ratio.sel(pair=q).mean())
        return f"{value:.2f}" if np.isfinite(value) else "– (no difference)"

    rows = [["pair", "mean participation ratio", "max rank90", "max rank99"]] + [
        [str(q), ratio(q), int(result.rank90.sel(pair=q).max()), int(result.rank99.sel(pair=q).max())]
        for q in result.pair.values]
    with _compute_context(args, ds):
        # the opening's metrics are geometric: built without graphs over the statistics variables
        sections, first = opening(ds, pair_metrics(without_lens(ds), "norm"), out, args.prompt, found,
                                  args.include_massive, computed)
    summary = summary_sentences(ds, computed["summary"], int(found.massive.sum()), not args.include_massive)
    sections.insert(0, "<h2>Summary</h2><p>" + html.escape(" ".join(summary)) + "</p>")
    if left_out(ds):
        sections.insert(0, f'<p class="note"><b>Note:</b> {html.escape(left_out(ds))}</p>')
    settings = {"store": str(args.store), "chat template": chat_templating(ds),
                **{k: v for k, v in ds.attrs.items() if k not in (LEFT_OUT_ATTR, UNFINISHED_LENS_ATTR)}}
    return plots.html_report(images, out, f"resdiff: {ds.attrs.get('pair_label', args.store)}", rows, settings,
                             sections, first)


def _capture_options(p: argparse.ArgumentParser, pass_pairs: bool = True) -> None:
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
    inp.add_argument("--seed", type=int, help="seed of --shuffle (default 0)")
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
    run.add_argument("--positions", metavar="first:N|last:N",
                     help="store only each prompt's first N or last N token positions (default all)")
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
        _renamed(lens, lens.add_argument(
            "--pass-pair", dest="pass_pairs", action=_CommaList, metavar="LEFT-RIGHT[,...]",
            help="pairs of passes (repeatable or comma-separated; default: all, BB-BS ... SB-SS); statistics are "
            "right relative to left, KL(right || left)"), "--pairs", "one name for a pair of passes")
    lens.add_argument("--save-lens", action="store_true", default=None,
                      help="also store each model's unembedding and final norm (lens statistics of new tokens later)")


def build_parser() -> argparse.ArgumentParser:
    from store.units import CODECS, DEFAULT_CODEC

    parser = argparse.ArgumentParser(
        prog="cli.py",
        description="resdiff: capture and compare the residual streams of a base LLM and its SFT variant.",
    )
    parser.add_argument("--debug", action="store_true", help="show the full traceback on errors")
    parser.add_argument("--storage-option", dest="storage_options", action="append", metavar="KEY=VALUE",
                        help="option for stores at fsspec URLs (s3://bucket/x.zarr, gs://, memory://), e.g. "
                        "endpoint_url=http://127.0.0.1:9000 or anon=true; repeatable, dotted keys nest "
                        "(client_kwargs.region_name=eu-west-1); give it before the command")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("pairs", help="list the registered model pairs")
    p.set_defaults(func=_cmd_pairs)

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
    _capture_options(p)
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

    p = sub.add_parser(
        "sweep", help="capture several registered pairs, one store each, with a status manifest",
        description="Capture each pair of --pair into STORE_DIR/<pair>.zarr. A failed pair is recorded with its "
        "reason and the sweep goes on; complete stores are skipped; STORE_DIR/sweep_manifest.csv lists the "
        "outcome of every pair. Exit code 1 if any pair failed. Rerun the same command to resume.",
    )
    _renamed(p, p.add_argument("--pair", dest="model_pairs", action=_CommaList, default="", metavar="NAME[,...]",
                               help="registered model pairs (repeatable or comma-separated; see `cli.py pairs`)"),
             "--pairs", "as capture names a model pair")
    p.add_argument("--store-dir", default="outputs/sweep", help="where the stores go (default outputs/sweep)")
    p.add_argument("--cache-dir", help="where the tiny pair is built (default: outputs/models or $RESDIFF_CACHE)")
    p.add_argument("--overwrite", action="store_true", default=None, help="capture again even complete stores")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    _capture_options(p, pass_pairs=False)
    p.set_defaults(func=_cmd_sweep)

    p = sub.add_parser(
        "export-json", help="write the legacy multi-pass JSON (format_version 2) from a store",
        description="Export the legacy format-2 JSON, its .meta.json sidecar and a manifest_multi.csv row, as the "
        "old tool wrote them, derived from the store. Streams one prompt at a time.",
    )
    p.add_argument("store", help="path of a store written by `capture` (with lens statistics)")
    p.add_argument("--out", default="outputs/export",
                   help="output directory: files go to OUT/<pair_label>/, the manifest to OUT/ "
                   "(default outputs/export)")
    p.add_argument("--lens", choices=["raw", "norm"], default="raw",
                   help="raw: the legacy semantics (default); norm: the standard logit lens at every layer "
                   "(a deviation)")
    p.set_defaults(func=_cmd_export_json)

    p = sub.add_parser(
        "export-netcdf", help="write a selection of a store as float32 netCDF4",
        description="Write a selection of a store to a netCDF4 file (float32; netCDF4 has no float16).",
    )
    p.add_argument("store", help="path of a store written by `capture`")
    p.add_argument("out", help="the .nc file to write")
    p.add_argument("--sel", action="append", metavar="DIM=VALUE", help="select one label, e.g. pass_=SS (repeatable)")
    p.add_argument("--vars", nargs="+", metavar="VAR", help="variables to write (default: all)")
    p.set_defaults(func=_cmd_export_netcdf)

    p = sub.add_parser(
        "import-json", help="convert a legacy JSON file (format 1 or 2) into a statistics-only store",
        description="Read a legacy results file streaming (twice: shapes, then values) and write its statistics "
        "as a store without residuals. Legacy layer key k becomes layer k + 1.",
    )
    p.add_argument("file", help="a residual_compare_*.json or multi_pass_*.json file")
    p.add_argument("--store", help="store path (default: the file's path with .zarr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=_cmd_import_json)

    p = sub.add_parser(
        "report", help="per-layer or per-token summaries, hotspots and tracked-token changes of a store",
        description="Summaries (mean, std, min, max; padding excluded) of metrics per layer or token, seven-number "
        "summaries across prompts, the top-n |value| hotspots, tracked-token logit changes and, with --token-id, "
        "logit-grid and top-k-membership previews. Pair metrics are right relative to left.",
    )
    p.add_argument("store", help="a store from `capture` or `import-json`")
    p.add_argument("--metric", action="append",
                   help="metric (repeatable); default norm_diff (pairwise) or norm (runs). Pairwise: "
                   "norm_left, norm_right, norm_diff, rel_norm_diff, cosine_sim, cosine_prev_left/right, "
                   "norm_delta_left/right, "
                   "entropy_left/right, kl. Runs: norm, norm_delta, cosine_prev, entropy")
    p.add_argument("--axis", choices=["layer", "token"], default="layer", help="summaries per layer or per token")
    p.add_argument("--record-type", choices=["pairwise", "runs"], default="pairwise", help="pairs or single passes")
    p.add_argument("--top-n", type=int, default=5,
                   help="hotspots and tracked changes listed (largest |value|), grid preview rows and columns")
    p.add_argument("--lens", choices=["raw", "norm"], default="norm",
                   help="lens of entropy, KL and logits: norm (default; final norm, then unembedding: the standard "
                   "logit lens) or raw (unembedding alone)")
    _pass_pair_arg(p, "only these pairs of passes (repeatable)")
    p.add_argument("--pass", dest="pass_", action="append", help="only these passes with --record-type runs")
    p.add_argument("--token-id", type=int, action="append",
                   help="token id (repeatable): restricts tracked changes and previews its logit grid and top-k "
                   "membership")
    p.add_argument("--logit-source", choices=["left", "right", "diff"], default="diff",
                   help="grid previewed with --token-id: the left or right pass's logit, or diff = right - left "
                   "(the legacy base|sft|diff with diff = base - sft is not copied)")
    _renamed(p, p.add_argument("--prompt-index", dest="prompt", type=int, default=0, metavar="N",
                               help="prompt (its index) of the --token-id previews (default 0)"),
             "--prompt", "--prompt is a prompt's text, in capture")
    p.add_argument("--export", metavar="OUT.csv|OUT.json|OUT.parquet", help="write the hotspot and tracked-change rows")
    _massive_args(p, "summaries and hotspots")
    _scale_args(p)
    p.add_argument("--quiet", action="store_true", help="do not say where the computation runs")
    p.set_defaults(func=_cmd_report)

    p = sub.add_parser(
        "decompose", help="spectra, effective ranks, principal angles, CP and Tucker of the pairwise differences",
        description="Per pair and layer: the spectrum of the difference vectors h_right - h_left over all real "
        "positions (uncentred), participation ratio, rank to 90/99% of variance, top-k directions and principal "
        "angles between pairs' top-k subspaces; CP and Tucker of the pair x layer x dim tensor of mean "
        "differences. Written to a sibling store named by the settings; the same settings reuse it.",
    )
    p.add_argument("store", help="a store from `capture` (needs resid)")
    _pass_pair_arg(p, "only these pairs of passes (repeatable; default all)")
    _renamed(p, p.add_argument("--components", dest="top_k", type=int, default=8, metavar="K",
                               help="principal directions kept and compared (default 8)"),
             "--top-k", "--top-k is the lens's top-k logits, in capture")
    p.add_argument("--cp-rank", type=int, help="CP rank (default: smallest <= 8 with relative error <= 5%%)")
    p.add_argument("--tucker-ranks", metavar="P,L,D", help="Tucker ranks (default: 99%% energy per mode)")
    p.add_argument("--out", help="output store (default: STORE's sibling NAME.decomp-<settings hash>.zarr; "
                   "for a store at a URL, under outputs/)")
    _renamed(p, p.add_argument("--overwrite", dest="force", action="store_true",
                               help="recompute and replace an existing output"), "--force", "as capture says it")
    _massive_args(p, "the spectra", factor=False)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _scale_args(p)
    p.set_defaults(func=_cmd_decompose)

    p = sub.add_parser(
        "plot", help="PNG figures (and --html, one self-contained page) of a store",
        description="Layer curves of norm_diff, cosine_sim and KL for all pairs; layer x token heatmaps of one "
        "prompt per pair (and per pass); spectra, effective ranks and CP factors of the decomposition.",
    )
    p.add_argument("store", help="a store from `capture`")
    p.add_argument("--out", help="output directory (default: STORE without .zarr, plus -plots; for a store at a "
                   "URL, under outputs/)")
    p.add_argument("--html", action="store_true", help="also write report.html with the images embedded")
    p.add_argument("--metric", default="norm_diff", help="pair metric of the heatmaps (default norm_diff)")
    p.add_argument("--pass-metric", default="norm", help="pass metric of the per-pass heatmaps (default norm; "
                   "empty to skip)")
    _renamed(p, p.add_argument("--prompt-index", dest="prompt", type=int, default=0, metavar="N",
                               help="prompt (its index) of the heatmaps (default 0)"),
             "--prompt", "--prompt is a prompt's text, in capture")
    p.add_argument("--lens", choices=["raw", "norm"], default="norm", help="lens of KL (default norm, as everywhere)")
    _renamed(p, p.add_argument("--components", dest="top_k", type=int, default=8, metavar="K",
                               help="principal directions of the decomposition (default 8)"),
             "--top-k", "--top-k is the lens's top-k logits, in capture")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _massive_args(p, "colour scales, spectra and the opening tables", factor=False)
    _scale_args(p)
    p.set_defaults(func=_cmd_plot)

    p = sub.add_parser(
        "factorial", help="the 2x2 factorial: how much of h_SS - h_BB is the embeddings, the body, or both",
        description="Per layer over real positions: the embedding main effect E = ((SB-BB) + (SS-BS))/2, the body "
        "main effect B = ((BS-BB) + (SS-SB))/2 (D = SS - BB = E + B) and the interaction I = SS - SB - BS + BB, as "
        "shares of sum |D|^2. Needs the four standard passes.",
    )
    p.add_argument("store", help="a store from `capture` with the passes BB, BS, SB, SS")
    p.add_argument("--by", help="also split by kind (special and chat-template tokens against the rest) or by a "
                   "per-token coordinate, e.g. role (chat prompts)")
    _massive_args(p, "the sums")
    _scale_args(p)
    p.set_defaults(func=_cmd_factorial)

    p = sub.add_parser(
        "diff-lens", help="the tokens each pair's mean difference promotes and suppresses, per layer",
        description="The mean difference h_right - h_left over the first K real positions of each prompt (the "
        "Activation Difference Lens setting) and over all real positions, read through each side's normed lens "
        "(final norm, unembedding): the top promoted and suppressed tokens as text. The lens is the store's saved "
        "lens (--save-lens) or the models' safetensors checkpoints.",
    )
    p.add_argument("store", help="a store from `capture`")
    _pass_pair_arg(p, "only these pairs of passes (repeatable)")
    p.add_argument("--layer", type=int, action="append", help="only these layers (repeatable; default all)")
    p.add_argument("--k", type=int, default=5, help="first real positions of each prompt averaged (default 5)")
    p.add_argument("--top", type=int, default=10, help="tokens listed each way (default 10)")
    _massive_args(p, "the means", factor=False)
    _scale_args(p)
    p.set_defaults(func=_cmd_diff_lens)

    p = sub.add_parser(
        "loader-stats", help="what an activation loader for dictionary learning would yield, before training",
        description="Builds analysis.activation_loader for the selection and prints its rows, units (store "
        "chunks read once per epoch), batches per epoch, the shuffle buffer's memory and the read throughput "
        "measured on a few units. Nothing is trained.",
    )
    p.add_argument("store", help="a store from `capture`")
    p.add_argument("--layer", type=int, action="append", required=True,
                   help="layer to read (repeatable: a layer axis after the batch axis)")
    p.add_argument("--passes", help="comma-separated passes, the crosscoder layout (default BB,SS)")
    _pass_pair_arg(p, "differences h_right - h_left instead of --passes, e.g. BB-SS", repeat=False)
    p.add_argument("--positions", default="all", help="all (default) or N: the first N real positions of each prompt")
    p.add_argument("--kind", action="append", choices=["special", "text"], help="only these token kinds")
    p.add_argument("--role", action="append", help="only tokens of these chat roles (stores with a chat template)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per batch (default 4096)")
    p.add_argument("--shuffle-buffer", default="512MiB", help="memory of the shuffle buffer (default 512MiB)")
    p.add_argument("--normalize", action="store_true", help="compute the per-pass normalisation factors too")
    p.add_argument("--world-size", type=int, default=1, help="processes the epoch is split across (default 1)")
    _massive_args(p, "the rows")
    p.set_defaults(func=_cmd_loader_stats)

    p = sub.add_parser(
        "verify", help="check a store: format, metadata, shapes, done coverage, chunks present and checksummed, "
                       "NaN only on padding, no inf",
        description="Check a store against its own metadata; prints each problem on a line and exits 1 if any.",
    )
    p.add_argument("store", help="path of a store")
    p.add_argument("--deep", action="store_true",
                   help="decode every chunk of every array and check its crc32c checksum (reads the whole store); "
                        "by default a sample of each array's chunks is decoded, and the residuals all are")
    p.set_defaults(func=_cmd_verify)

    p = sub.add_parser("info", help="summarise a store: dims, passes, models, completeness",
                       description="Print a short summary of a store without reading its data: format, dimensions, "
                       "models, passes, prompts and their token counts, which regions and lens statistics are done, "
                       "chunking and stored bytes.")
    p.add_argument("store", help="path of a store written by `capture`")
    p.set_defaults(func=_cmd_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if hasattr(args, "memory_limit") and not (getattr(args, "scheduler", None) or
                                              getattr(args, "local_cluster", None) is not None):
        from analysis.compute.context import share_one_heap

        share_one_heap()  # before any thread starts (see its docstring)
    from store.errors import ResdiffError, damaged_store_error
    from store.location import parse_storage_options, set_storage_options

    try:
        with set_storage_options(parse_storage_options(args.storage_options)):  # undone on return
            return args.func(args)
    except ResdiffError as exc:
        if args.debug:
            traceback.print_exc()
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted; rerun the same command to resume", file=sys.stderr)
        return 130
    except BrokenPipeError:  # e.g. `cli.py pairs | head`: the reader left, which is fine
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 0
    except Exception as exc:  # a library's own exception: still one line, the traceback only under --debug
        if args.debug:
            traceback.print_exc()
        damaged = damaged_store_error(exc)
        if damaged is not None:
            print(f"error: {damaged}", file=sys.stderr)
            return 2
        where = traceback.extract_tb(exc.__traceback__)[-1]
        first = (str(exc).strip().splitlines() or [""])[0][:300]
        print(f"error: {type(exc).__name__}: {first} (in {Path(where.filename).name}:{where.lineno}; rerun with "
              "--debug for the traceback, and please report it)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
