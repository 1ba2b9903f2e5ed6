"""Comparing model outputs: every tensor of a nested output, leaf by leaf.

Used wherever the tool promises "the same outputs": the CLI's identity check, the export checks and
the coverage sweep. Detection models return lists of dicts of tensors; all of them are compared.

Example:
    >>> import torch
    >>> a = {"boxes": torch.ones(2, 4), "scores": torch.tensor([0.5, 0.25])}
    >>> b = {"boxes": torch.ones(2, 4), "scores": torch.tensor([0.5, 0.5])}
    >>> output_difference(a, b)
    (0.25, 0.5)
"""
from __future__ import annotations

from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from .errors import RetrofitError


class OutputMismatchError(RetrofitError):
    """Two outputs do not even have the same structure or shapes."""


def output_tensors(value: Any) -> list[torch.Tensor]:
    """The tensors (and array-likes, e.g. onnxruntime's) of a nested output, in order, on the CPU."""
    return [torch.as_tensor(leaf).detach().cpu() for leaf in tree_leaves(value)
            if isinstance(leaf, torch.Tensor) or hasattr(leaf, "__array__")]


def output_difference(expected: Any, actual: Any) -> tuple[float, float]:
    """(max |Δ|, max |Δ| relative to the tensor's max |expected|) over every output tensor, in float64.

    Raises :class:`OutputMismatchError` when the outputs differ in number or shape."""
    expected, actual = output_tensors(expected), output_tensors(actual)
    if len(actual) != len(expected) or any(a.shape != e.shape for a, e in zip(actual, expected)):
        raise OutputMismatchError(f"outputs of shapes {[tuple(a.shape) for a in actual]} against "
                                  f"{[tuple(e.shape) for e in expected]}")
    pairs = [(e.double(), a.double()) for e, a in zip(expected, actual) if e.numel()]
    absolute = max(((a - e).abs().max().item() for e, a in pairs), default=0.0)
    relative = max(((a - e).abs().max() / e.abs().max().clamp_min(1e-12)).item() for e, a in pairs) \
        if pairs else 0.0
    return absolute, relative
