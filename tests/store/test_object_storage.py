"""Stores at fsspec URLs: a real S3-compatible server (moto's server mode) on loopback, and ``memory://``."""

from __future__ import annotations

import json
import socket

import pytest

from cli import main
from store.location import current_storage_options, set_storage_options
from store.reader import open_store
from store.testing import assert_stores_equal

pytestmark = pytest.mark.slow

# chunking: a local store is sharded (format 4) and an object store is not, so their chunking attributes differ
# by design (its ``shard``); the values, labels and every other attribute must match
IGNORED = ("created_at", "completed_at", "capture_settings", "chunking")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def s3_options():
    """Start moto's S3 server on a free loopback port and make a bucket; yield the storage options."""
    moto_server = pytest.importorskip("moto.server")
    pytest.importorskip("s3fs")
    port = _free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    options = {"endpoint_url": f"http://127.0.0.1:{port}", "key": "testing", "secret": "testing",
               "client_kwargs": {"region_name": "us-east-1"}}
    boto3 = pytest.importorskip("boto3")
    boto3.client("s3", endpoint_url=options["endpoint_url"], aws_access_key_id="testing",
                 aws_secret_access_key="testing", region_name="us-east-1").create_bucket(Bucket="resdiff")
    yield options
    server.stop()


@pytest.fixture(autouse=True)
def _clean_storage_options():
    yield
    set_storage_options({})


def _option_args(options: dict) -> list[str]:
    flat = {"endpoint_url": options["endpoint_url"], "key": options["key"], "secret": options["secret"],
            "client_kwargs.region_name": options["client_kwargs"]["region_name"]}
    return [a for k, v in flat.items() for a in ("--storage-option", f"{k}={v}")]


def _capture_args(tiny_pair, store) -> list[str]:
    return ["capture", "--pair", "tiny", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet",
            "--prompt", "The cat sat.", "--prompt", "Why is the sky blue?", "--store-dtype", "float32"]


def test_capture_report_export_on_s3(tiny_pair, s3_options, tmp_path, capsys):
    url = "s3://resdiff/runs/tiny.zarr"
    storage = _option_args(s3_options)
    local = tmp_path / "local.zarr"
    assert main(_capture_args(tiny_pair, local)) == 0
    assert main([*storage, *_capture_args(tiny_pair, url)]) == 0
    assert f"store      {url}" in capsys.readouterr().out
    set_storage_options({})  # the explicit argument alone must reach the server
    assert_stores_equal(open_store(url, storage_options=s3_options), local, ignore_attrs=IGNORED)
    assert open_store(local).attrs["chunking"]["shard"]  # sharded on a local disk, not on an object store
    assert "shard" not in open_store(url, storage_options=s3_options).attrs["chunking"]
    assert main([*storage, "verify", url]) == 0
    assert main(["verify", f"file://{local}"]) == 0  # file:// URLs are local paths
    assert main([*storage, "capture", *_capture_args(tiny_pair, url)[1:]]) == 0  # complete: nothing to do
    assert "already complete" in capsys.readouterr().out
    assert main([*storage, "report", url, "--metric", "kl", "--top-n", "2"]) == 0
    from_s3 = capsys.readouterr().out
    assert main(["report", str(local), "--metric", "kl", "--top-n", "2"]) == 0
    assert capsys.readouterr().out.replace(str(local), url) == from_s3
    out = tmp_path / "export"
    assert main([*storage, "export-json", url, "--out", str(out)]) == 0
    exported = json.loads(next(out.rglob("multi_pass_*.json")).read_text())
    assert len(exported) == 2


def test_resume_and_unfinished_template_on_s3(tiny_pair, s3_options, tmp_path):
    import numpy as np
    import zarr

    from store.location import zarr_store

    url, local = "s3://resdiff/resume/tiny.zarr", tmp_path / "local.zarr"
    storage = _option_args(s3_options)
    assert main(_capture_args(tiny_pair, local)) == 0
    assert main([*storage, *_capture_args(tiny_pair, url)]) == 0
    set_storage_options(s3_options)
    root = zarr.open_group(store=zarr_store(url), mode="r+")
    root["resid"][1, :] = np.nan  # a region lost with its flag, as a killed capture leaves it
    root["done"][1, :] = False
    root["lens_done"][:] = False
    assert main([*storage, *_capture_args(tiny_pair, url)]) == 0
    assert_stores_equal(open_store(url), local, ignore_attrs=IGNORED)
    root.attrs["resdiff_creating"] = True  # as if the template write had been cut short
    assert main([*storage, *_capture_args(tiny_pair, url)]) == 0  # replaced, not read
    assert_stores_equal(open_store(url), local, ignore_attrs=IGNORED)
    assert "resdiff_creating" not in open_store(url).attrs


def test_memory_urls_and_bad_options(tiny_pair, tmp_path, capsys):
    url = "memory://resdiff/tiny.zarr"
    assert main(_capture_args(tiny_pair, url)) == 0
    assert main(["verify", url]) == 0
    assert main(["info", url]) == 0
    assert main(["--storage-option", "novalue", "info", url]) == 2
    assert "--storage-option takes KEY=VALUE" in capsys.readouterr().err
    assert main(["info", "memory://resdiff/missing.zarr"]) == 2
    assert "no resdiff store at memory://resdiff/missing.zarr" in capsys.readouterr().err
    assert current_storage_options() == {}


def test_analysis_and_exports_read_url_stores(tmp_path, monkeypatch, capsys):
    from store.testing import write_tiny_store

    monkeypatch.chdir(tmp_path)
    url = "memory://resdiff/synthetic.zarr"
    write_tiny_store(url)
    assert main(["export-netcdf", url, str(tmp_path / "ss.nc"), "--sel", "pass_=SS", "--vars", "resid"]) == 0
    assert (tmp_path / "ss.nc").stat().st_size > 0
    assert main(["decompose", url, "--quiet"]) == 0  # results are files: written locally, under outputs/
    assert len(list((tmp_path / "outputs").glob("synthetic.decomp-*.zarr"))) == 1
    assert main(["plot", url, "--quiet"]) == 0
    assert list((tmp_path / "outputs" / "synthetic-plots").glob("*.png"))
