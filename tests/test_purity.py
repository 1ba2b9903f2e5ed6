"""The analysis is pure and retrofit never touches the model it is given, by construction: every
public analysis and every failed retrofit leaves the caller's model bit-identical (the same
parameter and buffer objects, values, Parameter types, devices, hooks, training flags, state-dict
keys), including models with a module registered under two names, a block or a conv shared by two
blocks and tied weights; and such models are edited correctly (a shared block once, the copy
computing exactly what the model computes, the sharing kept in the copy)."""
from __future__ import annotations

import functools

import pytest
import torch
import torchvision
from hypothesis import HealthCheck, given, settings, strategies as st
from torch import nn

import se_retrofit
from se_retrofit import RetrofitError
from se_retrofit.copying import meta_copy

from helpers import as_if_pretrained, run, small_input

_HOOK_DICTS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks",
               "_forward_hooks_with_kwargs", "_forward_pre_hooks_with_kwargs", "_forward_hooks_always_called",
               "_state_dict_hooks", "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")


def fingerprint(model: nn.Module) -> dict:
    """Everything of ``model`` the caller could notice, by name (shared and tied names included)."""
    tensors = {name: (t, type(t), t.device, t.dtype, t.requires_grad, t.detach().clone())
               for name, t in [*model.named_parameters(remove_duplicate=False),
                               *model.named_buffers(remove_duplicate=False)]}
    modules = {name: (m, type(m), m.training, tuple(vars(m)), {h: dict(getattr(m, h, {})) for h in _HOOK_DICTS},
                      dict(m._parameters), dict(m._buffers), dict(m._modules))
               for name, m in model.named_modules(remove_duplicate=False)}
    return {"tensors": tensors, "modules": modules, "keys": list(model.state_dict(keep_vars=True))}


def assert_untouched(model: nn.Module, before: dict) -> None:
    after = fingerprint(model)
    assert after["keys"] == before["keys"]
    assert after["tensors"].keys() == before["tensors"].keys()
    for name, (tensor, kind, device, dtype, grad, value) in before["tensors"].items():
        now = after["tensors"][name]
        assert now[0] is tensor and now[1:5] == (kind, device, dtype, grad), name
        assert torch.equal(now[5], value), name
    assert after["modules"].keys() == before["modules"].keys()
    for name, (module, kind, training, attributes, hooks, params, buffers, children) in before["modules"].items():
        now = after["modules"][name]
        assert now[0] is module and now[1] is kind and now[2] == training and now[3] == attributes, name
        assert now[4] == hooks, name
        for was, is_now in zip((params, buffers, children), now[5:]):
            assert was.keys() == is_now.keys() and all(was[k] is is_now[k] for k in was), name


# --- models with aliases, sharing and ties ------------------------------------------------------

def _resnet() -> nn.Module:
    torch.manual_seed(0)
    return as_if_pretrained(torchvision.models.resnet18())


def alias_fc():
    model = _resnet()
    model.alias = model.fc
    return model


def shared_block():
    model = _resnet()
    model.layer1[1] = model.layer1[0]
    return model


def shared_conv():
    model = _resnet()
    model.layer1[0].conv2 = model.layer1[1].conv2
    return model


def tied_weight():
    model = _resnet()
    model.layer3[1].conv1.weight = model.layer3[1].conv2.weight
    return model


def hooked_and_mixed_modes():
    model = shared_block()
    model.layer1[0].register_forward_hook(lambda module, args, output: None)
    model.layer2.register_forward_pre_hook(lambda module, args: None)
    model.eval()
    model.layer3.train()
    return model


class NeedsValues(nn.Module):
    """A forward that reads a value: probed on real tensors; its conv is registered under two names."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 3, 3, padding=1)
        self.same_conv = self.conv

    def forward(self, x):
        if x.abs().sum().item() >= 0:
            x = x + self.conv(x)
        return x + self.same_conv(x)


MODELS = [alias_fc, shared_block, shared_conv, tied_weight, hooked_and_mixed_modes, NeedsValues]
ANALYSES = {
    "analyze": lambda m, x: se_retrofit.analyze(m, x),
    "find_blocks": lambda m, x: se_retrofit.find_blocks(m, x),
    "find_units": lambda m, x: se_retrofit.find_units(m, x),
    "plan": lambda m, x: se_retrofit.plan(m, example_input=x),
}


@pytest.mark.parametrize("build", MODELS)
@pytest.mark.parametrize("analysis", ANALYSES)
@pytest.mark.slow
def test_every_analysis_leaves_the_model_bit_identical(build, analysis):
    model = build()
    before = fingerprint(model)
    result = ANALYSES[analysis](model, small_input(1, 32))
    assert result
    assert_untouched(model, before)


FAILURES = {
    "an input the model refuses": dict(example_input=torch.randn(1, 5, 32, 32)),
    "no block matches": dict(blocks=["nothing.*"]),
    "an unknown attention": dict(attention="no-such-attention"),
    "an attention option it does not take": dict(bogus_option=3),
}


@pytest.mark.parametrize("build", MODELS)
@pytest.mark.parametrize("failure", FAILURES)
@pytest.mark.slow
def test_a_failed_retrofit_leaves_the_model_bit_identical(build, failure):
    model = build()
    before = fingerprint(model)
    with pytest.raises(RetrofitError):
        se_retrofit.retrofit(model, **{"example_input": small_input(1, 32), **FAILURES[failure]})
    assert_untouched(model, before)


@pytest.mark.parametrize("build", [m for m in MODELS if m is not NeedsValues])  # its forward is untraceable
@pytest.mark.slow
def test_a_model_with_shared_or_tied_modules_is_edited_exactly_and_left_alone(build):
    model = build()
    before = fingerprint(model)
    x = small_input(2, 32)
    edited = se_retrofit.retrofit(model, example_input=x)
    assert_untouched(model, before)
    for training in (False, True):
        assert torch.equal(run(edited, x, training), run(model, x, training))
    sites = se_retrofit.record_of(edited).sites
    attention = {id(m) for name, m in edited.named_modules() if name.endswith(".se") or name == "se"}
    assert len(attention) == len(sites) == len({s.block for s in sites})  # each shared block edited once


def test_a_block_shared_under_two_names_is_edited_once_and_stays_shared():
    model = shared_block()
    edited = se_retrofit.retrofit(model, example_input=small_input(1, 32))
    sites = [s.block for s in se_retrofit.record_of(edited).sites]
    assert len(sites) == 7 and sites[:2] == ["layer1.0", "layer2.0"]  # its first name, like named_modules()
    assert edited.layer1[0] is edited.layer1[1] and hasattr(edited.layer1[1], "se")
    assert {"layer1.0.se.fc1.weight", "layer1.1.se.fc1.weight"} <= edited.state_dict().keys()


def test_ties_and_aliases_are_kept_in_the_copy():
    edited = se_retrofit.retrofit(tied_weight(), example_input=small_input(1, 32))
    assert edited.layer3[1].conv1.weight is edited.layer3[1].conv2.weight
    edited = se_retrofit.retrofit(alias_fc(), example_input=small_input(1, 32))
    assert edited.alias is edited.fc and edited.fc.weight.device.type == "cpu"


def test_the_meta_copy_the_analysis_records_shares_nothing_with_the_model():
    model = shared_block()
    model.layer3[1].conv1.weight = model.layer3[1].conv2.weight
    twin = meta_copy(model)
    assert twin.layer1[0] is twin.layer1[1] and twin.layer3[1].conv1.weight is twin.layer3[1].conv2.weight
    assert all(p.device.type == "meta" and type(p) is nn.Parameter for p in twin.parameters())
    assert not {id(m) for m in model.modules()} & {id(m) for m in twin.modules()}
    assert all(p.device.type == "cpu" for p in model.parameters())


@pytest.mark.filterwarnings("ignore:`torch.jit:FutureWarning")
def test_a_torchscript_model_is_refused_with_the_reason():
    model = torchvision.models.resnet18().eval()
    for scripted in (torch.jit.script(model), torch.jit.trace(model, small_input(1, 32))):
        with pytest.raises(RetrofitError, match=r"^the model is TorchScript .*retrofit the nn.Module before"):
            se_retrofit.retrofit(scripted)
    model.layer2 = torch.jit.script(model.layer2)
    with pytest.raises(RetrofitError, match="its module 'layer2' is TorchScript"):
        se_retrofit.retrofit(model, example_input=small_input(1, 32))


# --- random models with random aliasing, sharing and ties ---------------------------------------

class Block(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 1)

    def forward(self, x):
        return x + self.conv2(torch.relu(self.bn(self.conv1(x))))


class Net(nn.Module):
    def __init__(self, blocks: list[nn.Module], channels: int):
        super().__init__()
        self.stem = nn.Conv2d(3, channels, 3, padding=1)
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(channels, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


@st.composite
def random_nets(draw):
    """A chain of residual blocks where a block may be an earlier one again, share an earlier
    block's conv, tie its weight to another conv's, or be registered under a second name."""
    channels = draw(st.sampled_from([4, 8]))
    torch.manual_seed(draw(st.integers(0, 2**16)))
    blocks: list[nn.Module] = []
    for _ in range(draw(st.integers(1, 5))):
        how = draw(st.sampled_from(["new", "new", "same block", "shared conv", "tied weight"]))
        earlier = blocks[draw(st.integers(0, len(blocks) - 1))] if blocks else None
        if how == "same block" and earlier is not None:
            blocks.append(earlier)
            continue
        block = Block(channels)
        if how == "shared conv" and earlier is not None:
            block.conv2 = earlier.conv2
        elif how == "tied weight":
            block.conv1.weight = (earlier or block).conv1.weight if earlier is not None else block.conv1.weight
            block.conv2.weight = nn.Parameter(block.conv2.weight.detach().clone())
        blocks.append(block)
    net = as_if_pretrained(Net(blocks, channels))
    for i in draw(st.lists(st.integers(0, len(blocks) - 1), max_size=2, unique=True)):
        setattr(net, f"alias{i}", blocks[i])
    if draw(st.booleans()):
        net.head_alias = net.head
    return net, len({id(b) for b in blocks})


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_nets(), st.booleans())
@pytest.mark.slow
def test_random_shared_and_tied_models_stay_untouched_and_are_edited_exactly(built, training):
    net, distinct_blocks = built
    net.train(training)
    x = small_input(2, 12)
    before = fingerprint(net)
    analysis = se_retrofit.analyze(net, x)
    assert_untouched(net, before)
    assert len(analysis.blocks) == distinct_blocks
    with pytest.raises(RetrofitError):
        se_retrofit.retrofit(net, example_input=x, blocks=["nothing"])
    assert_untouched(net, before)
    edited = se_retrofit.retrofit(net, example_input=x)
    assert_untouched(net, before)
    assert len({id(m) for name, m in edited.named_modules() if name.endswith(".se")}) == distinct_blocks
    copies = dict(edited.named_modules(remove_duplicate=False))
    for name, module in net.named_modules(remove_duplicate=False):  # shared where the model shares
        for other, same in net.named_modules(remove_duplicate=False):
            assert (copies[name] is copies[other]) == (module is same)
    for mode in (False, True):
        assert torch.equal(run(edited, x, mode), run(net, x, mode))


# --- models that cache what they compute --------------------------------------------------------

@functools.lru_cache
def _offsets(channels: int) -> torch.Tensor:  # a table cached by size, as position tables are
    return torch.linspace(-1, 1, channels).view(1, -1, 1, 1)


class _CachingBlock(nn.Module):
    """A residual block that caches a grid per module and size (transformers' detectors cache their
    anchors so) and multiplies by a plain tensor attribute, which the meta probe cannot mix with meta
    tensors: the analysis records it on fake tensors."""

    def __init__(self, channels: int, size: int = 16):
        super().__init__()
        self.channels, self.size = channels, size
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.bn = nn.BatchNorm2d(channels)
        self.scale = torch.full((1, channels, 1, 1), 0.5)

    @functools.lru_cache(maxsize=8)
    def grid(self) -> torch.Tensor:
        return torch.linspace(0, 1, self.size ** 2).view(1, 1, self.size, self.size)

    def forward(self, x):
        branch = self.bn(self.conv(x)) * self.scale + self.grid() + _offsets(self.channels)
        return torch.relu(x + branch)


def _caching_model() -> nn.Module:
    torch.manual_seed(0)
    return as_if_pretrained(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _CachingBlock(8), _CachingBlock(8))).eval()


def _forget_caches() -> None:
    _offsets.cache_clear()
    _CachingBlock.grid.cache_clear()


@pytest.mark.parametrize("step", ["analyze", "retrofit"])
def test_a_fake_probe_leaves_no_fake_tensor_in_the_models_caches(step):
    """RT-DETR returned fake logits after `analyze`: its anchors, cached per module, were computed on
    fake tensors. Analysed and edited on fake tensors, a model computes real outputs afterwards."""
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = _caching_model()(x)
    _forget_caches()
    model = _caching_model()
    assert se_retrofit.analyze(model, x).probes["first"] == "fake"  # the path this test is about
    if step == "retrofit":
        _forget_caches()  # the analysis above must not decide what retrofit meets
        edited = se_retrofit.retrofit(model, example_input=x)
        with torch.no_grad():
            out = edited(x)
        assert type(out) is torch.Tensor and torch.equal(out, expected)
    with torch.no_grad():
        out = model(x)
    assert type(out) is torch.Tensor and torch.equal(out, expected)
