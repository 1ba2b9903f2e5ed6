"""Edited architectures by name in timm: ``timm.create_model("resnet50_se", ...)``.

:func:`register_timm_model` adds an entry to timm's model registry that builds the base with timm,
inserts the attention at the recorded sites (at identity), and carries a pretrained config copied from
the base's under its own architecture name, so everything that goes through ``timm.create_model`` by
name works with it: ``pretrained=True`` with ``pretrained_cfg_overlay=dict(file=...)``,
``checkpoint_path=``, ``num_classes=``, ``features_only=True``, timm's data config and
``reset_classifier``, and timm's ``train.py`` / ``validate.py`` run from a launcher that registers the
name first (docs/fine-tuning.md, "Using an edited model by name in timm").

Weights: a file saved from the edited model loads exactly (strictly); a checkpoint of the *base*
(``pretrained=True`` with the base's hub weights, or a base state dict as ``file``) loads into the
backbone and the attention starts at identity, which is ``se_retrofit.retrofit`` of the pretrained base.
"""
from __future__ import annotations

import dataclasses
import functools
import sys
import warnings
from collections import deque
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from .attention._layers import set_gate_state
from .config import RetrofitConfig, RetrofitRecord
from .core import apply_record, describe_base, record_of, retrofit_with
from .errors import RetrofitError
from .training import attention_state_dict

__all__ = ["TimmRegistrationError", "register_timm_model", "registered_timm_models", "unregister_timm_model"]

#: timm's ``register_model`` reads the pretrained config of a new name from its module's ``default_cfgs``
default_cfgs: dict[str, Any] = {}
_REGISTERED: dict[str, "_Architecture"] = {}
_CONFIG_FIELDS = {f.name for f in dataclasses.fields(RetrofitConfig)} - {"options", "attention_module"}


class TimmRegistrationError(RetrofitError):
    """The name cannot be registered in timm as asked."""


@dataclass(frozen=True)
class _Architecture:
    base: str
    record: RetrofitRecord
    gates: dict


def register_timm_model(name: str, base: str | Path, *, config: RetrofitConfig | None = None,
                        example_input: torch.Tensor | None = None, **options) -> str:
    """Register ``name`` in timm's model registry as ``base`` with attention retrofitted.

    Args:
        name: the new architecture name (letters, digits, ``_``; not an existing timm model).
        base: a timm architecture name (``resnet50``), or a directory written by
            :func:`se_retrofit.save` whose base is a timm model: its sites are replayed and its
            ``model.safetensors`` becomes the name's pretrained weights.
        config: a :class:`RetrofitConfig`; or pass its fields and the attention's options as keyword
            options, exactly as to :func:`se_retrofit.retrofit` (``position="post"``, ``reduction=8``).
        example_input: an input for analysing the base once, now (default: its own input size).

    Returns:
        ``name``, which ``timm.create_model`` now knows.

    Example:
        >>> import timm, torch, se_retrofit
        >>> se_retrofit.register_timm_model("resnet18_se_example", "resnet18", reduction=16)
        'resnet18_se_example'
        >>> model = timm.create_model("resnet18_se_example", num_classes=10).eval()
        >>> model.pretrained_cfg["architecture"], len(se_retrofit.record_of(model).sites), model.num_classes
        ('resnet18_se_example', 8, 10)
        >>> se_retrofit.unregister_timm_model("resnet18_se_example")
    """
    import timm

    _check_name(name)
    saved = Path(base) / "retrofit_config.json"
    if saved.is_file():
        architecture, pretrained_cfg = _from_saved(Path(base))
    else:
        architecture = _from_options(str(base), config, example_input, options)
        pretrained_cfg = timm.models.get_pretrained_cfg(architecture.base)
    _REGISTERED[name] = architecture
    _add_to_timm(name, dataclasses.replace(pretrained_cfg, architecture=name, tag=None))
    return name


def unregister_timm_model(name: str) -> None:
    """Remove a name added by :func:`register_timm_model` from timm's registry (no-op if unknown)."""
    from timm.models import _registry

    if _REGISTERED.pop(name, None) is None:
        return
    default_cfgs.pop(name, None)
    _registry._model_entrypoints.pop(name, None)
    module = _registry._model_to_module.pop(name, None)
    _registry._module_to_models.get(module, set()).discard(name)
    for key in _registry._model_with_tags.pop(name, []) + [name]:
        _registry._model_pretrained_cfgs.pop(key, None)
        _registry._model_has_pretrained.discard(key)
    _registry._model_default_cfgs.pop(name, None)
    if name in __all__:  # timm's register_model lists each name in its module's __all__
        __all__.remove(name)


def registered_timm_models() -> list[str]:
    """The names added by :func:`register_timm_model` in this process."""
    return sorted(_REGISTERED)


# --- registration -----------------------------------------------------------------------------

def _check_name(name: Any) -> None:
    import timm

    if not isinstance(name, str) or not name.isidentifier():
        raise TimmRegistrationError(f"a timm model name is made of letters, digits and _, not {name!r}")
    if timm.is_model(name) and name not in _REGISTERED:
        raise TimmRegistrationError(f"{name!r} is already a timm model; choose a new name such as {name}_se")


def _from_options(base: str, config: RetrofitConfig | None, example_input: Any, options: dict) -> _Architecture:
    import timm

    if not timm.is_model(base):
        raise TimmRegistrationError(f"unknown timm model {base!r} (and no directory saved by se_retrofit.save there)")
    if base in _REGISTERED:
        raise TimmRegistrationError(f"{base!r} is already an edited architecture; register from its base instead")
    if config is not None and options:
        raise TimmRegistrationError(f"pass either config= or retrofit options, not both ({', '.join(options)})")
    config = config or _config_from_options(options)
    probe = timm.create_model(base, pretrained=False)
    record = record_of(retrofit_with(probe, config, example_input=example_input, inplace=True))
    return _Architecture(base, record, {})


def _config_from_options(options: dict) -> RetrofitConfig:
    fields = {k: list(v) if k in ("stages", "blocks", "exclude") and v is not None else v
              for k, v in options.items() if k in _CONFIG_FIELDS}
    return RetrofitConfig(**fields, options={k: v for k, v in options.items() if k not in _CONFIG_FIELDS})


def _from_saved(directory: Path) -> tuple[_Architecture, Any]:
    import timm

    from .io import MODEL_FILE, read_config

    data = read_config(directory)
    record = RetrofitRecord.from_dict(data)
    if record.base.get("source") != "timm" or not timm.is_model(record.base.get("name")):
        raise TimmRegistrationError(f"{directory} was not made from a timm model (its base: "
                                    f"{record.base.get('source')}:{record.base.get('name')})")
    cfg = timm.models.get_pretrained_cfg(record.base["name"])
    num_classes = record.base.get("create_kwargs", {}).get("num_classes", cfg.num_classes)
    cfg = dataclasses.replace(cfg, file=str((directory / MODEL_FILE).resolve()), hf_hub_id=None, url=None,
                              source=None, num_classes=num_classes)
    return _Architecture(record.base["name"], record, dict(data.get("gates", {}))), cfg


def _add_to_timm(name: str, pretrained_cfg: Any) -> None:
    from timm.models import register_model
    from timm.models._pretrained import DefaultCfg

    default_cfgs[name] = DefaultCfg(tags=deque([""]), cfgs={"": pretrained_cfg})

    def create(pretrained: bool = False, **kwargs) -> nn.Module:
        return _create(name, pretrained, **kwargs)

    create.__name__ = create.__qualname__ = name
    create.__module__ = __name__
    create.__doc__ = f"{_REGISTERED[name].base} with {_REGISTERED[name].record.config.attention} (se_retrofit)"
    with warnings.catch_warnings():  # registering one of our own names again replaces it
        warnings.filterwarnings("ignore", message=f"Overwriting {name} in registry")
        register_model(create)


# --- creation (timm.create_model calls this) ----------------------------------------------------

def _create(name: str, pretrained: bool, **kwargs) -> nn.Module:
    from timm.models import build_model_with_cfg

    architecture = _REGISTERED[name]
    features = kwargs.get("features_only") and "feature_cls" not in kwargs
    out_indices = kwargs.pop("out_indices", None) if features else None
    if features:
        kwargs.pop("features_only")
    elif kwargs.get("features_only") and "out_indices" not in kwargs:
        # timm's default indices (0-4) are the base entry point's to narrow; it is not called here
        kwargs["out_indices"] = tuple(range(_feature_count(architecture.base, kwargs)))
    model = build_model_with_cfg(functools.partial(_build_edited, architecture), name, pretrained,
                                 pretrained_filter_fn=functools.partial(_with_identity_attention, architecture),
                                 **kwargs)
    return _feature_getter(model, out_indices) if features else model


def _feature_count(base: str, kwargs: dict) -> int:
    """How many feature levels the base has (``len(feature_info)``), from a copy built on the meta device."""
    import timm
    import torch

    options = {k: v for k, v in kwargs.items() if k not in ("features_only", "feature_cls", "out_indices", "feature_cfg")}
    with torch.device("meta"):
        return len(timm.create_model(base, pretrained=False, **options).feature_info)


def _feature_getter(model: nn.Module, out_indices: Any) -> nn.Module:
    """``features_only``: the edited model wrapped by timm's FeatureGetterNet (``forward_intermediates``),
    the one feature wrapper that needs no per-architecture settings from the base's own entry point."""
    from timm.models._builder import pretrained_cfg_for_features
    from timm.models._features import FeatureGetterNet

    if out_indices is None:
        out_indices = tuple(range(len(model.feature_info)))
    wrapper = FeatureGetterNet(model, out_indices=out_indices)
    wrapper.pretrained_cfg = wrapper.default_cfg = pretrained_cfg_for_features(model.pretrained_cfg)
    return wrapper


def _build_edited(architecture: _Architecture, **kwargs) -> nn.Module:
    import timm

    model = timm.create_model(architecture.base, pretrained=False, **kwargs)
    base = {**describe_base(model), "weights": "timm.create_model of a name registered by se_retrofit"}
    apply_record(model, RetrofitRecord(architecture.record.config, list(architecture.record.sites), base))
    for path, state in architecture.gates.items():  # gates folded or scaled before saving
        set_gate_state(model.get_submodule(path), state)
    return model


def _with_identity_attention(architecture: _Architecture, state_dict: dict, model: nn.Module) -> dict:
    """A checkpoint of the base (no attention weights) gets the model's identity attention added;
    a checkpoint of the edited model is loaded as it is (strictly, by timm)."""
    attention = attention_state_dict(model)
    if any(key in state_dict for key in attention):
        return state_dict
    base_filter = _base_filter(architecture.base)
    if base_filter is not None:
        state_dict = base_filter(state_dict, model)
    return {**state_dict, **{k: v.detach().clone() for k, v in attention.items()}}


def _base_filter(base: str):
    """The checkpoint filter timm applies to the base's own pretrained weights, if its module has one."""
    import timm

    module = sys.modules.get(timm.models.model_entrypoint(base).__module__)
    return getattr(module, "checkpoint_filter_fn", None)
