"""A full disk or a read-only directory: a one-line error, a store that is either absent or resumable,
and after space is freed the same command finishes the same store as an undisturbed run."""

from __future__ import annotations

import subprocess

import pytest

from cli import main
from store.testing import assert_stores_equal
from store.verify import verify_store


@pytest.fixture
def mounted(tmp_path):
    """A small tmpfs we can fill, remount larger or make read-only (needs root; skipped elsewhere)."""
    point = tmp_path / "fs"
    point.mkdir()

    def mount(options: str) -> None:
        done = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(point)], capture_output=True)
        if done.returncode != 0:
            pytest.skip(f"cannot mount a test file system here: {done.stderr.decode().strip()}")

    yield point, mount
    subprocess.run(["umount", "-l", str(point)], capture_output=True)


def _args(tiny_pair, store):
    return ["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--chunk-prompts", "1",
            "--batch-size", "1", "--quiet"]


@pytest.mark.root
def test_full_disk_stops_cleanly_and_resumes(tiny_pair, mounted, tmp_path, capsys):
    point, mount = mounted
    reference = tmp_path / "ref.zarr"
    assert main(_args(tiny_pair, reference)) == 0
    mount("size=1200k")  # room for the template and a few regions, not for 4.5 MB of data
    store = point / "s.zarr"
    assert main(_args(tiny_pair, store)) == 2
    err = capsys.readouterr().err
    assert err.startswith(f"error: cannot write the store at {store}: No space left on device (ENOSPC)")
    assert err.count("\n") == 1 and "rerun the same command" in err
    problems = verify_store(store)
    assert problems and all("not done" in p for p in problems), problems  # nothing half-written counts as done
    subprocess.run(["mount", "-o", "remount,size=64m", str(point)], check=True)  # space freed
    assert main(_args(tiny_pair, store)) == 0
    assert verify_store(store) == []
    assert_stores_equal(reference, store)


@pytest.mark.root
def test_read_only_directory_leaves_nothing(tiny_pair, mounted, capsys):
    point, mount = mounted
    mount("ro,size=64k")
    store = point / "s.zarr"
    assert main(_args(tiny_pair, store)) == 2
    err = capsys.readouterr().err
    assert "cannot write the store at" in err and "Read-only file system (EROFS)" in err and err.count("\n") == 1
    assert not store.exists() and not list(point.iterdir())
