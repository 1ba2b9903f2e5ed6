"""Surgery: the edited model computes exactly what the original did, keeps what it had, and learns."""
import copy
import warnings

import pytest
import timm
import torch
import torchvision
from torch import nn

import se_retrofit
from se_retrofit import POSITIONS
from se_retrofit.edited import base_class

from helpers import RESIDUAL_MODELS, ResNet1d, as_if_pretrained, make_model, max_rel_diff, run, small_input

DROP_PATH = {"resnet18", "resnet50", "resnext50_32x4d", "convnext_tiny", "efficientnet_b0", "mobilenetv2_100",
             "regnety_008", "res2net50_26w_4s"}


def _base(source, name):
    kwargs = {"drop_path_rate": 0.2} if source == "timm" and name in DROP_PATH else {}
    return make_model(source, name, **kwargs)


@pytest.mark.parametrize("source,name,count", RESIDUAL_MODELS, ids=[f"{s}:{n}" for s, n, _ in RESIDUAL_MODELS])
def test_identity_at_every_position_in_eval_and_train(source, name, count):
    base = _base(source, name)
    x = small_input()
    stages = len(se_retrofit.analyze(base, x[:1]).stages)
    for position in POSITIONS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", se_retrofit.StackedAttentionWarning)
            edited = se_retrofit.retrofit(base, position=position, example_input=x[:1])
        assert len(edited.se_retrofit.sites) == (stages - 1 if position == "stage" else count), position
        for training in (False, True):
            expected, got = run(base, x, training), run(edited, x, training)
            assert max_rel_diff(expected, got) <= 1e-6, (position, training)
            assert torch.equal(expected, got), (position, training)  # bit-identical by design


@pytest.mark.parametrize("position", POSITIONS)
@pytest.mark.slow
def test_every_new_parameter_learns_within_two_steps(position):
    # On a fresh timm model each block's last BN scale is 0: no gate can learn on all-zero features.
    base = make_model("timm", "resnet18", num_classes=4)
    model = se_retrofit.retrofit(base, position=position, example_input=small_input(1))
    new = {n: p for n, p in model.named_parameters() if ".se." in n}
    assert len(new) == 4 * len(model.se_retrofit.sites) == 4 * (3 if position == "stage" else 8)
    seen = {n: False for n in new}
    optimiser = torch.optim.SGD(model.parameters(), lr=0.1)
    x, y = small_input(4), torch.tensor([0, 1, 2, 3])
    for _ in range(2):
        optimiser.zero_grad()
        torch.nn.functional.cross_entropy(model(x), y).backward()
        for n, p in new.items():
            seen[n] |= p.grad is not None and bool(p.grad.abs().sum() > 0)
        optimiser.step()
    assert all(seen.values()), [n for n, ok in seen.items() if not ok]


def test_model_keeps_class_attributes_and_keys():
    base = timm.create_model("resnet50")
    edited = se_retrofit.retrofit(base)
    assert type(edited) is type(base)
    assert edited.pretrained_cfg == base.pretrained_cfg
    assert [f["module"] for f in edited.feature_info] == [f["module"] for f in base.feature_info]
    x = small_input(1)
    assert torch.equal(edited.eval().forward_features(x), base.eval().forward_features(x))
    edited.reset_classifier(7)
    assert edited(x).shape == (1, 7)
    base_keys, edited_keys = set(base.state_dict()), set(edited.state_dict())
    assert base_keys < edited_keys
    assert {k for k in edited_keys - base_keys if k.startswith("layer1.0.")} == {
        "layer1.0.se.fc1.weight", "layer1.0.se.fc1.bias", "layer1.0.se.fc2.weight", "layer1.0.se.fc2.bias"}
    # the block's forward lives on a generated subclass of its own class (so that it pickles)
    assert isinstance(edited.layer1[0], type(base.layer1[0]))
    assert base_class(edited.layer1[0]) is type(base.layer1[0]) and repr(edited.layer1[0]).startswith("Bottleneck(")


def test_torchvision_model_keeps_its_attributes():
    base = torchvision.models.resnet50()
    edited = se_retrofit.retrofit(base, position="post")
    assert type(edited) is torchvision.models.ResNet and edited.fc.in_features == 2048
    assert "layer4.2.se.fc2.bias" in edited.state_dict()


def test_caller_model_is_not_mutated_unless_inplace():
    base = timm.create_model("resnet18").train()
    keys = set(base.state_dict())
    edited = se_retrofit.retrofit(base)
    assert edited is not base and set(base.state_dict()) == keys and base.training
    assert not any("forward" in vars(m) for m in base.modules())
    same = se_retrofit.retrofit(base, inplace=True)
    assert same is base and "layer1.0.se.fc1.weight" in base.state_dict()


def test_training_mode_of_every_module_is_kept():
    base = timm.create_model("resnet18").train()
    base.layer3.eval()
    edited = se_retrofit.retrofit(base)
    assert edited.training and not edited.layer3.training and edited.layer2.training


def test_stage_selection_and_reduction():
    edited = se_retrofit.retrofit(timm.create_model("resnet50"), stages=[3, 4], reduction=8)
    assert [s.block for s in edited.se_retrofit.sites] == [f"layer3.{i}" for i in range(6)] + \
        [f"layer4.{i}" for i in range(3)]
    assert edited.layer3[0].se.fc1.out_channels == 1024 // 8
    with pytest.raises(ValueError, match=r"stage\(s\) 5 out of range.*stages 1-4"):
        se_retrofit.retrofit(timm.create_model("resnet18"), stages=[5])


def test_pre_position_sizes_the_module_for_the_block_input():
    edited = se_retrofit.retrofit(timm.create_model("resnet50"), position="pre")
    assert edited.layer1[0].se.fc1.in_channels == 64 and edited.layer2[0].se.fc1.in_channels == 256


def test_random_init_changes_the_output():
    base = make_model("timm", "resnet18").eval()
    edited = se_retrofit.retrofit(base, init="random").eval()
    x = small_input(1)
    assert not torch.allclose(base(x), edited(x))
    gates = edited.layer1[0].se
    assert gates.gate.scale == 1.0


def test_stacking_on_existing_attention_warns():
    with pytest.warns(se_retrofit.StackedAttentionWarning, match="already apply channel attention"):
        se_retrofit.retrofit(timm.create_model("efficientnet_b0"))


def test_retrofitting_twice_stacks_and_keeps_identity():
    base = make_model("timm", "resnet18").eval()
    once = se_retrofit.retrofit(base, position="standard")
    with pytest.warns(se_retrofit.StackedAttentionWarning):
        twice = se_retrofit.retrofit(once, position="post")
    assert isinstance(twice.layer1[0].se1, torch.nn.Module)
    x = small_input(1)
    assert torch.equal(twice.eval()(x), base(x))


def test_edited_model_deep_copies_and_runs():
    edited = se_retrofit.retrofit(make_model("timm", "resnet18")).eval()
    clone = copy.deepcopy(edited)
    with torch.no_grad():
        clone.layer1[0].se.fc2.bias.fill_(3.0)
    x = small_input(1)
    assert not torch.equal(clone(x), edited(x))  # the copy's forward uses the copy's modules


def test_one_dimensional_and_video_networks():
    audio = as_if_pretrained(ResNet1d()).eval()
    signal = torch.randn(2, 1, 400)
    edited = se_retrofit.retrofit(audio, example_input=signal[:1])
    assert isinstance(edited.layers[2].se.fc1, torch.nn.Conv1d)
    assert torch.equal(edited(signal), audio(signal))
    video = as_if_pretrained(torchvision.models.video.r3d_18()).eval()
    clip = torch.randn(1, 3, 4, 32, 32)
    edited = se_retrofit.retrofit(video, position="post", example_input=clip)
    assert isinstance(edited.layer1[0].se.fc1, torch.nn.Conv3d)
    with torch.no_grad():
        assert torch.equal(edited(clip), video(clip))


class _FixedSizeResidual(torch.nn.Module):
    """Accepts one input size only, and no layer of it says where the channels are: a pooling token
    mixer with a learned scale, ``x + γ·(pool(x) − x)`` (a norm or conv reading ``x`` or the sum would
    say it)."""

    def __init__(self):
        super().__init__()
        self.scale = torch.nn.Parameter(torch.ones(1))
        self.pool = torch.nn.AvgPool2d(3, 1, 1)

    def forward(self, x):
        torch._assert(x.shape[-1] == 16, "this model takes 16-wide inputs only")
        return x + self.scale * (self.pool(x) - x)


def test_ambiguous_layouts_are_skipped_with_a_reason():
    analysis, plan = se_retrofit.plan(_FixedSizeResidual(), example_input=torch.randn(1, 4, 16, 16))
    assert len(analysis.blocks) == 1 and analysis.blocks[0].layout == "unknown"
    assert plan.sites == [] and plan.skipped == {
        "": "layout unknown: the channel dimension could not be told from the probes"}
    with pytest.raises(ValueError, match="no block could be edited"):
        se_retrofit.retrofit(_FixedSizeResidual(), example_input=torch.randn(1, 4, 16, 16))


def test_a_model_with_no_unit_of_any_kind_is_a_clear_error():
    mlp = nn.Sequential(nn.Flatten(), nn.Linear(48, 16), nn.ReLU(), nn.Linear(16, 4))
    with pytest.raises(ValueError, match="no residual blocks found, nor joins of branches or conv chain layers: "
                                         "the model has no additions at all"):
        se_retrofit.retrofit(mlp, example_input=torch.randn(1, 3, 4, 4))


@pytest.mark.parametrize("kwargs,message", [
    ({"position": "middle"}, "unknown position 'middle'"),
    ({"reduction": 0}, "reduction must be a positive integer"),
    ({"attention": "nope"}, "unknown attention type 'nope'"),
    ({"init": "zeros"}, "unknown init 'zeros'"),
    ({"stages": [0]}, "stages must be positive integers"),
])
def test_bad_options_raise_value_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        se_retrofit.retrofit(timm.create_model("resnet18"), **kwargs)


class _ModeReadingBlock(torch.nn.Module):
    """A block whose own forward reads self.training (functional dropout on the branch)."""

    def __init__(self, channels=8):
        super().__init__()
        self.conv1 = torch.nn.Conv2d(channels, channels, 3, padding=1)
        self.act = torch.nn.ReLU()
        self.conv2 = torch.nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x):
        out = self.conv2(self.act(self.conv1(x)))
        out = torch.nn.functional.dropout(out, 0.5, training=self.training)
        return self.act(out + x)


def test_blocks_reading_training_flag_keep_both_behaviours():
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _ModeReadingBlock(), _ModeReadingBlock())
    x = small_input(2, 16)
    edited = se_retrofit.retrofit(base, position="standard", example_input=x[:1])
    assert len(edited.se_retrofit.sites) == 2
    for training in (True, False):
        assert torch.equal(run(base, x, training), run(edited, x, training)), training
    assert not torch.equal(run(edited, x, True), run(edited, x, False))  # dropout only while training


def test_native_se_models_are_flagged():
    blocks = se_retrofit.find_blocks(timm.create_model("seresnet50"))
    assert len(blocks) == 16 and all(b.has_attention for b in blocks)


def test_blocks_reading_training_flag_can_be_edited_twice():
    base = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 3, padding=1), _ModeReadingBlock())
    x = small_input(2, 16)
    once = se_retrofit.retrofit(base, position="standard", example_input=x[:1])
    with pytest.warns(se_retrofit.StackedAttentionWarning):
        twice = se_retrofit.retrofit(once, position="post", example_input=x[:1])
    assert {"se", "se1"} <= set(dict(twice[1].named_children()))
    for training in (True, False):
        assert torch.equal(run(base, x, training), run(twice, x, training)), training


@pytest.mark.slow
def test_blocks_with_optional_arguments_keep_both_call_forms():
    # DLA's trees call the same block class with a shortcut (tree1) and without one (tree2)
    base = make_model("timm", "dla34").eval()
    x = small_input(2)
    for position in POSITIONS:
        edited = se_retrofit.retrofit(base, position=position, example_input=x[:1])
        assert len(edited.se_retrofit.sites) == (3 if position == "stage" else 12), position
        assert torch.equal(edited(x), base(x)), position


class _TupleAttention(torch.nn.Module):
    """Returns (output, weights), as Hugging Face attention layers do."""

    def __init__(self, dim: int):
        super().__init__()
        self.proj = torch.nn.Linear(dim, dim)

    def forward(self, x, mask=None, **kwargs):
        return self.proj(x) * kwargs.get("scale", 1.0), None


class _KeywordLayer(torch.nn.Module):
    """A Hugging Face style layer: `**kwargs` passed on, a tuple unpacked, two residual adds."""

    def __init__(self, dim: int = 16):
        super().__init__()
        self.norm1, self.norm2 = torch.nn.LayerNorm(dim), torch.nn.LayerNorm(dim)
        self.attention = _TupleAttention(dim)
        self.mlp = torch.nn.Sequential(torch.nn.Linear(dim, 2 * dim), torch.nn.GELU(), torch.nn.Linear(2 * dim, dim))

    def forward(self, hidden, mask=None, **kwargs):
        attended, _ = self.attention(self.norm1(hidden), mask, **kwargs)
        hidden = attended + hidden
        return hidden + self.mlp(self.norm2(hidden))


class _KeywordModel(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = torch.nn.Conv2d(3, 16, 8, 8)
        self.layers = torch.nn.ModuleList([_KeywordLayer(), _KeywordLayer()])
        self.head = torch.nn.Linear(16, 5)

    def forward(self, x):
        hidden = self.embed(x).flatten(2).transpose(1, 2)
        for layer in self.layers:
            hidden = layer(hidden)
        return self.head(hidden.mean(1))


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity"])
def test_layers_taking_var_keyword_arguments_are_edited(position):
    """A forward with **kwargs (every Hugging Face layer) is edited, and passes them on as it did."""
    base = as_if_pretrained(_KeywordModel()).eval()
    x = small_input(size=32)
    model = se_retrofit.retrofit(base, position=position, example_input=x)
    assert len(se_retrofit.record_of(model).sites) == 4
    for training in (False, True):
        assert torch.equal(run(model, x, training), run(base, x, training))
    with torch.no_grad():
        for parameter in se_retrofit.attention_parameters(model):
            parameter.add_(0.1)
    assert not torch.equal(run(model, x, False), run(base, x, False))
    hidden, fresh = torch.randn(1, 16, 16), se_retrofit.retrofit(base, position=position, example_input=x)
    with torch.no_grad():  # the edited layer passes its **kwargs on to the attention, as the original does
        scaled = base.layers[0](hidden, scale=2.0)
        assert not torch.equal(scaled, base.layers[0](hidden))
        assert torch.equal(fresh.layers[0](hidden, scale=2.0), scaled)


class _DataDependentBlock(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = torch.nn.Conv2d(8, 8, 3, padding=1)

    def forward(self, x):
        if x.mean() > 0:  # data-dependent control flow: torch.fx cannot trace this forward
            return x + self.conv(x)
        return x - self.conv(x)


def test_a_block_whose_forward_cannot_be_rewritten_is_a_clear_error():
    from se_retrofit.config import RetrofitConfig, Site
    from se_retrofit.surgery import SurgeryError, apply_sites

    model = torch.nn.Sequential(_DataDependentBlock())
    site = Site(block="0", add_index=0, shortcut_arg=0, position="standard", channels=8, spatial_dims=2, stage=1,
                module_name="se")
    with pytest.raises(SurgeryError, match=r"_DataDependentBlock at '0': its forward cannot be rewritten \(torch.fx: "
                                           r"TraceError.*exclude=\['0'\]"):
        apply_sites(model, [site], RetrofitConfig())
    assert not hasattr(model[0], "se")  # nothing attached


# --- the residual addition stays in place where the original wrote it so ----------------------

def _sources(block: nn.Module) -> list[str]:
    from se_retrofit.edited import SPEC_ATTR

    return list(getattr(type(block), SPEC_ATTR).sources.values())


class Doubling(nn.Module):
    """A user attention type without ``writable_output``: the sum must not be written into its output."""

    def __init__(self, channels: int, *, spatial_dims: int = 2):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(1, channels, *([1] * spatial_dims)))

    def forward(self, x):
        return x * (1 + self.weight)


@pytest.mark.parametrize("position", ["standard", "post", "pre", "identity"])
@pytest.mark.slow
def test_an_in_place_residual_addition_stays_in_place(position):
    """timm's ResNet writes ``x += shortcut``; an fx trace records ``x + shortcut`` (one more
    block-sized tensor per block): the edited forward adds in place again, the values unchanged."""
    base = as_if_pretrained(timm.create_model("resnet18")).eval()
    x = small_input()
    model = se_retrofit.retrofit(base, position=position, example_input=x)
    assert all(".add_(" in source and " + " not in source for source in _sources(model.layer1[0]))
    for training in (False, True):
        assert torch.equal(run(model, x, training), run(base, x, training))
    model.train()(x).sum().backward()  # autograd accepts the write into the attention's output
    assert all(p.grad is not None for n, p in model.named_parameters() if ".se." in n and "fc2" in n)


def test_an_addition_written_out_of_place_or_into_an_unknown_modules_output_stays_so():
    x = small_input()
    efficientnet = se_retrofit.retrofit(as_if_pretrained(timm.create_model("efficientnet_b0")).eval(), example_input=x)
    assert all(".add_(" not in source for source in _sources(efficientnet.blocks[1][1]))  # `drop_path(x) + shortcut`
    from se_retrofit.attention import unregister_attention

    se_retrofit.register_attention("doubling_test", identity_init=lambda m: None)(Doubling)
    try:
        base = timm.create_model("resnet18").eval()
        model = se_retrofit.retrofit(base, attention="doubling_test", example_input=x)
    finally:
        unregister_attention("doubling_test")
    assert all(".add_(" not in source for source in _sources(model.layer1[0]))
    assert torch.equal(run(model, x, False), run(base, x, False))
