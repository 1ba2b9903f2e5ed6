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
import os
import traceback
from typing import Callable, Iterator

from torch import fx, nn
from torch.fx.proxy import TraceError

from .edited import SPEC_ATTR, VAR_KEYWORD_MARK, with_own_signature

MODULE_PATH = "module_path"


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


def trace(module: nn.Module, leaf_children: bool = False, concrete_args: dict | None = None) -> fx.Graph:
    """Trace ``module`` symbolically and return its graph (module paths in ``node.meta``).

    Side-effect free: a forward that caches on first call (torchvision's MultiScaleRoIAlign sets
    ``self.scales``) would otherwise keep Proxy objects, so every module's attributes are restored.
    A forward taking ``**kwargs`` (every Hugging Face layer) passes them on where it did: each
    ``f(..., **kwargs)`` is traced as a call with the keyword :data:`~.edited.VAR_KEYWORD_MARK` bound
    to the ``**kwargs`` placeholder, which the edited forward's code unpacks again.
    """
    saved = {m: dict(vars(m)) for m in module.modules()}
    cls = type(module)
    traced = with_own_signature(_variant_to_trace(module, concrete_args or {}))
    if traced is not cls.forward:
        module.__class__ = type(cls.__name__, (cls,), {"__module__": cls.__module__})
        module.__class__.forward = traced  # after creation: __init_subclass__ hooks (transformers') may wrap it
    try:
        graph = RetrofitTracer(leaf_children=leaf_children).trace(module, concrete_args=concrete_args)
        pass_var_keyword(graph)
        return graph
    except TraceError as error:
        raise TraceError(_where_tracing_failed(error)) from error
    finally:
        module.__class__ = cls
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


def snapshot_training(module: nn.Module) -> dict[nn.Module, bool]:
    """Snapshot of every submodule's ``training`` flag, to restore with :func:`restore_training`."""
    return {m: m.training for m in module.modules()}


def restore_training(snapshot: dict[nn.Module, bool]) -> None:
    for m, flag in snapshot.items():
        m.training = flag


@contextlib.contextmanager
def training_mode(module: nn.Module, training: bool) -> Iterator[nn.Module]:
    """``module.train(training)`` for the block, then every submodule's own flag back."""
    snapshot = snapshot_training(module)
    module.train(training)
    try:
        yield module
    finally:
        restore_training(snapshot)



# --- where a module's own additions sit in the graph surgery rewrites ------------------------

_NOT_TENSORS = frozenset({"shape", "ndim", "dtype", "device", "is_cuda", "requires_grad", "size", "dim",
                          "numel", "item", "tolist", "__len__", "len", "element_size", "nelement", "stride",
                          "data_ptr", "get_device", "is_contiguous", "is_floating_point"})


def own_tensor_adds(module: nn.Module, args: tuple, kwargs: dict) -> list[int]:
    """For the forward of ``module`` as surgery traces it (children kept as leaves), the positions
    among its addition nodes of those that add tensors, in graph order. Shape arithmetic such as
    ``H + pad`` is an addition node too, which a run of the model does not see as a tensor op.

    Raises whatever the tracer raises where the forward cannot be traced.
    """
    from . import op_kinds as K
    import inspect
    import torch
    from torch.fx.proxy import TraceError

    forward = type(module).forward
    params = list(inspect.signature(forward).parameters.values())[1:]
    try:
        bound = inspect.signature(forward).bind(module, *args, **kwargs).arguments
    except TypeError:
        bound = {}
    given = {k: v for k, v in bound.items() if k != "self"}
    concrete = {p.name: None for p in params if p.default is None and given.get(p.name) is None
                and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)}
    try:
        graph = trace(module, leaf_children=True, concrete_args=concrete or None)
    except TraceError:
        fixed = {p.name: p.default for p in params if isinstance(p.default, (bool, int, float, str))}
        if not fixed:
            raise
        graph = trace(module, leaf_children=True, concrete_args={**fixed, **concrete})
    modules = dict(module.named_modules())
    tensorish: dict[fx.Node, bool] = {}
    positions, count = [], 0
    for node in graph.nodes:
        if node.op == "placeholder":
            value = given.get(node.target.lstrip("*"), None)
            tensorish[node] = isinstance(value, torch.Tensor) or (value is None and not node.args)
        elif node.op in ("get_attr", "call_module"):
            tensorish[node] = True
        elif node.op in ("call_function", "call_method"):
            name = node.target if isinstance(node.target, str) else getattr(node.target, "__name__", "")
            if name == "getattr" and len(node.args) > 1 and node.args[1] in _NOT_TENSORS:
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
