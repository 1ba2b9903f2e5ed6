"""What to retrofit and where: the config dataclass (with JSON round trip) and the planned sites."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from typing import Any

from .errors import RetrofitError
from .attention import INITS, get_attention, is_registered
from .positions import POSITION_HELP, POSITIONS, UNIT_KINDS
from .positions.base import registered as registered_positions
from .saved_format import check_record
from .site import Site

__all__ = ["ConfigError", "POSITIONS", "POSITION_HELP", "RetrofitConfig", "RetrofitRecord", "Site"]


class ConfigError(RetrofitError):
    """A retrofit option has a value that cannot be used."""


@dataclass
class RetrofitConfig:
    """How to retrofit attention into a model. Round-trips through JSON.

    Example:
        >>> cfg = RetrofitConfig(position="post", reduction=8, stages=[3, 4], every=2, options={"gate": "tanh"})
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
    every: int | None = field(default=None, metadata={
        "help": "every k-th selected block of each stage, counting from its first (Non-local's 5-block "
                "model: stages [2, 3], every 2); None: every block"})
    exclude: list[str] | None = field(default=None, metadata={"help": "glob patterns of blocks to leave out"})
    init: str = field(default="identity", metadata={"help": "identity (output unchanged) | random"})
    options: dict[str, Any] = field(default_factory=dict, metadata={
        "help": "further options of the attention type (squeeze, gate, act, kernel_size, dilation)"})
    kinds: list[str] | None = field(default=None, metadata={
        "help": "kinds of unit to edit: residual (blocks with a residual addition), join (branches "
                "concatenated: Inception, DenseNet, ShuffleNet) and chain (conv → activation layers of "
                "VGG, MobileNetV1); None: the first of these the model has"})
    max_attention_mib: float = field(default=64.0, metadata={
        "help": "refuse a site whose attention map (Non-local, PAM) would exceed this many MiB at batch 1"})
    attention_module: str | None = field(default=None, metadata={
        "help": "module to import for a user-registered attention type (recorded automatically)"})

    def __post_init__(self) -> None:
        spec = get_attention(self.attention)
        self.attention_module = None if spec.builtin else self.attention_module or spec.cls.__module__
        self.position = self.position or spec.default_position
        if self.position not in registered_positions():
            raise ConfigError(f"unknown position {self.position!r}; choose one of "
                              f"{', '.join(registered_positions())}")
        if isinstance(self.kinds, str):
            self.kinds = [k.strip() for k in self.kinds.split(",")]
        if self.kinds is not None:
            unknown = [k for k in self.kinds if k not in UNIT_KINDS] if isinstance(self.kinds, (list, tuple)) \
                else [self.kinds]
            if unknown or not self.kinds:
                raise ConfigError(f"kinds must name unit kinds among {', '.join(UNIT_KINDS)}, got {self.kinds!r}")
            self.kinds = [k for k in UNIT_KINDS if k in self.kinds]
        for name in ("reduction", "divisor"):
            value = getattr(self, name)
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ConfigError(f"{name} must be a positive integer, got {value!r}")
        if self.every is not None and (isinstance(self.every, bool) or not isinstance(self.every, int)
                                       or self.every < 1):
            raise ConfigError(f"every must be a positive integer (2: every other block), got {self.every!r}")
        if isinstance(self.max_attention_mib, bool) or not isinstance(self.max_attention_mib, (int, float)) \
                or not self.max_attention_mib > 0:
            raise ConfigError(f"max_attention_mib must be a positive number of MiB, got {self.max_attention_mib!r}")
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
    def from_dict(cls, data: dict[str, Any], *, trust_code: bool = False) -> "RetrofitConfig":
        """The config ``to_dict`` wrote. A user-registered attention type that is not registered yet is
        imported from the module the config names only with ``trust_code=True``: a file never makes
        se_retrofit run code of its own accord, and a built-in type never imports anything."""
        if not isinstance(data, dict):
            raise ConfigError(f"a retrofit config must be a mapping of options, not {type(data).__name__}")
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ConfigError(f"unknown retrofit config keys: {', '.join(unknown)}")
        module = data.get("attention_module")
        if module and not is_registered(str(data.get("attention", "se"))):
            if not trust_code:
                raise ConfigError(
                    f"attention type {data.get('attention')!r} is registered by module {module!r}, which is not "
                    f"imported: se_retrofit runs no code named by a file unless asked. Import {module} yourself, "
                    f"or pass trust_code=True (command line: --import {module}) if you trust it")
            import_attention_module(module)
        return cls(**data)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_json(cls, text: str, *, trust_code: bool = False) -> "RetrofitConfig":
        return cls.from_dict(json.loads(text), trust_code=trust_code)


def import_attention_module(name: str) -> None:
    """Import the module that registers a user's attention type, with a one-line error."""
    import importlib

    try:
        importlib.import_module(name)
    except Exception as error:
        raise ConfigError(f"cannot import {name!r}, which registers the attention type "
                          f"({type(error).__name__}: {error}); make it importable (PYTHONPATH)") from None


@dataclass
class RetrofitRecord:
    """What was done to a model: kept on it as ``model.se_retrofit`` and written by ``save``.

    ``config`` and ``sites`` are the latest edit; ``earlier`` holds the edits made before it (a model
    retrofitted twice), oldest first, so that :func:`se_retrofit.load` replays them all in order.
    """

    config: RetrofitConfig
    sites: list[Site]
    base: dict[str, Any] = field(default_factory=dict)
    earlier: list[tuple[RetrofitConfig, list[Site]]] = field(default_factory=list)

    @property
    def edits(self) -> list[tuple[RetrofitConfig, list[Site]]]:
        """Every edit, oldest first: ``(config, sites)``."""
        return [*self.earlier, (self.config, self.sites)]

    @property
    def all_sites(self) -> list[Site]:
        """The sites of every edit, oldest first."""
        return [site for _, sites in self.edits for site in sites]

    def followed_by(self, config: RetrofitConfig, sites: list[Site]) -> "RetrofitRecord":
        """The record of this model edited once more."""
        return RetrofitRecord(config, sites, dict(self.base), self.edits)

    def to_dict(self) -> dict[str, Any]:
        data = {"config": self.config.to_dict(), "sites": [s.to_dict() for s in self.sites], "base": self.base}
        if self.earlier:
            data["earlier"] = [{"config": c.to_dict(), "sites": [s.to_dict() for s in sites]}
                               for c, sites in self.earlier]
        return data

    @classmethod
    def from_dict(cls, data: dict[str, Any], *, trust_code: bool = False) -> "RetrofitRecord":
        """The record ``to_dict`` wrote (keys besides ``config``, ``sites``, ``base`` and ``earlier`` are
        ignored), checked first against the saved format's schema (:mod:`se_retrofit.saved_format`):
        anything malformed is a :class:`~se_retrofit.saved_format.SavedFormatError`."""
        check_record(data)

        def config(entry: dict[str, Any]) -> RetrofitConfig:
            return RetrofitConfig.from_dict(entry, trust_code=trust_code)

        earlier = [(config(e["config"]), [Site.from_dict(s) for s in e["sites"]]) for e in data.get("earlier", [])]
        return cls(config(data["config"]), [Site.from_dict(s) for s in data["sites"]], dict(data.get("base", {})),
                   earlier)
