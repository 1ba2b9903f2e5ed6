"""What retrofit() does to be cheap is safe: probes on meta tensors, a second probe only where the
layers cannot tell the layout, one trace and one generated forward per block structure, one check
of the attention options.

Each shortcut is checked where it could go wrong: a forward that needs real values, a block that
reads ``self.training``, blocks of one class whose forwards read different settings of a child, a
channels-last map whose channel count equals its height.
"""
from __future__ import annotations

import dataclasses

import pytest
import timm
import torch
from torch import nn

import se_retrofit
from se_retrofit import tracing
from se_retrofit.analysis import NOT_NEEDED, analyze
from se_retrofit.attention.se import SqueezeExcite

from helpers import as_if_pretrained, run, small_input


@pytest.fixture
def traces(monkeypatch):
    """Counts the fx traces actually run (cache hits do not count)."""
    count = []
    original = tracing._trace

    def counted(*args, **kwargs):
        count.append(args[0])
        return original(*args, **kwargs)

    monkeypatch.setattr(tracing, "_trace", counted)
    return count


def test_a_resnet_is_traced_once_per_block_structure(traces):
    base = as_if_pretrained(timm.create_model("resnet18")).eval()
    x = small_input()
    model = se_retrofit.retrofit(base, example_input=x)
    # 8 blocks, analysed and edited in 2 modes (32 traces before): a plain block and a downsampling one
    assert sorted(type(m).__name__ + str(m.downsample is not None) for m in traces) == ["BasicBlockFalse", "BasicBlockTrue"]
    for training in (False, True):
        assert torch.equal(run(model, x, training), run(base, x, training))
    assert analyze(base).probes == {"first": "meta", "second": NOT_NEEDED} and analyze(base).notes == []


class Holder(nn.Module):
    def __init__(self, factor: int):
        super().__init__()
        self.factor = factor


class ModeBlock(nn.Module):
    """Reads ``self.training`` and a child's setting: its graph differs by mode and by that setting."""

    def __init__(self, channels: int, factor: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.holder = Holder(factor)

    def forward(self, x):
        out = self.bn(self.conv(x)) * self.holder.factor
        if self.training:
            out = out * 0.5
        return x + out


class TwoBlocks(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.blocks = nn.Sequential(ModeBlock(8, 1), ModeBlock(8, 3))

    def forward(self, x):
        return self.blocks(self.stem(x)).mean((2, 3))


def test_a_graph_is_shared_only_where_the_mode_and_the_settings_read_agree(traces):
    base = as_if_pretrained(TwoBlocks()).eval()
    x = small_input()
    model = se_retrofit.retrofit(base, example_input=x)
    for training in (False, True):
        assert torch.equal(run(model, x, training), run(base, x, training))
    assert len(traces) == 4  # 2 settings of holder.factor x 2 modes: nothing shared that should not be
    assert not torch.equal(run(base, x, True), run(base, x, False))  # the modes do compute different things


class NeedsValues(nn.Module):
    """A forward that reads a value (``.item()``): meta and fake tensors have none."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)

    def forward(self, x):
        if x.abs().sum().item() >= 0:
            x = x + self.conv(x)
        return x


def test_a_forward_that_needs_values_is_probed_on_real_tensors_and_says_why():
    analysis = analyze(NeedsValues(), small_input(1))
    assert analysis.probes == {"first": "real", "second": NOT_NEEDED} and len(analysis.blocks) == 1
    # 3 channels on a 3-pixel-high map: the conv that writes the branch says where its channels are (dim 1),
    # so no second probe is needed even where the sizes alone could not tell
    analysis = analyze(NeedsValues(), torch.randn(1, 3, 3, 8))
    assert analysis.probes == {"first": "real", "second": NOT_NEEDED} and analysis.blocks[0].layout == "channels_first"
    assert analysis.notes[0].startswith("first probe not on meta tensors: ")
    assert any(note.startswith("first probe not on fake tensors: ") for note in analysis.notes)


class FixedSize(nn.Module):
    """Refuses any input but 32x32 (as ViTs with a fixed img_size do)."""

    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(32, 32) * 0.1)

    def forward(self, x):
        assert x.shape[-1] == 32, f"Input width ({x.shape[-1]}) doesn't match model (32)."
        return x + torch.matmul(x, self.weight)


def test_a_second_probe_the_model_refuses_is_recorded_and_described():
    analysis = analyze(FixedSize(), torch.randn(1, 3, 32, 32))
    refused = ("not run: the model refuses an input of shape (1, 3, 64, 64) "
               "(AssertionError: Input width (64) doesn't match model (32).)")
    assert analysis.probes == {"first": "meta", "second": refused} and len(analysis.blocks) == 1
    told = analysis.blocks[0].layout != "unknown"  # the branch's layers may tell it all the same
    assert ("the second probe" in analysis.describe()) is not told
    unknown = dataclasses.replace(analysis, blocks=[dataclasses.replace(analysis.blocks[0], layout="unknown")])
    assert unknown.describe().endswith(f"; layout told from the layers alone: the second probe {refused}")


def test_retrofit_leaves_the_thread_count_as_it_was():
    threads = torch.get_num_threads()
    se_retrofit.retrofit(timm.create_model("resnet18"), example_input=small_input(1))
    assert torch.get_num_threads() == threads


class ChannelsLastBlock(nn.Module):
    """ConvNeXt's layout: a depthwise conv in NCHW, the rest and the addition in NHWC."""

    def __init__(self, channels: int):
        super().__init__()
        self.dwconv = nn.Conv2d(channels, channels, 3, padding=1, groups=channels)
        self.norm = nn.LayerNorm(channels)
        self.fc = nn.Linear(channels, channels)

    def forward(self, x):  # x: N, H, W, C
        y = self.dwconv(x.permute(0, 3, 1, 2)).permute(0, 2, 3, 1)
        return x + self.fc(self.norm(y))


class ChannelsLastNet(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 1)
        self.blocks = nn.Sequential(ChannelsLastBlock(channels), ChannelsLastBlock(channels))

    def forward(self, x):
        return self.blocks(self.stem(x).permute(0, 2, 3, 1)).mean((1, 2))


def test_the_layer_writing_the_branch_tells_the_layout_where_sizes_cannot():
    """The NHWC sum (N, H, W, C) of a square map has its size 1 equal to a spatial size, and a
    channels-first map may have as many channels as rows: the sizes cannot tell, the layer that writes
    the branch can, so no second probe runs."""
    analysis = analyze(ChannelsLastNet(16).eval(), torch.randn(1, 3, 20, 20))
    assert [(b.layout, b.channel_dim) for b in analysis.blocks] == [("channels_last", 3)] * 2
    assert analysis.probes["second"] == NOT_NEEDED
    for size in ((8, 12), (10, 12)):
        analysis = analyze(NeedsNoValues(8).eval(), torch.randn(1, 3, *size))
        assert analysis.probes["second"] == NOT_NEEDED and analysis.blocks[0].layout == "channels_first"


class NeedsNoValues(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 1)
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        x = self.stem(x)
        return x + self.conv(x)


def test_a_conv_that_tells_the_layout_spares_the_second_probe(monkeypatch):
    runs = []
    original = se_retrofit.probing._second_shapes
    monkeypatch.setattr(se_retrofit.probing, "_second_shapes", lambda *a: runs.append(1) or original(*a))
    analysis = analyze(timm.create_model("resnet18").eval(), small_input(1))
    assert runs == [] and len(analysis.blocks) == 8 and {b.layout for b in analysis.blocks} == {"channels_first"}


def test_blocks_of_one_structure_share_one_generated_forward(monkeypatch):
    base = as_if_pretrained(timm.create_model("resnet18")).eval()
    generated = []
    original = torch.fx.Graph.python_code
    monkeypatch.setattr(torch.fx.Graph, "python_code", lambda self, *a, **k: generated.append(1) or original(self, *a, **k))
    x = small_input()
    model = se_retrofit.retrofit(base, example_input=x)
    assert len(generated) == 2  # a plain block and a downsampling one, one graph for both modes, any width
    for training in (False, True):
        assert torch.equal(run(model, x, training), run(base, x, training))
    assert len({type(block) for block in model.modules() if type(block).__name__ == "BasicBlock"}) == 2


def test_attention_options_are_checked_once_and_each_site_built_once(monkeypatch):
    built = []
    original = SqueezeExcite.__init__

    def counted(self, channels, **options):
        built.append(channels)
        original(self, channels, **options)

    monkeypatch.setattr(SqueezeExcite, "__init__", counted)
    se_retrofit.retrofit(timm.create_model("resnet18"), example_input=small_input(1), reduction=8)
    # the options checked when the config is made and when surgery starts (64 channels), then the 8 sites
    assert sorted(built) == sorted([64, 64] + [64, 64, 128, 128, 256, 256, 512, 512])
