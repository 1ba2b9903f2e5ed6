"""Shape-only forwards: layers whose output shape is known without computing anything, for the meta
copy of a model the first probe records (:mod:`.probing`).

Norm and activation layers keep the shape of their input, and a conv's output shape is arithmetic,
where torch computes them on meta tensors the long way (in Python, op by op). A layer with a forward
of its own (on its class or its instance) keeps it."""
from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

from . import op_kinds as K


def shape_only_forward(module: nn.Module) -> Callable[..., torch.Tensor] | None:
    """The forward the meta copy gives ``module`` in place of its own; None where it keeps its own."""
    return _empty_like if _keeps_shape(module) else _activation_shape_only(module) or _conv_shape_only(module)


_SHAPE_KEEPING_FORWARDS = frozenset({nn.modules.batchnorm._BatchNorm.forward, nn.LayerNorm.forward,
                                     nn.GroupNorm.forward})


def _keeps_shape(module: nn.Module) -> bool:
    """A norm layer with torch's own forward (or timm's norm + activation), learned parameters (so the
    recording marks it as learned either way) and no forward of its own on the instance."""
    forward = type(module).forward
    timm_norm_act = type(module).__module__ == "timm.layers.norm_act" and isinstance(module, nn.BatchNorm2d)
    return (forward in _SHAPE_KEEPING_FORWARDS or timm_norm_act) and "forward" not in vars(module) \
        and any(True for _ in module.parameters(recurse=False))


def _empty_like(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty_like(input)


_ACTIVATION_FORWARDS = frozenset(cls.forward for types, kind in K._MODULE_KINDS if kind == K.ACT for cls in types)


def _activation_shape_only(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An activation layer (torch's or timm's own forward, none on the instance) keeps the shape of
    its input: on meta tensors it returns a new empty tensor like its input, or the input itself
    where it works in place (as the layer would: the recording follows tensors by identity)."""
    forward = type(module).forward
    known = forward in _ACTIVATION_FORWARDS or (type(module).__module__ == "timm.layers.activations"
                                                and K.module_kind(module) == K.ACT)
    if not known or "forward" in vars(module):
        return None
    return _same_tensor if getattr(module, "inplace", False) else _empty_like


def _same_tensor(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return input


_CONV_FORWARDS = {nn.Conv1d.forward: 1, nn.Conv2d.forward: 2, nn.Conv3d.forward: 3}


def _conv_shape_only(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A conv layer with torch's own forward returns, on meta tensors, an empty tensor of the shape
    torch's conv gives (out channels; each size ``(s + 2p - d(k - 1) - 1) // stride + 1``, kept
    with ``padding="same"``), where the meta conv computes the same in Python, op by op. An input
    the conv would refuse (other channels or rank, smaller than the kernel) raises as torch does,
    so a bad example input is still told. Any padding mode pads by ``padding`` first, to the same
    shape."""
    dims = _CONV_FORWARDS.get(type(module).forward)
    if dims is None or "forward" in vars(module):
        return None

    def forward(input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in (dims + 1, dims + 2) or input.shape[-dims - 1] != module.in_channels:
            raise RuntimeError(f"{type(module).__name__} expected {module.in_channels} input channels and "
                               f"{dims}-D maps, got an input of shape {tuple(input.shape)}")
        sizes = input.shape[-dims:]
        if module.padding != "same":
            padding = (0,) * dims if module.padding == "valid" else module.padding
            sizes = [(size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for size, pad, dilation, kernel, stride
                     in zip(sizes, padding, module.dilation, module.kernel_size, module.stride)]
        if min(sizes) < 1:
            raise RuntimeError(f"{type(module).__name__}: the input {tuple(input.shape)} is smaller than the kernel")
        return input.new_empty((*input.shape[:-dims - 1], module.out_channels, *sizes))

    return forward
