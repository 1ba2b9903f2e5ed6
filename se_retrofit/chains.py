"""Plain chains: networks of conv → norm → activation layers with neither residual additions nor
multi-branch joins (VGG, AlexNet, MobileNetV1, LCNet), where the SE paper puts SE "after the
non-linearity following each convolution" (SE-VGG-16) and SE-MobileNet after each
depthwise-separable conv.

A **chain layer** is a conv whose result, through norms only, reaches an activation, on a map that
still has spatial extent (a classifier's 7×7 "fc6" conv to 1×1 is not one). Which convs count is
decided by what the chain is built of:

* a chain of full convs (VGG, AlexNet, MONAI's U-Nets): every spatial (k > 1) conv that mixes all
  channels;
* a chain of depthwise-separable convs (MobileNetV1, LCNet: it has depthwise convs): every
  pointwise conv that follows a depthwise conv, the site going after the pointwise activation (after
  its norm where the projection is linear, as in MobileNetV2's bottlenecks). The repeating layer of
  such a chain is the separable pair, so the stem's full conv is not one.

These are looked for only where a model has no residual block and no join: a stem or a head of a
residual or multi-branch network is not a chain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn
from torch.nn.modules.conv import _ConvNd

from . import op_kinds as K
from .gates import CallCounts, Gate, gate_after
from .recording import Op, Recording

_NORMS = frozenset({K.NORM, K.IDENTITY})
_ENDS = frozenset({K.ACT, K.NORM_ACT})
_BETWEEN = frozenset({K.PAD, K.DROPOUT})  # between the pair: TF "same" padding (HF MobileNetV1), dropout


@dataclass
class ChainLayer:
    """One layer of a plain chain: its conv, the activation ending it, and the gate after that."""

    conv: Op
    end: Op
    gate: Gate


def find_chain_layers(recording: Recording, modules: dict[str, nn.Module]) -> list[ChainLayer]:
    """The layers of the chain, in execution order (see the module docstring)."""
    convs = [op for op in recording.ops if op.kind == K.CONV and isinstance(modules.get(op.module), _ConvNd)
             and op.shape and len(op.shape) >= 3]
    separable = any(_is_depthwise(modules[op.module]) for op in convs)
    calls = CallCounts(recording)
    layers = []
    for conv in convs:
        layer = modules[conv.module]
        counts = _follows_depthwise(conv, modules) if separable else _is_full_spatial(layer)
        end = _activation_after(conv, linear=separable) if counts else None
        if end is None or end.shape is None or math.prod(end.shape[2:]) <= 1:
            continue
        gate = gate_after(end, modules, calls, int(end.shape[1]))
        if gate is not None:
            layers.append(ChainLayer(conv, end, gate))
    return layers


def _is_depthwise(conv: _ConvNd) -> bool:
    return conv.groups > 1 and conv.groups == conv.in_channels


def _is_full_spatial(conv: _ConvNd) -> bool:
    return conv.groups == 1 and math.prod(conv.kernel_size) > 1


def _follows_depthwise(conv: Op, modules: dict[str, nn.Module]) -> bool:
    """A pointwise conv whose input comes from a depthwise conv through norms and activations."""
    layer = modules[conv.module]
    if layer.groups != 1 or math.prod(layer.kernel_size) != 1 or len(conv.inputs) != 1:
        return False
    op = conv.inputs[0]
    for _ in range(6):
        if op.kind == K.CONV:
            return isinstance(modules.get(op.module), _ConvNd) and _is_depthwise(modules[op.module])
        if op.kind == K.MUL:  # channel attention between the pair (LCNet's SE): follow the feature map
            maps = [i for i in op.inputs if i.shape == op.shape]
            if len(maps) != 1:
                return False
            op = maps[0]
            continue
        if op.kind not in _NORMS | _ENDS | _BETWEEN or len(op.inputs) != 1:
            return False
        op = op.inputs[0]
    return False


def _activation_after(conv: Op, linear: bool = False) -> Op | None:
    """The activation the conv's result reaches through norms (and dropout: MONAI's conv → norm →
    dropout → activation) only, where it is the only user; with ``linear``, the norm itself where no
    activation follows (a linear pointwise projection, as in MobileNetV2's bottlenecks)."""
    op = conv
    for _ in range(5):
        if len(op.users) != 1 or op.users[0].kind not in _NORMS | _ENDS | {K.DROPOUT}:
            return op if linear and op.kind == K.NORM else None
        op = op.users[0]
        if op.kind in _ENDS:
            return op
    return None
