"""Fine-tuning helpers: which parameters are new, freezing, and optimiser groups."""
from __future__ import annotations

import pytest
import torch

import se_retrofit
from se_retrofit import training

from helpers import make_model, small_input

MODELS = [("timm", "resnet18", "fc"), ("torchvision", "resnet18", "fc"),
          ("torchvision", "mobilenet_v3_small", "classifier"), ("timm", "convnext_atto", "head.fc")]


@pytest.fixture(params=MODELS, ids=[f"{s}:{n}" for s, n, _ in MODELS], scope="module")
def edited(request):
    source, name, head = request.param
    base = make_model(source, name, num_classes=5)
    model = se_retrofit.retrofit(base, position="standard", reduction=4)
    return base, model, head


def _count(parameters) -> int:
    return sum(p.numel() for p in parameters)


def test_attention_parameters_are_exactly_the_added_ones(edited):
    base, model, _ = edited
    added = _count(se_retrofit.attention_parameters(model))
    assert added > 0
    assert added == _count(model.parameters()) - _count(base.parameters())
    assert len(se_retrofit.attention_modules(model)) == len(se_retrofit.record_of(model).sites)


def test_attention_state_dict_holds_only_attention_keys(edited):
    _, model, _ = edited
    state = se_retrofit.attention_state_dict(model)
    modules = tuple(f"{p}." for p in se_retrofit.attention_modules(model))
    assert state and all(k.startswith(modules) for k in state)
    assert _count(v for k, v in state.items() if k in dict(model.named_parameters())) == \
        _count(se_retrofit.attention_parameters(model))


def test_head_is_found(edited):
    _, model, head = edited
    assert training.head_module_names(model) == [head]


@pytest.mark.parametrize("train_head", [False, True])
@pytest.mark.slow
def test_freeze_backbone_trains_only_the_new_parts(edited, train_head):
    _, model, head = edited
    trainable = se_retrofit.freeze_backbone(model, train_head=train_head)
    try:
        expected = _count(se_retrofit.attention_parameters(model))
        if train_head:
            expected += _count(model.get_submodule(head).parameters())
        assert trainable == expected == _count(p for p in model.parameters() if p.requires_grad)
        before = {k: v.clone() for k, v in model.state_dict().items()}
        optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
        model.train()
        for _ in range(2):  # fc1 of SE gets its gradient once fc2 has moved off zero
            optimizer.zero_grad()
            model(small_input(4, 32)).logsumexp(1).mean().backward()
            optimizer.step()
        allowed = set(training.attention_parameter_names(model))
        if train_head:
            allowed |= {f"{head}.{n}" for n, _ in model.get_submodule(head).named_parameters()}
        learning = {k for k, v in model.named_parameters() if v.grad is not None and v.grad.abs().max() > 0}
        assert learning == allowed
        assert all(torch.equal(v, before[k]) for k, v in model.named_parameters() if k not in allowed)
    finally:
        se_retrofit.unfreeze(model)
    assert all(p.requires_grad for p in model.parameters())


def test_param_groups_cover_every_parameter_once_with_the_right_rates(edited):
    _, model, head = edited
    groups = se_retrofit.param_groups(model, lr=0.01, new_lr_scale=10.0, weight_decay=0.05)
    ids = [id(p) for g in groups for p in g["params"]]
    assert len(ids) == len(set(ids)) == len(list(model.parameters()))
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"backbone", "backbone_no_decay", "attention", "attention_no_decay", "head",
                            "head_no_decay"}
    attention = {id(p) for p in se_retrofit.attention_parameters(model)}
    assert {id(p) for p in by_name["attention"]["params"] + by_name["attention_no_decay"]["params"]} == attention
    assert by_name["attention"]["lr"] == pytest.approx(0.1) and by_name["backbone"]["lr"] == 0.01
    assert by_name["head"]["lr"] == 0.01  # no head_lr_scale: the backbone's rate, in groups of its own
    assert {id(p) for p in by_name["head"]["params"] + by_name["head_no_decay"]["params"]} == \
        {id(p) for p in model.get_submodule(head).parameters()}
    for group in groups:
        no_decay = group["name"].endswith("_no_decay")
        assert all((p.ndim <= 1) == no_decay for p in group["params"])
        assert group["weight_decay"] == (0.0 if no_decay else 0.05)
    torch.optim.AdamW(groups)  # accepted as is


def test_param_groups_give_the_head_its_own_rate_and_skip_frozen(edited):
    _, model, head = edited
    se_retrofit.freeze_backbone(model, train_head=True)
    try:
        groups = se_retrofit.param_groups(model, lr=1e-3, head_lr_scale=5.0)
    finally:
        se_retrofit.unfreeze(model)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"attention", "attention_no_decay", "head", "head_no_decay"}
    assert by_name["head"]["lr"] == pytest.approx(5e-3)
    head_ids = {id(p) for p in model.get_submodule(head).parameters()}
    assert {id(p) for p in by_name["head"]["params"] + by_name["head_no_decay"]["params"]} == head_ids


def test_param_groups_label_the_new_head_as_head_after_freezing(edited):
    """Issue 21: after freeze_backbone(model, train_head=True) the trainable head was labelled backbone."""
    _, model, head = edited
    se_retrofit.freeze_backbone(model, train_head=True)
    try:
        groups = se_retrofit.param_groups(model, lr=0.02)
    finally:
        se_retrofit.unfreeze(model)
    by_name = {g["name"]: g for g in groups}
    assert set(by_name) == {"attention", "attention_no_decay", "head", "head_no_decay"}
    assert by_name["head"]["lr"] == by_name["head_no_decay"]["lr"] == 0.02
    assert {id(p) for p in by_name["head"]["params"] + by_name["head_no_decay"]["params"]} == \
        {id(p) for p in model.get_submodule(head).parameters()}


def _hand_written_split(model, weight_decay):
    """The rule param_groups used before timm's param_groups_weight_decay did the split: parameters
    with fewer than two dimensions go without decay."""
    return {id(p): 0.0 if p.ndim <= 1 else weight_decay for p in model.parameters() if p.requires_grad}


@pytest.mark.parametrize("weight_decay", [0.05, 0.0])
def test_param_groups_split_decay_as_the_hand_written_rule_did(edited, weight_decay):
    _, model, _ = edited
    groups = se_retrofit.param_groups(model, lr=0.01, weight_decay=weight_decay)
    decay = {id(p): g["weight_decay"] for g in groups for p in g["params"]}
    assert decay == _hand_written_split(model, weight_decay)
    order = [id(p) for p in model.parameters()]  # each group keeps the model's parameter order
    for group in groups:
        positions = [order.index(id(p)) for p in group["params"]]
        assert positions == sorted(positions)
    assert sum(g["name"].endswith("_no_decay") for g in groups) == 3  # even at weight_decay 0


@pytest.mark.parametrize("kwargs", [dict(lr=0), dict(lr=0.1, new_lr_scale=-1), dict(lr=0.1, weight_decay=-0.1),
                                    dict(lr=0.1, head_lr_scale=0)])
def test_param_groups_reject_bad_rates(kwargs):
    model = se_retrofit.retrofit(make_model("timm", "resnet18"), stages=[4])
    with pytest.raises(ValueError, match="param_groups needs lr > 0"):
        se_retrofit.param_groups(model, **kwargs)


def test_helpers_refuse_a_model_that_was_not_edited():
    with pytest.raises(ValueError, match="not edited by se_retrofit.retrofit"):
        se_retrofit.attention_parameters(make_model("timm", "resnet18"))


def test_freeze_with_head_names_what_it_looked_for():
    class Bare(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.body = torch.nn.Sequential(torch.nn.Conv2d(3, 3, 1), torch.nn.ReLU(), torch.nn.Conv2d(3, 3, 1))

        def forward(self, x):
            return x + self.body(x)

    model = se_retrofit.retrofit(Bare(), reduction=1, example_input=torch.randn(1, 3, 8, 8))
    assert se_retrofit.freeze_backbone(model) == _count(se_retrofit.attention_parameters(model))
    with pytest.raises(ValueError, match="cannot find the classifier head of Bare"):
        se_retrofit.freeze_backbone(model, train_head=True)
