"""No false residuals: hand-checked block counts for families that fool a naive 'count the adds'.

Models are built on the meta device (no memory, no init time) and analysed on meta tensors, or on
the CPU where an op has no meta kernel.
"""
import pytest
import timm
import torch

import se_retrofit

pytestmark = pytest.mark.slow  # registry families, each model built and analysed

# (model, residual blocks, tensor additions one forward pass executes, why the count is what it is)
TRICKY = [
    ("res2net50_26w_4s", 16, 40, "3+4+6+3 bottlenecks; the 24 hierarchical adds inside the splits are not blocks"),
    ("hrnet_w18_small", 23, 46, "1 + 4 + 6 + 8 branch blocks and 4 head bottlenecks; fusion adds are not"),
    ("dla34", 12, 12, "2+4+4+2 basic blocks; the tree passes some shortcuts in as arguments"),
    ("dpn68", 0, 22, "dual paths: the 'residual' operand comes from a split of another path"),
    ("rexnet_100", 11, 11, "partial residuals: the shortcut is added into the first C_in channels"),
    ("nf_resnet26", 8, 8, "scaled add out * alpha + shortcut, inside timm notrace blocks"),
    ("vit_tiny_patch16_224", 24, 25, "attention and MLP residual of 12 blocks; the position embedding is not"),
    ("swin_tiny_patch4_window7_224", 24, 41, "2 residuals in 12 blocks; attention bias and mask adds are not"),
    ("maxvit_tiny_tf_224", 55, 55, "11 blocks of MBConv (1) + block attention (2) + grid attention (2); the "
                                   "relative-position bias is passed to scaled_dot_product_attention, not added"),
    ("levit_128s", 20, 32, "2 per attention block (9) and the MLP residual of the 2 downsamples"),
    ("repvgg_a0", 17, 39, "identity-BN branch of the 17 non-first blocks; kxk + 1x1 branch sums are not"),
    ("ghostnet_100", 16, 16, "16 ghost bottlenecks, identity or conv shortcut"),
]


@pytest.mark.parametrize("name,blocks,additions,why", TRICKY, ids=[t[0] for t in TRICKY])
def test_tricky_family_counts(name, blocks, additions, why):
    try:
        with torch.device("meta"):
            model = timm.create_model(name).eval()
        analysis = se_retrofit.analyze(model, torch.randn(1, *model.pretrained_cfg["input_size"], device="meta"))
    except ValueError:  # an op without a meta kernel (swin's masks): analyse on the CPU
        analysis = se_retrofit.analyze(timm.create_model(name).eval())
    assert (len(analysis.blocks), analysis.additions) == (blocks, additions), why
