"""Sizes and dtypes, once: parsing and printing byte counts, and the table of dtype names.

Every size a user types (``--max-memory 24GB``, ``--memory-limit 512MiB``, ``--shuffle-buffer``)
goes through :func:`parse_size`, and every size resdiff prints through :func:`format_bytes`.
Dtypes are named by strings everywhere outside ``capture`` (which maps them to torch dtypes).
"""

from __future__ import annotations

from store.errors import UsageError

# Model dtypes a capture can load, and the bytes per element of each.
DTYPE_ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
MODEL_DTYPES = tuple(DTYPE_ITEMSIZE)
# Other names of them: the legacy config's (``auto`` loaded float32) and safetensors headers'.
DTYPE_ALIASES = {"auto": "float32", "fp32": "float32", "fp16": "float16", "bf16": "bfloat16",
                 "F32": "float32", "F16": "float16", "BF16": "bfloat16", **{name: name for name in MODEL_DTYPES}}
# Zarr has no bfloat16: residuals are stored as one of these.
STORE_DTYPES = ("float16", "float32")
LOADER_DTYPES = ("float32", "bfloat16")  # what the activation loader hands a trainer
# Compression of a store's data arrays (``capture --codec``; built in store.schema.compressors). BENCHMARKS.md
# "Codecs" has the measurements behind the default: activations are nearly incompressible, Zstd saves ~14% of
# float16 residuals (half of it the NaN padding inside written chunks) at ~0.9 GB/s per core, LZ4 saves the
# padding (~8%) at ~5 GB/s.
CODECS = ("lz4", "zstd", "none")
DEFAULT_CODEC = "lz4"


def itemsize(dtype: str) -> int:
    """Bytes per element of a dtype name.

    >>> itemsize("bfloat16")
    2
    """
    try:
        return DTYPE_ITEMSIZE[dtype]
    except KeyError:
        raise UsageError(f"unknown dtype {dtype!r}; use one of {', '.join(MODEL_DTYPES)}") from None


def parse_size(text: str | int, option: str = "--max-memory") -> int:
    """Bytes from ``24GB``, ``512MiB``, ``3e9`` or an int; a one-line error naming ``option`` otherwise.

    >>> parse_size("1.5GB"), parse_size("2KiB")
    (1500000000, 2048)
    """
    from dask.utils import parse_bytes

    try:
        value = parse_bytes(text) if isinstance(text, str) else int(text)
    except (ValueError, TypeError):
        raise UsageError(f"{option} {text!r} is not a size; write e.g. 24GB, 512MiB or 3e9") from None
    if value <= 0:
        raise UsageError(f"{option} must be positive, got {text!r}")
    return value


def format_bytes(n: float) -> str:
    """Bytes in binary units, three significant figures.

    >>> format_bytes(1.5 * 2**30), format_bytes(512), format_bytes(1000.4 * 2**20)
    ('1.5 GiB', '512 B', '1000 MiB')
    """
    for unit, size in (("TiB", 2**40), ("GiB", 2**30), ("MiB", 2**20), ("KiB", 2**10)):
        if abs(n) >= size:
            value = n / size
            return f"{value:.3g} {unit}" if abs(value) < 1000 else f"{value:.0f} {unit}"  # never 1e+03
    return f"{int(n)} B"
