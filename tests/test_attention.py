"""The SE module and the attention registry."""
import pytest
import timm
import torch
from timm.layers import SEModule
from torch import nn

import se_retrofit
from se_retrofit.attention import create_attention, get_attention, list_attentions, unregister_attention
from se_retrofit.attention.se import SqueezeExcite, reduced_channels


@pytest.mark.parametrize("channels", [16, 64, 96, 256, 1000, 2048])
def test_reduced_width_matches_timm(channels):
    assert SqueezeExcite(channels).fc1.out_channels == SEModule(channels).fc1.out_channels
    assert reduced_channels(channels, 16, divisor=1) == max(1, int(channels / 16 + 0.5))  # half up


def test_state_dict_names_match_timm():
    ours, theirs = SqueezeExcite(256).state_dict(), SEModule(256).state_dict()
    assert {k: v.shape for k, v in ours.items()} == {k: v.shape for k, v in theirs.items()}


def test_random_init_computes_timm_se():
    ours, theirs = SqueezeExcite(64), SEModule(64)
    theirs.load_state_dict(ours.state_dict())
    x = torch.randn(2, 64, 7, 7)
    assert torch.allclose(ours(x), theirs(x), atol=1e-6)


@pytest.mark.parametrize("dims", [1, 2, 3])
def test_identity_init_is_exact_for_any_spatial_rank(dims):
    se = create_attention("se", 32, init="identity", spatial_dims=dims)
    x = torch.randn(2, 32, *([5] * dims))
    assert torch.equal(se(x), x)
    assert se.gate.scale == 2.0 and not se.fc2.weight.any() and se.fc1.weight.any()


def test_gates_leave_identity_once_trained():
    se = create_attention("se", 32, init="identity")
    with torch.no_grad():
        se.fc2.bias.fill_(-1.0)
    x = torch.randn(1, 32, 4, 4)
    assert torch.allclose(se(x), x * 2 * torch.sigmoid(torch.tensor(-1.0)))


def test_registry_lists_and_rejects():
    assert "se" in list_attentions()
    with pytest.raises(ValueError, match="unknown attention type 'cbam2'; registered: .*se"):
        get_attention("cbam2")
    with pytest.raises(ValueError, match="must be letters"):
        se_retrofit.register_attention("bad name!")


@pytest.fixture
def clean_registry():
    before = set(list_attentions())
    yield
    for name in set(list_attentions()) - before:
        unregister_attention(name)


def test_user_attention_is_used_by_retrofit(clean_registry):
    @se_retrofit.register_attention("channel_scale_test")
    class ChannelScale(nn.Module):
        """Learned per-channel scale."""

        def __init__(self, channels, *, spatial_dims=2, **_):
            super().__init__()
            self.scale = nn.Parameter(torch.randn(1, channels, *([1] * spatial_dims)))

        def init_identity(self):
            nn.init.ones_(self.scale)

        def forward(self, x):
            return x * self.scale

    base = timm.create_model("resnet18").eval()
    edited = se_retrofit.retrofit(base, attention="channel_scale_test")
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(edited(x), base(x))
    assert "layer1.0.se.scale" in edited.state_dict()


def test_user_attention_without_identity_init_gets_the_zero_blend(clean_registry):
    from se_retrofit.attention.blend import ZeroBlend

    @se_retrofit.register_attention("no_identity_test")
    class Plain(nn.Module):
        def __init__(self, channels, **_):
            super().__init__()
            self.conv = nn.Conv2d(channels, channels, 1)

        def forward(self, x):
            return self.conv(x)

    blended = create_attention("no_identity_test", 8)
    assert isinstance(blended, ZeroBlend) and isinstance(blended.attn, Plain)
    x = torch.randn(2, 8, 5, 5)
    assert torch.equal(blended(x), x) and not torch.equal(blended.attn(x), x)
    assert isinstance(create_attention("no_identity_test", 8, init="random"), Plain)
    base = timm.create_model("resnet18").eval()
    edited = se_retrofit.retrofit(base, attention="no_identity_test", stages=[4])
    assert {"layer4.0.se.alpha", "layer4.0.se.attn.conv.weight"} <= set(edited.state_dict())
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(edited(x), base(x))


def test_a_built_in_name_cannot_be_taken_without_override(clean_registry):
    class Mine(nn.Module):
        def __init__(self, channels, **_):
            super().__init__()

        def init_identity(self):
            pass

        def forward(self, x):
            return x

    with pytest.raises(se_retrofit.RetrofitError, match="'se' is taken by a built-in type; choose another name, "
                                                        "or pass override=True"):
        se_retrofit.register_attention("se")(Mine)
    assert get_attention("se").cls is SqueezeExcite
    se_retrofit.register_attention("se", override=True)(Mine)
    assert get_attention("se").cls is Mine
    unregister_attention("se")  # the built-in comes back
    assert get_attention("se").cls is SqueezeExcite


def test_another_users_name_cannot_be_taken_silently(clean_registry):
    def make(label):
        return type(label, (nn.Module,), {"__init__": lambda self, c, **_: nn.Module.__init__(self),
                                          "forward": lambda self, x: x})

    se_retrofit.register_attention("taken_test")(make("First"))
    with pytest.raises(se_retrofit.RetrofitError, match="'taken_test' is taken by .*First"):
        se_retrofit.register_attention("taken_test")(make("Second"))
    se_retrofit.register_attention("taken_test")(make("First"))  # the same class again (a re-import) is fine


@pytest.mark.parametrize("name,options", [
    ("se", {}), ("se", {"squeeze": "avg+max", "gate": "tanh", "act": "silu"}),
    ("se", {"squeeze": "max", "gate": "hard_sigmoid"}), ("cbam", {}), ("cbam", {"gate": "tanh", "kernel_size": 3}),
    ("bam", {}), ("eca", {}), ("eca", {"gate": "hard_sigmoid", "kernel_size": 5})])
@pytest.mark.parametrize("dims", [1, 2, 3])
def test_built_in_types_script_with_the_same_output(name, options, dims):
    module = create_attention(name, 32, spatial_dims=dims, **options)
    with torch.no_grad():
        for p in module.parameters():
            p.add_(torch.randn_like(p) * 0.1)
    module.eval()
    x = torch.randn(2, 32, *([6] * dims))
    assert torch.equal(torch.jit.script(module)(x), module(x))


def _edited_resnet18(position: str) -> nn.Module:
    edited = se_retrofit.retrofit(timm.create_model("resnet18").eval(), position=position, gate="tanh").eval()
    with torch.no_grad():
        for n, p in edited.named_parameters():
            if ".se." in n:
                p.add_(torch.randn_like(p) * 0.1)
    return edited


def _forget_scripted_types() -> None:
    """TorchScript compiles one type per module class and attribute set, and caches it; see the next test."""
    torch.jit._recursive.concrete_type_store.type_store.clear()


@pytest.mark.parametrize("position", ["standard", "pre", "post", "identity", "inner"])
@pytest.mark.slow
def test_an_edited_timm_resnet_scripts_with_the_same_output(position):
    _forget_scripted_types()
    edited = _edited_resnet18(position)
    x = torch.randn(1, 3, 64, 64)
    with torch.no_grad():
        assert torch.equal(torch.jit.script(edited)(x), edited(x))
    _forget_scripted_types()


def test_two_edited_models_of_one_block_class_script_each_with_its_own_forward():
    _forget_scripted_types()
    x = torch.randn(1, 3, 64, 64)
    try:
        first, second = _edited_resnet18("post"), _edited_resnet18("standard")
        torch.jit.script(first)
        with torch.no_grad():
            assert torch.equal(torch.jit.script(second)(x), second(x))
    finally:
        _forget_scripted_types()
