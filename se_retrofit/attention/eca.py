"""Efficient Channel Attention.

Paper: `ECA-Net: Efficient Channel Attention for Deep Convolutional Neural Networks`
- https://arxiv.org/abs/1910.03151 (Wang et al. 2020)

No reduction: a 1-D convolution runs across the pooled channel vector, with the adaptive kernel
``k = odd(|(log2 C + 1) / 2|)`` (at least 3, as timm) unless ``kernel_size`` is given. The state
dict (``conv.weight``) matches timm's ``EcaModule``. Identity start: the conv is zeroed and the gate
is ``2·sigmoid``; the conv gets gradient at the first step.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import register_attention
from ._layers import Gate, check_by_building, check_odd_kernel
from .se import _fold_into

__all__ = ["EfficientChannelAttention", "eca_kernel_size"]


def eca_kernel_size(channels: int, gamma: float = 2, beta: float = 1) -> int:
    """The ECA paper's adaptive kernel size, odd and at least 3 (as timm computes it)."""
    t = int(abs(math.log(channels, 2) + beta) / gamma)
    return max(t if t % 2 else t + 1, 3)


@register_attention("eca")
class EfficientChannelAttention(nn.Module):
    """Efficient Channel Attention (Wang et al. 2020): a 1-D conv across pooled channels, ~k parameters."""

    writable_output = True  # returns a new product or sum: a block may add into it in place
    SQUEEZES_BY_STATISTICS = True  # sees positions through their mean and max only: see se_retrofit.masking

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2, kernel_size: int | None = None,
                 gate: str = "sigmoid"):
        super().__init__()
        k = eca_kernel_size(channels) if kernel_size is None else kernel_size
        check_odd_kernel(k)
        self.reduce_dims = list(range(2, 2 + spatial_dims))
        self.conv = nn.Conv1d(1, 1, kernel_size=k, padding=(k - 1) // 2, bias=False)
        self.gate = Gate(gate)

    def init_identity(self) -> None:
        nn.init.zeros_(self.conv.weight)
        self.gate.start_at_identity()

    def fold_input_scale(self) -> float:
        return _fold_into(self.gate, self.conv)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = x.mean(self.reduce_dims).unsqueeze(1)  # (N, 1, C): channels as a sequence
        y = self.gate(self.conv(y)).squeeze(1)
        for _ in self.reduce_dims:  # (N, C) -> (N, C, 1, …): unsqueeze, which TorchScript compiles
            y = y.unsqueeze(-1)
        return x * y
