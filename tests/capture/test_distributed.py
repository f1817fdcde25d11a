"""Distributed capture on a real dask.distributed cluster of worker processes on loopback."""

from __future__ import annotations

import numpy as np
import pytest
import zarr

from capture.pipeline.job import run_capture
from capture.settings import CaptureSettings
from store.testing import assert_stores_equal
from store.verify import verify_store
from tests.helpers import PROMPTS

pytestmark = pytest.mark.slow

IGNORED = ("created_at", "completed_at", "capture_settings")


def _settings(tiny_pair, store, **extra) -> CaptureSettings:
    base, sft, _ = tiny_pair
    return CaptureSettings(base=base, sft=sft, prompts=PROMPTS * 3, store=str(store), device="cpu", batch_size=2,
                           chunk_prompts=2, store_dtype="float32", top_k=3,
                           shard_size="1", **extra)  # shard rows of one chunk: several rows (tasks) to share out


@pytest.fixture(scope="module")
def client():
    """Two worker processes on loopback, as ``--local-cluster 2`` starts them."""
    from distributed import Client, LocalCluster

    with LocalCluster(n_workers=2, threads_per_worker=1, processes=True, dashboard_address=None) as cluster, \
            Client(cluster) as client:
        yield client


@pytest.fixture(scope="module")
def reference(tiny_pair, tmp_path_factory):
    store = tmp_path_factory.mktemp("single") / "s.zarr"
    run_capture(_settings(tiny_pair, store), log=lambda *a: None, progress=False)
    return store


def test_local_cluster_capture_equals_single_process(tiny_pair, reference, client, tmp_path):
    store = tmp_path / "s.zarr"
    messages = []
    run_capture(_settings(tiny_pair, store), log=messages.append, progress=False, client=client)
    assert any("(2 workers)" in m for m in messages), messages
    # 6 shard rows x 2 LLMs = 12 tasks; each worker loads each model at most once.
    assert "cluster capture done: 12 tasks" in messages[-1]
    assert int(messages[-1].split(", ")[1].split()[0]) <= 4, messages[-1]
    assert_stores_equal(store, reference, ignore_attrs=IGNORED)
    assert verify_store(store) == []
    heads = zarr.open_group(str(store), mode="r").attrs["lens_heads"]  # reported by the workers
    assert set(heads) == {"base", "sft"} and heads == zarr.open_group(str(reference), mode="r").attrs["lens_heads"]


def test_cluster_capture_resumes_an_interrupted_store(tiny_pair, reference, client, tmp_path):
    store = tmp_path / "s.zarr"
    run_capture(_settings(tiny_pair, store), log=lambda *a: None, progress=False, client=client)
    # Simulate a capture killed midway: some regions lost with their flags, statistics not done.
    root = zarr.open_group(str(store), mode="r+")
    root["resid"][1, 2:6] = np.nan
    root["done"][1, 2:6] = False
    root["resid"][3, 8:] = np.nan
    root["done"][3, 8:] = False
    root["lens_done"][:] = False
    run_capture(_settings(tiny_pair, store), log=lambda *a: None, progress=False, client=client)
    assert_stores_equal(store, reference, ignore_attrs=IGNORED)


def test_existing_scheduler_is_used_from_the_command_line(tiny_pair, reference, tmp_path, capsys):
    """``capture --scheduler ADDRESS``: the CLI connects (it owns the connection) and the capture runs there."""
    from distributed import LocalCluster

    from cli import main

    base, sft, _ = tiny_pair
    store = tmp_path / "s.zarr"
    prompts = [arg for text in PROMPTS * 3 for arg in ("--prompt", text)]
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=True, dashboard_address=None) as cluster:
        assert main(["capture", "--base", str(base), "--sft", str(sft), *prompts, "--store", str(store), "--device",
                     "cpu", "--batch-size", "2", "--chunk-prompts", "2", "--store-dtype", "float32", "--top-k", "3",
                     "--shard-size", "1", "--scheduler", cluster.scheduler_address, "--quiet"]) == 0
    assert_stores_equal(store, reference, ignore_attrs=IGNORED)


def test_scheduler_and_local_cluster_together_are_refused(tiny_pair, tmp_path, capsys):
    from cli import main

    base, sft, _ = tiny_pair
    assert main(["capture", "--base", str(base), "--sft", str(sft), "--store", str(tmp_path / "s.zarr"),
                 "--scheduler", "tcp://127.0.0.1:9", "--local-cluster", "2", "--quiet"]) == 2
    assert "give either --scheduler or --local-cluster, not both" in capsys.readouterr().err
