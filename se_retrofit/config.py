"""What to retrofit and where: the config dataclass (with JSON round trip) and the planned sites."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import RetrofitError
from .attention import INITS, get_attention

POSITIONS = ("standard", "pre", "post", "identity", "inner", "stage")
POSITION_HELP = {
    "standard": "on the residual branch, after its last layer, before the addition (SE paper default)",
    "pre": "at the input of the residual branch; the shortcut still sees the raw input",
    "post": "after the addition and the block's final activation",
    "identity": "on the shortcut, in parallel to the residual branch",
    "inner": "inside the branch, right after its spatial conv and that conv's norm (the paper's SE_3x3)",
    "stage": "once per stage transition, after the last block of every stage but the last (BAM)",
}


class ConfigError(RetrofitError):
    """A retrofit option has a value that cannot be used."""


@dataclass
class RetrofitConfig:
    """How to retrofit attention into a model. Round-trips through JSON.

    Example:
        >>> cfg = RetrofitConfig(position="post", reduction=8, stages=[3, 4], options={"gate": "tanh"})
        >>> RetrofitConfig.from_json(cfg.to_json()) == cfg
        True
    """

    attention: str = field(default="se", metadata={"help": "registered attention type: se, cbam, bam, eca, …"})
    position: str | None = field(default=None, metadata={
        "help": "standard | pre | post | identity | inner | stage; None: the attention's default"})
    reduction: int | None = field(default=None, metadata={"help": "reduction ratio r; None: the type's default"})
    divisor: int | None = field(default=None, metadata={
        "help": "round hidden widths to a multiple of this; None: the type's default (timm's)"})
    stages: list[int] | None = field(default=None, metadata={"help": "1-based stages to edit; None: all"})
    blocks: list[str] | None = field(default=None, metadata={"help": "glob patterns over block paths"})
    exclude: list[str] | None = field(default=None, metadata={"help": "glob patterns of blocks to leave out"})
    init: str = field(default="identity", metadata={"help": "identity (output unchanged) | random"})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "further options of the attention type (squeeze, gate, act, kernel_size, dilation)"})
    attention_module: str | None = field(default=None, metadata={
        "help": "module to import for a user-registered attention type (recorded automatically)"})

    def __post_init__(self) -> None:
        spec = get_attention(self.attention)
        if self.attention_module is None and not spec.cls.__module__.startswith("se_retrofit."):
            self.attention_module = spec.cls.__module__
        self.position = self.position or spec.default_position
        if self.position not in POSITIONS:
            raise ConfigError(f"unknown position {self.position!r}; choose one of {', '.join(POSITIONS)}")
        for name in ("reduction", "divisor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.stages is not None:
            if not self.stages or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                      for s in self.stages):
                raise ConfigError(f"stages must be positive integers such as [3, 4], got {self.stages!r}")
            self.stages = sorted(set(self.stages))
        for name in ("blocks", "exclude"):
            value = getattr(self, name)
            if isinstance(value, str):  # one pattern, not a list of its characters
                value = [value]
                setattr(self, name, value)
            if value is not None and (not isinstance(value, (list, tuple))
                                      or not all(isinstance(p, str) and p for p in value)):
                raise ConfigError(f"{name} must be a list of glob patterns such as ['layer3.*'], got {value!r}")
        self.options = dict(self.options)
        try:
            spec.check_options(self.attention_options())
        except ValueError as error:
            raise ConfigError(str(error)) from None

    def attention_options(self) -> dict[str, Any]:
        """Keyword options for the attention class: r and divisor where set, plus ``options``."""
        common = {"reduction": self.reduction, "divisor": self.divisor}
        return {**{k: v for k, v in common.items() if v is not None}, **self.options}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetrofitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown retrofit config keys: {', '.join(unknown)}")
        if data.get("attention_module"):
            import_attention_module(data["attention_module"])
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RetrofitConfig":
        return cls.from_dict(json.loads(text))


def import_attention_module(name: str) -> None:
    """Import the module that registers a user's attention type, with a one-line error."""
    import importlib

    try:
        importlib.import_module(name)
    except Exception as error:
        raise ConfigError(f"cannot import {name!r}, which registers the attention type "
                          f"({type(error).__name__}: {error}); make it importable (PYTHONPATH)") from None


@dataclass(frozen=True)
class Site:
    """One planned insertion: the module whose forward is edited, where in it, and the new module.

    ``block`` is the module to edit (the residual block, or for ``inner`` the module calling the
    spatial conv); ``add_index``/``shortcut_arg`` locate the residual addition in its forward;
    ``anchor`` names the child whose output is gated (``inner``); ``channel_dim`` is where the
    channels are at that point (1 for NCHW, -1 for NHWC maps and token sequences).
    """

    block: str
    add_index: int
    shortcut_arg: int
    position: str
    channels: int
    spatial_dims: int
    stage: int
    module_name: str
    channel_dim: int = 1
    anchor: str | None = None

    @property
    def module_path(self) -> str:
        return f"{self.block}.{self.module_name}" if self.block else self.module_name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Site":
        return cls(**data)


@dataclass
class RetrofitRecord:
    """What was done to a model: kept on it as ``model.se_retrofit`` and written by ``save``."""

    config: RetrofitConfig
    sites: list[Site]
    base: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"config": self.config.to_dict(), "sites": [s.to_dict() for s in self.sites],
                "base": self.base}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetrofitRecord":
        return cls(RetrofitConfig.from_dict(data["config"]),
                   [Site.from_dict(s) for s in data["sites"]], dict(data.get("base", {})))
