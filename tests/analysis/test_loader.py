"""The activation loader: each selected position once per epoch, values equal the store's, bounded memory."""

from __future__ import annotations

import math
import tracemalloc

import numpy as np
import pytest
import torch
import zarr

from analysis import activation_loader, open_store
from store.chunking import Chunking
from store.errors import UsageError
from store.testing import write_tiny_store

LENGTHS = (9, 7, 7, 6, 5, 4, 4, 3, 2, 2, 1)  # longest first, as a format-2 store lays them out
SINK_PROMPT, SINK_TOKEN = 3, 0  # a massive-activation position planted below


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    path = tmp_path_factory.mktemp("loader") / "s.zarr"
    write_tiny_store(path, n_prompts=len(LENGTHS), n_layers1=4, hidden=16, lengths=LENGTHS, store_dtype="float16",
                     chunking=Chunking(prompt=3, layer=2, token=4))
    resid = zarr.open_group(str(path), mode="r+")["resid"]
    resid[:, SINK_PROMPT, :, SINK_TOKEN] = resid[:, SINK_PROMPT, :, SINK_TOKEN] * 200  # one sink position
    return path


def _selected(ds, first: int | None = None, massive: bool = False) -> set[tuple[int, int]]:
    """The positions a default loader must yield, written plainly."""
    out = set()
    for row, n in enumerate(ds.n_tokens.values):
        for t in range(int(n) if first is None else min(int(n), first)):
            label = int(ds.prompt.values[row])
            if massive or (row, t) != (SINK_PROMPT, SINK_TOKEN):
                out.add((label, t))
    return out


def _epoch(loader) -> tuple[list[np.ndarray], list[tuple[int, int]]]:
    rows, where = [], []
    for batch, positions in loader:
        rows.append(batch.numpy())
        where += [tuple(p) for p in positions.tolist()]
    return rows, where


def test_every_selected_position_once_per_epoch_across_ranks_and_workers(store):
    ds = open_store(store)
    seen: list[tuple[int, int]] = []
    for rank in range(2):
        loader = activation_loader(store, layer=2, batch_size=5, rank=rank, world_size=2, with_positions=True,
                                   shuffle_buffer="2KiB")
        batches = list(torch.utils.data.DataLoader(loader, batch_size=None, num_workers=2))
        seen += [tuple(p) for _, positions in batches for p in positions.tolist()]
    assert len(seen) == len(set(seen))  # no overlap between ranks and workers
    assert set(seen) == _selected(ds)  # every real position but the sink; no padding
    assert (SINK_PROMPT, SINK_TOKEN) not in seen


def test_values_are_the_stores_in_both_layouts(store):
    ds = open_store(store)
    resid = ds.resid.astype("float32")
    loader = activation_loader(store, layer=[1, 3], passes=("BB", "SB", "SS"), batch_size=7, with_positions=True,
                               include_massive=True)
    for batch, positions in loader:
        assert batch.shape[1:] == (2, 3, 16) and batch.dtype == torch.float32
        for row, (label, token) in zip(batch.numpy(), positions.tolist(), strict=True):
            want = resid.sel(prompt=label, token=token, layer=[1, 3]).sel(pass_=["BB", "SB", "SS"])
            np.testing.assert_array_equal(row, want.transpose("layer", "pass_", "dim").values)
    diffs = activation_loader(store, layer=2, pair="BB-SS", batch_size=4, with_positions=True, include_massive=True)
    for batch, positions in diffs:
        assert batch.shape[1:] == (16,)
        for row, (label, token) in zip(batch.numpy(), positions.tolist(), strict=True):
            at = resid.sel(prompt=label, token=token, layer=2)
            np.testing.assert_array_equal(row, (at.sel(pass_="SS") - at.sel(pass_="BB")).values)


def test_one_seed_one_order_another_seed_another_and_epochs_differ(store):
    def order(seed, epoch=0):
        loader = activation_loader(store, layer=1, batch_size=4, seed=seed, with_positions=True,
                                   shuffle_buffer="2KiB")
        loader.set_epoch(epoch)
        return _epoch(loader)

    rows_a, where_a = order(0)
    rows_b, where_b = order(0)
    assert where_a == where_b and all(np.array_equal(a, b) for a, b in zip(rows_a, rows_b, strict=True))
    assert order(1)[1] != where_a and sorted(order(1)[1]) == sorted(where_a)
    assert order(0, epoch=1)[1] != where_a
    unshuffled = activation_loader(store, layer=1, batch_size=4, shuffle=False, with_positions=True)
    assert _epoch(unshuffled)[1] != where_a


def test_first_positions_and_massive_included_on_request(store):
    ds = open_store(store)
    first = activation_loader(store, layer=0, positions=2, batch_size=64, with_positions=True)
    assert set(_epoch(first)[1]) == _selected(ds, first=2)
    everything = activation_loader(store, layer=0, include_massive=True, batch_size=64, with_positions=True)
    assert set(_epoch(everything)[1]) == _selected(ds, massive=True)
    assert len(everything) == math.ceil(sum(LENGTHS) / 64) and everything.n_rows == sum(LENGTHS)


def test_normalisation_brings_each_pass_to_sqrt_dim_and_is_recorded(store):
    loader = activation_loader(store, layer=2, passes=("BB", "SS"), batch_size=16, normalize=True)
    rows = torch.cat(list(loader))
    mean_norm = rows.norm(dim=-1).mean(dim=0)
    np.testing.assert_allclose(mean_norm.numpy(), math.sqrt(16), rtol=1e-4)  # the sample is the whole selection
    again = activation_loader(store, layer=2, passes=("BB", "SS"), batch_size=16, scales=loader.scales)
    torch.testing.assert_close(torch.cat(list(again)).norm(dim=-1).mean(dim=0), mean_norm)
    assert loader.describe()["scales"] == loader.scales.tolist()


def test_memory_stays_under_the_shuffle_buffer(tmp_path):
    path = write_tiny_store(tmp_path / "big.zarr", n_prompts=64, n_layers1=2, hidden=256, lengths=(64,) * 64,
                            store_dtype="float16", chunking=Chunking(prompt=8, layer=2, token=16))
    buffer = 2 << 20
    loader = activation_loader(path, layer=1, passes=("BB", "SS"), batch_size=256, shuffle_buffer=buffer)
    unit = 8 * 2 * 16 * 256 * 4 * 2  # one unit of both passes, float32, with its read buffers
    tracemalloc.start()
    count = sum(len(b) for b in loader)
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    assert count == 64 * 64 - int(loader.describe()["excluded_massive"])
    # 7 units: the buffer, the unit being read and the chunk decodes in flight on the reader threads (CI measured
    # 6.06 units once, with the compressed bytes of a checksummed chunk alive beside its decoded copy)
    assert peak < buffer + 7 * unit, (peak, buffer)


def test_bad_requests_are_one_line_errors(store):
    for kwargs, text in [({"passes": ("BB", "XX")}, "pass 'XX' is not in this store"),
                         ({"passes": ("BB",), "pair": "BB-SS"}, "not both"),
                         ({"pair": "BBSS"}, "LEFT-RIGHT"),
                         ({"shuffle_buffer": "1KiB", "batch_size": 4096}, "fewer than one batch"),
                         ({"roles": ["user"]}, "chat template")]:
        with pytest.raises(UsageError, match=text):
            activation_loader(store, layer=1, **kwargs)
    with pytest.raises(UsageError, match="not stored"):
        activation_loader(store, layer=9)


def test_an_unfinished_capture_is_refused(tmp_path):
    path = write_tiny_store(tmp_path / "s.zarr", lengths=(5, 3, 4))
    zarr.open_group(str(path), mode="r+")["done"][3, 1] = False  # SS of one prompt not written yet
    activation_loader(path, layer=1, passes=("BB", "SB"))  # the passes asked for are complete
    with pytest.raises(UsageError, match="not complete"):
        activation_loader(path, layer=1, passes=("BB", "SS"))


def test_bfloat16_batches_and_token_kinds(store):
    ds = open_store(store)
    halves = activation_loader(store, layer=1, batch_size=64, dtype="bfloat16", include_massive=True)
    first = next(iter(halves))
    assert first.dtype == torch.bfloat16 and first.shape[1:] == (2, 16)
    texts = activation_loader(store, layer=1, batch_size=64, kinds=["text"], with_positions=True,
                              include_massive=True)
    assert set(_epoch(texts)[1]) == _selected(ds, massive=True)  # synthetic tokens are all text
    specials = activation_loader(store, layer=1, batch_size=64, kinds=["special"], include_massive=True)
    assert specials.n_rows == 0 and list(specials) == []


def test_loader_stats_command(store, capsys):
    from cli import main

    assert main(["loader-stats", str(store), "--layer", "2", "--pass-pair", "BB-SS", "--batch-size", "8"]) == 0
    out = capsys.readouterr().out
    assert f"{sum(LENGTHS) - 1} rows (differences BB-SS" in out and "1 massive-activation positions left out" in out
    assert "expected read throughput" in out
    assert main(["loader-stats", str(store), "--layer", "2", "--passes", "BB,XX"]) == 2
    assert "pass 'XX' is not in this store" in capsys.readouterr().err
