"""Where reports compute: bounded local threads, a real LocalCluster on loopback, BLAS pinning."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import dask
import pytest
from distributed import LocalCluster

from analysis.compute.context import compute_on, parse_memory, threads_for, tile_bytes
from cli import main
from store.errors import UsageError
from store.reader import open_store

REPORT = ["--metric", "norm_diff", "--metric", "kl", "--metric", "cosine_prev_left", "--top-n", "3",
          "--token-id", "7", "--quiet"]


@pytest.fixture(scope="module")
def store_path(capture_store):
    return capture_store("gpt2", store_dtype="float16", track=["7"])


def test_memory_sizes_and_threads():
    assert parse_memory("1GB") == 10**9 and parse_memory("512MiB") == 512 * 2**20
    with pytest.raises(UsageError, match=r"--memory-limit .lots. is not a size; write e\.g\. 24GB"):
        parse_memory("lots")
    assert threads_for(10**9, 100 * 10**6, cores=8) == (3, False)  # (4 + 2 x 3) x 100 MB <= 1 GB
    assert threads_for(10**9, 10**6, cores=2) == (2, False)
    assert threads_for(5 * 10**8, 100 * 10**6, cores=8) == (2, True)  # (1 + 2 x 2) x 100 MB; roomy: none
    assert threads_for(5 * 10**8, 66 * 10**6, cores=2) == (2, True)  # roomy would give 1 thread
    with pytest.raises(UsageError, match=r"below what one task of this store needs .* raise it to at least"):
        threads_for(10**6, 10**6)
    # One heap for all threads: (3 + 2 x threads) tiles, never the page-faulting tight mode.
    assert threads_for(5 * 10**8, 66 * 10**6, cores=2, one_heap=True) == (2, False)  # 7 tiles
    assert threads_for(5 * 10**8, 100 * 10**6, cores=8, one_heap=True) == (1, False)  # 5 tiles
    with pytest.raises(UsageError, match=r"about 477 MiB: 5 x a 95.4 MiB tile"):
        threads_for(4 * 10**8, 100 * 10**6, one_heap=True)


def test_one_heap_is_set_only_before_other_threads_start():
    code = ("import threading, json; from analysis.compute.context import share_one_heap as one; first = one(); "
            "import analysis.compute.context as c; c._ONE_HEAP = False; "
            "t = threading.Thread(target=threading.Event().wait, args=(5,), daemon=True); t.start(); "
            "print(json.dumps([first, one()]))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    assert json.loads(out.stdout) == [True, False]


def test_memory_limit_sets_local_threads(store_path):
    ds = open_store(store_path)
    tile = tile_bytes(ds)
    chunk = ds.resid.data.chunksize  # (pass_, prompt, layer, token, dim): a tile holds one chunk of each pass
    assert tile == ds.resid.sizes["pass_"] * chunk[1] * chunk[2] * chunk[3] * ds.sizes["dim"] * 2
    with compute_on(memory_limit=3 * tile, tile=tile) as where:
        assert dask.config.get("num_workers") == 1 and "local threads (1" in where


def test_blas_is_pinned_to_one_thread():
    code = ("import numpy, json; from threadpoolctl import threadpool_info as i; "
            "b = [p['num_threads'] for p in i()]; "
            "from analysis.compute.scheduler import pin_blas_threads as pin; pin(); "
            "print(json.dumps([b, [p['num_threads'] for p in i()]]))")
    env = {k: v for k, v in os.environ.items() if not k.endswith("_NUM_THREADS")}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True,
                         cwd=os.path.dirname(os.path.dirname(os.path.dirname(__file__))))
    before, after = json.loads(out.stdout)
    assert after and all(n == 1 for n in after)
    assert (os.cpu_count() or 1) == 1 or max(before) > 1  # the pin changed something


def test_report_on_a_local_cluster_matches_threads(store_path, capsys):
    assert main(["report", str(store_path), *REPORT]) == 0
    threaded = capsys.readouterr().out
    assert main(["report", str(store_path), *REPORT, "--local-cluster", "2", "--memory-limit", "2GB"]) == 0
    assert capsys.readouterr().out == threaded
    assert "logit grid preview" in threaded and "norm_diff across prompts" in threaded


def test_report_on_an_existing_scheduler_with_pinned_workers(store_path, capsys):
    assert main(["report", str(store_path), *REPORT]) == 0
    threaded = capsys.readouterr().out
    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert main(["report", str(store_path), *REPORT, "--scheduler", cluster.scheduler_address]) == 0
        assert capsys.readouterr().out == threaded
        from distributed import Client, get_client
        from threadpoolctl import threadpool_info

        with Client(cluster) as client, compute_on(client):
            threads = get_client().run(lambda: [p["num_threads"] for p in threadpool_info()])
    assert len(threads) == 2 and all(n == 1 for per_worker in threads.values() for n in per_worker)


def test_unreachable_scheduler_is_a_one_line_error(store_path, capsys):
    assert main(["report", str(store_path), "--scheduler", "tcp://127.0.0.1:9", "--quiet"]) == 2
    assert "could not reach the Dask scheduler at tcp://127.0.0.1:9" in capsys.readouterr().err


def test_analysis_commands_have_a_default_memory_limit(monkeypatch, capsys):
    """Without --memory-limit a command is bounded by a quarter of the machine's memory, as its help says."""
    import contextlib

    import psutil

    import cli
    from analysis.compute.context import default_memory_limit

    assert default_memory_limit() == int(psutil.virtual_memory().total * 0.25)
    seen = {}

    def fake_compute_on(client, memory_limit, tile):
        seen["limit"] = memory_limit
        return contextlib.nullcontext("here")

    monkeypatch.setattr("analysis.compute.context.compute_on", fake_compute_on)
    monkeypatch.setattr("analysis.compute.context.tile_bytes", lambda ds: 1)
    from analysis.commands import compute_context

    with compute_context(cli.build_parser().parse_args(["report", "x.zarr"]), None):
        pass
    assert seen["limit"] == default_memory_limit()
    with pytest.raises(SystemExit):
        cli.main(["report", "--help"])
    assert "default: a quarter of this machine's memory" in " ".join(capsys.readouterr().out.split())
