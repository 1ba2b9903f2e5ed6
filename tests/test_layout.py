"""Layout: where the channels are at a block's addition, told by the layers where the probes cannot."""
import pytest
import torch

import se_retrofit
from se_retrofit.layout import CHANNELS_FIRST, TOKENS

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


def test_a_linear_over_the_tokens_does_not_say_the_channels():
    """MLP-Mixer's token mixing, ``x + mlp(norm(x).transpose(1, 2)).transpose(1, 2)``: the Linear's
    features are the tokens, moved to dimension 1 of the sum. Before, they were taken for channels
    (channels-first, 196 "channels" at 224 px, so an edit made at one size failed at another); the
    writer says nothing there, and the channel-mixing adds keep their tokens layout."""
    import timm

    model = timm.create_model("mixer_s16_224", img_size=64, num_classes=5).eval()
    analysis = se_retrofit.analyze(model, torch.randn(1, 3, 64, 64))
    token_mixing = [b for b in analysis.blocks if "@" not in b.name]
    channel_mixing = [b for b in analysis.blocks if "@" in b.name]
    assert len(token_mixing) == len(channel_mixing) == 8
    assert all(b.layout != CHANNELS_FIRST for b in token_mixing)
    assert all((b.layout, b.channel_dim, b.channels) == (TOKENS, 2, 512) for b in channel_mixing)
