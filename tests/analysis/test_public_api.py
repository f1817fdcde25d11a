"""The analyses the CLI offers are public functions of ``analysis``, each documented with a runnable example
(the examples themselves run as doctests)."""

from __future__ import annotations

import inspect
import tempfile

import numpy as np
import pytest

import analysis

OFFERED = ("factorial", "factorial_shares", "diff_lens", "decompose", "shift_rate", "report_summary",
           "pair_metrics", "hotspots", "activation_loader", "open_store")


@pytest.mark.parametrize("name", OFFERED)
def test_every_analysis_is_exported_and_documented_with_an_example(name):
    func = getattr(analysis, name)
    assert name in analysis.__all__ and callable(func)
    doc = inspect.getdoc(func) or ""
    assert "Examples\n--------" in doc and ">>> " in doc, f"{name} has no example"


def test_decompose_is_what_the_decompose_command_stores():
    import xarray as xr

    from analysis.geometry.decompose import decompose_store
    from store.testing import write_tiny_store

    path = write_tiny_store(tempfile.mkdtemp() + "/s.zarr")
    stored = xr.open_zarr(decompose_store(path, top_k=2, cp_rank=1)[0])
    direct = analysis.decompose(analysis.open_store(path), top_k=2, cp_rank=1)
    for name in ("singular_value", "participation_ratio", "mean_diff", "principal_angle"):
        np.testing.assert_allclose(direct[name].values, stored[name].values, err_msg=name)
