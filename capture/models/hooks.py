"""Recording the residual stream of every layer in a single forward pass.

Axes legend for tensor names: b = prompt in the batch, l = layer (0..L), t = token
position, d = hidden dimension. ``resid_bltd[:, 0]`` is the input of the first block
(the embedding output as the block receives it, ``hidden_states[0]``) and
``resid_bltd[:, l]`` for l >= 1 is the raw output of block l-1, before any final norm,
so the last layer is raw too (``hidden_states[-1]`` in transformers is post-norm).
"""

from __future__ import annotations

import torch
from torch import nn


def _first_tensor(value) -> torch.Tensor:
    # transformers 5 blocks return a Tensor; older ones (and some remote code) a tuple.
    return value[0] if isinstance(value, (tuple, list)) else value


class ResidualRecorder:
    """Context manager that copies each block's input/output into ``resid_bltd``.

    Copying inside the hook (with the dtype cast) avoids keeping L+1 full-precision
    activations alive until the end of the forward pass. ``keep`` lists the true layer
    numbers to record (``--layers``), one buffer slot each; default all of 0..L.

    Examples
    --------
    >>> from transformers import GPT2Config, GPT2LMHeadModel
    >>> model = GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=50)).eval()
    >>> resid_bltd = torch.empty(1, 3, 4, 16)
    >>> with ResidualRecorder(model.transformer.h, resid_bltd):
    ...     _ = model(input_ids=torch.tensor([[1, 2, 3, 4]]))
    >>> bool(torch.isfinite(resid_bltd).all())
    True
    """

    def __init__(self, layers: nn.ModuleList, resid_bltd: torch.Tensor, keep: list[int] | None = None) -> None:
        keep = list(range(len(layers) + 1)) if keep is None else list(keep)
        if resid_bltd.shape[1] != len(keep):
            raise ValueError(f"buffer has {resid_bltd.shape[1]} layer slots for {len(keep)} kept layers")
        self.layers = layers
        self.resid_bltd = resid_bltd
        self.slot_of = {layer: slot for slot, layer in enumerate(keep)}  # true layer number -> buffer slot
        self._handles: list[torch.utils.hooks.RemovableHandle] = []

    def _store(self, layer: int, hidden_btd: torch.Tensor) -> None:
        slot = self.slot_of.get(layer)
        if slot is not None:
            self.resid_bltd[:, slot, : hidden_btd.shape[1]].copy_(hidden_btd)

    def __enter__(self) -> ResidualRecorder:
        def block_input(module, args, kwargs):
            self._store(0, args[0] if args else kwargs["hidden_states"])

        if 0 in self.slot_of:
            self._handles.append(self.layers[0].register_forward_pre_hook(block_input, with_kwargs=True))
        for index, layer in enumerate(self.layers):
            if index + 1 not in self.slot_of:
                continue

            def block_output(module, args, output, slot=index + 1):
                self._store(slot, _first_tensor(output))

            self._handles.append(layer.register_forward_hook(block_output))
        return self

    def __exit__(self, *exc_info) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()


class _Skipped(nn.Module):
    """A block not run: passes its input on, or, as the last block below a split, the carried state."""

    def __init__(self, state_btd: torch.Tensor | None) -> None:
        super().__init__()
        self.state_btd = state_btd

    def forward(self, hidden_states, *args, **kwargs):
        return hidden_states if self.state_btd is None else self.state_btd


class ContinueFrom:
    """Context manager: a forward of the model whose blocks are ``layers`` runs only blocks ``split``.., on
    ``state_btd`` (the residual stream at layer ``split`` of another pass) instead of its own embedding output.

    The blocks below the split are swapped for modules that do nothing (transformers 5 blocks return the
    hidden state as a tensor, which is what they return), the last of them handing on ``state_btd``; with
    ``split`` 0 the first block's input is replaced. The model's own embedding still runs (a lookup, cheap)
    and its output is dropped. Everything is restored on exit.
    """

    def __init__(self, layers: nn.ModuleList, split: int, state_btd: torch.Tensor) -> None:
        self.layers, self.split, self.state_btd = layers, split, state_btd
        self._saved: list[nn.Module] = []
        self._handle = None

    def __enter__(self) -> ContinueFrom:
        self._saved = [self.layers[i] for i in range(self.split)]
        for i in range(self.split):
            self.layers[i] = _Skipped(self.state_btd if i == self.split - 1 else None)
        if self.split == 0:
            def replace_input(module, args, kwargs):
                if args:
                    return (self.state_btd, *args[1:]), kwargs
                return args, {**kwargs, "hidden_states": self.state_btd}

            self._handle = self.layers[0].register_forward_pre_hook(replace_input, with_kwargs=True)
        return self

    def __exit__(self, *exc_info) -> None:
        for i, block in enumerate(self._saved):
            self.layers[i] = block
        self._saved = []
        if self._handle is not None:
            self._handle.remove()
            self._handle = None
