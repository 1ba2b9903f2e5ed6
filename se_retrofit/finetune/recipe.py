"""Fine-tuning recipes: one YAML file naming the model, the retrofit and a two-phase schedule.

A recipe is read into frozen dataclasses and checked key by key; every error names the file and
the key (``phases[1].lr``) and says what would be accepted. ``Recipe.to_dict()`` gives back a
mapping that ``Recipe.from_dict`` turns into an equal recipe (the YAML round trip).

Example:
    >>> recipe = Recipe.from_yaml('''
    ... name: resnet18-se
    ... model: resnet18
    ... retrofit: {attention: se, position: standard, reduction: 16}
    ... phases:
    ...   - {name: new-modules, trainable: new, epochs: 1, lr: 0.01}
    ...   - {name: full, trainable: all, epochs: 3, lr: 0.001, new_lr_scale: 10}
    ... ''')
    >>> recipe.total_epochs, recipe.phases[1].new_lr_scale
    (4, 10.0)
    >>> Recipe.from_yaml(recipe.to_yaml()) == recipe
    True
"""
from __future__ import annotations

import difflib
import hashlib
import json
import math
import os
from dataclasses import MISSING, dataclass, field, fields, replace
from pathlib import Path
from typing import Any, Callable

import yaml

from ..errors import RetrofitError
from ..attention import UnknownAttentionError
from ..config import ConfigError, RetrofitConfig
from ..hub import UnknownModelError, loading_kwargs, resolve

TASKS = ("classification", "detection")
TRAINABLE = ("new", "all")
OPTIMIZERS = ("sgd", "adamw")
KEY_HINTS = {"r": "reduction", "attention_type": "attention", "stage": "stages", "learning_rate": "lr",
             "epoch": "epochs", "batch": "batch_size", "schedule": "phases"}


class RecipeError(RetrofitError):
    """A recipe file cannot be read, or one of its keys has a value that cannot be used."""


# --- value checks: each takes (value, where) and returns the value to keep, or raises RecipeError ---

def _fail(where: str, wanted: str, value: Any) -> RecipeError:
    return RecipeError(f"{where} must be {wanted}, got {value!r}")


def _accepting(test: Callable[[Any], bool], wanted: str) -> Callable[[Any, str], Any]:
    """A check that keeps values passing ``test`` and names ``wanted`` for the others."""
    def check(value: Any, where: str) -> Any:
        if not test(value):
            raise _fail(where, wanted, value)
        return value
    return check


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


_text = _accepting(lambda v: isinstance(v, str) and bool(v.strip()), "a non-empty string")
_string = _accepting(lambda v: isinstance(v, str), "a string")
_boolean = _accepting(lambda v: isinstance(v, bool), "true or false")
_positive_int = _accepting(lambda v: _is_int(v) and v >= 1, "a positive integer")
_count = _accepting(lambda v: _is_int(v) and v >= 0, "an integer >= 0")


def _int_in(low: int, high: int) -> Callable[[Any, str], Any]:
    """A check for a whole number in [low, high] (every count has a sane ceiling: 1e20 is a typo)."""
    return _accepting(lambda v: _is_int(v) and low <= v <= high, f"a whole number from {low} to {high}")


#: ceilings of the recipe's counts, shared with the command line's options
LIMITS = {"epochs": (1, 100_000), "batch_size": (1, 65_536), "workers": (0, 256), "seed": (0, 2 ** 32 - 1),
          "image_size": (8, 16_384), "num_classes": (2, 1_000_000)}
NAME_BYTES = 200  # a directory name (runs/NAME) with room for what is put beside it
_mapping = _accepting(lambda v: isinstance(v, dict) and all(isinstance(k, str) for k in v),
                      "a mapping of names to values")


def _name(value: Any, where: str) -> str:
    value = _text(value, where)
    if (any(c in value for c in "/\\") or value.startswith(".") or any(ord(c) < 32 or c == "\x7f" for c in value)
            or len(value.encode("utf-8", "surrogatepass")) > NAME_BYTES):
        raise _fail(where, f"a name usable as a directory name (no '/', no control characters such as NUL, not "
                           f"starting with '.', at most {NAME_BYTES} bytes)", value[:80])
    return value


def _number(low: float, high: float = math.inf, *, low_open: bool = False, high_open: bool = False):
    """A check for a float in [low, high] (open ends where asked); ints are accepted as floats."""
    bounds = f"{'(' if low_open else '['}{low}, {high}{')' if high_open or high == math.inf else ']'}"

    def check(value: Any, where: str) -> float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and (value < low or (low_open and value == low) or value > high or (high_open and value == high)):
            ok = False
        if not ok:
            raise _fail(where, f"a number in {bounds}", value)
        return float(value)
    return check


def _optional(check: Callable[[Any, str], Any]):
    return lambda value, where: None if value is None else check(value, where)


def _choice(options: tuple[str, ...]) -> Callable[[Any, str], Any]:
    return _accepting(lambda v: isinstance(v, str) and v in options, f"one of {', '.join(options)}")


def _scale_range(value: Any, where: str) -> tuple[float, float]:
    if not isinstance(value, (list, tuple)) or len(value) != 2:
        raise _fail(where, "a pair [low, high] with 0 < low <= high <= 1", value)
    low, high = (_number(0.0, 1.0, low_open=True)(v, where) for v in value)
    if low > high:
        raise _fail(where, "a pair [low, high] with 0 < low <= high <= 1", value)
    return (low, high)


def _check(check: Callable[[Any, str], Any], help: str = "required", **kwargs) -> Any:
    """A dataclass field that carries its value check, what it is for, and its default."""
    return field(metadata={"check": check, "help": help}, **kwargs)


def _from_mapping(cls, data: Any, where: str, file: str):
    """Build dataclass ``cls`` from ``data``: unknown keys, missing keys and bad values are errors."""
    prefix = f"{file}: " if file else ""
    if not isinstance(data, dict):
        raise RecipeError(f"{prefix}{where or 'the recipe'} must be a mapping of keys to values, got {data!r}")
    known = [f.name for f in fields(cls)]
    for key in data:
        if key not in known:
            raise RecipeError(f"{prefix}unknown key {_join(where, key)!r}{_suggest(str(key), known)}")
    values = {}
    for spec in fields(cls):
        key = _join(where, spec.name)
        if spec.name not in data:
            if spec.default is MISSING and spec.default_factory is MISSING:
                raise RecipeError(f"{prefix}missing key {key!r} ({spec.metadata.get('help', 'required')})")
            continue
        try:
            values[spec.name] = spec.metadata["check"](data[spec.name], key)
        except RecipeError as error:
            raise RecipeError(f"{prefix}{error}") from None
    return cls(**values)


def _join(where: str, key: str) -> str:
    return f"{where}.{key}" if where else key


def _suggest(key: str, known: list[str]) -> str:
    close = [KEY_HINTS[key]] if key in KEY_HINTS else difflib.get_close_matches(key, known, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; known keys: {', '.join(known)}"


# --- the recipe -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class Phase:
    """One phase of the schedule: which parameters train, for how long, at which rates.

    ``trainable: new`` trains the inserted attention modules and the classifier head only
    (:func:`se_retrofit.freeze_backbone` with ``train_head=True``); ``all`` trains everything
    (:func:`se_retrofit.unfreeze`). Rates come from :func:`se_retrofit.param_groups`: the backbone
    (and head) at ``lr``, the attention modules at ``lr * new_lr_scale``, the head at
    ``lr * head_lr_scale`` when that is set. Within a phase the rate warms up linearly for
    ``warmup_epochs`` and then follows a cosine to zero.
    """

    name: str = _check(_name, help="a name for the phase, such as new-modules or full")
    epochs: int = _check(_int_in(*LIMITS["epochs"]), help="how many epochs the phase lasts")
    lr: float = _check(_number(0.0, low_open=True), help="the phase's base learning rate")
    trainable: str = _check(_choice(TRAINABLE), default="all")
    new_lr_scale: float = _check(_number(0.0, low_open=True), default=1.0)
    head_lr_scale: float | None = _check(_optional(_number(0.0, low_open=True)), default=None)
    weight_decay: float | None = _check(_optional(_number(0.0)), default=None)
    warmup_epochs: float = _check(_number(0.0), default=0.0)


@dataclass(frozen=True)
class DataSpec:
    """Images and their augmentation. ``image_size`` None: the model's own (timm data config)."""

    image_size: int | None = _check(_optional(_int_in(*LIMITS["image_size"])), default=None)
    val_fraction: float = _check(_number(0.0, 1.0, low_open=True, high_open=True), default=0.2)
    scale: tuple[float, float] = _check(_scale_range, default=(0.08, 1.0))
    hflip: float = _check(_number(0.0, 1.0), default=0.5)
    color_jitter: float = _check(_number(0.0), default=0.4)


@dataclass(frozen=True)
class TrainSpec:
    """Optimiser and loop settings shared by the phases. ``batch_size`` is per process."""

    batch_size: int = _check(_int_in(*LIMITS["batch_size"]), default=64)
    optimizer: str = _check(_choice(OPTIMIZERS), default="sgd")
    momentum: float = _check(_number(0.0, 1.0, high_open=True), default=0.9)
    weight_decay: float = _check(_number(0.0), default=1e-4)
    label_smoothing: float = _check(_number(0.0, 1.0, high_open=True), default=0.1)
    amp: bool = _check(_boolean, default=True)
    channels_last: bool = _check(_boolean, default=True)
    workers: int = _check(_int_in(*LIMITS["workers"]), default=4)
    seed: int = _check(_int_in(*LIMITS["seed"]), default=0)


def _retrofit(value: Any, where: str) -> RetrofitConfig:
    if not isinstance(value, dict):
        raise _fail(where, "a mapping (attention, position, reduction, stages, …)", value)
    known = [f.name for f in fields(RetrofitConfig)]
    for key in value:
        if key not in known:
            raise RecipeError(f"unknown key {_join(where, str(key))!r}{_suggest(str(key), known)}")
    try:
        return RetrofitConfig.from_dict(dict(value))
    except (ConfigError, UnknownAttentionError, TypeError) as error:
        raise RecipeError(f"{where}: {error}") from None


def _budget(value: Any, where: str) -> tuple[str, ...]:
    from ..budget import parse_budgets

    try:
        budgets = parse_budgets(value)
    except RetrofitError as error:
        raise RecipeError(f"{where}: {error}") from None
    if any(b.kind == "latency" for b in budgets):  # measured: a resume could choose other sites
        raise RecipeError(f"{where}: a recipe's budget is in params or flops; a latency budget is measured on "
                          "the machine that runs it, so a resumed run could choose other sites than its "
                          "checkpoint holds (choose the sites with se-retrofit MODEL --budget latency=… "
                          "--dry-run and write them as blocks:)")
    return tuple(b.text for b in budgets)


def _model(value: Any, where: str) -> str:
    value = _text(value, where)
    try:
        resolve(value)
    except UnknownModelError as error:
        raise RecipeError(f"{where}: {error}") from None
    return value


def _model_kwargs(value: Any, where: str) -> dict[str, Any]:
    value = _mapping(value, where)
    loading = loading_kwargs(value)
    if loading:
        raise RecipeError(f"{_join(where, loading[0])} would make the library load weights itself, past "
                          "se_retrofit's weights reader; give the file as the recipe's weights: PATH (or --weights "
                          "PATH): .safetensors, or a pickled .pth/.pt with --allow-pickle")
    return value


def _phases(value: Any, where: str) -> tuple[Phase, ...]:
    if not isinstance(value, list) or not value:
        raise _fail(where, "a non-empty list of phases (name, trainable, epochs, lr, …)", value)
    phases = tuple(_from_mapping(Phase, item, f"{where}[{i}]", "") for i, item in enumerate(value))
    names = [p.name for p in phases]
    if len(set(names)) != len(names):
        raise RecipeError(f"{where}: phase names must differ, got {names}")
    return phases


def _section(cls):
    return lambda value, where: _from_mapping(cls, value, where, "")


@dataclass(frozen=True)
class Recipe:
    """A fine-tuning job: model, retrofit config, data handling, optimiser and phases.

    ``task: detection`` marks a recipe whose model has no classifier head (e.g.
    ``torchvision:fasterrcnn_resnet50_fpn``): ``se-retrofit finetune`` retrofits and exports it
    (``--export-only``) but refuses to fine-tune it on an ImageFolder dataset.
    """

    name: str = _check(_name, help="the recipe's name, also the default output directory runs/NAME")
    model: str = _check(_model, help="a timm name (resnet50) or torchvision:NAME")
    retrofit: RetrofitConfig = _check(_retrofit, help="attention, position, reduction, stages, …")
    phases: tuple[Phase, ...] = _check(_phases, help="the list of fine-tuning phases")
    description: str = _check(_string, default="")
    task: str = _check(_choice(TASKS), default="classification")
    weights: str = _check(_text, default="pretrained")
    model_kwargs: dict[str, Any] = _check(_model_kwargs, default_factory=dict)
    data: DataSpec = _check(_section(DataSpec), default_factory=DataSpec)
    train: TrainSpec = _check(_section(TrainSpec), default_factory=TrainSpec)
    budget: tuple[str, ...] = _check(_budget, default=(), help="the cost the retrofit may add, as --budget: "
                                     "[params=+2%, flops=+0.5%, latency=+5%] (see se_retrofit.budget)")

    @property
    def total_epochs(self) -> int:
        return sum(p.epochs for p in self.phases)

    def epoch_phases(self) -> list[int]:
        """The phase index of every epoch, in order: ``[0, 0, 1, 1, 1]`` for phases of 2 and 3."""
        return [i for i, phase in enumerate(self.phases) for _ in range(phase.epochs)]

    # --- round trip ---
    def to_dict(self) -> dict[str, Any]:
        """A plain mapping (YAML/JSON types only) that :meth:`from_dict` reads back to an equal recipe."""
        def plain(obj):
            if hasattr(obj, "__dataclass_fields__"):
                return {f.name: plain(getattr(obj, f.name)) for f in fields(obj)}
            if isinstance(obj, (list, tuple)):
                return [plain(v) for v in obj]
            if isinstance(obj, dict):
                return {k: plain(v) for k, v in obj.items()}
            return obj
        out = plain(self)
        out["retrofit"] = {k: v for k, v in out["retrofit"].items() if v not in (None, {})}
        if not out["budget"]:  # no budget: the mapping (and fingerprint) of a recipe from before budgets
            del out["budget"]
        return out

    @classmethod
    def from_dict(cls, data: Any, *, source: str = "") -> "Recipe":
        """Validate ``data`` (a mapping as read from YAML); errors name ``source`` and the key."""
        return _from_mapping(cls, data, "", source)

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None)

    @classmethod
    def from_yaml(cls, text: str, *, source: str = "") -> "Recipe":
        try:
            data = yaml.load(text, Loader=_UniqueKeyLoader)  # noqa: S506 - a SafeLoader
        except yaml.YAMLError as error:
            where = getattr(error, "problem_mark", None)
            at = f" at line {where.line + 1}, column {where.column + 1}" if where else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise RecipeError(f"{source or 'recipe'}: not valid YAML{at}: {problem}") from None
        return cls.from_dict(data, source=source)

    def fingerprint(self) -> str:
        """A short hash of what the recipe computes (after overrides; ``train.workers`` aside, which
        changes only how fast images load): a checkpoint belongs to one fingerprint."""
        text = json.dumps(self.identity(), sort_keys=True, default=str)
        return hashlib.sha256(text.encode()).hexdigest()[:16]

    def identity(self) -> dict[str, Any]:
        """:meth:`to_dict` without the keys a resumed run may change (``train.workers``)."""
        out = self.to_dict()
        out["train"].pop("workers", None)
        return out

    # --- command-line overrides ---
    def with_overrides(self, *, epochs: list[int] | None = None, lr: float | None = None,
                       batch_size: int | None = None, image_size: int | None = None, seed: int | None = None,
                       workers: int | None = None, weights: str | None = None) -> "Recipe":
        """The recipe with command-line values put in (None keeps the recipe's).

        ``epochs``: one number per phase, or a single total shared out in proportion to the
        recipe's phase lengths (each phase keeps at least one epoch). ``lr``: the first phase's
        rate; the other phases keep their ratio to it.

        Example:
            >>> r = Recipe.from_yaml("name: x\\nmodel: resnet18\\nretrofit: {}\\nphases: "
            ...                      "[{name: a, epochs: 2, lr: 0.1}, {name: b, epochs: 8, lr: 0.01}]")
            >>> [p.epochs for p in r.with_overrides(epochs=[5]).phases], r.with_overrides(lr=1.0).phases[1].lr
            ([1, 4], 0.1)
        """
        phases = list(self.phases)
        if epochs is not None:
            phases = [replace(p, epochs=e) for p, e in zip(phases, split_epochs(epochs, phases))]
        if lr is not None:
            factor = lr / phases[0].lr
            phases = [replace(p, lr=p.lr * factor) for p in phases]
        train = replace(self.train, **{k: v for k, v in (("batch_size", batch_size), ("seed", seed),
                                                          ("workers", workers)) if v is not None})
        data = replace(self.data, image_size=image_size) if image_size is not None else self.data
        changed = replace(self, phases=tuple(phases), train=train, data=data, weights=weights or self.weights)
        return changed if changed == self else Recipe.from_dict(changed.to_dict(), source="the recipe with overrides")


def split_epochs(epochs: list[int], phases: list[Phase]) -> list[int]:
    """Epochs per phase from ``--epochs``: one per phase, or one total split in proportion."""
    if len(epochs) == len(phases):
        return list(epochs)
    if len(epochs) != 1:
        raise RecipeError(f"--epochs takes one total or one number per phase ({len(phases)}), got {epochs}")
    total, weights = epochs[0], [p.epochs for p in phases]
    if total < len(phases):
        raise RecipeError(f"--epochs {total} is fewer than the recipe's {len(phases)} phases (each needs one)")
    shares = [total * w / sum(weights) for w in weights]
    out = [max(1, math.floor(s)) for s in shares]
    while sum(out) != total:  # largest remainders gain, phases above their share (and above 1) give back
        step = 1 if sum(out) < total else -1
        order = sorted((i for i in range(len(out)) if step > 0 or out[i] > 1), key=lambda i: out[i] - shares[i])
        out[order[0] if step > 0 else order[-1]] += step
    return out


class _UniqueKeyLoader(yaml.SafeLoader):
    """YAML's safe loader that refuses a key given twice in one mapping (YAML keeps the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                hash(key)
            except TypeError:
                continue  # the base class reports an unhashable key
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key] + 1})", key_node.start_mark)
            seen[key] = key_node.start_mark.line
        return super().construct_mapping(node, deep=deep)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a recipe file; a :class:`RecipeError` names the file and the bad key.

    Example:
        >>> import glob
        >>> load_recipe(sorted(glob.glob("recipes/*.yaml"))[0]).task in TASKS  # doctest: +SKIP
        True
    """
    path = Path(path)
    if path.is_dir():
        raise RecipeError(f"recipe path {path} is a directory; pass a recipe file in it, such as "
                          f"{path / 'NAME.yaml'} (see recipes/)")
    if not path.is_file():
        raise RecipeError(f"recipe file {path} does not exist" + ("" if path.suffix else
                                                                     " (recipes are .yaml files; see recipes/)"))
    try:
        text = path.read_text()
    except (OSError, UnicodeDecodeError) as error:
        raise RecipeError(f"cannot read recipe file {path}: {error}") from None
    return Recipe.from_yaml(text, source=str(path))


def recipe_differences(a: dict[str, Any], b: dict[str, Any], prefix: str = "") -> list[str]:
    """Keys whose values differ between two recipe mappings: ``['phases[0].epochs (2 vs 3)']``."""
    if isinstance(a, dict) and isinstance(b, dict):
        return [d for k in sorted(set(a) | set(b), key=str)
                for d in recipe_differences(a.get(k), b.get(k), _join(prefix, str(k)))]
    if isinstance(a, list) and isinstance(b, list) and len(a) == len(b):
        return [d for i, (x, y) in enumerate(zip(a, b)) for d in recipe_differences(x, y, f"{prefix}[{i}]")]
    return [] if a == b else [f"{prefix} ({a!r} vs {b!r})"]
