"""se_retrofit: retrofit Squeeze-and-Excitation (and relatives) into pretrained networks.

Example:
    >>> import timm, torch, se_retrofit
    >>> base = timm.create_model("resnet18").eval()
    >>> model = se_retrofit.retrofit(base, position="standard", reduction=16)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> bool(torch.equal(model(x), base(x)))
    True

The names below are imported on first use (PEP 562), so ``import se_retrofit`` and the command
line's ``--help`` and ``--version`` do not load torch or timm; ``from se_retrofit import retrofit``
works as usual.
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import types

from ._version import __version__

#: public name → the module that defines it
_WHERE = {
    "RetrofitError": "errors",
    "Analysis": "analysis", "Block": "analysis", "analyze": "analysis", "find_blocks": "analysis",
    "find_units": "analysis",
    "create_attention": "attention", "list_attentions": "attention", "register_attention": "attention",
    "POSITIONS": "config", "RetrofitConfig": "config", "Site": "config",
    "StackedAttentionWarning": "core", "LeftOutWarning": "core", "plan": "core", "record_of": "core", "retrofit": "core",
    "retrofit_with": "core",
    "ImpossibleBudgetError": "budget",
    "load": "io", "save": "io",
    "fold_gate_scale": "convert", "to_timm_native": "convert",
    "ExportError": "export", "ExportResult": "export", "export": "export",
    "register_timm_model": "timm_models", "unregister_timm_model": "timm_models",
    "attention_modules": "training", "attention_parameters": "training", "attention_state_dict": "training",
    "freeze_backbone": "training", "param_groups": "training", "unfreeze": "training",
}


def __getattr__(name: str):
    """A public name, or a submodule (``se_retrofit.finetune``: the trainer), imported on first use."""
    if name in _WHERE:
        value = getattr(importlib.import_module(f".{_WHERE[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)
    else:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


class _Package(types.ModuleType):
    """Keeps ``se_retrofit.export`` the function when its submodule of the same name is imported
    (the import system sets the parent's attribute to the submodule; an eager ``from .export import
    export`` used to rebind it)."""

    def __setattr__(self, name: str, value) -> None:
        if isinstance(value, types.ModuleType) and _WHERE.get(name) == name:
            value = getattr(value, name)
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package


__all__ = [
    "Analysis", "Block", "RetrofitError", "POSITIONS", "RetrofitConfig", "Site", "StackedAttentionWarning", "LeftOutWarning", "analyze",
    "create_attention", "find_blocks", "find_units", "list_attentions", "plan", "record_of", "register_attention",
    "retrofit", "retrofit_with", "__version__", "load", "save", "fold_gate_scale", "to_timm_native",
    "attention_modules", "attention_parameters", "attention_state_dict", "freeze_backbone", "param_groups",
    "unfreeze", "export", "ExportError", "ExportResult", "ImpossibleBudgetError", "finetune", "register_timm_model", "unregister_timm_model",
]
