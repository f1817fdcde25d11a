"""The store's commands, each declared beside its handler: ``export-json``, ``export-netcdf``, ``import-json``,
``verify`` and ``info``.

``cli.py`` calls :func:`add_commands` with its sub-parsers; a handler parses nothing and returns the exit
status. Imports are deferred to the handlers, so building the parser loads no heavy library.
"""

from __future__ import annotations

import argparse


def add_commands(sub, renamed) -> None:
    """Declare this layer's commands on ``sub`` (``renamed(parser, action, old, why)`` keeps an old option name
    working)."""
    for declare in (_declare_export_json, _declare_export_netcdf, _declare_import_json, _declare_verify,
                    _declare_info):
        declare(sub, renamed)


def _declare_export_json(sub, renamed) -> None:
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


def _cmd_export_json(args: argparse.Namespace) -> int:
    from store.conversions.export_json import export_json

    path = export_json(args.store, args.out, lens=args.lens)
    print(f"Wrote comparison JSON to: {path}")
    return 0


def _declare_export_netcdf(sub, renamed) -> None:
    p = sub.add_parser(
        "export-netcdf", help="write a selection of a store as float32 netCDF4",
        description="Write a selection of a store to a netCDF4 file (float32; netCDF4 has no float16).",
    )
    p.add_argument("store", help="path of a store written by `capture`")
    p.add_argument("out", help="the .nc file to write")
    p.add_argument("--sel", action="append", metavar="DIM=VALUE", help="select one label, e.g. pass_=SS (repeatable)")
    p.add_argument("--vars", nargs="+", metavar="VAR", help="variables to write (default: all)")
    p.set_defaults(func=_cmd_export_netcdf)


def _cmd_export_netcdf(args: argparse.Namespace) -> int:
    from store.conversions.export_netcdf import export_netcdf

    path = export_netcdf(args.store, args.out, args.sel, args.vars, log=lambda line: print(f"note: {line}"))
    print(f"Wrote netCDF to: {path}")
    return 0


def _declare_import_json(sub, renamed) -> None:
    p = sub.add_parser(
        "import-json", help="convert a legacy JSON file (format 1 or 2) into a statistics-only store",
        description="Read a legacy results file streaming (twice: shapes, then values) and write its statistics "
        "as a store without residuals. Legacy layer key k becomes layer k + 1.",
    )
    p.add_argument("file", help="a residual_compare_*.json or multi_pass_*.json file")
    p.add_argument("--store", help="store path (default: the file's path with .zarr)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store")
    p.set_defaults(func=_cmd_import_json)


def _cmd_import_json(args: argparse.Namespace) -> int:
    from store.conversions.import_json import import_json
    from store.reader import describe_store

    path = import_json(args.file, args.store, overwrite=bool(args.overwrite))
    print(describe_store(path))
    return 0


def _declare_verify(sub, renamed) -> None:
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


def _declare_info(sub, renamed) -> None:
    p = sub.add_parser("info", help="summarise a store: dims, passes, models, completeness",
                       description="Print a short summary of a store without reading its data: format, dimensions, "
                       "models, passes, prompts and their token counts, which regions and lens statistics are done, "
                       "chunking and stored bytes.")
    p.add_argument("store", help="path of a store written by `capture`")
    p.set_defaults(func=_cmd_info)


def _cmd_info(args: argparse.Namespace) -> int:
    from store.reader import describe_store

    print(describe_store(args.store))
    return 0
