"""What to retrofit and where: the config dataclass (with JSON round trip) and the planned sites."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .attention import INITS, get_attention

POSITIONS = ("standard", "pre", "post", "identity")
POSITION_HELP = {
    "standard": "on the residual branch, after its last layer, before the addition (SE paper default)",
    "pre": "at the input of the residual branch; the shortcut still sees the raw input",
    "post": "after the addition and the block's final activation",
    "identity": "on the shortcut, in parallel to the residual branch",
}


class ConfigError(ValueError):
    """A retrofit option has a value that cannot be used."""


@dataclass
class RetrofitConfig:
    """How to retrofit attention into a model. Round-trips through JSON.

    Example:
        >>> cfg = RetrofitConfig(position="post", reduction=8, stages=[3, 4])
        >>> RetrofitConfig.from_json(cfg.to_json()) == cfg
        True
    """

    attention: str = field(default="se", metadata={"help": "registered attention type (se, ...)"})
    position: str = field(default="standard", metadata={"help": "standard | pre | post | identity"})
    reduction: int = field(default=16, metadata={"help": "reduction ratio r of the excitation MLP"})
    divisor: int = field(default=8, metadata={"help": "round the hidden width to a multiple of this"})
    stages: list[int] | None = field(default=None, metadata={"help": "1-based stages to edit; None: all"})
    init: str = field(default="identity", metadata={"help": "identity (output unchanged) | random"})

    def __post_init__(self) -> None:
        get_attention(self.attention)
        if self.position not in POSITIONS:
            raise ConfigError(f"unknown position {self.position!r}; choose one of {', '.join(POSITIONS)}")
        for name in ("reduction", "divisor"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.init not in INITS:
            raise ConfigError(f"unknown init {self.init!r}; choose one of {', '.join(INITS)}")
        if self.stages is not None:
            if not self.stages or any(isinstance(s, bool) or not isinstance(s, int) or s < 1
                                      for s in self.stages):
                raise ConfigError(f"stages must be positive integers such as [3, 4], got {self.stages!r}")
            self.stages = sorted(set(self.stages))

    def attention_options(self) -> dict[str, Any]:
        return {"reduction": self.reduction, "divisor": self.divisor}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "RetrofitConfig":
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown retrofit config keys: {', '.join(unknown)}")
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str) -> "RetrofitConfig":
        return cls.from_dict(json.loads(text))


@dataclass(frozen=True)
class Site:
    """One planned insertion: which block, which addition, where, and the module's size and name."""

    block: str
    add_index: int
    shortcut_arg: int
    position: str
    channels: int
    spatial_dims: int
    stage: int
    module_name: str

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
