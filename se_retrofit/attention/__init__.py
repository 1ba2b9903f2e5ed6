"""Attention modules and their registry.

Every attention type is one class in its own file, registered under a name. The constructor
contract is timm's: ``cls(channels, *, spatial_dims=2, reduction=16, divisor=8, **options)``.
A class starts at exact identity through its ``init_identity()`` method (or a function given to
:func:`register_attention`), called by :func:`create_attention` when ``init="identity"``.

Example:
    >>> import torch
    >>> from se_retrofit.attention import create_attention
    >>> se = create_attention("se", 64, init="identity")
    >>> x = torch.randn(2, 64, 8, 8)
    >>> bool(torch.equal(se(x), x))
    True
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Callable

from torch import nn

from ..errors import RetrofitError

INITS = ("identity", "random")


@dataclass(frozen=True)
class AttentionSpec:
    """A registered attention type: its class and how it starts at identity."""

    name: str
    cls: type[nn.Module]
    identity_init: Callable[[nn.Module], None] | None
    attr_name: str = "se"
    default_position: str = "standard"

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.cls.__name__

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
        accepted = self.options
        if "*" in accepted:
            return
        unknown = [k for k in options if k not in accepted]
        if unknown:
            takes = ", ".join(accepted) or "no options"
            raise ValueError(f"option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} "
                             f"do{'' if len(unknown) > 1 else 'es'} not apply to attention {self.name!r} "
                             f"(it takes: {takes})")


_REGISTRY: dict[str, AttentionSpec] = {}


class UnknownAttentionError(RetrofitError):
    """No attention type is registered under that name."""


def register_attention(name: str, *, identity_init: Callable[[nn.Module], None] | None = None,
                       attr_name: str = "se", default_position: str = "standard"):
    """Class decorator registering an attention module under ``name``.

    Args:
        name: the name used by ``retrofit(attention=...)`` and ``se-retrofit --attention``.
        identity_init: called on a new instance to make it compute the identity; by default the
            class's own ``init_identity()`` method.
        attr_name: attribute name of the inserted module inside each block.
        default_position: where ``retrofit`` puts it unless told (``stage`` for BAM).

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
        raise ValueError(f"attention name {name!r} must be letters, digits, '_' or '-'")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        init = identity_init or getattr(cls, "init_identity", None)
        _REGISTRY[name] = AttentionSpec(name, cls, init, attr_name, default_position)
        return cls

    return decorator


def unregister_attention(name: str) -> None:
    """Remove an attention type you registered (the built-in ones stay)."""
    if name in _BUILTINS:
        raise ValueError(f"{name!r} is built in and cannot be unregistered")
    _REGISTRY.pop(name, None)


def get_attention(name: str) -> AttentionSpec:
    """The spec registered under ``name``; the error lists what is registered."""
    _load_builtins()
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise UnknownAttentionError(
            f"unknown attention type {name!r}; registered: {known} "
            "(register your own with se_retrofit.register_attention)") from None


def is_registered(name: str) -> bool:
    """Whether an attention type of that name is registered (nothing is imported to find out)."""
    try:
        get_attention(name)
    except UnknownAttentionError:
        return False
    return True


def list_attentions() -> dict[str, AttentionSpec]:
    """All registered attention types by name."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def create_attention(name: str, channels: int, *, init: str = "identity", spatial_dims: int = 2,
                     **options) -> nn.Module:
    """Build a registered attention module for ``channels`` channels, at identity or random init."""
    spec = get_attention(name)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    spec.check_options(options)
    module = spec.cls(channels, spatial_dims=spatial_dims, **options)
    if init == "identity":
        if spec.identity_init is None:
            raise ValueError(f"attention {name!r} has no identity initialisation: give the class an "
                             "init_identity() method or pass identity_init= to register_attention, "
                             "or use init='random'")
        spec.identity_init(module)
    return module


_BUILTINS = ("se", "cbam", "bam", "eca")


def _load_builtins() -> None:
    import importlib

    for name in _BUILTINS:
        importlib.import_module(f"{__name__}.{name}")  # each registers itself on first import
