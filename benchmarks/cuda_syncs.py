"""Every host sync of a capture's pass loop, listed: the loop runs under ``torch.cuda.set_sync_debug_mode("warn")``.

A sync (``.item()``, a blocking copy, a data-dependent shape) stops the host until the GPU has caught up, so it
cannot queue the next forward; the capture is meant to have none inside its pass loop (the copies to the host
wait on their own events, not on the device). The loop is that of a ``--no-lens`` capture of a random-init pair
(loading, writing and the statistics stage are outside the debug mode); each warning is attributed to the line
that caused it, counted, and written to ``--out`` as JSON. On a CPU nothing syncs: the loop runs and the list is
empty (the rehearsal of ``gpu_session.sh``).

    python benchmarks/cuda_syncs.py --device cuda --shape qwen1.5b --out syncs.json
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import sys
import tempfile
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import SHAPES, around_pass_loops, build_pair, emit_report, machine, prompt_set
from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings

ROOT = str(Path(__file__).resolve().parents[1])


@contextlib.contextmanager
def listing_syncs(found: collections.Counter, device: str):
    """Run the block under the sync debug mode (on CUDA); each sync's warning is attributed to the Python line
    that made the synchronizing call, and counted in ``found``."""
    on_cuda = device.startswith("cuda")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if on_cuda:
            torch.cuda.set_sync_debug_mode("warn")
        try:
            yield
        finally:
            if on_cuda:
                torch.cuda.set_sync_debug_mode("default")
    for message in caught:
        if "synchroniz" in str(message.message):
            where = message.filename.removeprefix(ROOT + "/")
            found.update([f"{where}:{message.lineno} ({str(message.message).splitlines()[0][:80]})"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--shape", default="toy", choices=sorted(SHAPES))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--prompts", default="64x100", choices=["dev", "64x100"])
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--out", help="write the JSON report here")
    args = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="resdiff-syncs-"))
    base, sft = build_pair(args.shape, work, dtype=args.dtype, device="cuda" if args.device.startswith("cuda")
                           else "cpu")
    found: collections.Counter = collections.Counter()
    with around_pass_loops(lambda: listing_syncs(found, args.device)):
        run_capture(CaptureSettings(base=str(base), sft=str(sft), prompts=prompt_set(args.prompts), lens=False,
                                    device=args.device, dtype=args.dtype, batch_size=args.batch_size,
                                    store=str(work / "s.zarr")), progress=False)
    report = {"machine": machine(), "device": args.device, "shape": args.shape, "prompts": args.prompts,
              "observable": args.device.startswith("cuda"),
              "syncs_in_pass_loop": [{"site": site, "count": n} for site, n in found.most_common()]}
    emit_report(report, args.out)


if __name__ == "__main__":
    main()
