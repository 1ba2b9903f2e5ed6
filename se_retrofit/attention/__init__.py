"""Attention modules and their registry.

Every attention type is one class in its own file, registered under a name. The constructor
contract is timm's: ``cls(channels, *, spatial_dims=2, reduction=16, divisor=8, **options)``.
A class starts at exact identity through its ``init_identity()`` method (or a function given to
:func:`register_attention`), called by :func:`create_attention` when ``init="identity"``. A class
without one (timm's modules, a user's module) is wrapped in a zero-initialised blend
``x + α·(A(x) − x)`` (:class:`~se_retrofit.attention.blend.ZeroBlend`), exact identity for any
module. ``timm:NAME`` names every insertable attention of timm's ``get_attn`` (``timm:gca``).

A class may also define, as classmethods, ``check_options(options)`` (reject bad option values
when the config is built, before any model work), ``attention_bytes(channels, spatial, **options)``
(its largest intermediate at batch 1, for the planner's memory limit) and a ``SPATIAL_DIMS``
tuple (the feature-map ranks it supports; default 1, 2 and 3).

Example:
    >>> import torch
    >>> from se_retrofit.attention import create_attention
    >>> se = create_attention("se", 64, init="identity")
    >>> x = torch.randn(2, 64, 8, 8)
    >>> bool(torch.equal(se(x), x))
    True
"""
from __future__ import annotations

import importlib
import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import RetrofitError

INITS = ("identity", "random")
#: block selections a type may ask for when the user selects nothing: "last" = the last residual block
DEFAULT_BLOCKS = (None, "last")


class UnknownAttentionError(RetrofitError):
    """No attention type is registered under that name."""


class AttentionOptionError(RetrofitError):
    """An option of an attention type has a name or value it cannot take."""


class AttentionNameError(RetrofitError):
    """A name is already taken by another attention type."""


@dataclass(frozen=True)
class AttentionSpec:
    """A registered attention type: its class, how it starts at identity, and where it goes.

    ``identity_init`` None means the type has no identity initialisation of its own: with
    ``init="identity"`` it is wrapped in :class:`~se_retrofit.attention.blend.ZeroBlend`.
    """

    name: str
    cls: type[nn.Module]
    identity_init: Callable[[nn.Module], None] | None
    attr_name: str = "se"
    default_position: str = "standard"
    default_blocks: str | None = None

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.cls.__name__

    @property
    def builtin(self) -> bool:
        """Shipped with se_retrofit (nothing to import when a saved model is loaded)."""
        return self.cls.__module__ in {f"{__name__}.{module}" for module in _BUILTIN_MODULES}

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        """Feature-map ranks the type supports (the class's ``SPATIAL_DIMS``, else 1, 2 and 3)."""
        return tuple(getattr(self.cls, "SPATIAL_DIMS", (1, 2, 3)))

    @property
    def options(self) -> dict[str, Any]:
        """The keyword options the class takes (besides ``spatial_dims``), with their defaults."""
        params = inspect.signature(self.cls.__init__).parameters.values()
        if any(p.kind is p.VAR_KEYWORD for p in params):
            return {"*": None}
        return {p.name: p.default for p in params
                if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and p.name not in ("self", "channels",
                                                                                         "spatial_dims")}

    def check_options(self, options: dict[str, Any]) -> None:
        """Reject options the type does not take, then (where the class can tell) bad values."""
        accepted = self.options
        if "*" not in accepted:
            unknown = [k for k in options if k not in accepted]
            if unknown:
                takes = ", ".join(accepted) or "no options"
                raise AttentionOptionError(
                    f"option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                    f"do{'' if len(unknown) > 1 else 'es'} not apply to attention {self.name!r} (it takes: {takes})")
        check = getattr(self.cls, "check_options", None)
        if check is not None:
            try:
                check(dict(options))
            except RetrofitError:
                raise
            except (ValueError, TypeError) as error:
                raise AttentionOptionError(f"attention {self.name!r}: {error}") from None

    def build(self, channels: int, spatial_dims: int, options: dict[str, Any]) -> nn.Module:
        """A new module at the class's own (random) initialisation."""
        return self.cls(channels, spatial_dims=spatial_dims, **options)

    def blend(self, module: nn.Module) -> nn.Module:
        """``module`` inside a zero-initialised blend (for a type without identity initialisation)."""
        from .blend import ZeroBlend

        return ZeroBlend(module)

    def attention_bytes(self, channels: int, spatial: tuple[int, ...], options: dict[str, Any]) -> int | None:
        """Bytes of the type's largest intermediate at batch 1 in float32, where the class tells it."""
        size = getattr(self.cls, "attention_bytes", None)
        return None if size is None else int(size(channels, tuple(spatial), **options))

    def site_problem(self, channels: int, spatial: tuple[int, ...], options: dict[str, Any]) -> str | None:
        """Why this type cannot go on a feature map of this shape, or None."""
        if len(spatial) not in self.spatial_dims:
            ranks = ", ".join(f"{d}-D" for d in self.spatial_dims)
            return (f"attention {self.name!r} works on {ranks} feature maps only, and this one is "
                    f"{len(spatial)}-D {tuple(spatial)}; choose a type for {len(spatial)}-D maps (se, eca, nonlocal, …)")
        problem = getattr(self.cls, "site_problem", None)
        return None if problem is None else problem(channels, tuple(spatial), **options)


_REGISTRY: dict[str, AttentionSpec] = {}
_SHADOWED: dict[str, AttentionSpec] = {}  # built-in specs replaced with override=True


def register_attention(name: str, *, identity_init: Callable[[nn.Module], None] | None = None,
                       attr_name: str = "se", default_position: str = "standard",
                       default_blocks: str | None = None, override: bool = False):
    """Class decorator registering an attention module under ``name``.

    Args:
        name: the name used by ``retrofit(attention=...)`` and ``se-retrofit --attention``.
        identity_init: called on a new instance to make it compute the identity; by default the
            class's own ``init_identity()`` method. A class with neither is wrapped, at
            ``init="identity"``, in a zero-initialised blend ``x + α·(A(x) − x)`` (α starts at 0).
        attr_name: attribute name of the inserted module inside each block.
        default_position: where ``retrofit`` puts it unless told (``stage`` for BAM).
        default_blocks: ``"last"``: unless stages or blocks are given, only the last residual
            block (DANet's placement on the backbone output).
        override: replace a type already registered under ``name`` (a built-in one included);
            without it, a taken name is an error.

    Example:
        >>> import torch
        >>> from torch import nn
        >>> from se_retrofit import register_attention
        >>> @register_attention("scale_doc_example")
        ... class Scale(nn.Module):
        ...     def __init__(self, channels, **_):
        ...         super().__init__()
        ...         self.weight = nn.Parameter(torch.randn(channels, 1, 1))
        ...     def init_identity(self):
        ...         nn.init.ones_(self.weight)
        ...     def forward(self, x):
        ...         return x * self.weight
        >>> from se_retrofit.attention import unregister_attention
        >>> unregister_attention("scale_doc_example")  # undo the example
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise AttentionNameError(f"attention name {name!r} must be letters, digits, '_' or '-'")
    if default_blocks not in DEFAULT_BLOCKS:
        raise ValueError(f"default_blocks must be one of {DEFAULT_BLOCKS}, got {default_blocks!r}")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        init = identity_init or getattr(cls, "init_identity", None)
        spec = AttentionSpec(name, cls, init, attr_name, default_position, default_blocks)
        if spec.builtin:
            if name not in _REGISTRY:  # a user's override registered before the built-ins loaded wins
                _REGISTRY[name] = spec
            else:
                _SHADOWED[name] = spec
            return cls
        _load_builtins()  # so that a built-in name is seen as taken
        taken = _REGISTRY.get(name)
        if taken is not None and not override and _qualname(taken.cls) != _qualname(cls):
            what = "a built-in type" if taken.builtin else f"{_qualname(taken.cls)}"
            raise AttentionNameError(f"attention name {name!r} is taken by {what}; choose another name, or pass "
                                     "override=True to register_attention to replace it")
        if taken is not None and taken.builtin:
            _SHADOWED[name] = taken
        _REGISTRY[name] = spec
        return cls

    return decorator


def _qualname(cls: type) -> str:
    return f"{cls.__module__}.{cls.__qualname__}"


def unregister_attention(name: str) -> None:
    """Remove an attention type you registered; a built-in one you overrode comes back."""
    _load_builtins()
    spec = _REGISTRY.get(name)
    if spec is not None and spec.builtin:
        raise AttentionNameError(f"{name!r} is built in and cannot be unregistered")
    _REGISTRY.pop(name, None)
    if name in _SHADOWED:
        _REGISTRY[name] = _SHADOWED.pop(name)


def get_attention(name: str) -> AttentionSpec:
    """The spec registered under ``name`` (``timm:NAME`` resolves timm's ``get_attn``); the error
    lists what is registered."""
    _load_builtins()
    if name in _REGISTRY:
        return _REGISTRY[name]
    if isinstance(name, str) and name.startswith("timm:"):
        from .timm_attention import timm_spec

        return timm_spec(name)
    known = ", ".join(sorted(_REGISTRY))
    raise UnknownAttentionError(
        f"unknown attention type {name!r}; registered: {known}, and timm:NAME for timm's attention modules "
        "(register your own with se_retrofit.register_attention)")


def is_registered(name: str) -> bool:
    """Whether an attention type of that name is registered (nothing is imported to find out)."""
    try:
        get_attention(name)
    except UnknownAttentionError:
        return False
    return True


def list_attentions(*, include_timm: bool = False) -> dict[str, AttentionSpec]:
    """All registered attention types by name; with ``include_timm``, the ``timm:NAME`` ones too."""
    _load_builtins()
    specs = dict(sorted(_REGISTRY.items()))
    if include_timm:
        from .timm_attention import TIMM_ATTENTIONS, timm_spec

        specs.update({f"timm:{n}": timm_spec(f"timm:{n}") for n in TIMM_ATTENTIONS})
    return specs


def create_attention(name: str, channels: int, *, init: str = "identity", spatial_dims: int = 2,
                     **options) -> nn.Module:
    """Build a registered attention module for ``channels`` channels, at identity or random init.

    A type without an identity initialisation of its own comes, at ``init="identity"``, wrapped in
    :class:`~se_retrofit.attention.blend.ZeroBlend` (its own parameters under ``attn.``).
    """
    return attention_builder(name, init=init, **options)(channels, spatial_dims)


def attention_builder(name: str, *, init: str = "identity", **options) -> Callable[[int, int], nn.Module]:
    """:func:`create_attention` with the type, init and options checked once: the returned function
    builds a module for ``(channels, spatial_dims)`` (surgery builds one per site).

    Example:
        >>> build = attention_builder("se", reduction=8)
        >>> [build(channels, 2).fc1.out_channels for channels in (64, 256)]
        [8, 32]
    """
    spec = get_attention(name)
    if init not in INITS:
        raise AttentionOptionError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    spec.check_options(options)

    def build(channels: int, spatial_dims: int = 2) -> nn.Module:
        module = spec.build(channels, spatial_dims, options)
        if init == "identity":
            if spec.identity_init is None:
                return spec.blend(module)
            spec.identity_init(module)
        return module

    return build


#: modules shipping built-in types (each registers its types on first import)
_BUILTIN_MODULES = ("se", "cbam", "bam", "eca", "nonlocal_block", "danet", "gc")
_loaded = False


def _load_builtins() -> None:
    global _loaded
    if _loaded:
        return
    _loaded = True
    for module in _BUILTIN_MODULES:
        importlib.import_module(f"{__name__}.{module}")
