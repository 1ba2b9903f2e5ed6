"""The model copy retrofit() edits: the one copy.deepcopy makes, only quicker, and independent of the original."""
from __future__ import annotations

import copy
from collections import OrderedDict

import numpy as np
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
@pytest.mark.slow
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


class Settings:
    """A plain object attribute, holding a tensor and a list."""

    def __init__(self):
        self.table = torch.arange(6).reshape(2, 3)
        self.names = ["a", "b"]


class Attributes(nn.Module):
    """Attributes of every kind a model keeps (ultralytics' DetectionModel keeps ``stride``, a tensor):
    tensors of one and of several values, a numpy array, lists of tensors, dicts, a custom object,
    an alias of a child, empty containers, a tensor that is a parameter again."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.stride = torch.tensor([8.0, 16.0, 32.0])
        self.scale = torch.tensor(2.0)
        self.empty = torch.empty(0)
        self.anchors = [torch.randn(2, 2), torch.randn(3)]
        self.array = np.arange(5.0)
        self.names = {0: "person", 1: "car"}
        self.by_name = OrderedDict(first=torch.ones(2))
        self.settings = Settings()
        self.same_settings = self.settings
        self.weight_again = self.conv.weight
        self.nothing, self.none_list, self.pair = {}, [], (1, "x")
        self.children_list = [self.conv]

    def forward(self, x):
        return self.conv(x) * self.scale


def _same_structure(copied, reference, original, pairs: dict | None = None) -> None:
    """``copied`` is ``reference`` (copy.deepcopy's) object for object: same types, equal values, the
    same sharing (one object in the copy for one in deepcopy's), and a new object wherever deepcopy
    made one, never sharing a tensor's storage with ``original``."""
    pairs = {} if pairs is None else pairs  # id in the copy -> deepcopy's object, and back
    if id(copied) in pairs or ("ref", id(reference)) in pairs:
        assert pairs.get(id(copied)) is reference and pairs.get(("ref", id(reference))) is copied, \
            f"sharing differs at {type(copied).__name__}"
        return
    pairs[id(copied)], pairs[("ref", id(reference))] = reference, copied
    assert type(copied) is type(reference)
    assert (copied is original) == (reference is original), f"{type(copied).__name__} shared with the original"
    if isinstance(copied, torch.Tensor):
        assert copied.dtype == reference.dtype and copied.requires_grad == reference.requires_grad
        assert torch.equal(copied, reference)
        if copied.numel() and isinstance(original, torch.Tensor) and original.numel():
            assert copied.untyped_storage().data_ptr() != original.untyped_storage().data_ptr()
        return
    if isinstance(copied, np.ndarray):
        assert np.array_equal(copied, reference) and not np.shares_memory(copied, original)
        return
    if isinstance(copied, dict):
        assert list(copied) == list(reference)
        for key in copied:
            _same_structure(copied[key], reference[key], original.get(key) if isinstance(original, dict) else None, pairs)
    elif type(copied) in (list, tuple):
        assert len(copied) == len(reference)
        for i, item in enumerate(copied):
            _same_structure(item, reference[i], original[i] if len(original) > i else None, pairs)
    elif hasattr(copied, "__dict__") and not isinstance(copied, type) and not callable(copied) or isinstance(copied, nn.Module):
        _same_structure(vars(copied), vars(reference), vars(original) if hasattr(original, "__dict__") else None, pairs)
    else:
        assert copied == reference


def _transformers_bert():
    transformers = pytest.importorskip("transformers")
    config = transformers.BertConfig(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=37,
                                     vocab_size=100)
    return transformers.BertModel(config).eval()


def _ultralytics_yolo():
    import os

    os.environ.setdefault("YOLO_OFFLINE", "1")
    tasks = pytest.importorskip("ultralytics.nn.tasks", reason="ultralytics is not installed")
    return tasks.DetectionModel("yolov8n.yaml", verbose=False).eval()


LIBRARY_MODELS = {
    "timm resnet18": lambda: timm.create_model("resnet18"),
    "timm vit_tiny": lambda: timm.create_model("vit_tiny_patch16_224"),
    "torchvision mobilenet_v3_small": lambda: __import__("torchvision").models.mobilenet_v3_small(),
    "transformers bert": _transformers_bert,
    "ultralytics yolov8n": _ultralytics_yolo,
    "tensor, array, list and object attributes": Attributes,
    "ties, views and hooks": Tied,
}


@pytest.mark.parametrize("name", LIBRARY_MODELS)
def test_a_copy_is_deepcopy_object_for_object(name):
    torch.manual_seed(0)
    model = LIBRARY_MODELS[name]()
    _same_structure(deepcopy_module(model), copy.deepcopy(model), model)


def test_a_model_with_tensor_attributes_is_copied_and_retrofitted():
    """ultralytics' DetectionModel broke the copy: ``not value`` on its ``stride`` tensor."""
    model = nn.Sequential(Attributes(), nn.Conv2d(4, 4, 1))
    model.stride = torch.tensor([8.0, 16.0])
    copied = deepcopy_module(model)
    assert torch.equal(copied.stride, model.stride) and copied.stride is not model.stride
    assert copied[0].same_settings is copied[0].settings and copied[0].weight_again is copied[0].conv.weight
    assert copied[0].children_list[0] is copied[0].conv and copied[0].settings.table is not model[0].settings.table


class TensorAttributeBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(4, 4, 3, padding=1)
        self.gains = torch.tensor([1.0, 1.0])  # several values: no truth value

    def forward(self, x):
        return x + self.conv(x) * self.gains[0]


def test_retrofit_of_a_model_with_tensor_attributes_is_exact():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Conv2d(3, 4, 1), TensorAttributeBlock(), TensorAttributeBlock()).eval()
    base.stride = torch.tensor([8.0, 16.0, 32.0])
    x = small_input(2, 16)
    model = se_retrofit.retrofit(base, example_input=x)
    assert len(se_retrofit.record_of(model).sites) == 2 and torch.equal(model.stride, base.stride)
    for training in (False, True):
        assert torch.equal(run(model, x, training), run(base, x, training))
