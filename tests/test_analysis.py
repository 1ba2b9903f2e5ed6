"""Analysis: which additions are residual blocks, with what channels, stages and layout."""
import copy

import pytest
import timm
import torch
import torchvision

import se_retrofit
from se_retrofit.analysis import CHANNELS_FIRST, TOKENS, analyze

from helpers import EXPECTED_BLOCKS, ResNet1d, make_model, small_input


@pytest.mark.parametrize("source,name,expected", EXPECTED_BLOCKS, ids=[f"{s}:{n}" for s, n, _ in EXPECTED_BLOCKS])
@pytest.mark.slow
def test_block_counts(source, name, expected):
    blocks = se_retrofit.find_blocks(make_model(source, name))
    assert len(blocks) == expected
    assert all(b.layout == CHANNELS_FIRST for b in blocks)


def test_resnet50_blocks_in_detail():
    blocks = se_retrofit.find_blocks(timm.create_model("resnet50"))
    assert [b.path for b in blocks[:4]] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert [sum(b.stage == s for b in blocks) for s in (1, 2, 3, 4)] == [3, 4, 6, 3]
    first, second = blocks[0], blocks[1]
    assert (first.channels, first.in_channels, first.spatial) == (256, 64, (56, 56))
    assert first.shortcut == "layer1.0.downsample.1" and first.branch == "layer1.0.bn3"
    assert second.shortcut == "identity" and second.post_activation == "layer1.1.act3"
    assert blocks[-1].channels == 2048 and blocks[-1].stage == 4


def test_analysis_is_pure():
    model = timm.create_model("resnet18").train()
    model.layer2.eval()
    before = copy.deepcopy(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}
    se_retrofit.find_blocks(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("forward" in vars(m) for m in model.modules())


def test_res2net_hierarchical_adds_are_not_blocks():
    analysis = analyze(timm.create_model("res2net50_26w_4s"))
    assert analysis.additions == 40 and len(analysis.blocks) == 16
    assert {b.path.count(".") for b in analysis.blocks} == {1}  # layerN.M, never an inner split


def test_existing_attention_is_flagged():
    assert sum(b.has_attention for b in se_retrofit.find_blocks(timm.create_model("efficientnet_b0"))) == 9
    assert sum(b.has_attention for b in se_retrofit.find_blocks(timm.create_model("regnety_008"))) == 14
    assert not any(b.has_attention for b in se_retrofit.find_blocks(timm.create_model("resnet50")))
    assert not any(b.has_attention for b in se_retrofit.find_blocks(timm.create_model("convnext_tiny")))


def test_vit_position_embedding_add_is_not_a_block():
    model = timm.create_model("test_vit", dynamic_img_size=True)
    analysis = analyze(model, torch.randn(1, 3, 160, 160))
    depth = len(model.blocks)
    assert len(analysis.blocks) == 2 * depth  # attention and MLP residual of each block
    assert all(b.path.startswith("blocks.") for b in analysis.blocks)
    assert analysis.additions == 2 * depth + 1  # plus the position embedding
    assert {b.layout for b in analysis.blocks} == {TOKENS}
    assert {b.name for b in analysis.blocks if b.add_index == 1} == {f"blocks.{i}@1" for i in range(depth)}


def test_stages_are_resolution_levels():
    for name in ("resnet50", "convnext_tiny", "efficientnet_b0"):
        assert analyze(timm.create_model(name)).stages == [1, 2, 3, 4], name


def test_one_dimensional_resnet():
    blocks = se_retrofit.find_blocks(ResNet1d(), torch.randn(1, 1, 400))
    assert len(blocks) == 6
    assert [b.stage for b in blocks] == [1, 1, 2, 2, 3, 3]
    assert blocks[2].spatial == (100,) and blocks[2].channels == 32 and blocks[2].in_channels == 16


def test_video_resnet_three_dimensional():
    blocks = se_retrofit.find_blocks(torchvision.models.video.r3d_18(), torch.randn(1, 3, 8, 32, 32))
    assert len(blocks) == 8
    assert len(blocks[0].spatial) == 3 and blocks[0].layout == CHANNELS_FIRST


def test_model_that_does_not_trace_as_a_whole_is_analysed_from_what_it_runs():
    class Picky(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = timm.create_model("resnet18", num_classes=0)

        def forward(self, x):
            if x.sum() > -1e9:  # data-dependent control flow stops the tracer here
                return self.body(x)
            return x

    analysis = analyze(Picky(), small_input(1))
    assert len(analysis.blocks) == 8 and analysis.blocks[0].path == "body.layer1.0"
    assert analysis.untraceable == {} and all(b.rewrite_error is None for b in analysis.blocks)


def test_bad_example_input_is_a_clear_error():
    with pytest.raises(ValueError, match="example_input"):
        se_retrofit.find_blocks(timm.create_model("resnet18"), torch.randn(1, 5, 32, 32))


@pytest.mark.slow
def test_dual_path_network_has_additions_but_no_residual_blocks():
    # its additions mix two paths (a fusion, not a residual); its dense path's concatenations are joins
    analysis = analyze(timm.create_model("dpn68"), small_input(1))
    assert analysis.additions == 22 and analysis.blocks == []
    assert analysis.describe() == "0 of its 22 additions are residual connections; 22 join units"


def test_blocks_inside_timm_notrace_modules_are_found():
    blocks = se_retrofit.find_blocks(timm.create_model("nf_resnet26"), small_input(1))
    assert [b.path for b in blocks][:2] == ["stages.0.0", "stages.0.1"] and len(blocks) == 8


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
