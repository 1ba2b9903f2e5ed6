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

from .attention._layers import Gate
from .errors import RetrofitError
from .core import record_of
from .tracing import trace


class ConversionError(RetrofitError):
    """The edited model cannot be converted as asked."""


def fold_gate_scale(model: nn.Module, inplace: bool = False) -> nn.Module:
    """Return the model with every scaled gate (``2·sigmoid``) folded into the affine layer feeding it.

    Works where the attention module can take the scale on its input (SE, ECA) and is fed straight by
    a BatchNorm or a conv with bias (the ``standard`` position of a ResNet); raises
    :class:`ConversionError` elsewhere.

    Example:
        >>> import timm, torch, se_retrofit
        >>> from se_retrofit.convert import fold_gate_scale
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18")).eval()
        >>> folded = fold_gate_scale(model)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> bool(torch.equal(model(x), folded(x))), folded.layer1[0].se.gate.scale
        (True, 1.0)
    """
    record = record_of(model)
    target = model if inplace else copy.deepcopy(model)
    for site in record.all_sites:
        attention = target.get_submodule(site.module_path)
        if not _has_scaled_gate(attention):
            continue
        if not hasattr(attention, "fold_input_scale"):
            raise ConversionError(f"{site.module_path} ({type(attention).__name__}) has no plain-gate form")
        producer = _producer_of(target.get_submodule(site.block), site.module_name)
        try:
            scale = attention.fold_input_scale()
        except ValueError as error:
            raise ConversionError(f"{site.module_path}: {error}") from None
        with torch.no_grad():
            producer.weight.mul_(scale)
            producer.bias.mul_(scale)
    return target


def _has_scaled_gate(module: nn.Module) -> bool:
    return any(isinstance(g, Gate) and (g.scale != 1.0 or g.offset != 0.0) for g in module.modules())


def _producer_of(block: nn.Module, module_name: str) -> nn.Module:
    """The affine module (BatchNorm or conv with bias) whose output is the attention's only input."""
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


#: attention type → timm's prefix for its native models, and the options those models use
_NATIVE = {"se": ("se", {"reduction": 16, "divisor": 8}), "eca": ("eca", {})}


def timm_native_name(model: nn.Module) -> str:
    """The timm architecture whose blocks match this edit exactly (``resnet50`` + SE → ``seresnet50``,
    ``resnet50d`` + ECA → ``ecaresnet50d``)."""
    import timm

    record = record_of(model)
    if record.earlier:
        raise ConversionError(f"this model was retrofitted {len(record.edits)} times; timm's native models "
                              "have one attention module per block (convert a model edited once)")
    config = record.config
    base = record.base.get("name") or _timm_architecture(model)
    if config.attention not in _NATIVE or config.position != "standard" or config.stages or config.blocks \
            or config.exclude:
        raise ConversionError("only SE or ECA at the standard position in every block has a timm native "
                              f"equivalent (this edit: {config.attention} at {config.position}"
                              f"{', a subset of blocks' if config.stages or config.blocks or config.exclude else ''})")
    prefix, native_options = _NATIVE[config.attention]
    options = config.attention_options()
    if config.options or any(options.get(k, v) != v for k, v in native_options.items()):
        raise ConversionError(f"timm's native {config.attention} models use the default options "
                              f"({native_options or 'adaptive kernel'}); this edit used {options}")
    if not base or not timm.is_model(f"{prefix}{base}"):
        closest = timm.list_models(f"{prefix}{base}*") if base else []
        hint = f"; closest: {', '.join(closest[:3])} (retrofit its base, e.g. {closest[0][len(prefix):]}, " \
               "for an exact match)" if closest else ""
        raise ConversionError(f"timm has no native {config.attention} model for {base or 'this model'!r}{hint}")
    return f"{prefix}{base}"


def timm_create_kwargs(model: nn.Module) -> dict[str, int]:
    """Keyword arguments ``timm.create_model`` needs to build the native twin with this model's head.

    Example:
        >>> import timm, se_retrofit
        >>> from se_retrofit.convert import timm_create_kwargs
        >>> timm_create_kwargs(se_retrofit.retrofit(timm.create_model("resnet18", num_classes=10)))
        {'num_classes': 10}
        >>> timm_create_kwargs(se_retrofit.retrofit(timm.create_model("resnet18")))
        {}
    """
    num_classes = getattr(model, "num_classes", None)
    return {"num_classes": num_classes} if isinstance(num_classes, int) and num_classes != 1000 else {}


def _timm_architecture(model: nn.Module) -> str | None:
    cfg = getattr(model, "pretrained_cfg", None)
    return cfg.get("architecture") if isinstance(cfg, dict) else None


def to_timm_native(model: nn.Module) -> tuple[str, dict[str, torch.Tensor]]:
    """Name and state dict of the equivalent timm native model (``seresnet50``, ``ecaresnet50d``).

    The state dict loads strictly into ``timm.create_model(name, **timm_create_kwargs(model))`` and
    that model computes what the edited one computes. The model itself is not changed (the gates are
    folded in a copy). Raises :class:`ConversionError` where no native model matches.

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
    expected = timm.create_model(name, pretrained=False, **timm_create_kwargs(model)).state_dict()
    mismatched = sorted(k for k in expected.keys() & state.keys() if expected[k].shape != state[k].shape)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected or mismatched:
        raise ConversionError(f"the edit does not match timm's {name}: missing {missing[:3]}, unexpected "
                              f"{unexpected[:3]}, shape differs {mismatched[:3]}")
    return name, state
