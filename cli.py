"""resdiff command line: parse, call, print.

Run ``python cli.py --help`` for the commands, and ``python cli.py COMMAND --help`` for each command's
options. Each layer declares its own commands beside their handlers (``capture.commands``,
``analysis.commands``, ``store.commands``); this file adds the options every command shares, keeps old
option names working, opens the dask.distributed cluster a command asks for, and turns errors into one line.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import traceback
from pathlib import Path


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


def build_parser() -> argparse.ArgumentParser:
    from analysis.commands import add_commands as analysis_commands
    from capture.commands import add_commands as capture_commands
    from store.commands import add_commands as store_commands

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
    for add_commands in (capture_commands, analysis_commands, store_commands):
        add_commands(sub, _renamed)
    return parser


def _client(args: argparse.Namespace):
    """The cluster of ``--scheduler`` or ``--local-cluster`` (an analysis command's ``--memory-limit`` split between
    the local workers), as a context that closes it; None without either."""
    scheduler, workers = getattr(args, "scheduler", None), getattr(args, "local_cluster", None)
    limit = None
    if workers is not None and hasattr(args, "memory_limit"):
        from analysis.commands import memory_limit_of

        limit = memory_limit_of(args)
    return _cluster(scheduler, workers, limit)


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
        with set_storage_options(parse_storage_options(args.storage_options)), _client(args) as args.client:
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
