"""torch.fx tracing that honours timm's notrace registries and records module paths.

Analysis finds blocks from what the model executes (:mod:`.recording`); fx is used where a
block's own forward is rewritten: surgery (and analysis, to count the additions surgery will see)
traces a single block with all of its children kept as leaves, so only the block's own ``forward``
is regenerated and every child keeps its own code, hooks and train/eval behaviour.

Every node gets ``node.meta["module_path"]``: the dotted path of the module whose forward
created it (``""`` for the root), in the spirit of torchvision's ``NodePathTracer``.
"""
from __future__ import annotations

import contextlib
import contextvars
import copy
import inspect
import os
import traceback
import types
from typing import Any, Callable, Iterator, TypeVar

import torch
from torch import fx, nn
from torch.fx.proxy import TraceError

from .edited import SPEC_ATTR, VAR_KEYWORD_MARK, with_own_signature

MODULE_PATH = "module_path"
T = TypeVar("T")
#: what torch.fx raises on a forward it cannot trace (data-dependent control flow, proxies where
#: values are needed, unpacking a proxy, an op it cannot represent)
TRACE_FAILURES = (TraceError, TypeError, AttributeError, NotImplementedError, RuntimeError, ValueError, IndexError,
                  KeyError, AssertionError)


def _timm_notrace() -> tuple[list[type], list]:
    try:
        from timm.layers import get_notrace_functions, get_notrace_modules
    except ImportError:  # timm is a dependency, but tracing does not need it
        return [], []
    return list(get_notrace_modules()), list(get_notrace_functions())


class RetrofitTracer(fx.Tracer):
    """A tracer that keeps timm's notrace modules/functions opaque and records module paths.

    Args:
        leaf_children: if True, every direct child of the traced root is a leaf
            (block-level tracing for surgery). Otherwise only ``torch.nn`` modules and
            timm's notrace modules are leaves (whole-model tracing for analysis).
    """

    def __init__(self, leaf_children: bool = False):
        leaf_types, functions = _timm_notrace()
        super().__init__(autowrap_functions=tuple(functions), param_shapes_constant=True)
        self._leaf_types = tuple(leaf_types)
        self._leaf_children = leaf_children

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        if self._leaf_children:
            return module_qualified_name != ""
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, module_qualified_name)

    def keys(self, obj):
        """``**kwargs`` of the forward's own var-keyword argument unpacks to one marked keyword, which
        :func:`pass_var_keyword` turns back into ``**kwargs`` (fx cannot unpack a proxy)."""
        if obj.node.op == "placeholder" and str(obj.node.target).startswith("**"):
            return iter([VAR_KEYWORD_MARK])
        return super().keys(obj)

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        paths = [path for path, _ in getattr(self, "module_stack", {}).values()]
        if kind == "call_module" and paths and paths[-1] == target:
            paths.pop()  # the leaf itself is on the stack while its call is recorded: the caller is below
        node.meta[MODULE_PATH] = paths[-1] if paths else ""
        return node


def trace(module: nn.Module, leaf_children: bool = False, concrete_args: dict | None = None,
          shared: bool = False, training: bool | None = None) -> fx.Graph:
    """Trace ``module`` symbolically and return its graph (module paths in ``node.meta``).

    Side-effect free: a forward that caches on first call (torchvision's MultiScaleRoIAlign sets
    ``self.scales``) would otherwise keep Proxy objects, so every module's attributes are restored.
    A forward taking ``**kwargs`` (every Hugging Face layer) passes them on where it did: each
    ``f(..., **kwargs)`` is traced as a call with the keyword :data:`~.edited.VAR_KEYWORD_MARK` bound
    to the ``**kwargs`` placeholder, which the edited forward's code unpacks again.

    Inside :func:`graph_cache`, a block traced with its children as leaves is traced once per
    structure: a block of the same class, forward, attributes and children gets a copy of the graph
    of the first, provided the attributes of it and its children (not deeper) that the trace read
    (``training``, ``self.attn.num_heads``) are equal too, and the shapes of the parameters where the graph reads
    any. A forward that does not read ``training`` is thus traced once for both modes, and a
    ResNet's sixteen bottlenecks twice (with and without a downsampling shortcut). With ``shared``
    the cached graph itself is returned, not a copy: the caller must copy it before changing it
    (:func:`is_shared` tells which graphs are cached ones). With ``training`` the block is traced
    as ``module.train(training)`` makes it (every flag restored after); a graph cached for that
    mode is found without switching it.
    """
    if training is not None and not _trains_plainly(module):
        with training_mode(module, training):
            return trace(module, leaf_children, concrete_args, shared)
    cache = _GRAPHS.get()
    key = _structure_key(module, concrete_args) if cache is not None and leaf_children else None
    mode = training_mode(module, training) if training is not None else contextlib.nullcontext()
    if key is None:
        with mode:
            return _trace(module, leaf_children, concrete_args)
    for conditions, graph in cache.get(key, ()):
        if all(_current(module, what, training) == value for what, value in conditions):
            return graph if shared else copy.deepcopy(graph)
    reads: dict[tuple[str, str], Any] = {}
    with mode:
        try:
            graph = _trace(module, leaf_children, concrete_args, reads=reads)
        except _Unwatchable:  # a child whose class cannot be swapped (a compiled module): reads unknown
            return _trace(module, leaf_children, concrete_args)
        conditions = _conditions(module, graph, reads)
    if conditions is not None:
        setattr(graph, _SHARED_ATTR, True)
        cache.setdefault(key, []).append((conditions, graph))
        return graph if shared else copy.deepcopy(graph)
    return graph


_SHARED_ATTR = "_se_retrofit_shared"


def is_shared(graph: fx.Graph) -> bool:
    """Whether ``graph`` is a cached graph (from :func:`trace` with ``shared``), the graph of every
    block of its structure: copy it before changing it. One edit of it gives the same code for all
    of those blocks (surgery keeps that code in :func:`cache_memo`)."""
    return getattr(graph, _SHARED_ATTR, False)


def cache_memo() -> dict | None:
    """The dictionary of the enclosing :func:`graph_cache` (None outside one): a place for results
    derived from its graphs, which must not outlive them."""
    return _GRAPHS.get()


def _trace(module: nn.Module, leaf_children: bool, concrete_args: dict | None,
           reads: dict[tuple[str, str], Any] | None = None) -> fx.Graph:
    saved = {m: dict(vars(m)) for m in module.modules()}
    cls = type(module)
    watched = {"": module, **dict(module.named_children())} if reads is not None else {}
    classes = {id(m): (m, type(m)) for m in watched.values()}  # a child under two names is one module
    try:
        for m, original in classes.values():  # note which of their attributes the trace reads
            m.__class__ = _watching(original)
    except TypeError as error:
        for m, original in classes.values():
            m.__class__ = original
        raise _Unwatchable(str(error)) from None
    traced = with_own_signature(_variant_to_trace(module, concrete_args or {}))
    if traced is not cls.forward:
        module.__class__ = type(cls.__name__, (type(module),), {"__module__": cls.__module__})
        module.__class__.forward = traced  # after creation: __init_subclass__ hooks (transformers') may wrap it
    token = _READS.set((reads, {id(m): name for name, m in watched.items()})) if reads is not None else None
    try:
        graph = RetrofitTracer(leaf_children=leaf_children).trace(module, concrete_args=concrete_args)
        pass_var_keyword(graph)
        return graph
    except TraceError as error:
        raise TraceError(_where_tracing_failed(error)) from error
    finally:
        if token is not None:
            _READS.reset(token)
        module.__class__ = cls
        for m, original in classes.values():
            m.__class__ = original
        for m, attributes in saved.items():  # by identity: values may be tensors or proxies
            kept = {k: v for k, v in vars(m).items() if k.startswith("_tensor_constant")}  # the graph's
            vars(m).clear()
            vars(m).update(attributes)
            vars(m).update(kept)


def _where_tracing_failed(error: BaseException) -> str:
    """The error's first sentence and the line of the traced code that raised it (outside torch):
    ``Proxy object cannot be iterated (modeling_swin.py:538: height, width = input_dimensions)``."""
    text = str(error).strip()
    head = text.splitlines()[0].split(". ")[0] if text else type(error).__name__
    frames = [f for f in traceback.extract_tb(error.__traceback__)
              if f"{os.sep}torch{os.sep}" not in f.filename and not f.filename.endswith(__file__.rsplit(os.sep, 1)[-1])]
    if not frames:
        return head
    frame = frames[-1]
    return f"{head} ({os.path.basename(frame.filename)}:{frame.lineno}: {(frame.line or '').strip()})"


def pass_var_keyword(graph: fx.Graph) -> None:
    """Bind the marked keyword of each ``**kwargs`` unpacking to the placeholder itself (the tracer
    recorded ``kwargs[MARK]``), and drop the lookups left unused (a forward that takes ``**kwargs``
    and passes them nowhere)."""
    lookups = [n for n in graph.nodes if n.op == "call_function" and len(n.args) == 2 and n.args[1] == VAR_KEYWORD_MARK
               and isinstance(n.args[0], fx.Node) and n.args[0].op == "placeholder"]
    for item in lookups:
        for user in list(item.users):
            if user.kwargs.get(VAR_KEYWORD_MARK) is item:
                user.update_kwarg(VAR_KEYWORD_MARK, item.args[0])
        if not item.users:
            graph.erase_node(item)


# --- one trace per block structure ------------------------------------------------------------

_GRAPHS: contextvars.ContextVar[dict | None] = contextvars.ContextVar("se_retrofit_graphs", default=None)
_READS: contextvars.ContextVar[tuple | None] = contextvars.ContextVar("se_retrofit_reads", default=None)


@contextlib.contextmanager
def graph_cache() -> Iterator[dict]:
    """Within the block, :func:`trace` reuses the graph of a block traced before with the same
    structure (see there); an enclosing cache is reused. The cache ends with the outermost block,
    so a forward edited or a global setting changed later is traced again."""
    cache = _GRAPHS.get()
    if cache is not None:
        yield cache
        return
    token = _GRAPHS.set({})
    try:
        yield _GRAPHS.get()
    finally:
        _GRAPHS.reset(token)


_WATCHING: dict[type, type] = {}


class _Unwatchable(Exception):
    """A module's class cannot be swapped for one that notes attribute reads."""
_MODULE_ATTRS = frozenset(vars(nn.Module())) - {"training"}


def _watching(cls: type) -> type:
    """A subclass of ``cls`` that notes each read of an instance attribute (``training``, a plain
    setting such as ``num_heads``) made while :data:`_READS` is set."""
    watching = _WATCHING.get(cls)
    if watching is None:
        base = cls.__getattribute__

        def getattribute(self, name):
            value = base(self, name)
            state = _READS.get()
            if state is not None and not name.startswith("__") and name not in _MODULE_ATTRS:
                path = state[1].get(id(self))
                if path is not None and name in object.__getattribute__(self, "__dict__"):
                    state[0][path, name] = value
            return value

        watching = type(cls.__name__, (cls,), {"__getattribute__": getattribute, "__module__": cls.__module__,
                                               "__qualname__": cls.__qualname__})
        _WATCHING[cls] = watching
    return watching


def _current(module: nn.Module, what: tuple[str, str], training: bool | None = None) -> Any:
    """The value a trace of ``module`` (in mode ``training``, where given) would read for ``what``."""
    path, name = what
    if path == _SHAPES:
        return _shapes(module)
    if name == "training" and training is not None:
        return _plain(training)  # module.train(training) sets it on every submodule (see _trains_plainly)
    owner = module if not path else module._modules.get(path)
    return _plain(vars(owner).get(name, _NOT_PLAIN)) if owner is not None else _NOT_PLAIN


_SHAPES = "<shapes>"


def _conditions(module: nn.Module, graph: fx.Graph, reads: dict[tuple[str, str], Any]) -> tuple | None:
    """What a block of the same structure must also have to share ``graph``: the values the trace
    read, and the parameter shapes where the graph reads parameters (their shapes are constants in
    it); None where the graph cannot be shared (a value read is not plain data, or the graph keeps
    tensor constants on the module traced)."""
    conditions = []
    for what, value in reads.items():
        plain = _plain(value)
        if plain is _NOT_PLAIN:
            return None
        conditions.append((what, plain))
    get_attrs = [n.target for n in graph.nodes if n.op == "get_attr"]
    if any(target.startswith("_tensor_constant") for target in get_attrs):
        return None
    if get_attrs:
        conditions.append(((_SHAPES, ""), _shapes(module)))
    return tuple(conditions)


def _shapes(module: nn.Module) -> tuple:
    return tuple((name, tuple(t.shape), t.dtype) for name, t in
                 [*module.named_parameters(remove_duplicate=False), *module.named_buffers(remove_duplicate=False)])


def _structure_key(module: nn.Module, concrete_args: dict | None) -> tuple | None:
    """What the graph of ``module`` traced with its children as leaves depends on besides what its
    trace reads: its class and forward, its plain attributes, the names of its parameters, buffers
    and children and the children's classes; None where an attribute is not plain data (a tensor
    kept outside the buffers, an object): such a block is always traced."""
    if getattr(type(module).forward, "variants", None) is not None:
        return None  # edited before: which variant is traced depends on more than the structure
    try:
        args = tuple(sorted((concrete_args or {}).items()))
        hash(args)
    except TypeError:
        return None
    items = [type(module), type(module).forward, args, tuple(module._parameters), tuple(module._buffers),
             tuple((name, type(child)) for name, child in module._modules.items())]
    for name, value in vars(module).items():
        if name in _MODULE_ATTRS or name == "training":
            continue
        plain = _plain(value)
        if plain is _NOT_PLAIN:
            return None
        items.append((name, plain))
    return tuple(items)


_NOT_PLAIN = object()
_PLAIN_TYPES = (type(None), bool, int, float, complex, str, bytes, type, torch.dtype, torch.device,
                types.FunctionType, types.BuiltinFunctionType)


def _plain(value: Any) -> Any:
    """``value`` as a hashable key where it is plain data (numbers, strings, dtypes, functions,
    tuples and lists of them), else :data:`_NOT_PLAIN`."""
    if isinstance(value, _PLAIN_TYPES):
        return (type(value), value)
    if isinstance(value, (tuple, list, torch.Size)):
        items = tuple(_plain(v) for v in value)
        return _NOT_PLAIN if any(i is _NOT_PLAIN for i in items) else (type(value), items)
    return _NOT_PLAIN


def _variant_to_trace(module: nn.Module, concrete_args: dict) -> Callable:
    """``type(module).forward``; for a block edited before whose forward dispatches between traced
    variants, the variant for its mode and for the optional arguments ``concrete_args`` sets to None."""
    forward = type(module).forward
    variants = getattr(forward, "variants", None)
    if variants is None:
        return forward
    optional = getattr(type(module), SPEC_ATTR).optional
    key = (module.training, tuple(name in concrete_args and concrete_args[name] is None for name in optional))
    return variants.get(key) or next(iter(variants.values()))


def _trains_plainly(module: nn.Module) -> bool:
    """Whether ``module.train(mode)`` sets every submodule's flag to ``mode`` (no class overrides it)."""
    return all(type(m).train is nn.Module.train for m in module.modules())


def snapshot_training(module: nn.Module) -> dict[nn.Module, bool]:
    """Snapshot of every submodule's ``training`` flag, to restore with :func:`restore_training`."""
    return {m: m.training for m in module.modules()}


def restore_training(snapshot: dict[nn.Module, bool]) -> None:
    for m, flag in snapshot.items():
        if m.training != flag:
            m.training = flag


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module.train(training)`` for the block, then every submodule's own flag back; nothing at all
    where the block and all of its submodules are in that mode already."""
    snapshot = snapshot_training(module)
    if all(flag == training for flag in snapshot.values()):
        yield module
        return
    module.train(training)
    try:
        yield module
    finally:
        restore_training(snapshot)



# --- the arguments a block's forward is traced with ----------------------------------------------

def forward_function(module: nn.Module) -> Callable:
    """The module's forward as written by its author (an edited block's class keeps it as ``original``)."""
    forward = type(module).forward
    return getattr(forward, "original", forward)


def optional_arguments(module: nn.Module) -> list[str]:
    """Arguments of the forward defaulting to None (``shortcut=None``): the tracer cannot see
    ``if x is None``, so they are traced as None (concrete) or given (a proxy)."""
    params = list(inspect.signature(forward_function(module)).parameters.values())[1:]
    return [p.name for p in params if p.default is None and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]


def trace_fixing_defaults(module: nn.Module, trace_with: Callable[[dict[str, object]], T]) -> tuple[T, dict[str, object]]:
    """``trace_with({})``; where fx cannot trace a branch on an argument with a constant default
    (``if attn_mask is not None or is_causal``), ``trace_with(fixed)`` with such arguments fixed at
    their defaults. Returns the result and the arguments fixed."""
    try:
        return trace_with({}), {}
    except TraceError:
        params = list(inspect.signature(forward_function(module)).parameters.values())[1:]
        fixed = {p.name: p.default for p in params if isinstance(p.default, (bool, int, float, str))}
        if not fixed:
            raise
        return trace_with(fixed), fixed


# --- where a module's own additions sit in the graph surgery rewrites ------------------------

def _check_called_as_fixed(fixed: dict[str, object], given: dict[str, Any]) -> None:
    """Raise where the model calls the module with another value for an argument its trace fixed at
    the default (ConditionalDetr's first decoder layer runs with ``is_first=True``): a forward
    rewritten from that trace would not be the one this call runs."""
    differ = [f"{name}={given[name]!r}" for name, default in fixed.items()
              if isinstance(given.get(name), (bool, int, float, str)) and given[name] != default]
    if differ:
        raise TraceError(f"fx traces its forward only with {', '.join(f'{n}={v!r}' for n, v in fixed.items())} "
                         f"(the defaults) and the model calls it with {', '.join(differ)}")


_NOT_TENSORS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "size", "dim",
                          "numel", "item", "tolist", "__len__", "len", "element_size", "nelement", "stride",
                          "data_ptr", "get_device", "is_contiguous", "is_floating_point"})


_UNKNOWN = object()


def _item_of_given(node: fx.Node, name: str, known: dict[fx.Node, Any]) -> Any:
    """The value of ``container[index]`` where the container is an argument given as a list, tuple or
    dict (Mask2Former's per-level ``position_embeddings[level_index]``) and the index a constant or
    a given value; ``_UNKNOWN`` otherwise."""
    if name != "getitem" or len(node.args) != 2 or node.args[0] not in known:
        return _UNKNOWN
    container, index = known[node.args[0]], node.args[1]
    if isinstance(index, fx.Node):
        if index not in known:
            return _UNKNOWN
        index = known[index]
    if not isinstance(container, (list, tuple, dict)):
        return _UNKNOWN
    try:
        return container[index]
    except (IndexError, KeyError, TypeError):
        return _UNKNOWN


def own_tensor_adds(module: nn.Module, args: tuple, kwargs: dict) -> list[int]:
    """For the forward of ``module`` as surgery traces it (children kept as leaves), the positions
    among its addition nodes of those that add tensors, in graph order. Shape arithmetic such as
    ``H + pad`` is an addition node too, which a run of the model does not see as a tensor op.

    Raises whatever the tracer raises where the forward cannot be traced.
    """
    from . import op_kinds as K

    try:
        bound = inspect.signature(forward_function(module)).bind(module, *args, **kwargs).arguments
    except TypeError:
        bound = {}
    given = {k: v for k, v in bound.items() if k != "self"}
    nones = {name: None for name in optional_arguments(module) if given.get(name) is None}
    graph, fixed = trace_fixing_defaults(module, lambda fixed: trace(module, leaf_children=True, shared=True,
                                                                     concrete_args={**fixed, **nones} or None))
    _check_called_as_fixed(fixed, given)
    modules = dict(module.named_modules())
    tensorish: dict[fx.Node, bool] = {}
    known: dict[fx.Node, Any] = {}  # the values given, and items taken from them (``features[level]``)
    positions, count = [], 0
    for node in graph.nodes:
        if node.op == "placeholder":
            value = given.get(node.target.lstrip("*"), None)
            if node.target.lstrip("*") in given:
                known[node] = value
            tensorish[node] = isinstance(value, torch.Tensor) or (value is None and not node.args)
        elif node.op in ("get_attr", "call_module"):
            tensorish[node] = True
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            item = _item_of_given(node, name, known)
            if item is not _UNKNOWN:
                known[node] = item
                tensorish[node] = isinstance(item, torch.Tensor)
            elif name == "getattr" and len(node.args) > 1 and node.args[1] in _NOT_TENSORS:
                tensorish[node] = False
            elif name in _NOT_TENSORS:
                tensorish[node] = False
            elif node.op == "call_function" and getattr(node.target, "__module__", "") and \
                    str(getattr(node.target, "__module__", "")).startswith("torch") and name != "getitem":
                tensorish[node] = True
            else:
                tensorish[node] = any(tensorish.get(n, False) for n in node.all_input_nodes)
        if K.node_kind(node, modules) == K.ADD:
            if tensorish.get(node, False) and not any(isinstance(a, (tuple, list)) for a in node.args):
                positions.append(count)
            count += 1
    return positions
