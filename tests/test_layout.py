"""Layout: where the channels are at a block's addition, told by the layers where the probes cannot."""
import pytest
import torch

import se_retrofit

from helpers import make_model


@pytest.mark.slow
def test_layout_from_layers_when_the_model_resizes_every_input():
    # CrossViT interpolates any input to its img_size, so the second probe has the same shapes as
    # the first and says nothing about which dimension holds the channels: the branch's layers do.
    model = make_model("timm", "crossvit_9_240")
    analysis = se_retrofit.analyze(model)
    assert len(analysis.blocks) == 24  # attention + MLP residual in each of the 3 + 9 transformer blocks
    assert {b.layout for b in analysis.blocks} == {"tokens"}
    assert {(b.spatial, b.channels) for b in analysis.blocks} == {((401,), 128), ((197,), 256)}
    edited = se_retrofit.retrofit(model)
    x = torch.randn(1, 3, 240, 240)
    assert torch.equal(edited.eval()(x), model.eval()(x))
