"""Analysis: which additions are residual blocks, with what channels, stages and layout."""
import copy

import pytest
import timm
import torch
import torchvision

import se_retrofit
from se_retrofit.analysis import CHANNELS_FIRST, analyze

from helpers import EXPECTED_BLOCKS, ResNet1d, make_model, small_input


@pytest.mark.parametrize("source,name,expected", EXPECTED_BLOCKS, ids=[f"{s}:{n}" for s, n, _ in EXPECTED_BLOCKS])
@pytest.mark.slow
def test_block_counts(source, name, expected):
    blocks = se_retrofit.find_blocks(make_model(source, name))
    assert len(blocks) == expected
    assert all(b.layout == CHANNELS_FIRST for b in blocks)


def test_analysis_is_pure():
    model = timm.create_model("resnet18").train()
    model.layer2.eval()
    before = copy.deepcopy(model.state_dict())
    modes = {name: m.training for name, m in model.named_modules()}
    se_retrofit.find_blocks(model)
    assert {name: m.training for name, m in model.named_modules()} == modes
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("forward" in vars(m) for m in model.modules())


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


def test_blocks_inside_timm_notrace_modules_are_found():
    blocks = se_retrofit.find_blocks(timm.create_model("nf_resnet26"), small_input(1))
    assert [b.path for b in blocks][:2] == ["stages.0.0", "stages.0.1"] and len(blocks) == 8

