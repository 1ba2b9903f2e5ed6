"""The second edit mechanism: a module edited from outside its forward.

Where a block's forward cannot be rewritten (torch.fx cannot trace it: ``len(x.shape)``, a branch on
the input's dtype or values, a tuple argument unpacked; or its traced additions are not the ones the
model ran), the attention module can still go on what a module *returns*:

* ``post``: on the output of the module whose forward returns the sum (after the activation that
  follows it there), exactly where the rewrite would put it;
* ``standard``: on the output of the branch's last module, where the recording shows that output
  reaches the addition and nothing else (through stochastic depth or dropout only).

The module keeps its class: it becomes an instance of a generated subclass whose ``forward`` calls
the class's own forward and applies the attention module (a child of the module, so its parameters,
state-dict keys and ``.to()`` work as for a rewrite) to one tensor of the result. Like a rewritten
block (:mod:`.edited`), the subclass is rebuilt by ``copy.deepcopy``, ``pickle`` and
``torch.save(model)`` from "class + which outputs are gated", never lost or applied twice, which a
registered forward hook does not promise (``state_dict``-free save paths drop hooks, a second
registration doubles them). ``torch.jit.trace`` (``export(format="torchscript")``), ``torch.export``
and ONNX see through it; ``torch.jit.script`` is refused with that advice (it cannot compile the
``forward(*args, **kwargs)``).

Where the block's adding module receives a padding mask (:mod:`.masking`), that module becomes a
generated subclass too, whose call hands the mask to the gates of its block (:func:`provide_masks`):
the squeeze sees the real positions only, as in a rewritten forward.

Example:
    >>> import torch
    >>> from torch import nn
    >>> block = nn.Linear(4, 4)
    >>> wrap_output(block, [OutputGate("se", 0, -1)], {"se": nn.Identity()})
    >>> type(block).__name__, is_wrapped(block), "se" in dict(block.named_children())
    ('Linear', True, True)
"""
from __future__ import annotations

import contextvars
import functools
import inspect
from dataclasses import dataclass, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import RetrofitError
from .edited import SPEC_ATTR as REWRITE_SPEC_ATTR, EditSpec, edited_class
from .masking import PADDING_ARGUMENTS, padding_filled, real_positions_gated

SPEC_ATTR = "_se_retrofit_wrap"


@dataclass(frozen=True)
class OutputGate:
    """One attention module applied to a module's output: its attribute name on the module, which
    tensor of the output it gates (pytree order; 0 for a plain tensor), where that tensor's
    channels are (1 for NCHW, -1 for token sequences and channels-last maps), and the padding mask
    it squeezes by: the argument ``padding_mask`` of the call of the module ``mask_from`` (a
    module path as edited, used as a key) that runs around it."""

    attr: str
    leaf: int = 0
    channel_dim: int = 1
    padding_mask: str | None = None
    mask_from: str | None = None


@dataclass(frozen=True, eq=False)
class WrapSpec:
    """What rebuilds an outside-edited module's class: the class it had (a rewritten block's class
    by its :class:`.edited.EditSpec`), the gates applied to its output, in order, and the padding
    masks its call hands to gates below it: ``(key, argument name)`` pairs."""

    base: Any  # type | EditSpec
    gates: tuple[OutputGate, ...]
    provides: tuple[tuple[str, str], ...] = ()

    @property
    def key(self) -> tuple:
        base = self.base.key if isinstance(self.base, EditSpec) else self.base
        return (base, self.gates, self.provides)

    def __deepcopy__(self, memo: dict) -> "WrapSpec":
        return self


_CLASSES: dict[tuple, type] = {}


def is_wrapped(module: nn.Module) -> bool:
    """Whether ``module`` was edited from outside its forward."""
    return isinstance(vars(type(module)).get(SPEC_ATTR), WrapSpec)


def wrap_output(module: nn.Module, gates: list[OutputGate], attention: dict[str, nn.Module]) -> None:
    """Attach the ``attention`` modules to ``module`` (by attribute name) and make its class apply
    them to its output, after any gates it applies already."""
    spec = _spec_of(module)
    for name, child in attention.items():
        if name in vars(module) and vars(module)[name] is None:
            delattr(module, name)  # timm keeps `self.se = None` where a block has no attention
        child.train(module.training)
        module.add_module(name, child)
    _rebuild(module, replace(spec, gates=spec.gates + tuple(gates)))


def provide_masks(module: nn.Module, masks: tuple[tuple[str, str], ...]) -> None:
    """Make each call of ``module`` hand the padding masks it receives to the gates below it: ``masks``
    are ``(key, argument name)`` pairs; a gate whose ``mask_from`` is the key reads that argument."""
    spec = _spec_of(module)
    _rebuild(module, replace(spec, provides=spec.provides + tuple(m for m in masks if m not in spec.provides)))


def _spec_of(module: nn.Module) -> WrapSpec:
    """The module's wrap spec, or one with nothing yet on its class (a rewritten block's or its own)."""
    spec = vars(type(module)).get(SPEC_ATTR)
    if isinstance(spec, WrapSpec):
        return spec
    rewritten = vars(type(module)).get(REWRITE_SPEC_ATTR)
    return WrapSpec(rewritten if isinstance(rewritten, EditSpec) else type(module), ())


def _rebuild(module: nn.Module, spec: WrapSpec) -> None:
    module.__dict__.pop("forward", None)
    module.__class__ = wrapped_class(spec)


def wrapped_class(spec: WrapSpec) -> type:
    """The generated subclass for ``spec`` (one per distinct edit)."""
    cls = _CLASSES.get(spec.key)
    if cls is None:
        base = edited_class(spec.base) if isinstance(spec.base, EditSpec) else spec.base
        name = base.__qualname__.split("<")[0]
        cls = type(base.__name__, (base,), {
            "forward": _forward(base.forward, spec.gates, spec.provides), SPEC_ATTR: spec, "__reduce_ex__": _reduce_wrapped,
            "__prepare_scriptable__": _refuse_script,
            "__module__": base.__module__,
            # pickling the class object itself (not an instance) must fail loudly, not find the base
            "__qualname__": f"{name}<output edited by se_retrofit>",
        })
        _CLASSES[spec.key] = cls
    return cls


class NotScriptableError(RetrofitError):
    """``torch.jit.script`` of a module edited from outside its forward."""


def _refuse_script(self: nn.Module) -> nn.Module:
    raise NotScriptableError(
        f"{type(self).__name__} was edited by se_retrofit from outside its forward (torch.fx cannot rewrite it), "
        "which torch.jit.script cannot compile; use torch.jit.trace, or se_retrofit.export(model, path, "
        "format='torchscript'), which traces")


def _reduce_wrapped(self: nn.Module, protocol: int) -> tuple:
    return (_new_wrapped, (vars(type(self))[SPEC_ATTR],), self.__getstate__())


def _new_wrapped(spec: WrapSpec) -> nn.Module:
    """Unpickling: an empty instance of the wrapped class; pickle then restores its state."""
    cls = wrapped_class(spec)
    return cls.__new__(cls)


def _forward(inner: Callable, gates: tuple[OutputGate, ...], provides: tuple[tuple[str, str], ...]) -> Callable:
    def gated(self, *args, **kwargs):
        return gate_output(self, inner(self, *args, **kwargs), gates)

    def handing_masks(self, *args, **kwargs):
        call = _signature(inner).bind(self, *args, **kwargs).arguments
        token = _MASKS.set({**_MASKS.get(), **{key: call.get(name) for key, name in provides}})
        try:
            return gated(self, *args, **kwargs)
        finally:
            _MASKS.reset(token)

    forward = handing_masks if provides else gated

    # inspect.signature reports the wrapped forward's parameters (libraries read them); its
    # attributes (a rewritten forward's variants) stay with it
    functools.update_wrapper(forward, inner, updated=())
    return forward


#: the padding masks handed down by the calls running now (:func:`provide_masks`), by key
_MASKS: contextvars.ContextVar[dict[str, Any]] = contextvars.ContextVar("se_retrofit_padding_masks", default={})


@functools.lru_cache(maxsize=None)
def _signature(function: Callable) -> inspect.Signature:
    return inspect.signature(function)


def gate_output(module: nn.Module, output: Any, gates: tuple[OutputGate, ...]) -> Any:
    """``output`` with each gate's tensor passed through its attention module."""
    if isinstance(output, torch.Tensor) and all(gate.leaf == 0 for gate in gates):
        for gate in gates:
            output = _attend(getattr(module, gate.attr), output, gate)
        return output
    leaves, structure = tree_flatten(output)
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    for gate in gates:
        if gate.leaf >= len(tensors):
            raise RuntimeError(f"{type(module).__name__} was edited by se_retrofit to gate tensor #{gate.leaf} of its "
                               f"output, and this call returned {len(tensors)} tensors")
        index = tensors[gate.leaf]
        leaves[index] = _attend(getattr(module, gate.attr), leaves[index], gate)
    return tree_unflatten(leaves, structure)


def _attend(attention: nn.Module, x: torch.Tensor, gate: OutputGate) -> torch.Tensor:
    """As :func:`.placement.attend`: channels-last maps and token sequences are moved to channels-first;
    with a padding mask, the squeeze sees the real positions only (:mod:`.masking`)."""
    x = x if gate.channel_dim == 1 else x.movedim(gate.channel_dim, 1)
    if gate.padding_mask is None:
        out = attention(x)
    else:
        mask = _MASKS.get().get(gate.mask_from)
        filled, real = padding_filled(x, mask, PADDING_ARGUMENTS[gate.padding_mask])
        out = real_positions_gated(attention(filled), x, real)
    return out if gate.channel_dim == 1 else out.movedim(1, gate.channel_dim)
