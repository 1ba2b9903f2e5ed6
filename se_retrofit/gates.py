"""Gates: where, in which module's forward, an attention module can be put on one tensor of the
executed graph. The contract between the analysis of units that are not residual additions
(multi-branch joins, plain chains) and planning; surgery knows each ``how``.

A gate is found from the operation producing the tensor (:func:`gate_after`), preferring, in order:

* ``output``: the tensor is what a composite module returns (and that module is called once): the
  module's forward is edited and its return value gated, so every use of the tensor is gated and
  the new module's keys sit under that module (``features.denseblock1.denselayer1.se.fc1.weight``);
* ``child``: the tensor is the result of a leaf module (a ``ReLU``, a ``BatchNormAct2d``) called once
  in its caller's forward: the caller is edited and that call gated (VGG's ``features.1``);
* ``child_call``: the same, where the caller calls the leaf several times (MONAI's DynUNet blocks
  apply one ``lrelu`` after each conv): call number ``index`` of it is gated;
* ``cat`` / ``cat_operand``: after the ``index``-th concatenation of a module's own forward (and the
  activation right after it), or on one of its operands only (a branch computed by functions in the
  joining forward itself).
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass

import torch
from torch import fx, nn
from torch.utils._pytree import tree_leaves, tree_map

from . import op_kinds as K
from .copying import fake_copy, meta_copy
from .fake_runs import caches_emptied_after
from .recording import ModuleCall, Op, Recording
from .tracing import TRACE_FAILURES, optional_arguments, trace

CHILD, CHILD_CALL, OUTPUT, CAT, CAT_OPERAND = "child", "child_call", "output", "cat", "cat_operand"


@dataclass(frozen=True)
class Gate:
    """One place for an attention module on ``channels`` channels (at ``channel_dim``).

    Attributes:
        module: dotted path of the module whose forward is edited.
        how: ``output`` | ``child`` | ``cat`` | ``cat_operand`` (see the module docstring).
        anchor: for ``child`` and ``child_call``, the child's name within ``module``.
        index: for ``cat``/``cat_operand``, which concatenation of ``module``'s own forward; for
            ``child_call``, which call of the child.
        operand: for ``cat_operand``, which tensor of that concatenation.
        channels, channel_dim: the gated tensor's channel count and where it is (1 for NCHW).
    """

    module: str
    how: str
    channels: int
    anchor: str = ""
    index: int = 0
    operand: int = 0
    channel_dim: int = 1


class CallCounts:
    """How many times each module ran in a recording (composite modules and leaves)."""

    def __init__(self, recording: Recording):
        self.counts: dict[str, int] = {}
        for call in recording.calls.values():
            self.counts[call.path] = self.counts.get(call.path, 0) + 1
        self.leaf_calls: dict[str, list[Op]] = {}
        for op in recording.ops:
            if op.module:
                self.counts[op.module] = self.counts.get(op.module, 0) + 1
                self.leaf_calls.setdefault(op.module, []).append(op)

    def once(self, path: str) -> bool:
        return self.counts.get(path, 0) == 1


def gate_after(op: Op, modules: dict[str, nn.Module], calls: CallCounts, channels: int,
               within: str | None = None) -> Gate | None:
    """A gate on the tensor ``op`` produces (every use of it), or None where no module call
    returns it alone. ``within``: only modules inside this path (a unit's container)."""
    for path in op.returned_by:  # innermost first
        module = modules.get(path)
        if not path or module is None or not _inside(path, within):
            continue
        if not calls.once(path):
            shared = _shared_leaf_call(op, path, calls, within)
            if shared is not None:
                return shared
            continue
        if K.module_kind(module) == K.OTHER:
            return Gate(path, OUTPUT, channels)
        caller = op.scope
        if path == op.module and _inside(caller, within) and (not caller or path.startswith(f"{caller}.")):
            return Gate(caller, CHILD, channels, anchor=path[len(caller) + 1:] if caller else path)
    return None


def _shared_leaf_call(op: Op, path: str, calls: CallCounts, within: str | None) -> Gate | None:
    """A ``child_call`` gate where ``op`` is one call of a leaf that only its caller's forward calls,
    all in one call of that forward (an activation module applied after each of a block's convs)."""
    caller = op.scope
    uses = calls.leaf_calls.get(path, [])
    if path != op.module or not caller or not path.startswith(f"{caller}.") or not _inside(caller, within) \
            or any(use.scope != caller or use.call != op.call for use in uses):
        return None
    return Gate(caller, CHILD_CALL, int(op.shape[1]) if op.shape else 0, anchor=path[len(caller) + 1:],
                index=uses.index(op))


def _inside(path: str, within: str | None) -> bool:
    return within is None or within == "" or path == within or path.startswith(f"{within}.")


def own_index(op: Op, ops: list[Op]) -> int:
    """Which operation of ``op``'s kind it is among those of the same forward call."""
    return sum(1 for other in ops if other.index < op.index and other.call == op.call
               and other.scope == op.scope and other.kind == op.kind and not other.module)


def gate_problem(module: nn.Module, gate: Gate, call: ModuleCall | None) -> str | None:
    """Why surgery could not find ``gate`` in the forward of ``module`` traced with its children as
    leaves, or why that traced forward would not compute what the module does on the input it
    received when recorded (``call``: a forward that branches on its input's type); None where it can."""
    given = _bound(module, call)
    concrete = {name: None for name in optional_arguments(module) if given.get(name) is None}
    try:
        graph = trace(module, leaf_children=True, concrete_args=concrete or None)
    except TRACE_FAILURES as error:
        return f"torch.fx cannot trace it: {_first_line(error)}"
    problem = _place_problem(module, graph, gate)
    if problem is None and call is not None:
        problem = _replay_problem(module, fx.GraphModule(module, graph), call)
    return problem


def _place_problem(module: nn.Module, graph: fx.Graph, gate: Gate) -> str | None:
    modules = dict(module.named_modules())
    if gate.how == CHILD:
        calls = sum(n.op == "call_module" and n.target == gate.anchor for n in graph.nodes)
        return None if calls == 1 else f"its traced forward calls {gate.anchor!r} {calls} times, not once"
    if gate.how == CHILD_CALL:
        calls = sum(n.op == "call_module" and n.target == gate.anchor for n in graph.nodes)
        return None if calls > gate.index else f"its traced forward calls {gate.anchor!r} {calls} times, " \
                                               f"not {gate.index + 1}"
    if gate.how == OUTPUT:
        value = next(n for n in graph.nodes if n.op == "output").args[0]
        return None if isinstance(value, fx.Node) else "its forward returns more than one tensor"
    cats = sum(K.node_kind(n, modules) == K.CAT for n in graph.nodes)
    return None if gate.index < cats else f"its traced forward has {cats} concatenations, not {gate.index + 1}"


def _replay_problem(module: nn.Module, traced: nn.Module, call: ModuleCall) -> str | None:
    """The traced forward, run on the recorded input, returns what the module returns (shapes)."""
    def shapes(value):
        return tree_map(lambda t: tuple(t.shape) if isinstance(t, torch.Tensor) else None, value)

    def fresh():  # each run on its own containers: a forward may append to a list it is given (VoVNet)
        return tree_map(lambda leaf: leaf, (call.args, call.kwargs))

    try:
        with torch.no_grad():
            args, kwargs = fresh()
            expected = shapes(_call_as_probed(module, args, kwargs))
    except Exception:  # the recorded input is gone stale (a list grown after the call): nothing to compare
        return None
    try:
        with torch.no_grad():
            args, kwargs = fresh()
            got = shapes(_call_as_probed(traced, args, kwargs))
    except Exception as error:  # what fails here is the traced code: any error says it differs
        return f"its traced forward does not run on the input it receives ({_first_line(error)})"
    return None if got == expected else "its traced forward returns other shapes than the module on its input"


def _call_as_probed(module: nn.Module, args: tuple, kwargs: dict):
    """Call ``module`` the way the probe ran: a copy of it with its parameters on the meta device for
    meta inputs (``module`` itself is never swapped: see :func:`~se_retrofit.copying.meta_copy`),
    inside their fake-tensor mode for fake ones."""
    tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    mode = getattr(tensors[0], "fake_mode", None) if tensors else None
    if mode is not None:  # on a fake copy, forgetting what caches kept: see :mod:`.fake_runs`
        twin = fake_copy(module, mode)
        with mode, caches_emptied_after():
            return twin(*args, **kwargs)
    if tensors and tensors[0].device.type == "meta":
        return meta_copy(module)(*args, **kwargs)
    return module(*args, **kwargs)


def _bound(module: nn.Module, call: ModuleCall | None) -> dict:
    if call is None:
        return {}
    try:
        return dict(inspect.signature(type(module).forward).bind(module, *call.args, **call.kwargs).arguments)
    except TypeError:
        return {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()
