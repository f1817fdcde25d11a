"""The attention mask of a padded batch, built before the forward so the model never reads it on the host.

Given a 2-D padding mask, transformers' mask code asks two questions of its values in Python
(``fast_all``: "is anything padded?", so it can hand SDPA ``is_causal``; and, without a mask,
"are these packed sequences?" of the position ids). On a GPU each answer is a device-to-host
sync inside every forward, so the host can never queue more than one forward ahead. A 4-D mask
is taken as it is, with no question asked: this module builds it with the model's own mask
function (so its format follows the attention implementation: boolean for SDPA, additive for
eager) and the skip turned off, which reads nothing on the host.

One 4-D mask stands for every layer only where no sliding window is shorter than the batch; there,
and for attention implementations whose masks are not 4-D tensors (flash, flex), the 2-D mask is
passed as before, correct, with its sync.

Axes legend: b = prompt in a batch, t = token position, d = hidden dimension.
"""

from __future__ import annotations

import torch
from torch import nn


def windowed_beyond(config, n_tok: int) -> bool:
    """True when some layer of ``config`` attends through a sliding window shorter than ``n_tok`` tokens."""
    window = getattr(config, "sliding_window", None)
    if window is None or n_tok <= window:
        return False
    layer_types = getattr(config, "layer_types", None)
    return layer_types is None or "sliding_attention" in layer_types


def prepared_mask(body: nn.Module, embeds_btd: torch.Tensor, mask_bt: torch.Tensor,
                  position_ids_bt: torch.Tensor) -> torch.Tensor:
    """The mask to pass ``body`` for the padding ``mask_bt``: its 4-D mask, made here (see the module), or
    ``mask_bt`` itself where a 4-D mask cannot stand for every layer."""
    from transformers.masking_utils import create_causal_mask

    config = body.config
    if windowed_beyond(config, mask_bt.shape[1]):
        return mask_bt
    mask = create_causal_mask(config=config, inputs_embeds=embeds_btd, attention_mask=mask_bt, cache=None,
                              position_ids=position_ids_bt, allow_is_causal_skip=False)
    return mask if isinstance(mask, torch.Tensor) and mask.ndim == 4 else mask_bt
