"""The class of an edited block: a generated subclass that keeps the edit through pickling.

Surgery regenerates a block's ``forward``. That forward lives on a subclass of the block's own
class, generated once per distinct edit, so the block stays an instance of its library's class
(``isinstance(block, Bottleneck)``), keeps its name in ``repr`` and its state-dict keys, and every
copy of it computes the same thing:

* ``copy.deepcopy`` and ``pickle`` / ``torch.save(model)`` reduce an edited block to
  "original class + generated code + state"; loading it in a fresh process rebuilds the same
  subclass. A forward bound on the instance, by contrast, is pickled by name and silently comes back
  as the class's original forward.
* a generated forward that cannot be pickled (its code refers to a function pickle cannot name)
  makes pickling fail with the reason, never succeed with the wrong forward.

Example:
    >>> import io, timm, torch, se_retrofit
    >>> model = se_retrofit.retrofit(timm.create_model("resnet18"), position="post").eval()
    >>> buffer = io.BytesIO()
    >>> torch.save(model, buffer)
    >>> again = torch.load(io.BytesIO(buffer.getvalue()), weights_only=False).eval()
    >>> type(again.layer1[0]).__name__, is_edited(again.layer1[0])
    ('BasicBlock', True)
"""
from __future__ import annotations

import importlib
import inspect
import re
import types
import typing
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn
from torch.fx.graph_module import _forward_from_src

#: a traced variant of a block's forward: (training, which optional arguments are None)
Variant = tuple[bool, tuple[bool, ...]]
SPEC_ATTR = "_se_retrofit_edit"
#: in a traced graph, the keyword that stands for ``**kwargs`` passed on (see :func:`.tracing.trace`)
VAR_KEYWORD_MARK = "_se_retrofit_var_keyword"


@dataclass(frozen=True, eq=False)
class EditSpec:
    """Everything needed to rebuild an edited block's class: its base class, the generated source of
    each traced variant with the globals it refers to, and how calls pick a variant."""

    base: type
    sources: dict[Variant, str]
    globals: dict[Variant, dict[str, Any]]
    optional: tuple[str, ...] = ()
    fixed: tuple[tuple[str, Any], ...] = ()
    var_keyword: bool = False  # the original forward takes **kwargs (passed on where the sources mark it)

    @property
    def key(self) -> tuple:
        return (self.base, tuple(sorted(self.sources.items())), self.optional, self.fixed, self.var_keyword)

    def __deepcopy__(self, memo: dict) -> "EditSpec":
        return self  # immutable, and its globals hold modules and functions that must not be copied

    def __reduce__(self) -> tuple:
        """Modules among the globals (``torch``) pickle by name; functions pickle by reference as usual."""
        named = {key: {name: _ModuleName(v.__name__) if isinstance(v, types.ModuleType) else v
                       for name, v in values.items()} for key, values in self.globals.items()}
        return (_restore_spec, (self.base, self.sources, named, self.optional, self.fixed, self.var_keyword))


@dataclass(frozen=True)
class _ModuleName:
    name: str


def _restore_spec(base, sources, named_globals, optional, fixed, var_keyword=False) -> EditSpec:
    restored = {key: {name: importlib.import_module(v.name) if isinstance(v, _ModuleName) else v
                      for name, v in values.items()} for key, values in named_globals.items()}
    return EditSpec(base, sources, restored, optional, fixed, var_keyword)


_CLASSES: dict[tuple, type] = {}


def is_edited(module: nn.Module) -> bool:
    """Whether ``module``'s forward was rewritten by se_retrofit."""
    return isinstance(getattr(type(module), SPEC_ATTR, None), EditSpec)


def base_class(module: nn.Module) -> type:
    """The class the module's library gave it (the edited class's base)."""
    spec = getattr(type(module), SPEC_ATTR, None)
    return spec.base if isinstance(spec, EditSpec) else type(module)


def install(block: nn.Module, spec: EditSpec) -> None:
    """Make ``block`` an instance of the edited class described by ``spec``."""
    block.__dict__.pop("forward", None)  # a forward bound on the instance would shadow the class's
    block.__class__ = edited_class(spec)


def edited_class(spec: EditSpec) -> type:
    """The generated subclass for ``spec`` (one class per distinct edit, shared by equal edits)."""
    cls = _CLASSES.get(spec.key)
    if cls is None:
        base = spec.base
        forward = _forward(spec)
        cls = type(base.__name__, (base,), {
            "forward": forward, SPEC_ATTR: spec, "__reduce_ex__": _reduce_edited,
            **({"__prepare_scriptable__": _prepare_scriptable} if forward is not next(iter(forward.variants.values()))
               else {}),
            "__module__": base.__module__,
            # pickling the class object itself (not an instance) must fail loudly, not find the base
            "__qualname__": f"{base.__qualname__}<edited by se_retrofit>",
        })
        _CLASSES[spec.key] = cls
    return cls


_SCRIPTABLE: dict[type, type | None] = {}
_VARIANT = "_se_retrofit_variant_{}"


def _prepare_scriptable(self: nn.Module) -> nn.Module:
    """For ``torch.jit.script``: the block as an instance of a class whose ``forward`` dispatches between
    the traced variants in code TorchScript compiles (the Python dispatcher takes ``*args, **kwargs``);
    the block itself where that cannot be written (keyword arguments passed on, arguments fixed)."""
    cls = type(self)
    if cls not in _SCRIPTABLE:
        _SCRIPTABLE[cls] = _scriptable_class(cls)
    scriptable = _SCRIPTABLE[cls]
    if scriptable is None:
        return self
    copy = scriptable.__new__(scriptable)
    copy.__dict__ = self.__dict__  # shares parameters, buffers, children and flags with the block
    return copy


def _scriptable_class(cls: type) -> type | None:
    from torch.fx.graph_module import _method_from_src

    spec: EditSpec = getattr(cls, SPEC_ATTR)
    given = next((key for key in spec.sources if not any(key[1])), None)
    if spec.fixed or spec.var_keyword or given is None:
        return None
    methods, names = {}, {}
    for key, src in spec.sources.items():
        if src not in names:
            names[src] = _VARIANT.format(len(names))
            methods[names[src]] = _method_from_src(names[src], _scriptable_variant(src, names[src]),
                                                   {**spec.globals[key], "typing": typing})
    header = spec.sources[given].strip().splitlines()[0]
    params = [p.name for p in list(inspect.signature(spec.base.forward).parameters.values())[1:]]
    if not header.startswith("def forward(self") or any(p.kind not in (p.POSITIONAL_OR_KEYWORD,)
                                                        for p in list(inspect.signature(spec.base.forward).parameters.values())[1:]):
        return None
    lines = [header]
    for training in (True, False):
        lines.append(f"    if {'' if training else 'not '}self.training:")
        for key in (k for k in spec.sources if k[0] == training):
            test = " and ".join(f"{name} is {'' if none else 'not '}None" for name, none in zip(spec.optional, key[1]))
            call = ", ".join("None" if name in spec.optional and key[1][spec.optional.index(name)] else name
                             for name in params)
            lines.append(f"        if {test or 'True'}:")
            lines.append(f"            return self.{names[spec.sources[key]]}({call})")
    lines.append("    raise RuntimeError('se_retrofit: no traced variant of this block takes these arguments')")
    globals_ = {**spec.globals[given], "typing": typing}
    methods["forward"] = _method_from_src("forward", "\n".join(lines) + "\n", globals_)
    return type(cls.__name__, (cls,), {**methods, "__module__": cls.__module__, "__qualname__": cls.__qualname__})


def _scriptable_variant(src: str, name: str) -> str:
    """A variant's code as a method TorchScript compiles: under its own name, without fx's check that an
    argument specialised to None is None (the dispatcher calls it with None), that argument typed."""
    lines = [line for line in src.splitlines() if "_assert_is_none(" not in line]
    text = "\n".join(lines).replace("def forward(", f"def {name}(", 1)
    head, _, body = text.partition(") -> ")
    head = re.sub(r"(\w+) = None", r"\1 : typing.Optional[torch.Tensor] = None", head)
    return f"{head}) -> {body}" if body else text


def _reduce_edited(self: nn.Module, protocol: int) -> tuple:
    return (_new_edited, (getattr(type(self), SPEC_ATTR),), self.__getstate__())


def _new_edited(spec: EditSpec) -> nn.Module:
    """Unpickling: an empty instance of the edited class; pickle then restores its state."""
    cls = edited_class(spec)
    return cls.__new__(cls)


def _forward(spec: EditSpec) -> Callable:
    """One compiled forward where every variant has the same code, else a dispatcher."""
    compiled: dict[str, Callable] = {}
    variants = {}
    for key, src in spec.sources.items():
        if src not in compiled:
            compiled[src] = _forward_from_src(_unpack_var_keyword(src), dict(spec.globals[key]))
        variants[key] = compiled[src]
    original = spec.base.forward
    if len(compiled) == 1 and not spec.fixed and not spec.var_keyword:
        forward = next(iter(compiled.values()))
    else:
        forward = _dispatcher(variants, spec.optional, dict(spec.fixed), original)
    forward.variants = variants
    forward.original = original
    return forward


def _unpack_var_keyword(src: str) -> str:
    """The traced code with each marked keyword (``f(x, MARK = kwargs)``) written as ``f(x, **kwargs)``."""
    return src.replace(f"{VAR_KEYWORD_MARK} = ", "**")


def _dispatcher(variants: dict[Variant, Callable], optional: tuple[str, ...], fixed: dict[str, object],
                original: Callable) -> Callable:
    """Choose the traced variant matching the block's mode and which optional arguments are None."""
    signature = inspect.signature(original)
    var_keyword = next((p.name for p in signature.parameters.values() if p.kind is p.VAR_KEYWORD), None)
    if var_keyword is not None and all(takes_var_keyword(v) for v in variants.values()):
        var_keyword = None  # traced with its **kwargs: they are passed on as the original did

    def forward(self, *args, **kwargs):
        if not optional and not fixed and var_keyword is None:
            return variants[(self.training, ())](self, *args, **kwargs)
        bound = signature.bind(self, *args, **kwargs)
        bound.apply_defaults()
        if var_keyword is not None and bound.arguments.pop(var_keyword, None):
            raise TypeError(f"{type(self).__name__} was edited by se_retrofit as called without keyword arguments "
                            f"beyond its own; it cannot take {', '.join(kwargs.keys() - signature.parameters.keys())}")
        for name, value in fixed.items():
            if bound.arguments[name] != value:
                raise ValueError(f"{type(self).__name__} was edited by se_retrofit for {name}={value!r}, "
                                 f"its default; it cannot be called with {name}={bound.arguments[name]!r}")
        nones = tuple(bound.arguments[name] is None for name in optional)
        variant = variants.get((self.training, nones))
        if variant is None:
            given = [name for name, none in zip(optional, nones) if not none]
            raise ValueError(f"{type(self).__name__} was edited by se_retrofit for the calls its forward accepts; "
                             f"it refused {', '.join(given)} when traced")
        # positionally: fx renames the parameters it specialised to None (bias -> bias_1)
        return variant(*bound.args, **bound.kwargs)

    return forward


def takes_var_keyword(function: Callable) -> bool:
    """Whether ``function`` has a ``**kwargs`` parameter."""
    return any(p.kind is p.VAR_KEYWORD for p in inspect.signature(function).parameters.values())


def with_own_signature(function: Callable) -> Callable:
    """``function`` with the parameters its signature reports, written out: a wrapper that takes
    ``(*args, **kwargs)`` and reports the wrapped forward's signature (transformers'
    ``GradientCheckpointingLayer``) is traced by fx through its code, which it cannot unpack.
    ``function`` itself where its code already takes those parameters."""
    params = list(inspect.signature(function).parameters.values())
    code = getattr(function, "__code__", None)
    if code is None or list(code.co_varnames[:len(params)]) == [p.name for p in params]:
        return function
    namespace = {"_function": function, **{f"_default_{p.name}": p.default for p in params if p.default is not p.empty}}
    source = ", ".join(_parameter_source(p, params) for p in params)
    call = ", ".join(p.name if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) else
                     f"*{p.name}" if p.kind is p.VAR_POSITIONAL else
                     f"**{p.name}" if p.kind is p.VAR_KEYWORD else f"{p.name}={p.name}" for p in params)
    exec(f"def forward({source}):\n    return _function({call})\n", namespace)  # our own source, no input
    return namespace["forward"]


def _parameter_source(parameter: inspect.Parameter, params: list[inspect.Parameter]) -> str:
    kind = parameter.kind
    text = {kind.VAR_POSITIONAL: "*", kind.VAR_KEYWORD: "**"}.get(kind, "") + parameter.name
    if parameter.default is not parameter.empty:
        text += f"=_default_{parameter.name}"
    before = params[params.index(parameter) - 1].kind if params.index(parameter) else None
    if kind is kind.KEYWORD_ONLY and before not in (kind.KEYWORD_ONLY, kind.VAR_POSITIONAL):
        text = "*, " + text
    return text
