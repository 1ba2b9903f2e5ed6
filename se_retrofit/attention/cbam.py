"""Convolutional Block Attention Module.

Paper: `CBAM: Convolutional Block Attention Module` - https://arxiv.org/abs/1807.06521 (Woo et al. 2018)

Channel attention (a shared MLP over the average- and max-pooled vectors, summed, gated), then
spatial attention (a k×k conv over the channel-mean and channel-max maps, k = 7, gated), in
sequence. Names follow timm's ``CbamModule``: ``channel.fc1``, ``channel.fc2``,
``spatial.conv.conv``, ``spatial.conv.bn``; the MLP has no bias and ``divisor`` defaults to 1, as
in timm. The official init is not the identity (the spatial gate starts near 0.5); here both gates
start at exactly 1: ``fc2`` and the spatial BN's scale and shift are zeroed, the gates doubled, and
``fc1`` starts with mirrored rows so its ReLUs cannot all start dead.
"""
from __future__ import annotations

import torch
from torch import nn

from . import register_attention
from ._layers import (BATCHNORMS, Gate, act_layer, check_by_building, check_odd_kernel, conv_layer, hidden_channels,
                      mirror_rows_)

__all__ = ["CBAM", "ChannelAttention", "SpatialAttention"]


class ChannelAttention(nn.Module):
    """CBAM's channel half: ``gate(MLP(avg x) + MLP(max x))``."""

    def __init__(self, channels: int, *, spatial_dims: int, reduction: int, divisor: int, act: str, gate: str):
        super().__init__()
        conv = conv_layer(spatial_dims)
        hidden = hidden_channels(channels, reduction, divisor)
        self.reduce_dims = tuple(range(2, 2 + spatial_dims))
        self.fc1 = conv(channels, hidden, kernel_size=1, bias=False)
        self.act = act_layer(act)
        self.fc2 = conv(hidden, channels, kernel_size=1, bias=False)
        self.gate = Gate(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x_avg = self.fc2(self.act(self.fc1(x.mean(self.reduce_dims, keepdim=True))))
        x_max = self.fc2(self.act(self.fc1(x.amax(self.reduce_dims, keepdim=True))))
        return x * self.gate(x_avg + x_max)


class _ConvNorm(nn.Module):
    """conv + BN without activation, named as timm's ``ConvNormAct(apply_act=False)``."""

    def __init__(self, cin: int, cout: int, kernel_size: int, spatial_dims: int):
        super().__init__()
        self.conv = conv_layer(spatial_dims)(cin, cout, kernel_size, padding=kernel_size // 2, bias=False)
        self.bn = BATCHNORMS[spatial_dims](cout)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bn(self.conv(x))


class SpatialAttention(nn.Module):
    """CBAM's spatial half: ``gate(BN(conv_k([mean_c x, max_c x])))``."""

    def __init__(self, *, spatial_dims: int, kernel_size: int, gate: str):
        super().__init__()
        check_odd_kernel(kernel_size)
        self.conv = _ConvNorm(2, 1, kernel_size, spatial_dims)
        self.gate = Gate(gate)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        maps = torch.cat([x.mean(dim=1, keepdim=True), x.amax(dim=1, keepdim=True)], dim=1)
        return x * self.gate(self.conv(maps))


@register_attention("cbam")
class CBAM(nn.Module):
    """CBAM (Woo et al. 2018): channel attention, then spatial attention, in sequence."""

    writable_output = True  # returns a new product or sum: a block may add into it in place

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 16, divisor: int = 1,
                 kernel_size: int = 7, act: str = "relu", gate: str = "sigmoid"):
        super().__init__()
        self.channel = ChannelAttention(channels, spatial_dims=spatial_dims, reduction=reduction,
                                        divisor=divisor, act=act, gate=gate)
        self.spatial = SpatialAttention(spatial_dims=spatial_dims, kernel_size=kernel_size, gate=gate)

    def init_identity(self) -> None:
        mirror_rows_(self.channel.fc1)
        nn.init.zeros_(self.channel.fc2.weight)
        nn.init.zeros_(self.spatial.conv.bn.weight)
        nn.init.zeros_(self.spatial.conv.bn.bias)
        self.channel.gate.start_at_identity()
        self.spatial.gate.start_at_identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.spatial(self.channel(x))
