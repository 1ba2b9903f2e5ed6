"""Fine-tuning helpers: the new attention modules, the backbone and the head, kept apart.

A retrofitted network has three kinds of parameters: the pretrained backbone, the attention modules
se_retrofit inserted (new, starting at identity) and the classifier head (new when you change
``num_classes``). Transfer learning usually trains the new parts first and faster, then the whole
network at a lower rate. These helpers make that a few lines in any training script.

Example:
    >>> import timm, torch, se_retrofit
    >>> model = se_retrofit.retrofit(timm.create_model("resnet18", num_classes=10))
    >>> frozen = se_retrofit.freeze_backbone(model, train_head=True)    # phase 1: new parts only
    >>> sum(p.requires_grad for p in model.parameters()) == len(se_retrofit.attention_parameters(model)) + 2
    True
    >>> se_retrofit.unfreeze(model)                                      # phase 2: everything
    >>> groups = se_retrofit.param_groups(model, lr=1e-3, new_lr_scale=10.0, weight_decay=1e-4)
    >>> [(g["name"], g["lr"], g["weight_decay"]) for g in groups]  # doctest: +NORMALIZE_WHITESPACE
    [('backbone', 0.001, 0.0001), ('backbone_no_decay', 0.001, 0.0), ('attention', 0.01, 0.0001),
     ('attention_no_decay', 0.01, 0.0), ('head', 0.001, 0.0001), ('head_no_decay', 0.001, 0.0)]
    >>> optimizer = torch.optim.SGD(groups, momentum=0.9)
"""
from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .core import record_of

HEAD_NAMES = ("fc", "classifier", "head", "heads", "last_linear")


def attention_modules(model: nn.Module) -> dict[str, nn.Module]:
    """The inserted attention modules by their path in ``model`` (``layer1.0.se``)."""
    return {site.module_path: model.get_submodule(site.module_path) for site in record_of(model).all_sites}


def attention_parameter_names(model: nn.Module) -> list[str]:
    """Full names of the parameters of the inserted attention modules."""
    return [f"{path}.{name}" for path, module in attention_modules(model).items()
            for name, _ in module.named_parameters()]


def attention_parameters(model: nn.Module) -> list[nn.Parameter]:
    """The parameters of the inserted attention modules, e.g. for an optimiser of their own.

    Example:
        >>> import timm, se_retrofit
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18"))
        >>> sum(p.numel() for p in se_retrofit.attention_parameters(model))
        90112
    """
    return [p for module in attention_modules(model).values() for p in module.parameters()]


def attention_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights (and buffers) of the inserted attention modules only, under their full keys.

    Example:
        >>> import timm, se_retrofit
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18"), stages=[4])
        >>> sorted(se_retrofit.attention_state_dict(model))[:2]
        ['layer4.0.se.fc1.bias', 'layer4.0.se.fc1.weight']
    """
    prefixes = tuple(f"{path}." for path in attention_modules(model))
    return {k: v.detach().contiguous() for k, v in model.state_dict().items() if k.startswith(prefixes)}


def head_module_names(model: nn.Module) -> list[str]:
    """Paths of the classifier head: timm's ``pretrained_cfg['classifier']``, else a top-level
    ``fc``/``classifier``/``head``/``heads``. Empty when the model has no recognisable head."""
    cfg = getattr(model, "pretrained_cfg", None)
    names = cfg.get("classifier") if isinstance(cfg, dict) else None
    names = [names] if isinstance(names, str) else list(names or [])
    found = [n for n in names if _has_submodule(model, n)]
    if found:
        return found
    return [n for n in HEAD_NAMES if isinstance(getattr(model, n, None), nn.Module)][:1]


def _has_submodule(model: nn.Module, name: str) -> bool:
    try:
        return isinstance(model.get_submodule(name), nn.Module)
    except AttributeError:
        return False


def freeze_backbone(model: nn.Module, *, train_head: bool = False) -> int:
    """Train only the new attention modules (and the head with ``train_head=True``).

    Sets ``requires_grad`` and returns how many parameters stay trainable. Norm layers of the backbone
    keep their running statistics unless you also put them in eval mode.

    Example:
        >>> import timm, se_retrofit
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18"))
        >>> se_retrofit.freeze_backbone(model) == sum(p.numel() for p in se_retrofit.attention_parameters(model))
        True
    """
    trainable = set(attention_parameter_names(model))
    if train_head:
        heads = head_module_names(model)
        if not heads:
            raise ValueError(f"cannot find the classifier head of {type(model).__name__} (looked for timm's "
                             f"pretrained_cfg['classifier'] and {', '.join(HEAD_NAMES)}); "
                             "call freeze_backbone(model) and set requires_grad on your head yourself")
        trainable |= {f"{h}.{n}" for h in heads for n, _ in model.get_submodule(h).named_parameters()}
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(name in trainable)
    return sum(p.numel() for p in model.parameters() if p.requires_grad)


def unfreeze(model: nn.Module) -> None:
    """Make every parameter trainable again (phase two of a fine-tuning schedule)."""
    for parameter in model.parameters():
        parameter.requires_grad_(True)


def param_groups(model: nn.Module, lr: float, new_lr_scale: float = 10.0, weight_decay: float = 1e-4, *,
                 head_lr_scale: float | None = None) -> list[dict[str, Any]]:
    """Optimiser parameter groups: backbone at ``lr``, new attention at ``lr * new_lr_scale``, the
    head at ``lr * head_lr_scale`` (``lr`` without it).

    Norm weights and biases (every parameter with fewer than two dimensions) go in ``*_no_decay``
    groups with ``weight_decay=0`` (timm's ``param_groups_weight_decay`` makes that split). The head
    (:func:`head_module_names`) has groups of its own, so after ``freeze_backbone(model,
    train_head=True)`` the groups read ``attention`` and ``head``. Frozen parameters
    (``requires_grad=False``) are left out, as in timm; build a new optimiser after :func:`unfreeze`.
    Each group carries a ``name``; empty groups are dropped.

    Example:
        >>> import timm, torch, se_retrofit
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18", num_classes=5))
        >>> groups = se_retrofit.param_groups(model, lr=0.01, head_lr_scale=10.0)
        >>> [(g["name"], g["lr"]) for g in groups]  # doctest: +NORMALIZE_WHITESPACE
        [('backbone', 0.01), ('backbone_no_decay', 0.01), ('attention', 0.1), ('attention_no_decay', 0.1),
         ('head', 0.1), ('head_no_decay', 0.1)]
        >>> optimizer = torch.optim.AdamW(groups)
    """
    from timm.optim import param_groups_weight_decay

    if lr <= 0 or new_lr_scale <= 0 or weight_decay < 0 or (head_lr_scale is not None and head_lr_scale <= 0):
        raise ValueError(f"param_groups needs lr > 0, new_lr_scale > 0, head_lr_scale > 0 and weight_decay >= 0; "
                         f"got lr={lr}, new_lr_scale={new_lr_scale}, head_lr_scale={head_lr_scale}, "
                         f"weight_decay={weight_decay}")
    attention = {id(p) for p in attention_parameters(model)}
    heads = {id(p) for h in head_module_names(model) for p in model.get_submodule(h).parameters()}
    rates = {"backbone": lr, "attention": lr * new_lr_scale, "head": lr * (head_lr_scale or 1.0)}
    # timm's split (1-d parameters and biases: no decay), asked with a non-zero rate so that it splits
    # even where weight_decay is 0; then each half is cut by kind, the model's parameter order kept
    split = param_groups_weight_decay(model, weight_decay=1.0)
    no_decay = {id(p) for g in split if g["weight_decay"] == 0.0 for p in g["params"]}
    buckets: dict[str, list[nn.Parameter]] = {f"{k}{s}": [] for k in rates for s in ("", "_no_decay")}
    for parameter in (p for p in model.parameters() if p.requires_grad):
        key = id(parameter)
        kind = "attention" if key in attention else "head" if key in heads else "backbone"
        buckets[kind + ("_no_decay" if key in no_decay else "")].append(parameter)
    return [{"name": name, "params": params, "lr": rates[name.removesuffix("_no_decay")],
             "weight_decay": 0.0 if name.endswith("_no_decay") else weight_decay}
            for name, params in buckets.items() if params]
