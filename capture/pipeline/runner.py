"""Running passes over prompt batches and handing back chunk-aligned groups.

Axes legend: g = prompt in a write group, b = prompt in a compute batch, l = layer
(0..L), t = token position, d = hidden dimension.

Prompts arrive in store order, longest first. Write groups are whole prompt chunks of
the store; compute batches run inside a group, consecutive prompts of similar length
under ``--batch-size`` prompts and ``--batch-tokens`` padded tokens. Batches are
right-padded, which is exact for every supported architecture; position ids come
from the attention mask so GPT-2's learned positions stay correct too.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from capture.errors import NonFiniteActivation
from capture.inputs.prompts import TokenizedPrompts
from capture.inputs.selection import StoredWindow
from capture.models.hooks import ContinueFrom, ResidualRecorder
from capture.models.loading import decoder, decoder_layers
from capture.models.masks import prepared_mask
from capture.models.transfer import DeviceToHost, HostCopy, arrivals, to_device
from capture.pipeline.carry import Crossing, raw
from capture.plan.batching import compute_batches
from capture.plan.passes import Pass


@dataclass
class CapturedGroup:
    """Residuals of one pass over one write group of prompts, padded positions NaN.

    Once written, :meth:`release` hands its arrays back to the pool they came from, for a later group
    (they must not be read after that)."""

    pass_index: int
    prompts: slice
    resid_gltd: np.ndarray
    final_gtd: np.ndarray
    n_real_tokens: int
    pool: HostBuffers | None = None
    carry_gstd: np.ndarray | None = None  # raw states at the pass's carried splits (--cross-layers), full length

    def release(self) -> None:
        if self.pool is not None:
            self.pool.give_back(self.resid_gltd, self.final_gtd)
            self.pool = None


class HostBuffers:
    """Host buffers of write groups, reused once their group is written: a group's buffers are fresh memory
    otherwise, tens of MB whose page faults the launching thread pays in series with the kernels.

    Buffers are flat; an array is the contiguous prefix of the smallest free buffer that holds it (store
    order is longest first, so the first groups' buffers fit the rest). Thread-safe: the writer's thread gives
    back what the filling thread takes.

    >>> pool = HostBuffers(np.float32)
    >>> a = pool.take((2, 3)); pool.give_back(a); b = pool.take((3,))
    >>> np.shares_memory(a, b), b.flags.c_contiguous
    (True, True)
    """

    def __init__(self, dtype) -> None:
        import threading

        self.dtype, self.free, self.lock = np.dtype(dtype), [], threading.Lock()

    def take(self, shape: tuple[int, ...]) -> np.ndarray:
        n = int(np.prod(shape))
        with self.lock:
            fits = [i for i, b in enumerate(self.free) if b.size >= n]
            flat = self.free.pop(min(fits, key=lambda i: self.free[i].size)) if fits else None
        if flat is None:
            flat = np.empty(n, self.dtype)
        return flat[:n].reshape(shape)

    KEPT = 4  # a group's two arrays, for the group being filled and the one being written

    def give_back(self, *arrays: np.ndarray) -> None:
        with self.lock:
            self.free.extend(a.base if a.base is not None else a for a in arrays)
            self.free.sort(key=lambda b: -b.size)
            del self.free[self.KEPT:]  # the smallest beyond those go: they would fit nothing the others do not


def _device_of(module: nn.Module) -> torch.device:
    return next(module.parameters()).device


@torch.inference_mode()
def forward_residuals(
    model: nn.Module,
    embedding: nn.Module,
    ids_bt: torch.Tensor,
    mask_bt: torch.Tensor,
    out_dtype: torch.dtype = torch.float32,
    keep_layers: list[int] | None = None,
    carry: tuple[list[int], torch.Tensor] | None = None,
    start: tuple[int, torch.Tensor] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """One forward pass of ``model`` on ``embedding(ids_bt)``; returns (resid_bltd, final_btd).

    Only the decoder body runs: the LM head (a vocabulary-sized product) is not needed
    for residuals. ``keep_layers`` are the layers recorded (default all of 0..L). ``carry`` (layers,
    buffer (b, s, t, d) in the model's dtype) also records those layers' states at full precision, for the
    crossed passes that continue them; ``start`` (split, state_btd) runs only the blocks from the split on,
    on that state (a crossed pass: the layers below the split recorded here are not its own).
    """
    layers = decoder_layers(model)
    device = _device_of(model.get_input_embeddings())
    ids_bt, mask_bt = ids_bt.to(device), mask_bt.to(device)
    model_dtype = model.get_input_embeddings().weight.dtype
    embeds_btd = embedding(ids_bt.to(_device_of(embedding))).to(device=device, dtype=model_dtype)
    position_ids_bt = (mask_bt.long().cumsum(-1) - 1).clamp(min=0)
    n_batch, n_tok = ids_bt.shape
    n_kept = len(layers) + 1 if keep_layers is None else len(keep_layers)
    resid_bltd = torch.empty(n_batch, n_kept, n_tok, embeds_btd.shape[-1], dtype=out_dtype, device=device)
    body = decoder(model)
    mask = prepared_mask(body, embeds_btd, mask_bt, position_ids_bt)  # nothing read on the host
    with contextlib.ExitStack() as stack:
        if start is not None:  # swaps blocks: entered before the recorders hook them
            stack.enter_context(ContinueFrom(layers, start[0], start[1].to(device=device, dtype=model_dtype)))
        stack.enter_context(ResidualRecorder(layers, resid_bltd, keep_layers))
        if carry is not None:
            stack.enter_context(ResidualRecorder(layers, carry[1], carry[0]))
        out = body(inputs_embeds=embeds_btd, attention_mask=mask, position_ids=position_ids_bt, use_cache=False)
    # on the residuals' device: a model split over GPUs (--device-map) ends on another one than it starts
    return resid_bltd, out.last_hidden_state.to(device=device, dtype=out_dtype)


def _first_non_finite(resid_bltd: torch.Tensor, real_bt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(found, vector) of the first real position, in C order, whose vector holds a non-finite value, as tensors
    on the device: ``found`` is (any, row, layer, token), ``vector`` that position's values (the host finds
    the bad one). Nothing waits for the device.

    A vector is non-finite exactly when its largest or smallest entry is (``amax`` and ``amin`` carry NaN and
    infinities through): two reductions in the residuals' own dtype whose temporaries are (batch, layer,
    token), where a boolean per entry would be as large as float16 residuals (GBs on a big batch, outside
    the memory plan) and a sum could overflow a finite float16 vector."""
    finite_blt = torch.isfinite(resid_bltd.amax(dim=-1)) & torch.isfinite(resid_bltd.amin(dim=-1))
    bad_n = (~finite_blt & real_bt[:, None, :]).view(-1).view(torch.uint8)  # no copy
    any_, index = bad_n.max(0)  # the first maximum: the first bad position in C order
    _, n_layer, n_tok, n_dim = resid_bltd.shape
    where = [index // (n_layer * n_tok), index // n_tok % n_layer, index % n_tok]
    return torch.stack([any_.long(), *where]), resid_bltd.reshape(-1, n_dim).index_select(0, index.view(1))[0]


def pad_batch(ids: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ids and the attention mask of a batch."""
    n_tok = max(len(i) for i in ids)
    ids_bt = torch.full((len(ids), n_tok), pad_id, dtype=torch.long)
    mask_bt = torch.zeros((len(ids), n_tok), dtype=torch.long)
    for row, seq in enumerate(ids):
        ids_bt[row, : len(seq)] = torch.tensor(seq, dtype=torch.long)
        mask_bt[row, : len(seq)] = 1
    return ids_bt, mask_bt


@dataclass
class _Launched:
    """A compute batch whose forward is queued and whose results are being copied to the host."""

    pass_index: int
    pass_name: str
    group: slice
    batch: slice
    last: bool  # the group's last batch


class _GroupFilling:
    """Write groups filled from finished batches, in the order the batches were launched."""

    def __init__(self, prompts: TokenizedPrompts, window: StoredWindow, token_extent: Callable[[slice], int],
                 np_dtype: np.dtype) -> None:
        self.prompts, self.window, self.token_extent, self.np_dtype = prompts, window, token_extent, np_dtype
        self.pool = HostBuffers(np_dtype)
        self.simple = not any(window.start)  # every window starts at the first token: one slice per batch
        self.stored_lengths = window.lengths  # a list built once, not per batch
        self.open: dict[tuple[int, int], CapturedGroup] = {}

    def place(self, launched: _Launched, arrays: list[np.ndarray]) -> CapturedGroup | None:
        """Place a batch's copied results (resid, final, found, value) in its group; the group once its last
        batch is placed."""
        resid_host, final_host, found, value = arrays[:4]
        batch, group = launched.batch, launched.group
        if found[0]:
            _, row, layer, token = (int(i) for i in found)
            first_bad = value[~np.isfinite(value)][0]
            raise NonFiniteActivation(pass_=launched.pass_name, prompt=self.prompts.label(batch.start + row),
                                      layer=self.window.layers[layer], token=token, value=float(first_bad))
        key = (launched.pass_index, group.start)
        if key not in self.open:  # allocated at its first batch's placement: after the previous group was handed on
            size, extent = group.stop - group.start, self.token_extent(group)
            hidden = resid_host.shape[-1]
            # Simple placement writes every cell of every row (values, then NaN past the batch), so the buffer
            # needs no NaN fill of its own: one pass over the memory, not two.
            resid = self.pool.take((size, len(self.window.layers), extent, hidden))
            final = self.pool.take((size, extent, hidden))
            if not self.simple:
                resid.fill(np.nan)
                final.fill(np.nan)
            self.open[key] = CapturedGroup(launched.pass_index, group, resid, final, 0, self.pool)
        filling = self.open[key]
        at = batch.start - group.start
        if len(arrays) > 4:  # states carried for crossed passes: every forward position, any window
            carry = arrays[4]
            if filling.carry_gstd is None:
                full = self.prompts.lengths[group.start]  # store order: the group's longest forward
                filling.carry_gstd = np.zeros((group.stop - group.start, carry.shape[1], full, carry.shape[3]),
                                              dtype=carry.dtype)
            filling.carry_gstd[at: at + len(carry), :, : carry.shape[2]] = carry
        if self.simple:
            width, rows = resid_host.shape[2], slice(at, at + len(resid_host))
            filling.resid_gltd[rows, :, :width] = resid_host
            filling.resid_gltd[rows, :, width:] = np.nan
            filling.final_gtd[rows, :width] = final_host
            filling.final_gtd[rows, width:] = np.nan
        else:  # --positions last:N: each prompt's own window
            for row in range(len(resid_host)):
                a, b = self.window.start[batch.start + row], self.window.stop[batch.start + row]
                filling.resid_gltd[at + row, :, : b - a] = resid_host[row, :, a:b]
                filling.final_gtd[at + row, : b - a] = final_host[row, a:b]
        filling.n_real_tokens += sum(self.stored_lengths[batch])
        return self.open.pop(key) if launched.last else None


def run_passes(
    model: nn.Module,
    passes: list[tuple[int, Pass]],
    embeddings: dict[str, nn.Module],
    prompts: TokenizedPrompts,
    groups: list[slice],
    window: StoredWindow,
    *,
    batch_size: int,
    batch_tokens: int,
    max_padding: float = float("inf"),
    token_extent: Callable[[slice], int],
    out_dtype: torch.dtype,
    pad_id: int = 0,
    skip: Callable[[int, slice], bool] = lambda pass_index, group: False,
    place_behind: bool | None = None,
    crossing: Crossing | None = None,
) -> Iterator[CapturedGroup]:
    """Yield one :class:`CapturedGroup` per (pass, write group) not skipped.

    ``prompts.ids`` are what each forward sees (in store order); ``window`` what of it is
    stored; ``token_extent(group)`` the token positions the group's buffer covers. On CUDA
    each batch is placed in its group after the next batch is launched, so that the device
    computes one batch while the last is copied (``capture.models.transfer``); on the CPU at once,
    so that no batch outlives its placement. ``place_behind`` (default: on CUDA) places each batch on a
    thread of its own, one placement at a time, so the launching thread goes on launching meanwhile. A
    group's buffers come from a pool: :meth:`CapturedGroup.release` them once written. ``crossing``
    (``--cross-layers``) says which passes' states to carry and where crossed passes start from.
    """
    filling = _GroupFilling(prompts, window, token_extent, torch.empty(0, dtype=out_dtype).numpy().dtype)
    copies = DeviceToHost(_device_of(model.get_input_embeddings()))
    if place_behind is None:
        place_behind = copies.device.type == "cuda"

    def launches() -> Iterator[tuple[_Launched, HostCopy]]:
        lengths = prompts.lengths  # a list built once, not per batch
        for pass_index, spec in passes:
            for group in groups:
                if skip(pass_index, group):
                    continue
                batches = compute_batches(lengths, group, batch_size, batch_tokens, max_padding)
                extent = token_extent(group)
                for number, batch in enumerate(batches):
                    launched = _Launched(pass_index, spec.name, group, batch, number == len(batches) - 1)
                    crossed = crossing.batch_plan(pass_index, spec, batch, lengths) if crossing else ((), None)
                    embedding = embeddings[spec.embedding] if not spec.crossed else model.get_input_embeddings()
                    yield launched, _launch(model, embedding, prompts, batch, copies, window.layers,
                                            out_dtype, pad_id, extent if filling.simple else None, *crossed)

    if not place_behind:
        for launched, arrays in arrivals(copies, launches()):
            if (done := filling.place(launched, arrays)) is not None:
                yield done
        return
    with ThreadPoolExecutor(1, thread_name_prefix="resdiff-place") as placing:
        placed = None  # the placement in flight: at most one, so a batch outlives its arrival by one launch
        for launched, arrays in arrivals(copies, launches()):
            if placed is not None and (done := placed.result()) is not None:  # re-raises a placement's error
                yield done
            placed = placing.submit(filling.place, launched, arrays)
        if placed is not None and (done := placed.result()) is not None:
            yield done


def _launch(model: nn.Module, embedding: nn.Module, prompts: TokenizedPrompts, batch: slice,
            copies: DeviceToHost, layers: list[int], out_dtype: torch.dtype, pad_id: int,
            width: int | None, carry_splits: tuple[int, ...] = (), start: tuple | None = None) -> HostCopy:
    """Queue one batch's forward, make its padding NaN, and start its copy to the host (the first ``width``
    positions, all where None); with ``carry_splits`` the states there too, whole and raw."""
    ids_bt, mask_bt = pad_batch([prompts.ids[i] for i in range(batch.start, batch.stop)], pad_id)
    ids_bt, mask_bt = to_device(ids_bt, copies.device), to_device(mask_bt, copies.device)
    carry = None
    if carry_splits:
        model_dtype = model.get_input_embeddings().weight.dtype
        carry = (list(carry_splits), torch.empty(*ids_bt.shape[:1], len(carry_splits), ids_bt.shape[1],
                                                 model.get_input_embeddings().weight.shape[1], dtype=model_dtype,
                                                 device=copies.device))
    if start is not None:
        start = (start[0], to_device(start[1], copies.device))
    resid_bltd, final_btd = forward_residuals(model, embedding, ids_bt, mask_bt, out_dtype, layers, carry, start)
    real_bt = mask_bt.bool()
    with torch.inference_mode():  # padding becomes NaN on the device, then one copy to the host
        found, value = _first_non_finite(resid_bltd, real_bt)
        resid_bltd.masked_fill_(~real_bt[:, None, :, None], float("nan"))
        final_btd.masked_fill_(~real_bt[:, :, None], float("nan"))
    width = resid_bltd.shape[2] if width is None else min(resid_bltd.shape[2], width)
    # Only the copy keeps the device tensors alive from here (until it is done).
    extra = [raw(carry[1])] if carry is not None else []
    return copies.start(resid_bltd[:, :, :width], final_btd[:, :width], found, value, *extra)


class Throughput:
    """Tokens per second over a run, for the progress bar."""

    def __init__(self) -> None:
        self.start = time.perf_counter()
        self.tokens = 0

    def add(self, n: int) -> float:
        self.tokens += n
        return self.tokens / max(time.perf_counter() - self.start, 1e-9)
