"""Squeeze-and-Excitation.

Paper: `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507 (Hu et al.)

``s = sigmoid(W2 · relu(W1 · mean(x)))``, ``y = s · x``, with W1: C → C/r and W2: C/r → C as
1×1 convolutions. Names and the reduced width ``make_divisible(C / r, 8)`` follow timm's
``SEModule`` (``fc1``, ``fc2``), so state dicts move between the two.

Exact identity at start: the gate is ``gate_scale · sigmoid(·)`` with ``gate_scale = 2`` and
``fc2`` zeroed, so every gate is ``2 · 0.5 = 1`` exactly and ``y`` is bit-identical to ``x``.
``fc2`` gets gradient at the first step (``fc1`` is random), ``fc1`` from the second.
:func:`se_retrofit.convert.fold_gate_scale` turns the scaled gate back into timm's plain one.
"""
from __future__ import annotations

import torch
from timm.layers import make_divisible
from torch import nn

from . import register_attention

__all__ = ["SqueezeExcite", "reduced_channels"]
_CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def reduced_channels(channels: int, reduction: int = 16, divisor: int = 8) -> int:
    """Hidden width of the excitation MLP, rounded as timm rounds it (``divisor=1``: exact C/r)."""
    return make_divisible(channels / reduction, divisor, round_limit=0.0)


@register_attention("se")
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): channel gates from globally pooled features."""

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 16, divisor: int = 8):
        super().__init__()
        if spatial_dims not in _CONVS:
            raise ValueError(f"SE supports 1, 2 or 3 spatial dimensions, not {spatial_dims}")
        conv = _CONVS[spatial_dims]
        hidden = reduced_channels(channels, reduction, divisor)
        self.reduce_dims = tuple(range(2, 2 + spatial_dims))
        self.fc1 = conv(channels, hidden, kernel_size=1, bias=True)
        self.act = nn.ReLU(inplace=True)
        self.fc2 = conv(hidden, channels, kernel_size=1, bias=True)
        self.gate_scale = 1.0

    def init_identity(self) -> None:
        """Zero the last layer and double the gate: every gate is exactly 1."""
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.gate_scale = 2.0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = x.mean(self.reduce_dims, keepdim=True)
        s = self.fc2(self.act(self.fc1(s)))
        gate = torch.sigmoid(s)
        if self.gate_scale != 1.0:
            gate = gate * self.gate_scale
        return x * gate

    def extra_repr(self) -> str:
        return f"gate_scale={self.gate_scale}"
