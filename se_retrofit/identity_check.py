"""The identity check: does the edited model compute what the original computes?

A freshly built timm model zero-initialises the last norm of each residual branch (and starts
ConvNeXt's layer scale at 1e-6), so every branch outputs ~0 and *any* module put on a branch, even
one that doubles its input, leaves the output unchanged: on such weights an identity check passes
vacuously. When the weights are random, the check therefore runs on copies of both models given the
statistics trained weights have (:func:`trained_like`); the models themselves are left untouched.

Example:
    >>> import timm, torch, se_retrofit
    >>> base = timm.create_model("resnet18").eval()
    >>> edited = se_retrofit.retrofit(base)
    >>> check = check_identity(base, edited, torch.randn(1, 3, 64, 64), random_weights=True)
    >>> check.passed, check.max_abs_diff, check.statistics
    (True, 0.0, 'trained-like statistics on a copy (the weights are random)')
"""
from __future__ import annotations

import zlib
from dataclasses import asdict, dataclass
from typing import Any

import torch
from torch import nn

from .copying import deepcopy_module
from .core import record_of
from .outputs import output_difference
from .tracing import training_mode

#: largest max |Δ| relative to the output's max |value| that still counts as identity
TOLERANCE = 1e-4
OWN_WEIGHTS = "the model's own weights"
TRAINED_LIKE = "trained-like statistics on a copy (the weights are random)"
_NORMS = (nn.modules.batchnorm._BatchNorm, nn.LayerNorm, nn.GroupNorm)


@dataclass(frozen=True)
class IdentityCheck:
    """max |Δ| (absolute and relative) between the two models' outputs, and the weights it used."""

    max_abs_diff: float
    max_rel_diff: float
    statistics: str
    tolerance: float = TOLERANCE

    @property
    def passed(self) -> bool:
        return self.max_rel_diff <= self.tolerance

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "passed": self.passed}


@torch.no_grad()
def trained_like(model: nn.Module, *, skip: tuple[str, ...] = ()) -> nn.Module:
    """Give ``model``'s norms (weight, bias, running statistics) and layer scales (``gamma``) the
    spread trained weights have, in place; returns ``model``.

    Values depend only on each tensor's name and shape, so two models sharing names (a model and
    its edited copy) get the same values. Modules under a path in ``skip`` (the inserted attention)
    are left as they are.

    Example:
        >>> import timm
        >>> model = trained_like(timm.create_model("resnet18"))
        >>> bool(model.layer1[0].bn2.weight.abs().min() > 0.4)
        True
    """
    def skipped(name: str) -> bool:
        return any(name == path or name.startswith(path + ".") for path in skip)

    for name, module in model.named_modules():
        if isinstance(module, _NORMS) and not skipped(name):
            for tensor_name, low, spread in (("weight", 0.5, None), ("bias", None, 0.1),
                                             ("running_mean", None, 0.1), ("running_var", 0.5, None)):
                tensor = getattr(module, tensor_name, None)
                if isinstance(tensor, torch.Tensor) and tensor.is_floating_point():
                    tensor.copy_(_draw(f"{name}.{tensor_name}", tensor, low, spread))
    for name, param in model.named_parameters():
        if name.endswith("gamma") and not skipped(name):
            param.copy_(_draw(name, param, 0.5, None))
    return model


def _draw(name: str, like: torch.Tensor, low: float | None, spread: float | None) -> torch.Tensor:
    """Uniform in [low, low + 1) (``low`` given) or normal times ``spread``, seeded by ``name``."""
    generator = torch.Generator().manual_seed(zlib.crc32(name.encode()))
    values = torch.rand(like.shape, generator=generator) + low if low is not None else \
        torch.randn(like.shape, generator=generator) * spread
    return values.to(dtype=like.dtype, device=like.device)


def check_identity(base: nn.Module, edited: nn.Module, example: Any, *, random_weights: bool,
                   attention_paths: tuple[str, ...] | None = None) -> IdentityCheck:
    """Compare ``base`` and ``edited`` on ``example`` in eval mode (train/eval flags restored).

    ``random_weights``: the weights are a fresh initialisation, so compare copies of both given
    :func:`trained_like` statistics (the inserted modules, at ``attention_paths``, keep theirs; by
    default the sites recorded on ``edited``).
    """
    statistics = OWN_WEIGHTS
    if random_weights:
        if attention_paths is None:
            attention_paths = tuple(site.module_path for site in record_of(edited).sites)
        base, edited = trained_like(deepcopy_module(base)), trained_like(deepcopy_module(edited), skip=attention_paths)
        statistics = TRAINED_LIKE
    with training_mode(base, False), training_mode(edited, False), torch.no_grad():
        absolute, relative = output_difference(base(example), edited(example))
    return IdentityCheck(absolute, relative, statistics)
