"""Tracked-token trajectories and the changes finder, against the stored per-pass logits."""

from __future__ import annotations

import dask
import numpy as np
import pytest

from analysis import open_store, tracked_changes, tracked_trajectory
from store.errors import UsageError
from store.testing import CountingScheduler
from tests.helpers import PROMPTS


@pytest.fixture(scope="module")
def store(capture_store):
    return open_store(capture_store("gemma", prompts=PROMPTS[:3], track=["7", "40"]))


def test_trajectory_and_changes(store):
    with dask.config.set(scheduler=CountingScheduler(0)):
        trajectory = tracked_trajectory(store, 40, lens="norm")
        changes = tracked_changes(store, threshold=0.05, lens="norm")
    logits = store.tracked_logit.sel(lens="norm").values
    index = {p: i for i, p in enumerate(store.pass_.values)}
    shift = trajectory["shift"].values
    for q, (left, right) in enumerate(zip(store.left.values, store.right.values, strict=True)):
        np.testing.assert_array_equal(trajectory.logit_left.values[q], logits[index[left], ..., 1])
        expected = logits[index[right], ..., 1] - logits[index[left], ..., 1]
        np.testing.assert_allclose(shift[q], expected, equal_nan=True)
    found = changes.sel(token_q=40).values
    assert np.array_equal(np.isfinite(found), np.nan_to_num(np.abs(shift), nan=0) >= 0.05)
    assert np.isnan(found[..., int(store.n_tokens.values.min()):]).any()  # padding never reported
    assert np.isfinite(found).sum() > 0


def test_untracked_token_is_a_clear_error(store):
    with pytest.raises(UsageError, match=r"token 3 is not tracked in this store \(tracked: 7, 40\)"):
        tracked_trajectory(store, 3)
