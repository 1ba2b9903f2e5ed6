"""Every attention type at every position: identity at start, learning, overheads, layouts."""
import warnings

import pytest
import timm
import torch
import torchvision

import se_retrofit
from se_retrofit import POSITIONS
from se_retrofit.attention import list_attentions

from helpers import ResNet1d, as_if_pretrained, make_model, run, small_input

TYPES = ["se", "cbam", "bam", "eca"]
MODELS = [("timm", "resnet50"), ("timm", "convnext_tiny"), ("timm", "efficientnet_b0"),
          ("torchvision", "resnet50")]


def _retrofit(base, **kwargs):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", se_retrofit.StackedAttentionWarning)
        return se_retrofit.retrofit(base, **kwargs)


def test_all_four_types_are_registered():
    assert set(TYPES) <= set(list_attentions())


@pytest.mark.parametrize("source,name", MODELS, ids=[f"{s}:{n}" for s, n in MODELS])
@pytest.mark.parametrize("attention", TYPES)
@pytest.mark.slow
def test_identity_for_every_type_and_position(source, name, attention):
    base = make_model(source, name, **({"drop_path_rate": 0.1} if source == "timm" else {}))
    x = small_input()
    for position in POSITIONS:
        edited = _retrofit(base, attention=attention, position=position, example_input=x[:1])
        assert edited.se_retrofit.sites, position
        for training in (False, True):
            assert torch.equal(run(base, x, training), run(edited, x, training)), (position, training)


@pytest.mark.parametrize("attention", TYPES)
@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.slow
def test_every_new_parameter_learns_within_two_steps(attention, position):
    base = make_model("timm", "resnet18", num_classes=4)
    model = _retrofit(base, attention=attention, position=position, example_input=small_input(1))
    prefixes = tuple(f"{s.module_path}." for s in model.se_retrofit.sites)
    new = {n: p for n, p in model.named_parameters() if n.startswith(prefixes)}
    assert new
    learned = set()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = small_input(4), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        learned |= {n for n, p in new.items() if p.grad is not None and p.grad.abs().sum() > 0}
        optimiser.step()
    assert learned == set(new), sorted(set(new) - learned)


@pytest.mark.parametrize("attention,position,expected", [
    ("se", "standard", 2_530_992),     # the SE paper: ~2.5M on ResNet-50
    ("cbam", "standard", 2_516_544),   # CBAM paper: ~2.5M
    ("bam", "stage", 357_619),         # BAM paper: ~0.36M in 3 modules
    ("eca", "standard", 86),           # ECA paper: ~80
])
@pytest.mark.slow
def test_parameter_overheads_on_resnet50(attention, position, expected):
    base = timm.create_model("resnet50")
    edited = se_retrofit.retrofit(base, attention=attention, position=position)
    added = sum(p.numel() for p in edited.parameters()) - sum(p.numel() for p in base.parameters())
    assert added == expected
    if attention == "bam":
        assert [s.block for s in edited.se_retrofit.sites] == ["layer1.2", "layer2.3", "layer3.5"]


def test_bam_defaults_to_stage_placement_and_others_to_standard():
    base = timm.create_model("resnet18")
    assert se_retrofit.retrofit(base, attention="bam").se_retrofit.config.position == "stage"
    assert se_retrofit.retrofit(base, attention="eca").se_retrofit.config.position == "standard"


def test_inner_goes_after_the_spatial_conv_and_its_norm():
    edited = se_retrofit.retrofit(make_model("timm", "resnet50"), position="inner")
    site = edited.se_retrofit.sites[0]
    assert (site.block, site.anchor, site.channels) == ("layer1.0", "bn2", 64)
    with pytest.warns(se_retrofit.StackedAttentionWarning):  # its blocks have SE of their own
        tv = se_retrofit.retrofit(torchvision.models.mobilenet_v3_large(), position="inner")
    first = tv.se_retrofit.sites[0]
    assert first.anchor == "1" and first.block.endswith(".block.0")  # inside Conv2dNormActivation


@pytest.mark.slow
def test_block_patterns_and_exclusions():
    base = timm.create_model("resnet50")
    edited = se_retrofit.retrofit(base, blocks=["layer3.*", "layer4.0"], exclude=["layer3.5"])
    assert [s.block for s in edited.se_retrofit.sites] == [f"layer3.{i}" for i in range(5)] + ["layer4.0"]
    with pytest.raises(ValueError, match=r"pattern 'layer9\.\*' matches no residual block"):
        se_retrofit.retrofit(base, blocks=["layer9.*"])
    convnext = se_retrofit.retrofit(timm.create_model("convnext_tiny"), blocks=["stages.2.blocks.*"])
    assert len(convnext.se_retrofit.sites) == 9


@pytest.mark.parametrize("name,layout", [("test_vit", "tokens"), ("test_mambaout", "channels_last"),
                                         ("test_maxvit", "channels_last")])
@pytest.mark.slow
def test_token_and_channels_last_layouts_keep_identity(name, layout):
    base = as_if_pretrained(timm.create_model(name)).eval()
    x = torch.randn(2, 3, 160, 160, generator=torch.Generator().manual_seed(0))
    analysis = se_retrofit.analyze(base)
    assert layout in {b.layout for b in analysis.blocks}
    for attention in TYPES:
        for position in ("standard", "pre", "post", "identity"):
            edited = _retrofit(base, attention=attention, position=position)
            assert torch.equal(edited(x), base(x)), (attention, position)


def test_one_stage_models_have_no_stage_transitions():
    with pytest.raises(ValueError, match="position 'stage' goes between stages"):
        se_retrofit.retrofit(timm.create_model("test_vit"), position="stage")


@pytest.mark.parametrize("attention", TYPES)
@pytest.mark.slow
def test_one_and_three_dimensional_networks(attention):
    audio = as_if_pretrained(ResNet1d()).eval()
    signal = torch.randn(2, 1, 400)
    video = as_if_pretrained(torchvision.models.video.r3d_18()).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    for position in POSITIONS:
        edited = _retrofit(audio, attention=attention, position=position, example_input=signal[:1])
        assert torch.equal(edited(signal), audio(signal)), position
    for position in ("standard", "inner", "stage"):
        edited = _retrofit(video, attention=attention, position=position, example_input=clip)
        with torch.no_grad():
            assert torch.equal(edited(clip), video(clip)), position


@pytest.mark.parametrize("kwargs,message", [
    ({"attention": "eca", "squeeze": "max"}, "option squeeze does not apply to attention 'eca' "
                                             "(it takes: kernel_size, gate)"),
    ({"attention": "eca", "reduction": 8}, "option reduction does not apply to attention 'eca'"),
    ({"attention": "se", "kernel_size": 3}, "option kernel_size does not apply to attention 'se'"),
    ({"attention": "se", "gate": "relu"}, "gate must be one of sigmoid, hard_sigmoid, tanh"),
    ({"attention": "se", "squeeze": "median"}, "squeeze must be one of avg, max, avg\\+max"),
    ({"attention": "cbam", "kernel_size": 4}, "kernel_size must be an odd positive integer"),
    ({"attention": "se", "act": "nope"}, "unknown activation 'nope'"),
])
def test_options_are_checked_per_type(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(").replace(")", r"\)")):
        se_retrofit.retrofit(timm.create_model("resnet18"), **kwargs)
