"""Sizes and dtype names."""

from __future__ import annotations

import pytest

from store.errors import UsageError
from store.units import format_bytes, itemsize, parse_size


def test_sizes_parse_and_print():
    assert parse_size("24GB") == 24 * 10**9 and parse_size("512MiB") == 512 * 2**20 and parse_size(7) == 7
    for bad in ("lots", "-1GB", "0"):
        with pytest.raises(UsageError, match="--max-memory"):
            parse_size(bad)
    assert format_bytes(1.5 * 2**30) == "1.5 GiB" and format_bytes(300) == "300 B"


def test_dtype_table():
    assert itemsize("float32") == 4 and itemsize("float16") == itemsize("bfloat16") == 2
    with pytest.raises(UsageError, match="unknown dtype 'int3'"):
        itemsize("int3")
