"""Multi-branch joins (se_retrofit.joins): Inception modules, dense layers, ShuffleNet units, fire modules.

Counts from the models' sources: GoogLeNet 9 Inception modules, Inception-v3 11 (Mixed_5b … Mixed_7c;
InceptionE's split 3×3 branches are part of their module), DenseNet-121 58 dense layers
(6 + 12 + 24 + 16), ShuffleNetV2 16 units (4 + 8 + 4), SqueezeNet 8 fire modules.
"""
import pytest
import timm
import torch
import torchvision
from torch import nn

import se_retrofit
from se_retrofit.analysis import analyze

from helpers import as_if_pretrained, run

tv = torchvision.models

JOIN_COUNTS = [
    ("torchvision", "googlenet", lambda: tv.googlenet(init_weights=False, aux_logits=False), 9),
    ("torchvision", "inception_v3", lambda: tv.inception_v3(init_weights=False, aux_logits=False), 11),
    ("torchvision", "densenet121", lambda: tv.densenet121(), 58),
    ("torchvision", "shufflenet_v2_x1_0", lambda: tv.shufflenet_v2_x1_0(), 16),
    ("torchvision", "squeezenet1_1", lambda: tv.squeezenet1_1(), 8),
    ("timm", "inception_v3", lambda: timm.create_model("inception_v3"), 11),
    ("timm", "densenet121", lambda: timm.create_model("densenet121"), 58),
]


@pytest.mark.parametrize("source,name,build,count", JOIN_COUNTS, ids=[f"{r[0]}:{r[1]}" for r in JOIN_COUNTS])
@pytest.mark.slow
def test_joins_found_one_per_unit_of_the_source(source, name, build, count):
    analysis = analyze(build())
    assert analysis.count("join") == count
    assert analysis.blocks == [] and analysis.count("chain") == 0  # find_blocks stays residual-only
    assert [u.kind for u in analysis.units_of()] == ["join"] * count


def _edited_keys(base: nn.Module, edited: nn.Module) -> list[str]:
    return [k for k in edited.state_dict() if k not in base.state_dict()]


def check_identity_and_liveness(base: nn.Module, x: torch.Tensor, **options) -> nn.Module:
    """Exact identity in train and eval on trained-like statistics, and the new modules move the output."""
    base = as_if_pretrained(base)
    edited = se_retrofit.retrofit(base, example_input=x[:1], **options)
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(base, x, training)), training
    reference = run(edited, x, False)
    new = _edited_keys(base, edited)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in edited.named_parameters():
            if name in new:
                param.add_(torch.randn(param.shape, generator=generator))
    assert not torch.equal(run(edited, x, False), reference)
    return edited


# (build, input size, modules at post, modules at standard: one per new branch)
EDITS = {
    "googlenet": (lambda: tv.googlenet(init_weights=False, aux_logits=False), 64, 9, 36),
    "inception_v3": (lambda: tv.inception_v3(init_weights=False, aux_logits=False), 96, 11, 40),
    "densenet121": (lambda: tv.densenet121(), 64, 58, 58),
    "shufflenet_v2_x0_5": (lambda: tv.shufflenet_v2_x0_5(), 64, 16, 19),
}


@pytest.mark.parametrize("position", ["post", "standard"])
@pytest.mark.parametrize("name", list(EDITS))
def test_identity_and_liveness_at_every_join_position(name, position):
    build, size, at_post, at_standard = EDITS[name]
    torch.manual_seed(0)
    edited = check_identity_and_liveness(build(), torch.randn(2, 3, size, size), position=position)
    assert len(edited.se_retrofit.sites) == (at_post if position == "post" else at_standard)
    assert {s.kind for s in edited.se_retrofit.sites} == {"join"}


@pytest.mark.slow
def test_modules_sit_in_the_unit_that_owns_them():
    torch.manual_seed(0)
    googlenet = tv.googlenet(init_weights=False, aux_logits=False)
    post = se_retrofit.retrofit(googlenet, position="post", example_input=torch.randn(1, 3, 64, 64))
    assert "inception3a.se.fc1.weight" in post.state_dict()  # on the Inception module's concatenation
    standard = se_retrofit.retrofit(googlenet, position="standard", example_input=torch.randn(1, 3, 64, 64))
    assert "inception3a.branch1.se.fc1.weight" in standard.state_dict()  # on its first branch
    densenet = se_retrofit.retrofit(tv.densenet121(), example_input=torch.randn(1, 3, 64, 64))
    assert "features.denseblock1.denselayer1.se.fc1.weight" in densenet.state_dict()  # SE-DenseNet
    assert type(densenet) is type(tv.densenet121())


@pytest.mark.slow
def test_stage_position_puts_one_module_after_each_stage_but_the_last():
    torch.manual_seed(0)
    edited = check_identity_and_liveness(tv.shufflenet_v2_x0_5(), torch.randn(2, 3, 64, 64), position="stage")
    assert [s.unit for s in edited.se_retrofit.sites] == ["stage2.3", "stage3.7"]


@pytest.mark.parametrize("position", ["pre", "identity", "inner"])
def test_positions_a_join_has_not_are_refused_with_the_reason(position):
    with pytest.raises(ValueError, match=f"no block could be edited: for all 8 joins, position '{position}' does "
                                         r"not apply to a join unit \(use standard, post, stage\)$"):
        se_retrofit.retrofit(tv.squeezenet1_1(), position=position, example_input=torch.randn(1, 3, 64, 64))


# --- idioms: small models, one way of concatenating each ----------------------------------------

def _conv(cin, cout, k=3):
    return nn.Sequential(nn.Conv2d(cin, cout, k, padding=k // 2), nn.BatchNorm2d(cout), nn.ReLU())


class Inception(nn.Module):
    """Four branches from one input; the 3×3 branch splits in two and joins again inside (InceptionE)."""

    def __init__(self, c=8):
        super().__init__()
        self.b1, self.b2, self.b2a, self.b2b = _conv(c, 4, 1), _conv(c, 4, 1), _conv(4, 4, 3), _conv(4, 4, 3)
        self.b3 = _conv(c, 4, 3)
        self.pool = nn.Sequential(nn.MaxPool2d(3, 1, 1), _conv(c, 4, 1))

    def forward(self, x):
        b2 = self.b2(x)
        b2 = torch.cat([self.b2a(b2), self.b2b(b2)], 1)
        return torch.cat([self.b1(x), b2, self.b3(x), self.pool(x)], 1)


class DenseLayers(nn.Module):
    """cat([x, f(x)]) three times: three dense layers."""

    def __init__(self, c=8, growth=4):
        super().__init__()
        self.layers = nn.ModuleList(_conv(c + i * growth, growth) for i in range(3))

    def forward(self, x):
        for layer in self.layers:
            x = torch.cat([x, layer(x)], 1)
        return x


class UNetSkip(nn.Module):
    """A skip concatenated with a branch that went down and came back up: a fusion, not a join."""

    def __init__(self, c=8):
        super().__init__()
        self.down, self.up = _conv(c, c), nn.ConvTranspose2d(c, c, 2, 2)

    def forward(self, x):
        return torch.cat([x, self.up(self.down(nn.functional.max_pool2d(x, 2)))], 1)


class SpaceToDepth(nn.Module):
    """Pixel tiles concatenated (YOLOv5's Focus): no learned layer between the input and the tiles."""

    def __init__(self, c=8):
        super().__init__()
        self.conv = _conv(4 * c, c)

    def forward(self, x):
        return self.conv(torch.cat([x[..., ::2, ::2], x[..., 1::2, ::2], x[..., ::2, 1::2], x[..., 1::2, 1::2]], 1))


class AlongSpace(nn.Module):
    """Two maps stacked along the height: not a join of channels."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b = _conv(c, c), _conv(c, c)

    def forward(self, x):
        return torch.cat([self.a(x), self.b(x)], 2)


class ResidualWithJoin(nn.Module):
    """Res2Net-like: the concatenation lies inside a residual branch and belongs to that block."""

    def __init__(self, c=8):
        super().__init__()
        self.a, self.b, self.proj = _conv(c, c // 2), _conv(c, c // 2), nn.Conv2d(c, c, 1)

    def forward(self, x):
        return x + self.proj(torch.cat([self.a(x), self.b(x)], 1))


def _stem(module):
    return nn.Sequential(_conv(3, 8), module)


@pytest.mark.parametrize("module,joins,residuals", [
    (Inception(), 1, 0), (DenseLayers(), 3, 0), (UNetSkip(), 0, 0), (SpaceToDepth(), 0, 0), (AlongSpace(), 0, 0),
    (ResidualWithJoin(), 0, 1),
], ids=["inception-nested", "dense", "unet-skip", "space-to-depth", "along-height", "inside-residual"])
def test_join_idioms(module, joins, residuals):
    analysis = analyze(_stem(module), torch.randn(1, 3, 16, 16))
    assert (analysis.count("join"), len(analysis.blocks)) == (joins, residuals)


def test_a_class_token_concatenated_is_no_join():
    vit = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8)
    analysis = analyze(vit, torch.randn(1, 3, 32, 32))
    assert analysis.count("join") == 0 and len(analysis.blocks) == 24


def test_a_model_with_residual_blocks_and_joins_edits_its_residual_blocks_unless_asked():
    torch.manual_seed(0)
    model = nn.Sequential(_conv(3, 8), ResidualWithJoin(), Inception())
    x = torch.randn(2, 3, 16, 16)
    analysis = analyze(model, x[:1])
    assert (len(analysis.blocks), analysis.count("join")) == (1, 1)
    default = se_retrofit.retrofit(model, example_input=x[:1])
    assert [s.kind for s in default.se_retrofit.sites] == ["residual"]
    both = check_identity_and_liveness(model, x, kinds=["residual", "join"], position="post")
    assert [s.kind for s in both.se_retrofit.sites] == ["residual", "join"]


@pytest.mark.slow
def test_a_saved_join_edit_loads_onto_a_fresh_base(tmp_path):
    torch.manual_seed(0)
    base = as_if_pretrained(tv.densenet121()).eval()
    edited = se_retrofit.retrofit(base, stages=[4], example_input=torch.randn(1, 3, 64, 64)).eval()
    with torch.no_grad():
        for name, param in edited.named_parameters():
            if ".se." in name:
                param.add_(0.1)  # as if fine-tuned
    path = se_retrofit.save(edited, tmp_path / "dense")
    again = se_retrofit.load(path, base_model=tv.densenet121()).eval()
    x = torch.randn(1, 3, 64, 64)
    assert len(again.se_retrofit.sites) == 16 and again.se_retrofit.sites[0].gate == edited.se_retrofit.sites[0].gate
    assert torch.equal(again(x), edited(x))
