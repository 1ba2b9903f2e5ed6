"""Squeeze-and-Excitation.

Paper: `Squeeze-and-Excitation Networks` - https://arxiv.org/abs/1709.01507 (Hu et al.)

``s = gate(W2 · act(W1 · squeeze(x)))``, ``y = s · x``, with W1: C → C/r and W2: C/r → C as 1×1
convolutions. Names and the reduced width ``make_divisible(C / r, 8)`` follow timm's ``SEModule``
(``fc1``, ``fc2``), so state dicts move between the two. The paper's ablations are options: the
squeeze (``avg``, ``max``, ``avg+max``; Table 11), the gate (``sigmoid``, ``hard_sigmoid``,
``tanh``; Table 12) and the hidden activation.

Exact identity at start: ``fc2`` is zeroed and the gate scaled (``2·sigmoid``, ``1 + tanh``), so
every gate is exactly 1. ``fc2`` gets gradient at the first step, ``fc1`` from the second; ``fc1``
starts with mirrored rows so that at least half of its ReLUs are active for any input. :func:`se_retrofit.convert.fold_gate_scale` folds ``2·sigmoid`` back into a plain gate.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_attention
from ._layers import (SQUEEZES, Gate, act_layer, check_by_building, check_choice, conv_layer, hidden_channels,
                      mirror_rows_, squeeze)

__all__ = ["SqueezeExcite", "reduced_channels"]


def reduced_channels(channels: int, reduction: int = 16, divisor: int = 8) -> int:
    """Hidden width of the excitation MLP, rounded as timm rounds it (``divisor=1``: exact C/r)."""
    return hidden_channels(channels, reduction, divisor)


@register_attention("se")
class SqueezeExcite(nn.Module):
    """Squeeze-and-Excitation (Hu et al. 2018): channel gates from globally pooled features."""

    writable_output = True  # returns a new product or sum: a block may add into it in place
    SQUEEZES_BY_STATISTICS = True  # sees positions through their mean and max only: see se_retrofit.masking

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 16, divisor: int = 8,
                 squeeze: str = "avg", gate: str = "sigmoid", act: str = "relu"):
        super().__init__()
        conv = conv_layer(spatial_dims)
        hidden = hidden_channels(channels, reduction, divisor)
        self.squeeze = check_choice("squeeze", squeeze, SQUEEZES)
        self.reduce_dims = list(range(2, 2 + spatial_dims))  # a list: TorchScript reduces over List[int]
        self.fc1 = conv(channels, hidden, kernel_size=1, bias=True)
        self.act = act_layer(act)
        self.fc2 = conv(hidden, channels, kernel_size=1, bias=True)
        self.gate = Gate(gate)

    def init_identity(self) -> None:
        """Zero the last layer and rescale the gate: every gate is exactly 1."""
        mirror_rows_(self.fc1)
        nn.init.zeros_(self.fc2.weight)
        nn.init.zeros_(self.fc2.bias)
        self.gate.start_at_identity()

    def fold_input_scale(self) -> float:
        """Drop the gate's scale s, expecting the input to be multiplied by s instead; returns s."""
        return _fold_into(self.gate, self.fc1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = squeeze(x, self.reduce_dims, self.squeeze)
        return x * self.gate(self.fc2(self.act(self.fc1(s))))


def _fold_into(gate: Gate, first_layer: nn.Module) -> float:
    """``gate.scale · f(W·pool(x))`` equals ``f((W/s)·pool(s·x))``: move the scale to the input."""
    if gate.offset != 0.0 or gate.kind == "tanh":
        raise ValueError(f"a {gate.kind} gate with offset {gate.offset} cannot be folded into a plain gate")
    scale = gate.scale
    with torch.no_grad():
        first_layer.weight.div_(scale)
    gate.scale = 1.0
    return scale
