"""One writer per store: a second capture, overwrite or import is refused while one runs, and touches nothing."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest

from cli import main
from store.errors import StoreLocked
from store.lock import lock_path, store_lock
from store.testing import write_tiny_store
from store.verify import verify_store

ROOT = Path(__file__).resolve().parents[2]
HOLD = ("import sys, time\nfrom store.lock import store_lock\nwith store_lock(sys.argv[1]):\n"
        "    print('held', flush=True)\n    time.sleep(120)\n")


@pytest.fixture
def holder(tmp_path):
    """Start a process that holds the lock of ``tmp_path / 's.zarr'``; yield it (killed at the end)."""
    store = tmp_path / "s.zarr"
    proc = subprocess.Popen([sys.executable, "-c", HOLD, str(store)], cwd=ROOT, stdout=subprocess.PIPE, text=True)
    assert proc.stdout.readline().strip() == "held"
    yield proc
    proc.kill()
    proc.wait()


def _capture_args(tiny_pair, store, *extra) -> list[str]:
    return ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet", "--prompt", "The cat sat.",
            "--prompt", "Why is the sky blue?", *extra]


def test_a_second_writer_is_refused_naming_the_first_then_takes_over_when_it_dies(holder, tmp_path):
    store = tmp_path / "s.zarr"
    with pytest.raises(StoreLocked, match=f"being written by process {holder.pid} on ") as caught:
        with store_lock(store):
            pass
    assert isinstance(caught.value, BlockingIOError)
    holder.send_signal(signal.SIGKILL)  # dies holding it: the OS releases the lock, the file stays
    holder.wait()
    assert lock_path(store).exists()
    with store_lock(store):
        assert str(os.getpid()) in lock_path(store).read_text()


def test_overwrite_during_a_capture_is_refused_and_touches_nothing(holder, tmp_path, tiny_pair, capsys):
    store = write_tiny_store(tmp_path / "s.zarr", lengths=(5, 3, 4))
    before = sorted(p.relative_to(store) for p in store.rglob("*"))
    assert main(_capture_args(tiny_pair, store, "--overwrite")) == 2
    err = capsys.readouterr().err
    assert f"being written by process {holder.pid}" in err and err.count("\n") == 1
    assert sorted(p.relative_to(store) for p in store.rglob("*")) == before
    assert verify_store(store) == []


def test_import_during_a_capture_is_refused(holder, tmp_path, capsys):
    from store.testing import fill_lens_statistics

    source = fill_lens_statistics(write_tiny_store(tmp_path / "src.zarr", lengths=(5, 3, 4)))
    assert main(["export-json", str(source), "--out", str(tmp_path / "json")]) == 0
    legacy = next(p for p in (tmp_path / "json").rglob("*.json") if not p.name.endswith(".meta.json"))
    assert main(["import-json", str(legacy), "--store", str(tmp_path / "s.zarr")]) == 2
    assert "being written by" in capsys.readouterr().err


@pytest.mark.parametrize("kind", ["file", "folder", "zarr"])
def test_overwrite_removes_only_a_resdiff_store(tmp_path, tiny_pair, kind, capsys):
    target = tmp_path / "precious"
    if kind == "file":
        target.write_text("my notes")
    elif kind == "folder":
        target.mkdir()
        (target / "a.txt").write_text("x")
    else:
        import zarr

        zarr.open_group(str(target), mode="w").attrs["mine"] = True
    assert main(_capture_args(tiny_pair, target, "--overwrite")) == 2
    assert "so it was not removed" in capsys.readouterr().err
    assert target.exists() and (kind != "file" or target.read_text() == "my notes")


def test_leftover_staging_of_a_killed_run_is_removed_by_the_next(tmp_path, tiny_pair):
    store = tmp_path / "s.zarr"
    leftovers = [tmp_path / "s.zarr.creating", tmp_path / ".s.zarr.0123abcd.creating"]
    for leftover in leftovers:
        leftover.mkdir()
        (leftover / "zarr.json").write_text("{}")
    assert main(_capture_args(tiny_pair, store, "--no-lens")) == 0
    assert not any(p.exists() for p in leftovers) and verify_store(store) == []


@pytest.mark.slow
def test_two_captures_at_once_one_runs_one_is_refused(tmp_path, tiny_pair):
    store = tmp_path / "s.zarr"
    args = [sys.executable, str(ROOT / "cli.py"), *_capture_args(tiny_pair, store, "--overwrite")]
    runs = [subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(run.wait(timeout=300), run.stderr.read()) for run in runs]
    codes = sorted(code for code, _ in results)
    assert codes == [0, 2], results
    assert all("being written by" in err for code, err in results if code == 2)
    assert verify_store(store) == []
    assert not list(tmp_path.glob("*.creating")) and not list(tmp_path.glob(".*.creating"))


def test_object_stores_are_guarded_by_a_marker_while_written():
    import fsspec

    url = "memory://locks/s.zarr"
    fs = fsspec.filesystem("memory")
    with store_lock(url):
        assert "pid" in fs.cat_file("/locks/s.zarr.lock").decode()
    assert not fs.exists("/locks/s.zarr.lock")  # removed when the writer finishes
    fs.pipe_file("/locks/s.zarr.lock", b'{"pid": 1, "host": "elsewhere", "since": "then", "command": "capture"}')
    with pytest.raises(StoreLocked, match=r"process 1 on elsewhere .* if none is running .* delete the marker"):
        with store_lock(url):
            pass
    fs.rm("/locks/s.zarr.lock")
