"""Global context block.

Paper: `GCNet: Non-local Networks Meet Squeeze-Excitation Networks and Beyond`
- https://arxiv.org/abs/1904.11492 (Cao et al. 2019)

Context modelling by attention pooling (a 1×1 conv to one map, softmax over all positions, the
weighted sum of features), a bottleneck transform C → C/r → C (1×1 conv, LayerNorm over
[C/r, 1, …], ReLU, 1×1 conv) and a fusion: ``add`` (``x + T(context)``, the paper's best) or
``mul`` (``x · gate(T(context))``). Names follow mmcv's ``ContextBlock``: ``conv_mask``,
``channel_add_conv`` / ``channel_mul_conv``. GCNet places it after the last 1×1 conv of the
branch (``standard``) in stages c3–c5 with r = 16 or 4; here every stage unless told.

Identity start: the transform's last conv is zeroed. ``add``: ``x + 0``; ``mul``: the gate is
``2·sigmoid`` (as SE's), so ``x · 1``. The last conv gets gradient at the first step, the rest from
the second. The mask conv has no bias: the softmax over positions removes it, it could never learn.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import register_attention
from ._layers import Gate, check_by_building, check_choice, conv_layer, hidden_channels

__all__ = ["GlobalContextBlock", "FUSIONS"]

FUSIONS = ("add", "mul")


@register_attention("gc", attr_name="gc")
class GlobalContextBlock(nn.Module):
    """GCNet context block (Cao et al. 2019): attention pooling, C → C/r → C transform, added to x.

    Example:
        >>> import torch
        >>> from se_retrofit.attention import create_attention
        >>> gc = create_attention("gc", 64, reduction=4, fusion="mul")
        >>> x = torch.randn(2, 64, 7, 7)
        >>> bool(torch.equal(gc(x), x)), gc.channel_mul_conv[0].out_channels
        (True, 16)
    """

    writable_output = True  # returns a new product or sum: a block may add into it in place

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 16, divisor: int = 1,
                 fusion: str = "add"):
        super().__init__()
        conv = conv_layer(spatial_dims)
        hidden = hidden_channels(channels, reduction, divisor)
        self.fusion = check_choice("fusion", fusion, FUSIONS)
        self.conv_mask = conv(channels, 1, 1, bias=False)
        transform = nn.Sequential(conv(channels, hidden, 1), nn.LayerNorm([hidden] + [1] * spatial_dims),
                                  nn.ReLU(inplace=True), conv(hidden, channels, 1))
        self.channel_add_conv = transform if fusion == "add" else None
        self.channel_mul_conv = transform if fusion == "mul" else None
        self.gate = Gate("sigmoid")

    def init_identity(self) -> None:
        last = self._transform()[-1]
        nn.init.zeros_(last.weight)
        nn.init.zeros_(last.bias)
        if self.fusion == "mul":  # the add fusion does not use the gate
            self.gate.start_at_identity()

    def _transform(self) -> nn.Sequential:
        return self.channel_add_conv if self.channel_add_conv is not None else self.channel_mul_conv

    @classmethod
    def attention_bytes(cls, channels: int, spatial: tuple[int, ...], **_) -> int:
        """Bytes of the attention-pooling weights (one per position) at batch 1 in float32."""
        return 4 * math.prod(spatial)

    def context(self, x: torch.Tensor) -> torch.Tensor:
        """Attention-pooled features, (N, C, 1, …)."""
        weights = self.conv_mask(x).flatten(2).softmax(dim=-1)  # (n, 1, N)
        pooled = torch.bmm(x.flatten(2), weights.transpose(1, 2))  # (n, C, 1)
        for _ in range(x.dim() - 3):
            pooled = pooled.unsqueeze(-1)
        return pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        context = self.context(x)
        if self.channel_mul_conv is not None:
            return x * self.gate(self.channel_mul_conv(context))
        if self.channel_add_conv is not None:
            return x + self.channel_add_conv(context)
        return x
