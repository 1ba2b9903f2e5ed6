"""Norms told by what they compute, not by their class.

A frozen BatchNorm (torchvision's ``FrozenBatchNorm2d``, transformers' ``DetrFrozenBatchNorm2d``), a
BatchNorm fused into a scale and a shift, or a user's own affine norm layer is, at inference, one
thing: ``x · scale + shift`` per channel, from tensors the layer owns. Such a layer has no torch
base class the recording could know it by, so it is recognised from the operations its call
executed (:func:`is_affine_per_channel`), and the recording keeps its call as one ``norm``
operation, like ``nn.BatchNorm2d``'s: a norm on a shortcut is a projection, and a norm after a conv
is part of a conv → norm → activation layer.

Example:
    >>> import torch, torchvision
    >>> from se_retrofit.recording import record
    >>> layer = torchvision.ops.misc.FrozenBatchNorm2d(8)
    >>> [op.kind for op in record(torch.nn.Sequential(layer), torch.randn(1, 8, 4, 4)).ops]
    ['other', 'norm']
"""
from __future__ import annotations

import math

from torch import nn

from . import op_kinds as K

#: elementwise operations an affine norm applies to its input (as the recording names them)
_SCALES = frozenset({"mul", "mul_", "__mul__", "__rmul__", "__imul__", "div", "div_", "__truediv__",
                     "__itruediv__", "addcmul", "addcmul_"})
_SHIFTS = frozenset({"add", "add_", "__add__", "__radd__", "__iadd__", "sub", "sub_", "__sub__", "__rsub__",
                     "__isub__", "addcmul", "addcmul_"})


def channel_count(module: nn.Module) -> int | None:
    """The channel count ``C`` where the layer owns only per-channel vectors (each of ``C`` or one
    element: eps, a step counter) and has no child layers; None otherwise."""
    if next(module.children(), None) is not None:
        return None
    sizes = {t.numel() for t in (*module.parameters(recurse=False), *module.buffers(recurse=False))}
    sizes.discard(1)
    return sizes.pop() if len(sizes) == 1 else None


def is_affine_per_channel(module: nn.Module, ops: list, source, output) -> bool:
    """The call executed ``ops`` (recording :class:`~se_retrofit.recording.Op` s) on one input
    ``source`` and returned ``output`` (an op): it scales and shifts each channel of its input by
    tensors it owns, and returns the input's shape.

    * every operation on the input is a scale, a shift or a reshape that keeps its number of elements;
    * every other tensor it reads is its own (parameters, buffers and what it computes from them),
      of one element or one per channel of the input;
    * it both scales and shifts (a layer scale ``x · γ`` is no norm: it stays a multiplication).
    """
    channels = channel_count(module)
    if channels is None or output is None or output not in ops or source.shape is None \
            or output.shape != source.shape or channels not in source.shape[1:]:
        return False
    inside = set(ops)
    numel = math.prod(source.shape)
    names = set()
    for op in ops:
        if any(a is not None and a not in inside and a is not source for a in op.args):
            return False
        if not op.dynamic:
            if op.shape is not None and math.prod(op.shape) not in (1, channels):
                return False
            continue
        if op.kind not in (K.RESHAPE, K.IDENTITY) and op.name not in _SCALES | _SHIFTS:
            return False
        if op.shape is None or math.prod(op.shape) != numel:
            return False
        names.add(op.name)
    return bool(names & _SCALES) and bool(names & _SHIFTS)
