"""timm's attention modules by name: ``timm:se``, ``timm:gca``, ``timm:nl`` …

Paper: each module's own (see timm's ``timm.layers.create_attn.get_attn`` and the module docs).

``timm:NAME`` builds ``get_attn(NAME)(channels, **options)`` with timm itself, so the module, its
options and its state-dict names are timm's. None of them starts at identity (their sigmoid gates
start near 0.5; ``gca`` zeroes only the last weight, not its bias; ``nl`` zeroes its norm), so at
``init="identity"`` each is wrapped in the zero-initialised blend ``x + α·(A(x) − x)``
(:class:`~se_retrofit.attention.blend.ZeroBlend`): timm's parameters sit under ``attn.``
(``layer1.0.se.attn.fc1.weight``) next to ``alpha``. At ``init="random"`` the module is timm's
alone, with timm's names (``layer1.0.se.fc1.weight``). ``nl`` (``x + BN(z(y))`` with the BN at 0)
already computes x at timm's init; inside the blend it would never learn, so its BN starts at
weight 1 there. (Used alone, timm's ``nl`` is not a safe identity: its output has another memory
layout than its input, and the next convolution then rounds differently, ~1e-5.)

Options are timm's keyword arguments (``rd_ratio``, ``act_layer``, ``gate_layer``, ``kernel_size``,
``use_mlp`` …); ``reduction`` becomes ``rd_ratio = 1/r``, ``divisor`` ``rd_divisor``, ``act``
``act_layer`` and ``gate`` ``gate_layer`` where the module takes them. All are 2-D modules.
Names of ``get_attn`` that replace a conv instead of inserting into a feature map (sk, splat,
lambda, bottleneck, halo) are refused.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import math
from dataclasses import dataclass
from typing import Any

from torch import nn

from . import AttentionOptionError, AttentionSpec, UnknownAttentionError

__all__ = ["TIMM_ATTENTIONS", "timm_spec"]

#: names of timm's get_attn that insert into a feature map, keeping its shape
TIMM_ATTENTIONS = ("se", "ese", "eca", "ecam", "ceca", "ge", "gc", "gca", "cbam", "lcbam", "nl", "bat",
                   "coord", "scoord", "ela", "strip")
#: names of get_attn that replace a conv (they take a stride and do the block's spatial work)
REPLACES_A_CONV = ("sk", "splat", "lambda", "bottleneck", "halo")
#: our common option -> timm's keyword
ALIASES = {"reduction": "rd_ratio", "divisor": "rd_divisor", "act": "act_layer", "gate": "gate_layer"}
NOT_OPTIONS = ("self", "channels", "in_channels", "dim", "device", "dtype")


def _get_attn(name: str):
    return importlib.import_module("timm.layers.create_attn").get_attn(name)


@dataclass(frozen=True)
class TimmAttentionSpec(AttentionSpec):
    """A ``timm:NAME`` type: built by timm's ``get_attn``, 2-D only, identity by the blend."""

    fixed: tuple = ()  # keywords timm's get_attn fixes (functools.partial), e.g. gca's fuse_add=True

    @property
    def builtin(self) -> bool:
        return True  # nothing of the user's to import when a saved model is loaded

    @property
    def spatial_dims(self) -> tuple[int, ...]:
        return (2,)

    @property
    def summary(self) -> str:
        doc = (self.cls.__doc__ or "").strip().splitlines()
        first = doc[0].strip() if doc else ""
        return f"timm's {self.cls.__name__}{' (' + first + ')' if first else ''}, blended in from α = 0"

    @property
    def options(self) -> dict[str, Any]:
        params = inspect.signature(self.cls.__init__).parameters.values()
        fixed = dict(self.fixed)
        taken = {p.name: p.default for p in params if p.name not in NOT_OPTIONS and p.name not in fixed
                 and p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD)}
        return {**{ours: None for ours, theirs in ALIASES.items() if theirs in taken}, **taken}

    def check_options(self, options: dict[str, Any]) -> None:
        accepted = self.options
        unknown = [k for k in options if k not in accepted]
        if unknown:
            raise AttentionOptionError(f"option{'s' if len(unknown) > 1 else ''} {', '.join(unknown)} do"
                                       f"{'' if len(unknown) > 1 else 'es'} not apply to attention {self.name!r} "
                                       f"(it takes: {', '.join(accepted) or 'no options'})")
        try:  # building at 64 channels is cheap and checks the values the way timm will
            self.build(64, 2, options)
        except Exception as error:
            raise AttentionOptionError(f"attention {self.name!r}: timm's {self.cls.__name__} cannot be built with "
                                       f"options {options or '{}'}: {type(error).__name__}: {error}"
                                       f"{KNOWN_PROBLEMS.get(self.name[5:], '')}") from None

    def blend(self, module: nn.Module) -> nn.Module:
        before = BEFORE_BLEND.get(self.name[len("timm:"):])
        if before is not None:
            before(module)
        return super().blend(module)

    def build(self, channels: int, spatial_dims: int, options: dict[str, Any]) -> nn.Module:
        kwargs = {**dict(self.fixed), **_translate(options)}
        return self.cls(channels, **kwargs)

    def attention_bytes(self, channels: int, spatial: tuple[int, ...], options: dict[str, Any]) -> int | None:
        if self.name in ("timm:nl",):
            return 4 * math.prod(spatial) ** 2
        return None

    def site_problem(self, channels: int, spatial: tuple[int, ...], options: dict[str, Any]) -> str | None:
        problem = super().site_problem(channels, spatial, options)
        if problem or self.name != "timm:bat":
            return problem
        block = options.get("block_size", 7)
        if any(s % block for s in spatial):
            return (f"timm's BatNonLocalAttn needs a feature map whose height and width are multiples of its "
                    f"block_size {block}, and this one is {tuple(spatial)}; use an input size such as 224, or "
                    "another stage")
        return None


KNOWN_PROBLEMS = {
    "ge": " (timm 1.0.31's GatherExcite passes device and dtype positionally to its MLP, a timm bug; "
          "it builds with use_mlp=False)",
}


def _translate(options: dict[str, Any]) -> dict[str, Any]:
    out = {}
    for key, value in options.items():
        if key == "reduction":
            out["rd_ratio"] = 1.0 / value
        else:
            out[ALIASES.get(key, key)] = value
    return out


@functools.lru_cache(maxsize=None)
def timm_spec(name: str) -> TimmAttentionSpec:
    """The spec of ``timm:NAME``; an UnknownAttentionError (with the reason) for names that do not insert.

    Example:
        >>> import torch
        >>> from se_retrofit.attention import create_attention
        >>> gca = create_attention("timm:gca", 64)  # timm's GlobalContext(fuse_add=True), blended from α = 0
        >>> x = torch.randn(2, 64, 7, 7)
        >>> bool(torch.equal(gca(x), x)), type(gca.attn).__name__
        (True, 'GlobalContext')
    """
    short = name[len("timm:"):]
    if short in REPLACES_A_CONV:
        raise UnknownAttentionError(f"{name}: timm's {short!r} replaces a convolution (it takes a stride and does "
                                    "the block's spatial work) instead of inserting into a feature map; use one of "
                                    f"{', '.join('timm:' + n for n in TIMM_ATTENTIONS)}")
    if short not in TIMM_ATTENTIONS:
        raise UnknownAttentionError(f"unknown timm attention {name!r}; timm's get_attn names that insert into a "
                                    f"feature map: {', '.join('timm:' + n for n in TIMM_ATTENTIONS)}")
    target = _get_attn(short)
    fixed = ()
    if isinstance(target, functools.partial):
        fixed = tuple(sorted(target.keywords.items()))
        target = target.func
    return TimmAttentionSpec(name, target, None, attr_name="se", default_position="standard", fixed=fixed)


def _unit_norm(module: nn.Module) -> None:
    """timm's NonLocalAttn is ``x + norm(z(y))`` with its norm at 0: already x. Inside the blend that
    would learn nothing (``A(x) − x = 0`` gives α no gradient, and α = 0 gives the module none), so
    its norm starts at weight 1 (PyTorch's default) and the blend alone makes the start exact."""
    nn.init.ones_(module.norm.weight)
    nn.init.zeros_(module.norm.bias)


#: timm modules that already compute x at timm's init, made to compute something else before blending
BEFORE_BLEND = {"nl": _unit_norm}