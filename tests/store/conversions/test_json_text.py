"""The numpy-formed JSON lists against ``json.dumps`` of the same Python values."""

from __future__ import annotations

import json

import numpy as np
import pytest

from store.conversions.json_text import list_texts, number_list_texts, numbers, rounded


def _reference(values: np.ndarray, digits: int | None, indent: int) -> list[str]:
    """Each row through ``json.dumps(indent=2)``, re-indented as it sits at ``indent``."""
    rows = values.reshape(-1, values.shape[-1]).tolist()
    if digits is not None:
        rows = [[round(v, digits) for v in row] for row in rows]
    return [json.dumps(row, indent=2).replace("\n", "\n" + " " * indent) for row in rows]


def _awkward_floats(rng) -> np.ndarray:
    values = np.concatenate([
        rng.normal(0, 8, 4000).astype(np.float32).astype(np.float64),  # logits as stored
        (rng.integers(-10**7, 10**7, 500) + 0.5) / 1e6,  # ties at the sixth decimal
        np.array([0.0, -0.0, 1e-7, -4e-7, 9.9e-5, 1e-4, -1e-4, 5.0, -3.0, 1e8, 2e9, 123456.7890125,
                  np.nan, np.inf, -np.inf, 0.0078125, 2.675, 1 / 3]),
        rng.normal(0, 1e-4, 300),
    ])
    return values[: len(values) // 6 * 6].reshape(-1, 6)


@pytest.mark.parametrize("indent", [0, 10])
def test_rounded_float_lists_are_json_dumps_of_python_round(indent):
    values = _awkward_floats(np.random.default_rng(0))
    assert number_list_texts(values, indent, digits=6) == _reference(values, 6, indent)


def test_int_lists_and_plain_floats():
    rng = np.random.default_rng(1)
    ids = rng.integers(-1, 200_000, size=(50, 4, 20)).astype(np.int32)
    assert number_list_texts(ids, 8) == _reference(ids, None, 8)
    floats = _awkward_floats(rng)
    assert list_texts(numbers(floats), floats.shape[-1], 4) == _reference(floats, None, 4)
    assert number_list_texts(np.zeros((3, 0), np.int32), 2) == ["[]"] * 3


def test_rounded_matches_python_round_on_ties_and_near_ties():
    rng = np.random.default_rng(2)
    x = np.concatenate([_awkward_floats(rng).ravel(), np.nextafter((np.arange(-5000, 5000) + 0.5) / 1e6, 1),
                        np.nextafter((np.arange(-5000, 5000) + 0.5) / 1e6, -1)])
    got, want = rounded(x, 6), [round(v, 6) for v in x.tolist()]
    assert [repr(a) for a in got] == [repr(b) for b in want]
