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

from dataclasses import dataclass
from typing import Callable

from torch import nn

INITS = ("identity", "random")


@dataclass(frozen=True)
class AttentionSpec:
    """A registered attention type: its class and how it starts at identity."""

    name: str
    cls: type[nn.Module]
    identity_init: Callable[[nn.Module], None] | None
    attr_name: str = "se"

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        return doc[0] if doc else self.cls.__name__


_REGISTRY: dict[str, AttentionSpec] = {}


class UnknownAttentionError(ValueError):
    """No attention type is registered under that name."""


def register_attention(name: str, *, identity_init: Callable[[nn.Module], None] | None = None,
                       attr_name: str = "se"):
    """Class decorator registering an attention module under ``name``.

    Args:
        name: the name used by ``retrofit(attention=...)`` and ``se-retrofit --attention``.
        identity_init: called on a new instance to make it compute the identity; by default the
            class's own ``init_identity()`` method.
        attr_name: attribute name of the inserted module inside each block.

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
    """
    if not name or not name.replace("_", "").replace("-", "").isalnum():
        raise ValueError(f"attention name {name!r} must be letters, digits, '_' or '-'")

    def decorator(cls: type[nn.Module]) -> type[nn.Module]:
        init = identity_init or getattr(cls, "init_identity", None)
        _REGISTRY[name] = AttentionSpec(name, cls, init, attr_name)
        return cls

    return decorator


def unregister_attention(name: str) -> None:
    """Remove a registered attention type (built-ins come back on the next lookup)."""
    _REGISTRY.pop(name, None)
    if name in _BUILTINS:
        _loaded.clear()


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


def list_attentions() -> dict[str, AttentionSpec]:
    """All registered attention types by name."""
    _load_builtins()
    return dict(sorted(_REGISTRY.items()))


def create_attention(name: str, channels: int, *, init: str = "identity", **options) -> nn.Module:
    """Build a registered attention module for ``channels`` channels, at identity or random init."""
    spec = get_attention(name)
    if init not in INITS:
        raise ValueError(f"unknown init {init!r}; choose one of {', '.join(INITS)}")
    module = spec.cls(channels, **options)
    if init == "identity":
        if spec.identity_init is None:
            raise ValueError(f"attention {name!r} has no identity initialisation: give the class an "
                             "init_identity() method or pass identity_init= to register_attention, "
                             "or use init='random'")
        spec.identity_init(module)
    return module


_BUILTINS = ("se",)
_loaded: list[bool] = []


def _load_builtins() -> None:
    if _loaded:
        return
    import importlib

    for name in _BUILTINS:
        module = importlib.import_module(f"{__name__}.{name}")
        if name not in _REGISTRY:  # re-register after an unregister_attention()
            register_attention(name)(getattr(module, module.__all__[0]))
    _loaded.append(True)
