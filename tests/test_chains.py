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
@pytest.mark.slow
def test_chain_layers_found_one_per_conv_or_separable_pair(source, name, build, count):
    analysis = analyze(build())
    assert analysis.count("chain") == count
    assert analysis.blocks == [] and analysis.count("join") == 0


@pytest.mark.parametrize("position", ["post", "standard"])
@pytest.mark.parametrize("name,build,size,count", [
    ("vgg11_bn", lambda: tv.vgg11_bn(), 64, 8),
    ("mobilenetv1_100", lambda: timm.create_model("mobilenetv1_100"), 64, 13),
])
@pytest.mark.slow
def test_identity_and_liveness_after_each_chain_layer(name, build, size, count, position):
    torch.manual_seed(0)
    edited = check_identity_and_liveness(build(), torch.randn(2, 3, size, size), position=position)
    assert len(edited.se_retrofit.sites) == count and {s.kind for s in edited.se_retrofit.sites} == {"chain"}


@pytest.mark.slow
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


@pytest.mark.slow
def test_stages_select_chain_layers_by_resolution():
    analysis, plan = se_retrofit.plan(tv.vgg16_bn(), stages=[5], position="post")
    assert [s.unit for s in plan.sites] == ["features.34", "features.37", "features.40"]


@pytest.mark.parametrize("position", ["pre", "identity", "inner"])
@pytest.mark.slow
def test_positions_a_chain_has_not_are_refused_with_the_reason(position):
    with pytest.raises(ValueError, match=f"for all 8 chain layers, position '{position}' does not apply to a chain "
                                         r"unit \(use standard, post, stage\)$"):
        se_retrofit.retrofit(tv.vgg11(), position=position, example_input=torch.randn(1, 3, 64, 64))


def test_a_conv_without_activation_is_no_chain_layer():
    heads = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.Conv2d(8, 8, 3))
    assert analyze(heads, torch.randn(1, 3, 16, 16)).count("chain") == 0


# --- MONAI's patterns, written in plain torch ----------------------------------------------------

class _Convolution(nn.Sequential):
    """MONAI's ``Convolution``: a conv, then ``adn`` in its default order: norm → dropout → activation."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.add_module("conv", nn.Conv2d(cin, cout, 3, stride, 1))
        self.add_module("adn", nn.Sequential())
        self.adn.add_module("N", nn.InstanceNorm2d(cout, affine=True))
        self.adn.add_module("D", nn.Dropout(0.1))
        self.adn.add_module("A", nn.LeakyReLU(0.1))


class _TwoConv(nn.Sequential):  # BasicUNet's unit
    def __init__(self, cin, cout, stride=1):
        super().__init__(_Convolution(cin, cout, stride), _Convolution(cout, cout))


class _SharedActivationBlock(nn.Module):
    """DynUNet's ``UnetBasicBlock``: one ``lrelu`` module applied after each conv → norm."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1, self.conv2 = nn.Conv2d(cin, cout, 3, stride, 1), nn.Conv2d(cout, cout, 3, 1, 1)
        self.norm1, self.norm2 = nn.InstanceNorm2d(cout, affine=True), nn.InstanceNorm2d(cout, affine=True)
        self.lrelu = nn.LeakyReLU(0.01, inplace=True)

    def forward(self, x):
        out = self.lrelu(self.norm1(self.conv1(x)))
        return self.lrelu(self.norm2(self.conv2(out)))


MONAI_LIKE = {
    # 3 units x 2 convs, each conv → norm → dropout → activation
    "conv-norm-dropout-act": (lambda: nn.Sequential(_TwoConv(3, 8), _TwoConv(8, 16, 2), _TwoConv(16, 16, 2)), 6),
    # 3 blocks x 2 convs, the block's one activation module called after each
    "activation-called-twice": (lambda: nn.Sequential(_SharedActivationBlock(3, 8), _SharedActivationBlock(8, 16, 2),
                                                      _SharedActivationBlock(16, 16, 2)), 6),
}


@pytest.mark.parametrize("position", ["standard", "post"])
@pytest.mark.parametrize("name", MONAI_LIKE)
def test_monai_chain_patterns(name, position):
    build, count = MONAI_LIKE[name]
    model = build().eval()
    assert analyze(model, torch.randn(1, 3, 16, 16)).count("chain") == count
    edited = check_identity_and_liveness(model, torch.randn(2, 3, 16, 16), position=position)
    assert len(edited.se_retrofit.sites) == count


def test_a_shared_activation_is_gated_at_each_of_its_calls():
    model = nn.Sequential(_SharedActivationBlock(3, 8)).eval()
    edited = se_retrofit.retrofit(model, example_input=torch.randn(1, 3, 16, 16))
    assert [(s.block, s.gate, s.anchor, s.add_index) for s in edited.se_retrofit.sites] == [
        ("0", "child_call", "lrelu", 0), ("0", "child_call", "lrelu", 1)]


@pytest.mark.parametrize("name,build,count", [
    # encoder conv_0 and down_1..4, decoder upcat_4..1: 9 TwoConv units x 2 convs
    ("BasicUNet", lambda nets: nets.BasicUNet(2, 1, 2, features=(8, 8, 16, 32, 64, 8)), 18),
    # input block, 2 downsamples, bottleneck, 3 upsample blocks: 7 UnetBasicBlocks x 2 convs
    ("DynUNet", lambda nets: nets.DynUNet(2, 1, 2, [3, 3, 3, 3], [1, 2, 2, 2], [2, 2, 2], filters=[8, 16, 32, 64]), 14),
])
@pytest.mark.slow
def test_monai_unets(name, build, count):
    nets = pytest.importorskip("monai.networks.nets")
    analysis = analyze(build(nets).eval(), torch.randn(1, 1, 32, 32))
    assert (analysis.count("chain"), analysis.count("join"), len(analysis.blocks)) == (count, 0, 0)
    assert all(not u.gate_errors for u in analysis.units)


class _SamePaddedLayer(nn.Module):
    """HF MobileNetV1's ConvLayer: TF "same" padding computed from the input's size, which fx cannot
    trace (``if in_height % stride == 0``), then conv → norm → activation (a child called once)."""

    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.stride = stride
        self.conv, self.norm, self.act = nn.Conv2d(cin, cout, 3, stride), nn.BatchNorm2d(cout), nn.ReLU6()

    def forward(self, x):
        pad = 1 if x.shape[-1] % self.stride == 0 else 2
        return self.act(self.norm(self.conv(nn.functional.pad(x, (pad, pad, pad, pad)))))


@pytest.mark.parametrize("position", ["standard", "post"])
def test_a_chain_layer_fx_cannot_rewrite_is_gated_after_its_activation_from_outside(position):
    model = nn.Sequential(_SamePaddedLayer(3, 8), _SamePaddedLayer(8, 16, 2), _SamePaddedLayer(16, 16, 2)).eval()
    analysis = analyze(model, torch.randn(1, 3, 16, 16))
    assert analysis.count("chain") == 3 and all(dict(u.gate_errors) for u in analysis.units)
    edited = check_identity_and_liveness(model, torch.randn(2, 3, 16, 16), position=position)
    assert [(s.block, s.edit) for s in edited.se_retrofit.sites] == [(f"{i}.act", "wrap") for i in range(3)]
    assert edited(torch.randn(1, 3, 21, 21)).shape == model(torch.randn(1, 3, 21, 21)).shape  # another size


def test_hf_mobilenet_v1_every_chain_layer_edited():
    # transformers' MobileNetV1: 13 depthwise-separable pairs, each layer padding TF-style from its input
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.MobileNetV1ForImageClassification(
        transformers.MobileNetV1Config(depth_multiplier=0.25, image_size=64, num_labels=3)).eval()
    wrapped = _LogitsOnly(model)
    edited = check_identity_and_liveness(wrapped, torch.randn(2, 3, 64, 64))
    assert len(edited.se_retrofit.sites) == 13 and {s.edit for s in edited.se_retrofit.sites} == {"wrap"}


class _LogitsOnly(nn.Module):
    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, x):
        return self.model(x).logits
