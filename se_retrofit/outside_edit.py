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

Example:
    >>> import torch
    >>> from torch import nn
    >>> block = nn.Linear(4, 4)
    >>> wrap_output(block, [OutputGate("se", 0, -1)], {"se": nn.Identity()})
    >>> type(block).__name__, is_wrapped(block), "se" in dict(block.named_children())
    ('Linear', True, True)
"""
from __future__ import annotations

import functools
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_flatten, tree_unflatten

from .errors import RetrofitError
from .edited import SPEC_ATTR as REWRITE_SPEC_ATTR, EditSpec, edited_class

SPEC_ATTR = "_se_retrofit_wrap"


@dataclass(frozen=True)
class OutputGate:
    """One attention module applied to a module's output: its attribute name on the module, which
    tensor of the output it gates (pytree order; 0 for a plain tensor) and where that tensor's
    channels are (1 for NCHW, -1 for token sequences and channels-last maps)."""

    attr: str
    leaf: int = 0
    channel_dim: int = 1


@dataclass(frozen=True, eq=False)
class WrapSpec:
    """What rebuilds an outside-edited module's class: the class it had (a rewritten block's class
    by its :class:`.edited.EditSpec`) and the gates applied to its output, in order."""

    base: Any  # type | EditSpec
    gates: tuple[OutputGate, ...]

    @property
    def key(self) -> tuple:
        base = self.base.key if isinstance(self.base, EditSpec) else self.base
        return (base, self.gates)

    def __deepcopy__(self, memo: dict) -> "WrapSpec":
        return self


_CLASSES: dict[tuple, type] = {}


def is_wrapped(module: nn.Module) -> bool:
    """Whether ``module`` was edited from outside its forward."""
    return isinstance(vars(type(module)).get(SPEC_ATTR), WrapSpec)


def wrap_output(module: nn.Module, gates: list[OutputGate], attention: dict[str, nn.Module]) -> None:
    """Attach the ``attention`` modules to ``module`` (by attribute name) and make its class apply
    them to its output, after any gates it applies already."""
    spec = vars(type(module)).get(SPEC_ATTR)
    if isinstance(spec, WrapSpec):
        base, before = spec.base, spec.gates
    else:
        rewritten = vars(type(module)).get(REWRITE_SPEC_ATTR)
        base, before = (rewritten if isinstance(rewritten, EditSpec) else type(module)), ()
    for name, child in attention.items():
        if name in vars(module) and vars(module)[name] is None:
            delattr(module, name)  # timm keeps `self.se = None` where a block has no attention
        child.train(module.training)
        module.add_module(name, child)
    module.__dict__.pop("forward", None)
    module.__class__ = wrapped_class(WrapSpec(base, before + tuple(gates)))


def wrapped_class(spec: WrapSpec) -> type:
    """The generated subclass for ``spec`` (one per distinct edit)."""
    cls = _CLASSES.get(spec.key)
    if cls is None:
        base = edited_class(spec.base) if isinstance(spec.base, EditSpec) else spec.base
        name = base.__qualname__.split("<")[0]
        cls = type(base.__name__, (base,), {
            "forward": _forward(base.forward, spec.gates), SPEC_ATTR: spec, "__reduce_ex__": _reduce_wrapped,
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


def _forward(inner: Callable, gates: tuple[OutputGate, ...]) -> Callable:
    def forward(self, *args, **kwargs):
        return gate_output(self, inner(self, *args, **kwargs), gates)

    # inspect.signature reports the wrapped forward's parameters (libraries read them); its
    # attributes (a rewritten forward's variants) stay with it
    functools.update_wrapper(forward, inner, updated=())
    return forward


def gate_output(module: nn.Module, output: Any, gates: tuple[OutputGate, ...]) -> Any:
    """``output`` with each gate's tensor passed through its attention module."""
    if isinstance(output, torch.Tensor) and all(gate.leaf == 0 for gate in gates):
        for gate in gates:
            output = _attend(getattr(module, gate.attr), output, gate.channel_dim)
        return output
    leaves, structure = tree_flatten(output)
    tensors = [i for i, leaf in enumerate(leaves) if isinstance(leaf, torch.Tensor)]
    for gate in gates:
        if gate.leaf >= len(tensors):
            raise RuntimeError(f"{type(module).__name__} was edited by se_retrofit to gate tensor #{gate.leaf} of its "
                               f"output, and this call returned {len(tensors)} tensors")
        index = tensors[gate.leaf]
        leaves[index] = _attend(getattr(module, gate.attr), leaves[index], gate.channel_dim)
    return tree_unflatten(leaves, structure)


def _attend(attention: nn.Module, x: torch.Tensor, channel_dim: int) -> torch.Tensor:
    """As :func:`.placement.attend`: channels-last maps and token sequences are moved to channels-first."""
    if channel_dim == 1:
        return attention(x)
    return attention(x.movedim(channel_dim, 1)).movedim(1, channel_dim)
