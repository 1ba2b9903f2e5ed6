"""The model copy retrofit() edits: the one copy.deepcopy makes, only quicker, and independent of the original."""
from __future__ import annotations

import copy

import pytest
import timm
import torch
from torch import nn

import se_retrofit
from se_retrofit.copying import deepcopy_module

from helpers import as_if_pretrained, run, small_input


class Tied(nn.Module):
    """One parameter in two modules, a buffer that is a view of another, a hook, a plain tensor attribute."""

    def __init__(self):
        super().__init__()
        self.a = nn.Linear(4, 4)
        self.b = nn.Linear(4, 4)
        self.b.weight = self.a.weight
        self.register_buffer("table", torch.arange(8.0))
        self.register_buffer("half_table", self.table[:4])
        self.scale = torch.tensor(2.0)
        self.calls = []
        self.a.register_forward_hook(lambda module, args, output: None)

    def forward(self, x):
        return self.b(self.a(x)) * self.scale + self.half_table


class OwnCopy(nn.Module):
    """A module with its own __deepcopy__: deepcopy's rules, not ours."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(2, 2)

    def __deepcopy__(self, memo):
        new = OwnCopy()
        new.lin.weight.data.copy_(self.lin.weight.data + 1)
        new.lin.bias.data.copy_(self.lin.bias.data)
        return new


def _same_copy(copied: nn.Module, reference: nn.Module, original: nn.Module) -> None:
    assert type(copied) is type(reference) and repr(copied) == repr(reference)
    assert vars(copied).keys() == vars(reference).keys()
    state, expected = copied.state_dict(), reference.state_dict()
    assert state.keys() == expected.keys() and all(torch.equal(state[k], expected[k]) for k in state)
    originals = {t.data_ptr() for t in [*original.parameters(), *original.buffers()] if t.numel()}
    assert not originals & {t.data_ptr() for t in [*copied.parameters(), *copied.buffers()] if t.numel()}


@pytest.mark.parametrize("name", ["resnet18", "efficientnet_b0", "vit_tiny_patch16_224", "convnext_atto"])
def test_a_copy_is_the_deep_copy(name):
    model = as_if_pretrained(timm.create_model(name)).eval()
    copied = deepcopy_module(model)
    _same_copy(copied, copy.deepcopy(model), model)
    x = small_input(1) if "vit" not in name else torch.randn(1, 3, 224, 224)
    assert torch.equal(copied.eval()(x), model(x))


def test_ties_views_hooks_and_attributes_are_kept_as_deepcopy_keeps_them():
    model = Tied()
    copied = deepcopy_module(model)
    _same_copy(copied, copy.deepcopy(model), model)
    assert copied.b.weight is copied.a.weight
    assert copied.half_table.untyped_storage().data_ptr() == copied.table.untyped_storage().data_ptr()
    assert len(copied.a._forward_hooks) == 1 and copied.scale is not model.scale and copied.calls == []
    copied.a.weight.data.add_(1)
    assert not torch.equal(copied.a.weight, model.a.weight)


def test_a_module_with_its_own_deepcopy_is_copied_by_it():
    model = nn.Sequential(OwnCopy(), nn.ReLU())
    copied = deepcopy_module(model)
    assert torch.equal(copied[0].lin.weight, model[0].lin.weight + 1)


def test_requires_grad_is_copied_and_gradients_are_not_as_with_deepcopy():
    model = nn.Linear(3, 3)
    model.bias.requires_grad_(False)
    model(torch.randn(2, 3)).sum().backward()
    assert copy.deepcopy(model).weight.grad is None  # a Parameter's __deepcopy__ leaves .grad out
    copied = deepcopy_module(model)
    assert copied.weight.grad is None and model.weight.grad is not None
    assert copied.weight.requires_grad and not copied.bias.requires_grad


def test_retrofit_leaves_the_model_it_is_given_alone():
    base = as_if_pretrained(timm.create_model("resnet18")).eval()
    before = {k: v.clone() for k, v in base.state_dict().items()}
    x = small_input()
    model = se_retrofit.retrofit(base, example_input=x)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.5)
    assert all(torch.equal(before[k], v) for k, v in base.state_dict().items())
    assert not any(type(m).__name__ != "BasicBlock" and hasattr(m, "se") for m in base.modules())
    assert not torch.equal(run(model, x, False), run(base, x, False))
