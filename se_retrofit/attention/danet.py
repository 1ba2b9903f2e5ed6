"""Dual attention: DANet's position and channel attention modules.

Paper: `Dual Attention Network for Scene Segmentation` - https://arxiv.org/abs/1809.02983 (Fu et al. 2019)

Position attention (PAM): query and key 1×1 convs to C/8 (``reduction=8``), value conv C → C,
``S = softmax(QᵀK)`` over all N positions, ``out = x + γ·V·Sᵀ``. Channel attention (CAM): the
C×C map ``softmax(max(E) − E)`` with ``E = X·Xᵀ``, ``out = x + β·A·X``; no weights besides β.
``danet`` runs both in parallel and sums them, as the paper's head does:
``out = x + γ·PAM(x) + β·CAM(x)``. Names follow the seed code's ``PAM_Module``/``CAM_Module``
(``query_conv``, ``key_conv``, ``value_conv``, ``gamma``); in ``danet`` they sit under ``pam.`` and
``cam.``, and β is ``cam.gamma``.

Identity start: γ = β = 0, as in the paper, so the output is exactly ``x``. γ and β get gradient at
the first step; the convolutions from the second, once γ is no longer 0. The key conv has no bias
(the seed's would add the same amount to every key of a query's row under the softmax: it could
never learn). These are the attention modules alone, inserted into the backbone; DANet's
segmentation head (the 2048 → 512 convolutions around them) is not part of them.

Default placement: once, after the last residual block (DANet puts them on the dilated
backbone's output), position ``post``. PAM's N×N map is quadratic in positions: the planner asks
:meth:`PositionAttention.attention_bytes` and refuses a site over the memory limit.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import register_attention
from ._layers import check_by_building, conv_layer, hidden_channels

__all__ = ["PositionAttention", "ChannelAttentionMap", "DualAttention"]


@register_attention("pam", attr_name="pam", default_position="post", default_blocks="last")
class PositionAttention(nn.Module):
    """DANet position attention (Fu et al. 2019): each position attends to all, ``x + γ·V·softmax(QᵀK)ᵀ``."""

    writable_output = True  # returns a new product or sum: a block may add into it in place

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 8, divisor: int = 1):
        super().__init__()
        conv = conv_layer(spatial_dims)
        hidden = hidden_channels(channels, reduction, divisor)
        self.query_conv = conv(channels, hidden, 1)
        self.key_conv = conv(channels, hidden, 1, bias=False)
        self.value_conv = conv(channels, channels, 1)
        self.gamma = nn.Parameter(torch.zeros(1))

    def init_identity(self) -> None:
        nn.init.zeros_(self.gamma)

    @classmethod
    def attention_bytes(cls, channels: int, spatial: tuple[int, ...], **_) -> int:
        """Bytes of the N×N position map at batch 1 in float32."""
        return 4 * math.prod(spatial) ** 2

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        """The attention term without γ and the shortcut."""
        q = self.query_conv(x).flatten(2).transpose(1, 2)  # (n, N, c)
        k = self.key_conv(x).flatten(2)  # (n, c, N)
        attention = torch.bmm(q, k).softmax(dim=-1)  # (n, N, N)
        v = self.value_conv(x).flatten(2)  # (n, C, N)
        return torch.bmm(v, attention.transpose(1, 2)).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.attend(x)


@register_attention("cam", attr_name="cam", default_position="post", default_blocks="last")
class ChannelAttentionMap(nn.Module):
    """DANet channel attention (Fu et al. 2019): a C×C affinity map over channels, ``x + β·A·X``."""

    writable_output = True  # returns a new product or sum: a block may add into it in place

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2):
        super().__init__()
        conv_layer(spatial_dims)  # checks the rank
        self.gamma = nn.Parameter(torch.zeros(1))

    def init_identity(self) -> None:
        nn.init.zeros_(self.gamma)

    @classmethod
    def attention_bytes(cls, channels: int, spatial: tuple[int, ...], **_) -> int:
        """Bytes of the C×C channel map at batch 1 in float32."""
        return 4 * channels * channels

    def attend(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.flatten(2)  # (n, C, N)
        energy = torch.bmm(flat, flat.transpose(1, 2))  # (n, C, C)
        energy = energy.amax(dim=-1, keepdim=True) - energy
        return torch.bmm(energy.softmax(dim=-1), flat).reshape(x.shape)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.gamma * self.attend(x)


@register_attention("danet", attr_name="da", default_position="post", default_blocks="last")
class DualAttention(nn.Module):
    """DANet (Fu et al. 2019): position and channel attention in parallel, ``x + γ·PAM(x) + β·CAM(x)``.

    Example:
        >>> import torch
        >>> from se_retrofit.attention import create_attention
        >>> da = create_attention("danet", 64)
        >>> x = torch.randn(2, 64, 7, 7)
        >>> bool(torch.equal(da(x), x)), float(da.pam.gamma), float(da.cam.gamma)
        (True, 0.0, 0.0)
    """

    writable_output = True  # returns a new product or sum: a block may add into it in place

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 8, divisor: int = 1):
        super().__init__()
        self.pam = PositionAttention(channels, spatial_dims=spatial_dims, reduction=reduction, divisor=divisor)
        self.cam = ChannelAttentionMap(channels, spatial_dims=spatial_dims)

    def init_identity(self) -> None:
        self.pam.init_identity()
        self.cam.init_identity()

    @classmethod
    def attention_bytes(cls, channels: int, spatial: tuple[int, ...], **_) -> int:
        return max(PositionAttention.attention_bytes(channels, spatial), ChannelAttentionMap.attention_bytes(
            channels, spatial))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pam.gamma * self.pam.attend(x) + self.cam.gamma * self.cam.attend(x)
