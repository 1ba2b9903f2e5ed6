"""Non-local block.

Paper: `Non-local Neural Networks` - https://arxiv.org/abs/1711.07971 (Wang et al. 2018)

Every position attends to every position: ``y_i = Σ_j f(x_i, x_j) g(x_j) / C(x)`` and
``z = x + W(y)``, with θ, φ, g 1×1 convolutions to C/2 channels (``reduction=2``) and W a 1×1
convolution back to C followed by a BN. Pairwise functions (option ``mode``): ``embedded_gaussian``
(softmax of θᵀφ, the default), ``dot`` (θᵀφ / N) and ``gaussian`` (softmax of xᵀx: no θ, φ).
``sub_sample`` max-pools φ and g (2×2; 1×2×2 on video, keeping time): a quarter of the pairs.
1-D, 2-D and 3-D feature maps; token sequences reach it channels-first (surgery moves the axis).
Names follow the seed code's ``_NonLocalBlockND``: ``theta``, ``phi``, ``g``, ``W.0`` (conv),
``W.1`` (BN).

Identity start (paper §4.1: "the initial state is identity, so it can be inserted into any
pre-trained network"): the BN's weight and bias are zeroed, so ``W(y)`` is exactly 0 in eval and
in train mode and ``z = x``. The BN gets gradient at the first step, W, θ, φ and g from the second.

Two biases of the seed are dropped because they can never learn: φ's under the softmax over
positions (it adds the same amount to every pair of a row), and W's conv bias under the BN (the
BN subtracts the batch mean in training).

Memory is quadratic in positions: the planner asks :meth:`NonLocalBlock.attention_bytes` for the
N×M matrix at each site and refuses one over the limit.
"""
from __future__ import annotations

import math

import torch
from torch import nn

from . import register_attention
from ._layers import BATCHNORMS, check_by_building, check_choice, conv_layer, hidden_channels

__all__ = ["NonLocalBlock", "MODES"]

MODES = ("embedded_gaussian", "dot", "gaussian")
#: max-pool kernel of sub_sample by spatial rank (time is not pooled on video)
POOL_KERNEL = {1: (2,), 2: (2, 2), 3: (1, 2, 2)}
POOLS = {1: nn.MaxPool1d, 2: nn.MaxPool2d, 3: nn.MaxPool3d}


@register_attention("nonlocal", attr_name="nl", default_position="post")
class NonLocalBlock(nn.Module):
    """Non-local block (Wang et al. 2018): every position attends to all, ``z = x + BN(W·y)``.

    Example:
        >>> import torch
        >>> from se_retrofit.attention import create_attention
        >>> block = create_attention("nonlocal", 64, spatial_dims=3)  # video: (N, C, T, H, W)
        >>> x = torch.randn(2, 64, 4, 8, 8)
        >>> bool(torch.equal(block(x), x)), block.inter_channels
        (True, 32)
        >>> NonLocalBlock.attention_bytes(64, (4, 8, 8))  # 256 positions × 64 after sub-sampling × 4 bytes
        65536
    """

    writable_output = True  # returns a new product or sum: a block may add into it in place

    check_options = classmethod(check_by_building)

    def __init__(self, channels: int, *, spatial_dims: int = 2, reduction: int = 2, divisor: int = 1,
                 mode: str = "embedded_gaussian", sub_sample: bool = True):
        super().__init__()
        conv = conv_layer(spatial_dims)
        self.mode = check_choice("mode", mode, MODES)
        if not isinstance(sub_sample, bool):
            raise ValueError(f"sub_sample must be True or False, got {sub_sample!r}")
        self.inter_channels = hidden_channels(channels, reduction, divisor)
        self.g = conv(channels, self.inter_channels, 1)
        self.theta = self.phi = None
        if mode != "gaussian":
            self.theta = conv(channels, self.inter_channels, 1)
            self.phi = conv(channels, self.inter_channels, 1, bias=mode == "dot")
        self.pool = POOLS[spatial_dims](POOL_KERNEL[spatial_dims], ceil_mode=True) if sub_sample else None
        self.W = nn.Sequential(conv(self.inter_channels, channels, 1, bias=False), BATCHNORMS[spatial_dims](channels))

    def init_identity(self) -> None:
        """Zero the BN after W: ``W(y) = 0``, so ``z = x`` exactly."""
        nn.init.zeros_(self.W[1].weight)
        nn.init.zeros_(self.W[1].bias)

    @classmethod
    def attention_bytes(cls, channels: int, spatial: tuple[int, ...], *, sub_sample: bool = True, **_) -> int:
        """Bytes of the N×M pairwise matrix at batch 1 in float32 (N positions, M after sub-sampling)."""
        positions = math.prod(spatial)
        if not sub_sample:
            return 4 * positions * positions
        kernel = POOL_KERNEL.get(len(spatial), (2,) * len(spatial))
        pooled = math.prod(-(-s // k) for s, k in zip(spatial, kernel))
        return 4 * positions * pooled

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n = x.shape[0]
        keys, values = x, self.g(x)
        queries = x
        if self.theta is not None and self.phi is not None:
            queries, keys = self.theta(x), self.phi(x)
        if self.pool is not None:
            keys, values = self.pool(keys), self.pool(values)
        q = queries.flatten(2).transpose(1, 2)  # (n, N, c)
        pairs = torch.bmm(q, keys.flatten(2))  # (n, N, M)
        if self.mode == "dot":
            pairs = pairs / pairs.shape[-1]
        else:
            pairs = pairs.softmax(dim=-1)
        y = torch.bmm(pairs, values.flatten(2).transpose(1, 2))  # (n, N, c)
        y = y.transpose(1, 2).reshape([n, self.inter_channels] + list(x.shape[2:]))
        return x + self.W(y)
