"""Conversions of an edited model: fold the identity reparameterisation, export to timm's native SE nets.

An identity-initialised SE gate is ``2 · sigmoid(a)``. At the ``standard`` position the SE input
comes straight from an affine layer (the branch's last BatchNorm or conv), so the factor 2 can be
moved into that layer exactly: doubling its weight and bias doubles its output, halving ``fc1``'s
weight keeps ``a`` unchanged, and ``sigmoid(a) · 2y == 2 · sigmoid(a) · y``. Scaling by powers of
two is exact in floating point, so the folded model computes bit-for-bit what the edited one did.
"""
from __future__ import annotations

import copy

import torch
from torch import fx, nn

from .core import record_of
from .surgery import _instance_forward_as_class
from .tracing import trace


class ConversionError(ValueError):
    """The edited model cannot be converted as asked."""


def fold_gate_scale(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the model with every scaled SE gate folded into the affine layer feeding it.

    Example:
        >>> import timm, torch, se_retrofit
        >>> from se_retrofit.convert import fold_gate_scale
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18")).eval()
        >>> folded = fold_gate_scale(model)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> bool(torch.equal(model(x), folded(x))), folded.layer1[0].se.gate_scale
        (True, 1.0)
    """
    record = record_of(model)
    target = model if inplace else copy.deepcopy(model)
    for site in record.sites:
        attention = target.get_submodule(site.module_path)
        scale = getattr(attention, "gate_scale", 1.0)
        if scale == 1.0:
            continue
        producer = _producer_of(target.get_submodule(site.block), site.module_name)
        with torch.no_grad():
            producer.weight.mul_(scale)
            producer.bias.mul_(scale)
            attention.fc1.weight.div_(scale)
        attention.gate_scale = 1.0
    return target


def _producer_of(block: nn.Module, module_name: str) -> nn.Module:
    """The affine module (BatchNorm or conv with bias) whose output is the attention's only input."""
    with _instance_forward_as_class(block):
        graph = trace(block, leaf_children=True)
    call = next((n for n in graph.nodes if n.op == "call_module" and n.target == module_name), None)
    source = call.args[0] if call is not None and call.args else None
    if not isinstance(source, fx.Node) or source.op != "call_module" or len(source.users) != 1:
        raise ConversionError(f"{module_name} in this block is not fed by a single module; its gate "
                              "cannot be folded")
    producer = block.get_submodule(source.target)
    if type(producer) not in _AFFINE_TYPES or getattr(producer, "bias", None) is None:
        raise ConversionError(f"{source.target} ({type(producer).__name__}) is not a plain BatchNorm or "
                              "conv with bias; the identity gate cannot be folded into it")
    return producer


_AFFINE_TYPES = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.Conv1d, nn.Conv2d, nn.Conv3d)


def timm_native_name(model: nn.Module) -> str:
    """The timm architecture whose SE blocks match this edit exactly (``resnet50`` → ``seresnet50``)."""
    import timm

    record = record_of(model)
    config = record.config
    base = record.base.get("name") or _timm_architecture(model)
    if config.attention != "se" or config.position != "standard" or config.stages is not None:
        raise ConversionError("only SE at the standard position in every stage has a timm native "
                              f"equivalent (this edit: {config.attention} at {config.position}, "
                              f"stages {config.stages or 'all'})")
    if not base or not timm.is_model(f"se{base}"):
        raise ConversionError(f"timm has no native SE model for {base or 'this model'!r}")
    return f"se{base}"


def _timm_architecture(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def to_timm_native(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """Name and state dict of the equivalent timm native model (e.g. ``seresnet50``).

    The state dict loads strictly into ``timm.create_model(name)`` and that model computes what
    the edited one computes. Raises :class:`ConversionError` where no native model matches.

    Example:
        >>> import timm, torch, se_retrofit
        >>> from se_retrofit.convert import to_timm_native
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18")).eval()
        >>> name, state = to_timm_native(model)
        >>> native = timm.create_model(name).eval()
        >>> native.load_state_dict(state, strict=True)
        <All keys matched successfully>
    """
    import timm

    name = timm_native_name(model)
    state = fold_gate_scale(model).state_dict()
    expected = timm.create_model(name, pretrained=False).state_dict()
    mismatched = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected or mismatched:
        raise ConversionError(f"the edit does not match timm's {name}: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, shape differs {mismatched[:3]}")
    return name, state
