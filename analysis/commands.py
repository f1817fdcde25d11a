"""The analysis commands, each declared beside its handler: ``report``, ``decompose``, ``plot``, ``factorial``,
``diff-lens``, ``loader-stats`` and ``crossing``.

``cli.py`` calls :func:`add_commands` with its sub-parsers and runs a handler with ``args.client`` set (the
dask.distributed client of ``--scheduler`` or ``--local-cluster``, or None). Every handler opens its store
through :func:`open_for_analysis` (what is missing is said first, in one line each) and computes inside
:func:`compute_context` (``--memory-limit``); the text it prints is assembled by the analysis modules.
"""

from __future__ import annotations

import argparse
import contextlib
import sys

from store.errors import UsageError


def add_commands(sub, renamed) -> None:
    """Declare this layer's commands on ``sub`` (``renamed(parser, action, old, why)`` keeps an old option name
    working)."""
    for declare in (_declare_report, _declare_decompose, _declare_plot, _declare_factorial, _declare_diff_lens,
                    _declare_loader_stats, _declare_crossing):
        declare(sub, renamed)


def memory_limit_of(args: argparse.Namespace) -> int:
    """The bytes of ``--memory-limit``, or the default share of this machine's memory."""
    from analysis.compute.context import default_memory_limit, parse_memory

    return parse_memory(args.memory_limit) if args.memory_limit else default_memory_limit()


@contextlib.contextmanager
def compute_context(args: argparse.Namespace, ds):
    """Compute on ``args.client``'s cluster, or on local threads under ``--memory-limit``."""
    from analysis.compute.context import compute_on, tile_bytes

    with compute_on(getattr(args, "client", None), memory_limit_of(args), tile_bytes(ds)) as where:
        yield where


def open_for_analysis(store: str, reads_lens: bool = True):
    """The store as analysis may read it (``store.completeness.usable``); the lines on what is left out printed
    first, so that nothing below them is read as covering it."""
    from store.completeness import usable
    from store.reader import open_store

    ds, notes = usable(open_store(store), reads_lens=reads_lens)
    for note in notes:
        print(f"note: {note}")
    return ds


def _pass_pair_arg(p, renamed, help_text: str, repeat: bool = True) -> None:
    """``--pass-pair LEFT-RIGHT``, the one name of a pair of passes (``--pair`` names a model pair)."""
    action = p.add_argument("--pass-pair", dest="pass_pair", action="append" if repeat else "store",
                            metavar="LEFT-RIGHT", help=help_text)
    renamed(p, action, "--pair", "--pair names a model pair, in capture")


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


def _declare_report(sub, renamed) -> None:
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
                   "norm_delta_left/right, entropy_left/right, kl, target_logprob_left/right, logprob_diff "
                   "(log-prob of the next token, right - left). Runs: norm, norm_delta, cosine_prev, entropy, "
                   "target_logprob")
    p.add_argument("--axis", choices=["layer", "token"], default="layer", help="summaries per layer or per token")
    p.add_argument("--record-type", choices=["pairwise", "runs"], default="pairwise", help="pairs or single passes")
    p.add_argument("--top-n", type=int, default=5,
                   help="hotspots and tracked changes listed (largest |value|), grid preview rows and columns")
    p.add_argument("--lens", choices=["raw", "norm"], default="norm",
                   help="lens of entropy, KL and logits: norm (default; final norm, then unembedding: the standard "
                   "logit lens) or raw (unembedding alone)")
    _pass_pair_arg(p, renamed, "only these pairs of passes (repeatable)")
    p.add_argument("--pass", dest="pass_", action="append", help="only these passes with --record-type runs")
    p.add_argument("--token-id", type=int, action="append",
                   help="token id (repeatable): restricts tracked changes and previews its logit grid and top-k "
                   "membership")
    p.add_argument("--logit-source", choices=["left", "right", "diff"], default="diff",
                   help="grid previewed with --token-id: the left or right pass's logit, or diff = right - left "
                   "(the legacy base|sft|diff with diff = base - sft is not copied)")
    renamed(p, p.add_argument("--prompt-index", dest="prompt", type=int, default=0, metavar="N",
                               help="prompt (its index) of the --token-id previews (default 0)"),
             "--prompt", "--prompt is a prompt's text, in capture")
    p.add_argument("--export", metavar="OUT.csv|OUT.json|OUT.parquet", help="write the hotspot and tracked-change rows")
    _massive_args(p, "summaries and hotspots")
    _scale_args(p)
    p.add_argument("--quiet", action="store_true", help="do not say where the computation runs")
    p.set_defaults(func=_cmd_report)


def _cmd_report(args: argparse.Namespace) -> int:
    from analysis.report.export_rows import check_export_path, export_rows
    from analysis.report.text import build_report

    if args.export:
        check_export_path(args.export)  # before any work
    ds = open_for_analysis(args.store)
    with compute_context(args, ds) as where:
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


def _declare_decompose(sub, renamed) -> None:
    p = sub.add_parser(
        "decompose", help="spectra, effective ranks, principal angles, CP and Tucker of the pairwise differences",
        description="Per pair and layer: the spectrum of the difference vectors h_right - h_left over all real "
        "positions (uncentred), participation ratio, rank to 90/99% of variance, top-k directions and principal "
        "angles between pairs' top-k subspaces; CP and Tucker of the pair x layer x dim tensor of mean "
        "differences. Written to a sibling store named by the settings; the same settings reuse it.",
    )
    p.add_argument("store", help="a store from `capture` (needs resid)")
    _pass_pair_arg(p, renamed, "only these pairs of passes (repeatable; default all)")
    renamed(p, p.add_argument("--components", dest="top_k", type=int, default=8, metavar="K",
                               help="principal directions kept and compared (default 8)"),
             "--top-k", "--top-k is the lens's top-k logits, in capture")
    p.add_argument("--cp-rank", type=int, help="CP rank (default: smallest <= 8 with relative error <= 5%%)")
    p.add_argument("--tucker-ranks", metavar="P,L,D", help="Tucker ranks (default: 99%% energy per mode)")
    p.add_argument("--out", help="output store (default: STORE's sibling NAME.decomp-<settings hash>.zarr; "
                   "for a store at a URL, under outputs/)")
    renamed(p, p.add_argument("--overwrite", dest="force", action="store_true",
                               help="recompute and replace an existing output"), "--force", "as capture says it")
    _massive_args(p, "the spectra", factor=False)
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _scale_args(p)
    p.set_defaults(func=_cmd_decompose)


def _cmd_decompose(args: argparse.Namespace) -> int:
    import xarray as xr

    from analysis.geometry.decompose import decompose_store, summary_lines

    ds = open_for_analysis(args.store, reads_lens=False)
    with compute_context(args, ds):
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


def _declare_plot(sub, renamed) -> None:
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
    renamed(p, p.add_argument("--prompt-index", dest="prompt", type=int, default=0, metavar="N",
                               help="prompt (its index) of the heatmaps (default 0)"),
             "--prompt", "--prompt is a prompt's text, in capture")
    p.add_argument("--lens", choices=["raw", "norm"], default="norm", help="lens of KL (default norm, as everywhere)")
    renamed(p, p.add_argument("--components", dest="top_k", type=int, default=8, metavar="K",
                               help="principal directions of the decomposition (default 8)"),
             "--top-k", "--top-k is the lens's top-k logits, in capture")
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    _massive_args(p, "colour scales, spectra and the opening tables", factor=False)
    _scale_args(p)
    p.set_defaults(func=_cmd_plot)


def _cmd_plot(args: argparse.Namespace) -> int:
    from analysis.report.page import PlotRequest, write_plots

    ds = open_for_analysis(args.store)
    request = PlotRequest(store=args.store, out=args.out, metric=args.metric, pass_metric=args.pass_metric,
                          prompt=args.prompt, lens=args.lens, top_k=args.top_k, include_massive=args.include_massive,
                          html=args.html, progress=not args.quiet)
    for path in write_plots(ds, request, lambda: compute_context(args, ds)):
        print(f"Wrote {path}")
    return 0


def _declare_crossing(sub, renamed) -> None:
    p = sub.add_parser(
        "crossing", help="where in depth the change enters: the crossed passes' profile over split layers",
        description="For a store captured with --cross-layers: per split L and direction, at the last layer, the "
        "KL of the pass the crossing should reproduce from the crossed pass (KL(SS || B>S@L), KL(BB || S>B@L), "
        "norm lens), its share of KL(SS || BB), and the share of sum |h_SS - h_BB|^2 left between them, with 95% "
        "bootstrap intervals over prompts.",
    )
    p.add_argument("store", help="a store from `capture --cross-layers SPEC`")
    _bootstrap_args(p)
    _export_arg(p, "the profile's rows (one per split and direction, per split, per split and tracked token)")
    _massive_args(p, "the sums")
    _scale_args(p)
    p.set_defaults(func=_cmd_crossing)


def _cmd_crossing(args: argparse.Namespace) -> int:
    from analysis.geometry.outliers import describe_massive
    from analysis.readouts.crossing import crossing_profile
    from analysis.report.readout_text import crossing_lines

    _check_readout_args(args)
    ds = open_for_analysis(args.store)
    found, profile = _with_massive(args, ds, lambda keep: crossing_profile(ds, keep, resamples=args.resamples,
                                                                          seed=args.seed))
    print("\n".join([*describe_massive(ds, found, args.include_massive), *crossing_lines(profile)]))
    _export_readout(args, profile)
    return 0


def _bootstrap_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--resamples", type=int, default=1000,
                   help="bootstrap resamples of the prompts behind the 95%% intervals (default 1000)")
    p.add_argument("--seed", type=int, default=0, help="seed of the resampling (default 0)")


def _export_arg(p: argparse.ArgumentParser, what: str) -> None:
    p.add_argument("--export", metavar="OUT.csv|OUT.json|OUT.parquet",
                   help=f"also write {what}, with their 95%% intervals")


def _check_readout_args(args: argparse.Namespace) -> None:
    """The bootstrap and export options, refused in one line before any work."""
    from analysis.report.export_rows import check_export_path

    if args.resamples < 10:
        raise UsageError(f"--resamples must be at least 10, got {args.resamples}")
    if args.export:
        check_export_path(args.export)


def _export_readout(args: argparse.Namespace, result, table_of=None) -> None:
    from analysis.report.export_rows import export_rows
    from analysis.report.tables import dataset_rows

    if args.export:
        rows = dataset_rows(result, table_of)
        print(f"Exported {len(rows)} rows to {export_rows(rows, args.export)}")


def _with_massive(args: argparse.Namespace, ds, readout):
    """(massive positions, ``readout(keep)``) in one computation under the command's memory limit: ``keep`` leaves
    the massive positions out unless ``--include-massive``, and both come from the same read of the residuals."""
    import dask

    from analysis.geometry.outliers import massive_positions

    with compute_context(args, ds):  # graphs built here follow the memory limit
        found = massive_positions(ds, args.massive_factor)
        return dask.compute(found, readout(None if args.include_massive else ~found.massive))


def _declare_factorial(sub, renamed) -> None:
    p = sub.add_parser(
        "factorial", help="the 2x2 factorial: how much of h_SS - h_BB is the embeddings, the body, or both",
        description="Per layer over real positions: the embedding main effect E = ((SB-BB) + (SS-BS))/2, the body "
        "main effect B = ((BS-BB) + (SS-SB))/2 (D = SS - BB = E + B) and the interaction I = SS - SB - BS + BB, as "
        "shares of sum |D|^2, each with its 95% bootstrap interval over prompts (resampled from per-prompt sums). "
        "Needs the four standard passes.",
    )
    p.add_argument("store", help="a store from `capture` with the passes BB, BS, SB, SS")
    p.add_argument("--by", help="also split by kind (special and chat-template tokens against the rest) or by a "
                   "per-token coordinate, e.g. role (chat prompts)")
    _bootstrap_args(p)
    _export_arg(p, "the shares per layer (and group)")
    _massive_args(p, "the sums")
    _scale_args(p)
    p.set_defaults(func=_cmd_factorial)


def _cmd_factorial(args: argparse.Namespace) -> int:
    from analysis.geometry.outliers import describe_massive
    from analysis.readouts.factorial import factorial_shares
    from analysis.report.readout_text import factorial_lines

    _check_readout_args(args)
    ds = open_for_analysis(args.store, reads_lens=False)
    by = args.by
    if by == "kind":  # special and chat-template tokens against the rest
        from analysis.readouts.tokens import token_kinds

        by = token_kinds(ds)
    found, shares = _with_massive(args, ds, lambda keep: factorial_shares(ds, where=keep, by=by,
                                                                          resamples=args.resamples, seed=args.seed))
    print("\n".join([*describe_massive(ds, found, args.include_massive), *factorial_lines(shares, args.by)]))
    _export_readout(args, shares)
    return 0


def _declare_diff_lens(sub, renamed) -> None:
    p = sub.add_parser(
        "diff-lens", help="the tokens each pair's mean difference promotes and suppresses, per layer",
        description="The mean difference h_right - h_left over the first K real positions of each prompt (the "
        "Activation Difference Lens setting) and over all real positions, read through each side's normed lens "
        "(final norm, unembedding): the top promoted and suppressed tokens as text. The lens is the store's saved "
        "lens (--save-lens) or the models' safetensors checkpoints.",
    )
    p.add_argument("store", help="a store from `capture`")
    _pass_pair_arg(p, renamed, "only these pairs of passes (repeatable)")
    p.add_argument("--layer", type=int, action="append", help="only these layers (repeatable; default all)")
    p.add_argument("--k", type=int, default=5, help="first real positions of each prompt averaged (default 5)")
    p.add_argument("--top", type=int, default=10, help="tokens listed each way (default 10)")
    _massive_args(p, "the means", factor=False)
    _scale_args(p)
    p.set_defaults(func=_cmd_diff_lens)


def _cmd_diff_lens(args: argparse.Namespace) -> int:
    from analysis.readouts.difflens import diff_lens
    from analysis.report.readout_text import diff_lens_lines

    ds = open_for_analysis(args.store, reads_lens=False)
    with compute_context(args, ds):
        result = diff_lens(ds, k=args.k, top=args.top, include_massive=args.include_massive, pairs=args.pass_pair,
                           layers=args.layer)
    print("\n".join(diff_lens_lines(ds, result, args.k, args.include_massive)))
    return 0


def _declare_loader_stats(sub, renamed) -> None:
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
    _pass_pair_arg(p, renamed, "differences h_right - h_left instead of --passes, e.g. BB-SS", repeat=False)
    p.add_argument("--positions", default="all", help="all (default) or N: the first N real positions of each prompt")
    p.add_argument("--kind", action="append", choices=["special", "text"], help="only these token kinds")
    p.add_argument("--role", action="append", help="only tokens of these chat roles (stores with a chat template)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per batch (default 4096)")
    p.add_argument("--shuffle-buffer", default="512MiB", help="memory of the shuffle buffer (default 512MiB)")
    p.add_argument("--normalize", action="store_true", help="compute the per-pass normalisation factors too")
    p.add_argument("--world-size", type=int, default=1, help="processes the epoch is split across (default 1)")
    _massive_args(p, "the rows")
    p.set_defaults(func=_cmd_loader_stats)


def _cmd_loader_stats(args: argparse.Namespace) -> int:
    from analysis.loader.activations import activation_loader
    from analysis.loader.stats import loader_stats
    from analysis.report.readout_text import loader_stats_lines

    open_for_analysis(args.store, reads_lens=False)  # refuses unfinished residuals in one line
    passes = args.passes.split(",") if args.passes else None
    positions = "all" if args.positions == "all" else int(args.positions)
    loader = activation_loader(args.store, layer=args.layer if len(args.layer) > 1 else args.layer[0], passes=passes,
                               pair=args.pass_pair, batch_size=args.batch_size, shuffle_buffer=args.shuffle_buffer,
                               positions=positions, include_massive=args.include_massive,
                               massive_factor=args.massive_factor, kinds=args.kind, roles=args.role,
                               normalize=args.normalize, world_size=args.world_size)
    stats = loader_stats(loader)
    print("\n".join(loader_stats_lines(args.store, stats, args.pass_pair, args.batch_size, args.world_size)))
    return 0
