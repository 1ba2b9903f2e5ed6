"""A registered attention type that adds nothing: ``attention: noop`` in a recipe fine-tunes the
model exactly as it is (no new parameter, the output unchanged), so the "plain fine-tune" arm of
benchmarks/transfer.py runs through the same ``se-retrofit finetune`` path as the retrofit arms.

Example:
    >>> import torch, timm, se_retrofit, transfer_noop  # doctest: +SKIP
    >>> base = timm.create_model("resnet18").eval()  # doctest: +SKIP
    >>> torch.equal(se_retrofit.retrofit(base, attention="noop").eval()(torch.randn(1, 3, 32, 32)), ...)  # doctest: +SKIP
"""
from torch import nn

import se_retrofit


@se_retrofit.register_attention("noop")
class NoOp(nn.Module):
    """Returns its input: a site with no attention (the plain fine-tuning baseline)."""

    def __init__(self, channels, **_):
        super().__init__()

    def init_identity(self):
        pass

    def forward(self, x):
        return x
