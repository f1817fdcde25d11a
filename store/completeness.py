"""What of a store may be read: the one gate between a store and every number a command prints.

Used by every analysis command and export (``cli.py``, ``store.conversions``).

A capture writes its residuals first and its lens statistics after, each with ``done``
flags; a killed run leaves some unwritten, and unwritten regions read as NaN (floats)
or as fill ids, which sums and rates would turn into numbers (a shift rate of 0.0000,
NaN tables). :func:`usable` takes the store apart before any analysis: statistics that
are absent or unfinished are removed from the Dataset, so every consumer sees a store
without them (and skips, or refuses in one line), and the lines that say what was left
out, for how many prompts and how to finish it, are returned for the command to print
first. Unfinished residuals are refused outright: every analysis reads them.
"""

from __future__ import annotations

import numpy as np
import xarray as xr

from store.errors import ResdiffError
from store.schema import PAIR_STATS, PASS_STATS

LENS_VARIABLES = (*PASS_STATS, *PAIR_STATS)
LEFT_OUT_ATTR = "resdiff_left_out"  # the line of :func:`usable`, kept on the Dataset for later errors
UNFINISHED_LENS_ATTR = "resdiff_unfinished_lens"  # "done/prompts" of lens statistics :func:`usable` dropped
RESUME = "rerun the same `capture` command to finish it (it resumes where it stopped)"


class UnfinishedStore(ResdiffError, ValueError):
    """The residuals of some passes and prompts were never written (the capture stopped)."""

    _msg = ("the residuals of {missing} of {total} pass x prompt regions were never written (the capture stopped "
            "early){which}; " + RESUME)


def lens_state(ds: xr.Dataset) -> tuple[int, int] | None:
    """(prompts whose lens statistics are done, prompts); None when the store has no lens statistics."""
    if "lens_done" not in ds or not any(name in ds for name in LENS_VARIABLES):
        return None
    done = np.asarray(ds["lens_done"].values, dtype=bool)
    return int(done.sum()), int(done.size)


def lens_note(ds: xr.Dataset) -> str | None:
    """One line saying why lens statistics are missing, or None when they are complete."""
    state = lens_state(ds)
    if state is None:
        return ("lens statistics: none in this store (captured with --no-lens or imported without them); entropy, "
                "KL, top-k tokens, the shift rate and tracked logits are left out; capture without --no-lens for "
                "them")
    done, total = state
    if done == total:
        return None
    return (f"lens statistics: unfinished, {done} of {total} prompts done (the capture stopped in its lens stage); "
            f"entropy, KL, top-k tokens, the shift rate and tracked logits are left out; {RESUME}")


def require_residuals_done(ds: xr.Dataset) -> None:
    """Refuse in one line a store whose residual regions are not all written."""
    if "resid" not in ds or "done" not in ds:
        return
    done = np.asarray(ds["done"].values, dtype=bool)
    if done.all():
        return
    passes = [str(p) for p, row in zip(ds.pass_.values, done, strict=True) if not row.all()]
    raise UnfinishedStore(missing=int((~done).sum()), total=int(done.size),
                          which=f" (passes {', '.join(passes)})" if passes else "")


def usable(ds: xr.Dataset, needs_residuals: bool = True, reads_lens: bool = True) -> tuple[xr.Dataset, list[str]]:
    """``ds`` without the statistics that are unfinished, and the lines saying what is left out.

    Refuses (:class:`UnfinishedStore`) when ``needs_residuals`` and some residual region was
    never written. Lens statistics of a capture that stopped in its lens stage are dropped
    whole (a partial set would bias every mean toward the prompts that happened to finish);
    the lines name them only for a caller that ``reads_lens``.

    Examples
    --------
    >>> import tempfile
    >>> from store.testing import write_tiny_store
    >>> from store.reader import open_store
    >>> ds, notes = usable(open_store(write_tiny_store(tempfile.mkdtemp() + "/s.zarr")))
    >>> notes[0][:40]
    'lens statistics: none in this store (cap'
    """
    if needs_residuals:
        require_residuals_done(ds)
    note, state = lens_note(ds), lens_state(ds)
    attrs = {LEFT_OUT_ATTR: note or ""}
    if note and state is not None:
        ds = without_lens(ds).drop_vars("lens_done")
        attrs[UNFINISHED_LENS_ATTR] = f"{state[0]}/{state[1]}"
    notes = [note] if note and reads_lens else []
    return ds.assign_attrs(attrs), notes


def without_lens(ds: xr.Dataset) -> xr.Dataset:
    """``ds`` without its lens statistics: what geometric analysis builds on, with no graph over them."""
    return ds.drop_vars([name for name in LENS_VARIABLES if name in ds])


def left_out(ds: xr.Dataset) -> str:
    """What :func:`usable` left out, for an error that asks for it ("" when nothing was)."""
    return str(ds.attrs.get(LEFT_OUT_ATTR, ""))
