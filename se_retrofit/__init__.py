"""se_retrofit: retrofit Squeeze-and-Excitation (and relatives) into pretrained networks.

Example:
    >>> import timm, torch, se_retrofit
    >>> base = timm.create_model("resnet18").eval()
    >>> model = se_retrofit.retrofit(base, position="standard", reduction=16)
    >>> x = torch.randn(1, 3, 64, 64)
    >>> bool(torch.equal(model(x), base(x)))
    True
"""
from .errors import RetrofitError
from .analysis import Analysis, Block, analyze, find_blocks, find_units
from .attention import create_attention, list_attentions, register_attention
from .config import POSITIONS, RetrofitConfig, Site
from .core import StackedAttentionWarning, plan, record_of, retrofit, retrofit_with
from .budget import ImpossibleBudgetError
from .io import load, save
from .convert import fold_gate_scale, to_timm_native
from .export import ExportError, ExportResult, export
from .timm_models import register_timm_model, unregister_timm_model
from .training import (attention_modules, attention_parameters, attention_state_dict, freeze_backbone,
                       param_groups, unfreeze)

from ._version import __version__


def __getattr__(name: str):
    """``se_retrofit.finetune`` (the trainer: DDP, YAML, plots, datasets) is imported on first use."""
    if name == "finetune":
        import importlib

        return importlib.import_module(".finetune", __name__)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "Analysis", "Block", "RetrofitError", "POSITIONS", "RetrofitConfig", "Site", "StackedAttentionWarning", "analyze",
    "create_attention", "find_blocks", "find_units", "list_attentions", "plan", "record_of", "register_attention",
    "retrofit", "retrofit_with", "__version__", "load", "save", "fold_gate_scale", "to_timm_native",
    "attention_modules", "attention_parameters", "attention_state_dict", "freeze_backbone", "param_groups",
    "unfreeze", "export", "ExportError", "ExportResult", "finetune", "register_timm_model", "unregister_timm_model",
    "ImpossibleBudgetError",
]
