"""Squeezing over the real positions of a padded sequence.

Channel attention squeezes a block's output over every position. In a batch of sequences padded to
one length the padding positions are averaged in too, and once fine-tuning moves the gates a real
token's output depends on how much padding its batch had. A block whose forward receives the
padding mask (an argument named as in :data:`PADDING_ARGUMENTS`: transformers' ``attention_mask``,
torch's ``key_padding_mask``) tells where the real positions are; before the attention module sees
the tokens, each sample's padding positions are set to the mean of its real positions
(:func:`padding_filled`), so a squeeze by mean or max sees exactly the statistics of the real ones,
and the padding positions leave the attention as they came in (:func:`real_positions_gated`). Without
padding (no mask, or a mask that masks nothing) the module sees the tokens themselves.

Only a type whose module sees positions through their per-channel mean and max alone squeezes so
(SE and ECA: ``SQUEEZES_BY_STATISTICS``); a type that attends over positions (GC's softmax pooling,
CBAM's spatial map, Non-local) sees the padding as before. An edit made from outside a forward (on
a module's output, :mod:`.outside_edit`) gets the mask from the call of the block's adding module.

Example:
    >>> import torch
    >>> x = torch.tensor([[[1.0, 3.0, 100.0]]])          # (N, C, L): one sample, its last position padding
    >>> mask = torch.tensor([[1, 1, 0]])                   # transformers' attention_mask: 1 = real
    >>> filled, real = padding_filled(x, mask, PADDING_ARGUMENTS["attention_mask"])
    >>> filled
    tensor([[[1., 3., 2.]]])
    >>> real_positions_gated(filled * 2, x, real)           # a gate of 2 on the real positions only
    tensor([[[  2.,   6., 100.]]])
"""
from __future__ import annotations

import inspect
from typing import Optional, Tuple

import torch
from torch import nn

#: argument name -> what its values mean: ``allowed`` (transformers: 1 or True where a position may be
#: attended, or an additive mask of 0 there and a large negative number elsewhere, 2-D, 3-D or 4-D);
#: ``padding`` (torch: True, or -inf, where a position is padding; 2-D)
PADDING_ARGUMENTS = {"attention_mask": "allowed", "key_padding_mask": "padding", "src_key_padding_mask": "padding",
                     "padding_mask": "padding"}


def padding_argument(module: nn.Module) -> Optional[str]:
    """The name of the argument of ``module``'s forward that carries the padding mask, if one does."""
    from .tracing import forward_function

    try:
        names = inspect.signature(forward_function(module)).parameters
    except (TypeError, ValueError):
        return None
    return next((name for name in PADDING_ARGUMENTS if name in names), None)


def real_positions(mask: Optional[torch.Tensor], meaning: str, batch: int, length: int) -> Optional[torch.Tensor]:
    """``(N, L)``, True at the real positions, from a mask whose values have ``meaning`` (see
    :data:`PADDING_ARGUMENTS`); None where there is no mask or it is not one over these ``length``
    positions (a cross-attention's memory)."""
    if mask is None:
        return None
    if meaning == "padding":
        real = ~mask if mask.dtype == torch.bool else mask == 0
    elif mask.dim() == 2:
        real = mask != 0  # a plain mask: 1 where real
    else:  # an attention mask: a key is real where some query may attend it
        real = mask if mask.dtype == torch.bool else mask > -1000.0
        real = real.any(dim=-2)
        if real.dim() == 3:
            real = real.any(dim=1)  # over heads
    if real.dim() != 2 or real.shape[0] != batch or real.shape[1] != length:
        return None
    return real


def padding_filled(x: torch.Tensor, mask: Optional[torch.Tensor], meaning: str
                   ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """``x`` ``(N, C, L)`` with each sample's padding positions set to the mean of its real positions,
    and the real positions ``(N, 1, L)`` (None where the mask says nothing of these positions)."""
    real = real_positions(mask, meaning, x.shape[0], x.shape[-1])
    if real is None:
        return x, None
    real = real.unsqueeze(1)
    weight = real.to(x.dtype)
    mean = (x * weight).sum(-1, keepdim=True) / weight.sum(-1, keepdim=True).clamp_min(1.0)
    return torch.where(real, x, mean), real


def real_positions_gated(gated: torch.Tensor, x: torch.Tensor, real: Optional[torch.Tensor]) -> torch.Tensor:
    """The attention's output at the real positions, ``x`` at the padding ones."""
    return gated if real is None else torch.where(real, gated, x)
