"""Bottleneck Attention Module.

Paper: `BAM: Bottleneck Attention Module` - https://arxiv.org/abs/1807.06514 (Park et al. 2018)

A channel branch (MLP with BN over the pooled vector) and a spatial branch (1×1 reduce, two
dilated 3×3 convs with dilation 4, 1×1 to one map), combined as in the official code:
``y = x · (1 + gate(Mc · Ms))``. BAM sits once per stage transition (``position="stage"``).

Identity start: the spatial branch's last conv is zeroed (``Ms = 0``) and the gate becomes
``sigmoid(a) - 0.5``, so the attention term is exactly 0 and ``y = x``. The last conv gets gradient
at the first step, the rest of both branches from the second.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_attention
from ._layers import BATCHNORMS, Gate, act_layer, check_by_building, check_positive_int, conv_layer, hidden_channels

__all__ = ["BAM"]


@register_attention("bam", default_position="stage", attr_name="bam")
class BAM(nn.Module):
    """BAM (Park et al. 2018): channel and spatial branches, ``x · (1 + gate(Mc · Ms))``."""

    writable_output = True  # returns a new product or sum: a block may add into it in place

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 16, divisor: int = 1,
                 dilation: int = 4, act: str = "relu"):
        super().__init__()
        conv, norm = conv_layer(spatial_dims), BATCHNORMS[spatial_dims]
        check_positive_int("dilation", dilation)
        hidden = hidden_channels(channels, reduction, divisor)
        self.reduce_dims = tuple(range(2, 2 + spatial_dims))
        # layers followed by a BN have no bias: in training the BN removes it, so it would never learn
        self.channel = nn.Sequential(
            conv(channels, hidden, 1, bias=False), norm(hidden), act_layer(act), conv(hidden, channels, 1))
        self.spatial = nn.Sequential(
            conv(channels, hidden, 1, bias=False), norm(hidden), act_layer(act),
            conv(hidden, hidden, 3, padding=dilation, dilation=dilation, bias=False), norm(hidden),
            act_layer(act),
            conv(hidden, hidden, 3, padding=dilation, dilation=dilation, bias=False), norm(hidden),
            act_layer(act),
            conv(hidden, 1, 1))
        self.gate = Gate("sigmoid")

    def init_identity(self) -> None:
        nn.init.zeros_(self.spatial[-1].weight)
        nn.init.zeros_(self.spatial[-1].bias)
        self.gate.offset = -0.5  # sigmoid(0) - 0.5 == 0 exactly: y = x · (1 + 0)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mc = self.channel(x.mean(self.reduce_dims, keepdim=True))
        ms = self.spatial(x)
        return x * (1 + self.gate(mc * ms))
