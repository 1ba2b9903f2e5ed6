"""Record what a model executes: every tensor operation of one forward pass, as a graph.

A :class:`~torch.overrides.TorchFunctionMode` sees each torch function and Tensor method the model
calls (``x + y``, ``out += identity``, ``add_``, ``torch.add(..., alpha=)``, ``F.conv2d``…), and
forward hooks on every submodule tell which module's forward is running. Nothing needs to be
traceable: data-dependent control flow, ``**kwargs`` and untraceable children simply run.

Modules of a known kind (conv, linear, norm, pooling, activation, dropout: see
:mod:`se_retrofit.op_kinds`) are recorded as one operation each, the way ``torch.fx`` keeps them
as leaves; inside any other module every operation is recorded, with the module path whose
forward performs it. Tensors are followed by identity, so an in-place operation makes the
tensor it changes a new value.

Example:
    >>> import torch, torchvision
    >>> model = torchvision.models.resnet18().eval()
    >>> ops = record(model, torch.randn(1, 3, 64, 64)).ops
    >>> [(op.name, op.scope) for op in ops if op.kind == "add"][:2]
    [('add_', 'layer1.0'), ('add_', 'layer1.1')]
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_leaves

from . import op_kinds as K
from .norms import channel_count, is_affine_per_channel

#: functions whose tensor result depends only on the shape, dtype or device of their inputs
SHAPE_ONLY = frozenset({
    "new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like", "empty_like",
    "full_like", "new_tensor", "rand_like", "randn_like", "randint_like",
})


@dataclass(eq=False)
class Op:
    """One executed operation (or one call of a leaf module).

    Attributes:
        index: position in execution order.
        kind: an :mod:`se_retrofit.op_kinds` constant.
        name: the function or method name, or the leaf module's path.
        args: the operation's tensor arguments in order (None where an argument is a parameter or
            a tensor the recording did not see being made).
        scope: path of the module whose own forward performs it (``""`` for the root).
        module: path of the leaf module for a module call, else ``""``.
        call: which call of the ``scope`` module it ran in (a counter over all module calls).
        dynamic: it depends on the model input.
        weights: it applies learned parameters (directly or through views of them).
        shape: shape of its (first) tensor result.
        users: operations that take its result.
        returned_by: modules (innermost first) whose call returned this result.
        returned_leaf: for each of those modules, which tensor of its output (in pytree order) this
            result is; -1 where the output holds it more than once.
    """

    index: int
    kind: str
    name: str
    args: list["Op | None"]
    scope: str
    module: str = ""
    call: int = 0
    dynamic: bool = False
    weights: bool = False
    shape: tuple[int, ...] | None = None
    users: list["Op"] = field(default_factory=list)
    returned_by: list[str] = field(default_factory=list)
    returned_leaf: dict[str, int] = field(default_factory=dict)
    kwargs: tuple[str, ...] = ()

    @property
    def inputs(self) -> list["Op"]:
        """The dynamic operations it reads (activations, not parameters or constants)."""
        return [a for a in self.args if a is not None and a.dynamic]

    def __repr__(self) -> str:
        return f"Op({self.index}, {self.name}, scope={self.scope!r})"


@dataclass
class ModuleCall:
    """One call of a module: its path, arguments (by reference), the call counter and the counter of
    the call it runs in (0: the root's)."""

    path: str
    number: int
    args: tuple
    kwargs: dict
    parent: int = 0


@dataclass
class Recording:
    """The executed graph of one forward pass."""

    ops: list[Op]
    inputs: list[Op]
    calls: dict[int, ModuleCall]
    first_call: dict[str, ModuleCall]
    parameters_read: set[str] = field(default_factory=set)  # names of parameters and buffers read directly


class _Values:
    """The tensors of the forward, followed by identity: the op that made each, and which are the
    model's weights (its parameters and buffers, and views of them made during the forward)."""

    def __init__(self, model: nn.Module):
        self.params = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
        self.param_names = {id(t): n for n, t in [*model.named_parameters(remove_duplicate=False),
                                                   *model.named_buffers(remove_duplicate=False)]}
        self.parameters_read: set[str] = set()
        self.made: dict[int, tuple[torch.Tensor, Op]] = {}   # id(tensor) -> (tensor kept alive, op)
        self.param_views: dict[int, torch.Tensor] = {}

    def lookup(self, tensor: torch.Tensor) -> Op | None:
        entry = self.made.get(id(tensor))
        return entry[1] if entry is not None and entry[0] is tensor else None

    def is_weight(self, tensor: torch.Tensor) -> bool:
        return id(tensor) in self.params or self.param_views.get(id(tensor)) is tensor

    def learned(self, tensor: torch.Tensor, op: Op | None) -> bool:
        """A weight, or a value computed from weights alone (``op`` made it)."""
        return self.is_weight(tensor) or (op is not None and op.weights and not op.dynamic)

    def note_parameters(self, tensors: list[torch.Tensor]) -> None:
        """Remember the parameters and buffers an operation reads, by name (see :func:`never_run`)."""
        for tensor in tensors:
            name = self.param_names.get(id(tensor))
            if name is not None:
                self.parameters_read.add(name)

    def bind(self, tensor: torch.Tensor, op: Op) -> None:
        self.made[id(tensor)] = (tensor, op)

    def bind_result(self, tensor: torch.Tensor, op: Op) -> None:
        self.bind(tensor, op)
        if op.weights and not op.dynamic:
            self.param_views[id(tensor)] = tensor

    def changed_in_place(self, tensor: torch.Tensor, op: Op) -> None:
        """The changed tensor is a new value, and so is every tensor it is a view of: writing into a slice
        (``batched[i, :, :h, :w].copy_(image)``, torchvision's detection transform) changes the whole."""
        while isinstance(tensor, torch.Tensor):
            self.bind(tensor, op)
            tensor = tensor._base


class _ModuleCalls:
    """Which module's forward is running: the calls open now, innermost last; every call of a module
    that is no leaf, numbered in the order calls start (leaf modules are counted too), with the index
    of its first op; and the first call of each path."""

    def __init__(self, model: nn.Module):
        self.paths = {id(m): p for p, m in reversed(list(model.named_modules(remove_duplicate=False)))}  # first names
        self.stack: list[tuple[str, int]] = [("", 0)]
        self.calls: dict[int, ModuleCall] = {}
        self.first_call: dict[str, ModuleCall] = {}
        self.counter = 0
        self.learned: dict[int, bool] = {}
        self.starts: dict[int, int] = {}   # call number -> index of its first op

    def has_parameters(self, module: nn.Module) -> bool:
        known = self.learned.get(id(module))
        if known is None:
            known = self.learned[id(module)] = any(True for _ in module.parameters())
        return known

    def open(self, path: str, args: tuple, kwargs: dict, first_op: int) -> None:
        call = ModuleCall(path, self.counter, args, kwargs, parent=self.stack[-1][1])
        self.calls[self.counter] = call
        self.first_call.setdefault(path, call)
        self.stack.append((path, self.counter))
        self.starts[self.counter] = first_op

    def close(self, path: str) -> int | None:
        """The number of the call of ``path`` that ends, where it is the innermost one open."""
        if self.stack[-1][0] != path:
            return None
        _, number = self.stack.pop()
        return number

    def forget(self, path: str, number: int) -> None:
        """Drop call ``number`` of ``path`` (a layer recorded as one op after all)."""
        if self.first_call.get(path) is self.calls.pop(number):
            del self.first_call[path]


@dataclass
class _LeafCall:
    """The call of a leaf module in progress (recorded as one op): the ops it reads, whether it applies
    weights, and how deep the calls inside it nest."""

    module: nn.Module
    reads: list[Op | None] = field(default_factory=list)
    weights: bool = False
    depth: int = 1

    def read(self, value: Any, values: _Values) -> None:
        for tensor in _tensors(value):
            op = values.lookup(tensor)
            if op is not None and op not in self.reads:
                self.reads.append(op)
            if values.learned(tensor, op):
                self.weights = True


class _Recorder(TorchFunctionMode):
    """Records the ops of one forward pass: torch functions as they run, leaf modules' calls as one op
    each, and per-channel affine norms folded into one (:mod:`.norms`)."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.ops: list[Op] = []
        self.values = _Values(model)
        self.modules = _ModuleCalls(model)
        self.leaf: _LeafCall | None = None

    def add_input(self, tensor: torch.Tensor) -> Op:
        op = Op(len(self.ops), K.OTHER, "input", [], "", dynamic=True, shape=tuple(tensor.shape))
        self.ops.append(op)
        self.values.bind(tensor, op)
        return op

    # --- module hooks ------------------------------------------------------------------
    def pre_hook(self, module, args, kwargs):
        path = self.modules.paths.get(id(module))
        if path is None:
            return
        if self.leaf is not None:
            self.leaf.depth += 1
            return
        self.modules.counter += 1
        if K.module_kind(module) != K.OTHER:
            self.leaf = _LeafCall(module)
            self.leaf.read((args, kwargs), self.values)
            return
        self.modules.open(path, args, kwargs, len(self.ops))

    def post_hook(self, module, args, output):
        path = self.modules.paths.get(id(module))
        if path is None:
            return
        if self.leaf is not None:
            self.leaf.depth -= 1
            if self.leaf.depth == 0:
                self._end_leaf(module, path, output)
            return
        number = self.modules.close(path)
        if number is not None and self._fold_norm(module, path, number, output):
            return
        self._note_returned(path, output)

    def _note_returned(self, path: str, output: Any) -> None:
        """Which tensor of the module's output each recorded value is (-1: more than one)."""
        for leaf, tensor in enumerate(_tensors(output)):
            op = self.values.lookup(tensor)
            if op is not None:
                if path in op.returned_leaf:
                    op.returned_leaf[path] = -1
                    continue
                op.returned_by.append(path)
                op.returned_leaf[path] = leaf

    def _end_leaf(self, module: nn.Module, path: str, output: Any) -> None:
        leaf, self.leaf = self.leaf, None
        weights = leaf.weights or self.modules.has_parameters(module)
        self._layer_op(K.module_kind(module), path, leaf.reads, weights, output)

    def _fold_norm(self, module: nn.Module, path: str, number: int, output: Any) -> bool:
        """Keep the call of a layer that computes a per-channel affine norm (:mod:`.norms`: a frozen
        BatchNorm) as one ``norm`` operation, as a BatchNorm's is; False where it is none."""
        start = self.modules.starts.pop(number, len(self.ops))
        outputs = _tensors(output)
        ops = self.ops[start:]
        if len(outputs) != 1 or not ops or channel_count(module) is None:
            return False
        sources = {a for op in ops for a in op.args if a is not None and a.dynamic and a.index < start}
        result = self.values.lookup(outputs[0])
        if len(sources) != 1 or not is_affine_per_channel(module, ops, *sources, result):
            return False
        (source,) = sources
        del self.ops[start:]
        source.users[:] = [user for user in source.users if user.index < start]
        self.modules.forget(path, number)
        self._layer_op(K.NORM, path, [source], True, output)
        return True

    def _layer_op(self, kind: str, path: str, reads: list, weights: bool, output: Any) -> None:
        """The call of the layer ``path`` as one op, the first tensor its call returns."""
        op = self._new_op(kind, path, reads, weights, output, module=path)
        op.returned_by.append(path)
        op.returned_leaf[path] = 0

    # --- functions ---------------------------------------------------------------------
    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if self.leaf is not None:
            self.leaf.read((args, kwargs), self.values)
            return func(*args, **kwargs)
        result = func(*args, **kwargs)
        name = getattr(func, "__name__", "")
        if name == "__get__" and not isinstance(result, torch.Tensor):
            return result  # x.shape, x.dtype…
        tensors = _tensors((args, kwargs))
        if not tensors and not _tensors(result):
            return result
        self.values.note_parameters(tensors)
        reads = [self.values.lookup(tensor) for tensor in tensors]
        weights = any(self.values.learned(tensor, op) for tensor, op in zip(tensors, reads))
        op = self._new_op(K.function_kind(func), name, reads, weights, result, kwargs=tuple(kwargs))
        if name in SHAPE_ONLY:
            op.dynamic = False
        if _in_place(name) and args and isinstance(args[0], torch.Tensor):
            op.shape = tuple(args[0].shape)  # ``x[mask] = 0`` returns None: its value is ``x``, changed
            self.values.changed_in_place(args[0], op)
        return result

    def _new_op(self, kind: str, name: str, reads: list, weights: bool, result: Any, module: str = "",
                kwargs: tuple = ()) -> Op:
        scope, call = self.modules.stack[-1]
        outputs = _tensors(result)
        op = Op(len(self.ops), kind, name, reads, scope, module, call,
                dynamic=any(r is not None and r.dynamic for r in reads), weights=weights,
                shape=tuple(outputs[0].shape) if outputs else None, kwargs=kwargs)
        self.ops.append(op)
        for read in reads:
            if read is not None and op not in read.users:
                read.users.append(op)
        if isinstance(result, torch.Tensor):
            self.values.bind_result(result, op)
        elif len(outputs) > 1:
            self._new_pieces(op, outputs)
        elif outputs:
            self.values.bind_result(outputs[0], op)
        return op

    def _new_pieces(self, op: Op, outputs: list[torch.Tensor]) -> None:
        """split, chunk, unbind: each piece is a value of its own."""
        for i, tensor in enumerate(outputs):
            item = Op(len(self.ops), K.OTHER, f"{op.name}[{i}]", [op], op.scope, call=op.call, dynamic=op.dynamic,
                      weights=op.weights, shape=tuple(tensor.shape))
            op.users.append(item)
            self.ops.append(item)
            self.values.bind_result(tensor, item)


_IN_PLACE_DUNDERS = frozenset({"__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__",
                               "__ifloordiv__", "__imod__", "__ipow__", "__iand__", "__ior__", "__ixor__",
                               "__ilshift__", "__irshift__", "__imatmul__"})


def _in_place(name: str) -> bool:
    return name in _IN_PLACE_DUNDERS or (name.endswith("_") and not name.startswith("_"))


_ATOMS = (int, float, bool, str, torch.dtype, torch.device, torch.memory_format, torch.layout)


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in ``value``, in pytree order. Plain tuples, lists and dicts (what nearly every call
    passes) are walked here: asking pytree the type of each node costs more than the op recorded."""
    if isinstance(value, torch.Tensor):
        return [value]
    if value is None or isinstance(value, _ATOMS):
        return []
    kind = type(value)
    if kind is tuple or kind is list:
        return [t for item in value for t in _tensors(item)]
    if kind is dict:
        return [t for item in value.values() for t in _tensors(item)]
    return [v for v in tree_leaves(value) if isinstance(v, torch.Tensor)]


def record(model: nn.Module, example: Any) -> Recording:
    """Run ``model`` on ``example`` (no autograd) and return the operations it executed.

    The caller puts the model in the mode wanted; its attributes are restored afterwards, so a
    forward that caches something on ``self`` leaves nothing behind.
    """
    recorder = _Recorder(model)
    inputs = [recorder.add_input(t) for t in _tensors(example)]
    handles = []
    saved = {m: dict(vars(m)) for m in model.modules()}
    try:
        for module in model.modules():
            handles.append(module.register_forward_pre_hook(recorder.pre_hook, with_kwargs=True))
            handles.append(module.register_forward_hook(recorder.post_hook, always_call=True))
        with torch.no_grad(), recorder:
            if isinstance(example, dict):
                model(**example)
            elif isinstance(example, tuple):
                model(*example)
            else:
                model(example)
    finally:
        for handle in handles:
            handle.remove()
        for module, attributes in saved.items():
            if vars(module).keys() != attributes.keys() or any(vars(module)[k] is not v for k, v in attributes.items()):
                vars(module).clear()
                vars(module).update(attributes)
    return Recording(recorder.ops, inputs, recorder.modules.calls, recorder.modules.first_call,
                     recorder.values.parameters_read)


def never_run(model: nn.Module, recording: Recording) -> list[str]:
    """Paths of the outermost modules with parameters that the recorded forward never called: a
    branch of the forward the probe did not take (a stage picked by a condition, an auxiliary
    head in eval mode). A module inside one that ran as a leaf, or whose parameters the forward read
    directly (``nn.MultiheadAttention``'s ``out_proj``), counts as run; so does a container whose
    forward is never called but whose children ran (a ``ModuleList``, or a ``Sequential`` iterated
    by its parent's forward).

    Example:
        >>> import torch
        >>> from torch import nn
        >>> class Pick(nn.Module):
        ...     def __init__(self):
        ...         super().__init__()
        ...         self.a, self.b = nn.Linear(4, 4), nn.Linear(4, 4)
        ...     def forward(self, x):
        ...         return self.a(x) if x.shape[0] == 1 else self.b(x)
        >>> model = Pick()
        >>> never_run(model, record(model, torch.randn(1, 4)))
        ['b']
    """
    paths = dict(model.named_modules(remove_duplicate=False))
    leaves = {id(paths[op.module]) for op in recording.ops if op.module and op.module in paths}
    ran = {path for path, module in paths.items() if id(module) in leaves} | \
        {call.path for call in recording.calls.values() if call.path in paths}
    above = {path.rsplit(".", k)[0] for path in ran for k in range(1, path.count(".") + 1)}
    called = {id(paths[path]) for path in ran | above}
    found: list[str] = []
    for path, module in model.named_modules():  # a shared module once, under its first path
        params = [f"{path}.{name}" for name, _ in module.named_parameters(remove_duplicate=False)]
        if not path or id(module) in called or not params or recording.parameters_read.intersection(params):
            continue
        parent = paths[path.rpartition(".")[0]]
        if (parent is model or id(parent) in called) and id(parent) not in leaves:
            found.append(path)
    return found
