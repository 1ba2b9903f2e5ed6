"""Plain chains (se_retrofit.chains): VGG, AlexNet, MobileNetV1, LCNet — SE after the activation of each
conv (SE-VGG-16), after each depthwise-separable pair's pointwise activation (SE-MobileNet).

Counts from the models' sources: VGG-16 13 convs, VGG-11 8, AlexNet 5, MobileNetV1 13 separable convs
(its stem conv is no chain layer: the chain's repeating layer is the separable pair), LCNet 13.
"""
import pytest
import timm
import torch
import torchvision
from torch import nn

import se_retrofit
from se_retrofit.analysis import analyze

from test_joins import check_identity_and_liveness

tv = torchvision.models

CHAIN_COUNTS = [
    ("torchvision", "vgg16_bn", lambda: tv.vgg16_bn(), 13),
    ("torchvision", "vgg11", lambda: tv.vgg11(), 8),
    ("torchvision", "alexnet", lambda: tv.alexnet(), 5),
    ("timm", "vgg16", lambda: timm.create_model("vgg16"), 13),  # its 7×7 "fc6" conv maps to 1×1: no site
    ("timm", "mobilenetv1_100", lambda: timm.create_model("mobilenetv1_100"), 13),
    ("timm", "lcnet_050", lambda: timm.create_model("lcnet_050"), 13),
    # two inverted bottlenecks without a skip, their projection linear: the site follows its norm
    ("timm", "test_efficientnet", lambda: timm.create_model("test_efficientnet"), 2),
]


@pytest.mark.parametrize("source,name,build,count", CHAIN_COUNTS, ids=[f"{r[0]}:{r[1]}" for r in CHAIN_COUNTS])
def test_chain_layers_found_one_per_conv_or_separable_pair(source, name, build, count):
    analysis = analyze(build())
    assert analysis.count("chain") == count
    assert analysis.blocks == [] and analysis.count("join") == 0


@pytest.mark.parametrize("position", ["post", "standard"])
@pytest.mark.parametrize("name,build,size,count", [
    ("vgg11_bn", lambda: tv.vgg11_bn(), 64, 8),
    ("mobilenetv1_100", lambda: timm.create_model("mobilenetv1_100"), 64, 13),
])
def test_identity_and_liveness_after_each_chain_layer(name, build, size, count, position):
    torch.manual_seed(0)
    edited = check_identity_and_liveness(build(), torch.randn(2, 3, size, size), position=position)
    assert len(edited.se_retrofit.sites) == count and {s.kind for s in edited.se_retrofit.sites} == {"chain"}


def test_the_module_follows_the_activation():
    edited = se_retrofit.retrofit(tv.vgg11_bn(), position="post", example_input=torch.randn(1, 3, 64, 64))
    site = edited.se_retrofit.sites[0]
    assert (site.unit, site.block, site.anchor, site.channels) == ("features.0", "features", "2", 64)
    mobilenet = se_retrofit.retrofit(timm.create_model("mobilenetv1_100"), example_input=torch.randn(1, 3, 64, 64))
    first = mobilenet.se_retrofit.sites[0]
    assert (first.unit, first.block, first.anchor, first.channels) == ("blocks.0.0.conv_pw", "blocks.0.0", "bn2", 64)


def test_a_residual_network_has_no_chain_layers():
    analysis = analyze(timm.create_model("resnet18"))
    assert (len(analysis.blocks), analysis.count("chain"), analysis.count("join")) == (8, 0, 0)


def test_stages_select_chain_layers_by_resolution():
    analysis, plan = se_retrofit.plan(tv.vgg16_bn(), stages=[5], position="post")
    assert [s.unit for s in plan.sites] == ["features.34", "features.37", "features.40"]


@pytest.mark.parametrize("position", ["pre", "identity", "inner"])
def test_positions_a_chain_has_not_are_refused_with_the_reason(position):
    with pytest.raises(ValueError, match=f"for all 8 chain layers, position '{position}' does not apply to a chain "
                                         r"unit \(use standard, post, stage\)$"):
        se_retrofit.retrofit(tv.vgg11(), position=position, example_input=torch.randn(1, 3, 64, 64))


def test_a_conv_without_activation_is_no_chain_layer():
    heads = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3))
    assert analyze(heads, torch.randn(1, 3, 16, 16)).count("chain") == 0
