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


# Fixed-size models (no second probe) whose blocks' branches are written by no layer that says the
# layout: the layers reading the block input or the sum say it. MLP-Mixer's token mixing and ResMLP's
# (its norm is an ``Affine``: alpha * x + beta, told by what it computes) read their input through a
# norm over the channels; EfficientFormer's pooling mixer ``x + γ·(pool(x) − x)`` has no layer at all,
# and the conv MLP after it reads the sum. Before, half of each model was skipped "layout unknown".
READ_LAYOUTS = [("mixer_s16_224", dict(img_size=64), 64, 16, (TOKENS, 2, 512)),
                ("resmlp_12_224", dict(img_size=64), 64, 24, (TOKENS, 2, 384)),
                ("efficientformer_l1", {}, 224, 30, None)]


@pytest.mark.parametrize("name,options,size,count,layout", READ_LAYOUTS, ids=[r[0] for r in READ_LAYOUTS])
def test_the_layers_reading_a_sum_say_its_layout(name, options, size, count, layout):
    import timm

    from helpers import as_if_pretrained

    torch.manual_seed(0)
    model = as_if_pretrained(timm.create_model(name, num_classes=0, **options)).eval()  # features: heads start at 0
    x = torch.randn(2, 3, size, size)
    analysis = se_retrofit.analyze(model, x[:1])
    assert len(analysis.blocks) == count and all(b.layout != "unknown" for b in analysis.blocks)
    if layout:
        assert {(b.layout, b.channel_dim, b.channels) for b in analysis.blocks} == {layout}
    edited = se_retrofit.retrofit(model, example_input=x[:1])
    assert len(edited.se_retrofit.edits[-1][1]) == count
    for training in (True, False):
        torch.manual_seed(1)
        expected = model.train(training)(x)
        torch.manual_seed(1)
        assert torch.equal(edited.train(training)(x), expected), training
    edited.eval()
    with torch.no_grad():
        for param in se_retrofit.attention_parameters(edited):
            param.add_(torch.randn_like(param))
        assert not torch.equal(edited(x), model.eval()(x))
        assert torch.allclose(edited(x)[:1], edited(x[:1]), atol=1e-5)  # the squeeze stays within a sample
