"""Pieces shared by the attention types: layers by spatial rank, activations, and gates that can
start at exactly 1.

A gate ``g(a)`` multiplies features, so exact identity needs ``g = 1`` at the start. A sigmoid (or
hard sigmoid) cannot reach 1, and at ``a = 0`` it gives 0.5, which halves every feature. The
identity start therefore scales the gate: ``2 · sigmoid(a)`` with the last layer producing ``a``
zeroed is exactly ``2 · 0.5 = 1``; a tanh gate becomes ``1 + tanh(a)``. ``gate.scale`` and
``gate.offset`` are plain attributes, not parameters, so state dicts keep timm's names.
"""
from __future__ import annotations

from typing import List

import torch
import torch.nn.functional as F
from timm.layers import get_act_layer, make_divisible
from torch import nn

CONVS = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}
BATCHNORMS = {1: nn.BatchNorm1d, 2: nn.BatchNorm2d, 3: nn.BatchNorm3d}
GATE_FUNCTIONS = {"sigmoid": torch.sigmoid, "hard_sigmoid": F.hardsigmoid, "tanh": torch.tanh}
#: (scale, offset) that make each gate exactly 1 where its input is 0
IDENTITY_GATE = {"sigmoid": (2.0, 0.0), "hard_sigmoid": (2.0, 0.0), "tanh": (1.0, 1.0)}
SQUEEZES = ("avg", "max", "avg+max")


def conv_layer(spatial_dims: int) -> type[nn.Module]:
    if spatial_dims not in CONVS:
        raise ValueError(f"attention supports 1, 2 or 3 spatial dimensions, not {spatial_dims}")
    return CONVS[spatial_dims]


def act_layer(name: str) -> nn.Module:
    """An activation by timm's name (relu, gelu, silu, …); the error lists the usual ones."""
    try:
        layer = get_act_layer(name)
    except Exception:
        layer = None
    if layer is None:
        raise ValueError(f"unknown activation {name!r}; use a timm name such as relu, gelu, silu, hard_swish")
    try:
        return layer(inplace=True)
    except TypeError:
        return layer()


def hidden_channels(channels: int, reduction: int, divisor: int) -> int:
    """C / r rounded to a multiple of ``divisor`` as timm rounds it (``divisor=1``: C / r, half up)."""
    for name, value in (("reduction", reduction), ("divisor", divisor)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return make_divisible(channels / reduction, divisor, round_limit=0.0)


@torch.no_grad()
def mirror_rows_(layer: nn.Module) -> None:
    """Make the layer's output units come in ± pairs (row j+h/2 = -row j, bias too).

    For any input one unit of each pair is ≥ 0, so at least half of the ReLUs after it are active.
    Without this, a hidden unit that starts dead (likely where the input is non-negative, e.g. after a
    block's ReLU) can never revive while the layer after it starts at zero: neither gets gradient.
    """
    half = layer.weight.shape[0] // 2
    layer.weight[half:2 * half] = -layer.weight[:half]
    if getattr(layer, "bias", None) is not None:
        layer.bias[half:2 * half] = -layer.bias[:half]


def squeeze(x: torch.Tensor, dims: List[int], kind: str) -> torch.Tensor:
    """Global pooling over ``dims``: average, maximum, or their mean (timm's ``add_maxpool``)."""
    if kind == "avg":
        return x.mean(dims, keepdim=True)
    if kind == "max":
        return x.amax(dims, keepdim=True)
    return 0.5 * x.mean(dims, keepdim=True) + 0.5 * x.amax(dims, keepdim=True)


def check_choice(name: str, value: str, choices) -> str:
    if value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(choices)}, got {value!r}")
    return value


class Gate(nn.Module):
    """``scale · f(a) + offset`` for f in sigmoid, hard_sigmoid, tanh; no parameters."""

    def __init__(self, kind: str = "sigmoid"):
        super().__init__()
        self.kind = check_choice("gate", kind, GATE_FUNCTIONS)
        self.scale, self.offset = 1.0, 0.0

    def start_at_identity(self) -> None:
        self.scale, self.offset = IDENTITY_GATE[self.kind]

    def forward(self, a: torch.Tensor) -> torch.Tensor:
        # branches on a string, not a dict of functions: TorchScript compiles this
        if self.kind == "hard_sigmoid":
            g = F.hardsigmoid(a)
        elif self.kind == "tanh":
            g = torch.tanh(a)
        else:
            g = torch.sigmoid(a)
        if self.scale != 1.0:
            g = g * self.scale
        if self.offset != 0.0:
            g = g + self.offset
        return g

    def extra_repr(self) -> str:
        return f"{self.kind}, scale={self.scale}, offset={self.offset}"


def gate_state(module: nn.Module) -> dict[str, dict[str, float]]:
    """Scale and offset of every gate inside ``module`` (saved with the model: they are not weights)."""
    return {name: {"scale": g.scale, "offset": g.offset} for name, g in module.named_modules()
            if isinstance(g, Gate)}


def set_gate_state(module: nn.Module, state: dict[str, dict[str, float]]) -> None:
    for name, values in state.items():
        gate = module.get_submodule(name)
        gate.scale, gate.offset = values["scale"], values["offset"]


def check_by_building(cls: type[nn.Module], options: dict) -> None:
    """Validate option values early by building the module once at a small width (64 channels, 2-D):
    the constructor is the one place that checks them, so the config can reject them before any
    model work. Use as ``check_options = classmethod(check_by_building)``."""
    cls(64, spatial_dims=2, **options)


def check_positive_int(name: str, value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}")
    return value


def check_odd_kernel(value) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % 2 == 0:
        raise ValueError(f"kernel_size must be an odd positive integer (3, 5, 7, …) so the output keeps "
                         f"its size, got {value!r}")
    return value
