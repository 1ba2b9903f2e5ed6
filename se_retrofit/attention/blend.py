"""Zero-initialised blend: exact identity for any attention module.

``y = x + α·(A(x) − x)`` with ``α`` a learned scalar that starts at 0. At α = 0 the output is
``x + 0`` — exactly ``x`` for any finite ``A(x)`` — in train and eval mode, whatever ``A`` is:
timm's modules (their gates start near 0.5), or a user's module without ``init_identity()``.
As α grows the block moves towards ``A(x)`` (α = 1: the module alone).

Gradient: α receives one at the first step (``Σ (A(x) − x)·∂L/∂y``); the module's own parameters
from the second step on, once α is no longer 0.

A module that already computes ``x`` at its start must not be blended: then ``A(x) − x = 0`` gives
α no gradient, and α = 0 gives the module none, so nothing ever learns. Give such a module an
``init_identity()`` (timm's ``nl``, at identity by its own init, has its norm set to 1 before it is blended).

State-dict names: the module sits under ``attn`` and the blend weight is ``alpha``, e.g.
``layer1.0.se.attn.fc1.weight`` and ``layer1.0.se.alpha``. (With ``init="random"`` there is no
blend, and the module keeps its names directly: ``layer1.0.se.fc1.weight``.)

The same idea starts DANet's γ and the residual scalars of ReZero/SkipInit at 0.
"""
from __future__ import annotations

import torch
from torch import nn

__all__ = ["ZeroBlend"]


class ZeroBlend(nn.Module):
    """``x + α·(A(x) − x)``, α a learned scalar starting at 0: exact identity for any module ``A``.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> blend = ZeroBlend(nn.Conv2d(8, 8, 3, padding=1))
        >>> x = torch.randn(1, 8, 5, 5)
        >>> bool(torch.equal(blend(x), x)), sorted(blend.state_dict())
        (True, ['alpha', 'attn.bias', 'attn.weight'])
    """

    writable_output = True  # returns a new product or sum: a block may add into it in place

    def __init__(self, attn: nn.Module):
        super().__init__()
        self.attn = attn
        self.alpha = nn.Parameter(torch.zeros(()))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.alpha * (self.attn(x) - x)
