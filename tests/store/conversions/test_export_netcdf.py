"""export-netcdf round trip, read back with the netCDF4 library and with xarray."""

from __future__ import annotations

import numpy as np

from cli import main
from store.reader import open_store


def test_netcdf_round_trip(tiny_pair, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet", "--top-k", "3"]) == 0
    out = tmp_path / "ss.nc"
    assert main(["export-netcdf", str(store), str(out), "--sel", "pass_=SS", "--sel", "layer=2",
                 "--vars", "resid", "entropy", "done"]) == 0
    import netCDF4
    import xarray as xr

    with netCDF4.Dataset(out) as nc:
        assert nc.variables["resid"].dtype == np.float32
        assert nc.variables["done"].dtype == np.int8
    back = xr.open_dataset(out, engine="netcdf4")
    ds = open_store(store).sel(pass_="SS", layer=2)
    np.testing.assert_array_equal(back.resid.values, ds.resid.values.astype(np.float32))
    np.testing.assert_array_equal(back.entropy.values, ds.entropy.values)
    assert back.token_str.values.tolist() == ds.token_str.values.tolist()
    assert back.attrs["pair_label"] == "tiny" and '"base"' in back.attrs["models"]
    back.close()


def test_netcdf_bad_selection(tiny_pair, tmp_path, capsys):
    store = tmp_path / "s.zarr"
    assert main(["capture", "--cache-dir", str(tiny_pair[2]), "--store", str(store), "--quiet", "--no-lens"]) == 0
    assert main(["export-netcdf", str(store), str(tmp_path / "x.nc"), "--sel", "pass_=XX"]) == 2
    assert "pass_ has no label 'XX'" in capsys.readouterr().err
    assert main(["export-netcdf", str(store), str(tmp_path / "x.nc"), "--vars", "nope"]) == 2
    assert "no variable 'nope'" in capsys.readouterr().err
    assert not (tmp_path / "x.nc").exists()


def test_netcdf_of_one_prompt_keeps_its_tokens_not_the_longest_prompts(tmp_path):
    import xarray as xr

    from store.testing import write_tiny_store

    store = write_tiny_store(tmp_path / "s.zarr", n_prompts=3, lengths=(9, 3, 5))
    out = tmp_path / "one.nc"
    assert main(["export-netcdf", str(store), str(out), "--sel", "prompt=1"]) == 0
    with xr.open_dataset(out, engine="netcdf4") as back:
        assert back.sizes["token"] == 3  # padding past the selection's longest prompt is not written
        want = open_store(store).sel(prompt=1).isel(token=slice(0, 3))
        np.testing.assert_array_equal(back.resid.values, want.resid.values.astype(np.float32))
