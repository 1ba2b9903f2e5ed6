"""The saved format's schema: the one place that says what a saved directory may hold.

:func:`se_retrofit.load` reads files someone may have changed, damaged or crafted. Everything it
reads passes here first, so that any malformed input ends as a :class:`SavedFormatError` (a
:class:`~se_retrofit.RetrofitError`) with a one-line message naming the key and what to do, before
anything is built or allocated:

* :func:`read_config_file` reads ``retrofit_config.json``: a regular file (never a FIFO, device or
  directory: opened with ``O_NONBLOCK`` and checked with ``fstat``), at most :data:`MAX_CONFIG_BYTES`,
  UTF-8, JSON without duplicate keys, ``NaN``/``Infinity`` or nesting deeper than :data:`MAX_DEPTH`;
* :func:`check_saved_config` checks it against the tables below: every section's keys are known,
  required ones present, and every value has its type, range or allowed name;
* :func:`read_weights` reads a ``.safetensors`` file the same way: a regular file whose header (its
  length prefix, JSON, dtypes, shapes and data offsets) describes exactly the bytes that follow;
* :func:`record_mismatch` turns what goes wrong when a well-formed record does not fit the model
  it is applied to (a module path that is not there, a constructor keyword the model does not take)
  into an error naming the record's key.

Extending the format: each section is one table, ``{key: Field(check, required)}``
(:data:`TOP_LEVEL`, :data:`CONFIG`, :data:`SITE`, :data:`BASE`, :data:`EARLIER`, :data:`GATE`,
:data:`FILES`). A new key (a model fingerprint, an output probe) is one more row in its table with
a check built from the small checkers here (:func:`integer`, :func:`number`, :func:`string`,
:func:`optional`, :func:`list_of`, :func:`mapping`, :func:`section`, :func:`one_of`); a key missing
from its table is refused as unknown, so a writer and this schema are changed together.

Example:
    >>> from se_retrofit.saved_format import SavedFormatError, check_site
    >>> try:
    ...     check_site({"block": "layer1.0", "channels": "64"})
    ... except SavedFormatError as error:
    ...     print(error)
    the retrofit record: sites[0] lacks the keys add_index, module_name, position, shortcut_arg, spatial_dims, stage; the saved directory was changed or damaged: save the model again (or restore its files)
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import re
import stat
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn

from .errors import RetrofitError
from .hub import WeightsError, file_kind, first_sentence, loading_kwargs

FORMAT = "se_retrofit/2"
#: format 1 was written before saves carried their proof (``verify``): it loads with a warning
UNVERIFIED_FORMAT = "se_retrofit/1"
READABLE_FORMATS = (FORMAT, UNVERIFIED_FORMAT)
CONFIG_FILE, MODEL_FILE, ATTENTION_FILE = "retrofit_config.json", "model.safetensors", "attention.safetensors"
PROBE_FILE = "probe.safetensors"

#: a saved config larger than this is refused unread (a ResNet-152's config is about 100 KiB)
MAX_CONFIG_BYTES = 32 * 1024 * 1024
#: JSON nested deeper than this is refused (a transformers config nests 4 or 5 levels)
MAX_DEPTH = 64
#: a safetensors header larger than this is refused (the safetensors library's own limit)
MAX_HEADER_BYTES = 100_000_000

FIX = "the saved directory was changed or damaged: save the model again (or restore its files)"
FIX_BASE = "pass base_model= to load onto your own model (or save the model again)"


class SavedFormatError(WeightsError):
    """A saved directory (its config or weights files) is malformed, or does not fit the model."""


def refuse(where: str, problem: str, fix: str = FIX) -> SavedFormatError:
    """The error for ``problem`` in ``where`` (a file), on one line."""
    text = f"{where}: {problem}; {fix}"
    return SavedFormatError(" ".join(text.split()))


class Invalid(Exception):
    """Raised by the checkers with ``KEY PROBLEM``; :func:`reported` turns it into a :class:`SavedFormatError`."""


def invalid(key: str, problem: str) -> Invalid:
    return Invalid(f"{key or 'the file'} {problem}")


@contextlib.contextmanager
def reported(where: str, fix: str = FIX) -> Iterator[None]:
    """Checks run inside report their first problem as a :class:`SavedFormatError` about ``where``."""
    try:
        yield
    except Invalid as error:
        raise refuse(where, str(error), fix) from None


# --- reading files ---------------------------------------------------------------------------------

@contextlib.contextmanager
def open_regular(file: Path, what: str) -> Iterator[tuple[int, int]]:
    """``(fd, size)`` of ``file`` opened for reading, refused unless it is a regular file: opened with
    ``O_NONBLOCK`` (a FIFO never blocks) and checked with ``fstat`` (no race with a ``stat`` before)."""
    file = Path(file)
    try:
        fd = os.open(file, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise SavedFormatError(f"{file} is missing: the saved directory lacks its {what}; save the model "
                               "again (or restore its files)") from None
    except OSError as error:
        raise SavedFormatError(f"cannot open {file} ({error.strerror or error}); check its permissions, or save "
                               "the model again") from None
    try:
        info = os.fstat(fd)
        if not stat.S_ISREG(info.st_mode):
            kind = file_kind(info.st_mode) or "not a regular file"
            raise SavedFormatError(f"{file} is {kind}, not a regular file holding the {what}; {FIX}")
        yield fd, info.st_size
    finally:
        os.close(fd)


def read_bytes(fd: int, count: int, file: Path) -> bytes:
    """Exactly ``count`` bytes from ``fd``; refused when the file ends (or fails) before."""
    chunks, left = [], count
    while left:
        try:
            chunk = os.read(fd, min(left, 1 << 24))
        except OSError as error:
            raise SavedFormatError(f"cannot read {file} ({error.strerror or error}); {FIX}") from None
        if not chunk:
            raise SavedFormatError(f"{file} ends after {count - left} of its {count} bytes (truncated); {FIX}")
        chunks.append(chunk)
        left -= len(chunk)
    return b"".join(chunks)


def parse_json(data: bytes, where: str) -> Any:
    """Strict JSON: UTF-8, no duplicate keys, no NaN/Infinity, at most :data:`MAX_DEPTH` levels."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise refuse(where, f"not UTF-8 text (byte {error.start})") from None
    try:
        value = json.loads(text, object_pairs_hook=_no_duplicates, parse_constant=_no_constant)
    except json.JSONDecodeError as error:
        raise refuse(where, f"not valid JSON ({error.msg} at line {error.lineno} column {error.colno})") from None
    except RecursionError:
        raise refuse(where, f"JSON nested deeper than {MAX_DEPTH} levels") from None
    except _DuplicateKey as error:
        raise refuse(where, f"the key {error.args[0]!r} appears twice in one object") from None
    except _Constant as error:
        raise refuse(where, f"{error.args[0]} is not a number JSON allows") from None
    if depth(value) > MAX_DEPTH:
        raise refuse(where, f"JSON nested deeper than {MAX_DEPTH} levels")
    return value


class _DuplicateKey(Exception):
    pass


class _Constant(Exception):
    pass


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


def _no_constant(name: str) -> Any:
    raise _Constant(name)


def depth(value: Any) -> int:
    """How deeply ``value`` nests lists and dicts (0 for a scalar); iterative, so never a RecursionError."""
    deepest, stack = 0, [(value, 0)]
    while stack:
        item, level = stack.pop()
        if isinstance(item, (dict, list)):
            deepest = max(deepest, level + 1)
            if deepest > MAX_DEPTH:
                return deepest
            stack.extend((child, level + 1) for child in (item.values() if isinstance(item, dict) else item))
    return deepest


def read_config_file(directory: str | os.PathLike) -> dict[str, Any]:
    """The saved config of ``directory``, read strictly (see the module docstring) and checked
    against the schema (:func:`check_saved_config`)."""
    file = Path(directory) / CONFIG_FILE
    if not os.path.lexists(file):
        raise SavedFormatError(f"{directory} is not a saved se_retrofit model: {CONFIG_FILE} is missing")
    with open_regular(file, "model's config") as (fd, size):
        if size > MAX_CONFIG_BYTES:
            raise refuse(str(file), f"{size} bytes, more than a saved config can hold ({MAX_CONFIG_BYTES})")
        config = parse_json(read_bytes(fd, size, file), str(file))
    check_saved_config(config, str(file))
    return config


# --- safetensors -----------------------------------------------------------------------------------

#: safetensors dtype names and their item sizes in bytes
DTYPE_SIZES = {"BOOL": 1, "U8": 1, "I8": 1, "F8_E5M2": 1, "F8_E4M3": 1, "I16": 2, "U16": 2, "F16": 2, "BF16": 2,
               "I32": 4, "U32": 4, "F32": 4, "I64": 8, "U64": 8, "F64": 8}
MAX_DIMS = 16


def read_weights(file: str | os.PathLike) -> dict[str, torch.Tensor]:
    """The tensors of a ``.safetensors`` file, refused (:class:`SavedFormatError`) unless it is a
    regular file whose header describes exactly the bytes that follow (see :func:`check_header`)."""
    file = Path(file)
    with open_regular(file, "weights") as (fd, size):
        if size < 8:
            raise refuse(str(file), f"{size} bytes, too short for a safetensors file (truncated)")
        (length,) = struct.unpack("<Q", read_bytes(fd, 8, file))
        if length > min(MAX_HEADER_BYTES, size - 8):
            raise refuse(str(file), f"the header length {length} exceeds the file ({size} bytes; truncated or "
                                    "not a safetensors file)")
        header = parse_json(read_bytes(fd, length, file), f"{file} (header)")
        check_header(header, size - 8 - length, f"{file} (header)")
    from safetensors.torch import load_file

    try:
        return load_file(str(file))
    except Exception as error:  # the file changed since it was checked, or safetensors disagrees
        raise refuse(str(file), f"safetensors cannot read it ({type(error).__name__}: {first_sentence(error)})") \
            from None


def check_header(header: Any, data_bytes: int, where: str) -> None:
    """Every tensor of a safetensors header: a known dtype, a shape, and data offsets inside the
    ``data_bytes`` that follow the header, exactly its size, the tensors tiling the data."""
    with reported(where):
        _check_tensors(header, data_bytes)


def _check_tensors(header: Any, data_bytes: int) -> None:
    if not isinstance(header, dict):
        raise invalid("the header", f"must be a JSON object, got {_shown(header)}")
    spans = []
    for name, entry in header.items():
        if name == "__metadata__":
            mapping(string(max_length=10_000), string(max_length=100_000))(entry, "__metadata__")
            continue
        key = f"tensor {name!r}"
        if not isinstance(entry, dict) or set(entry) != {"dtype", "shape", "data_offsets"}:
            raise invalid(key, "must be an object with exactly dtype, shape and data_offsets")
        one_of(*DTYPE_SIZES)(entry["dtype"], f"{key} dtype")
        list_of(integer(0, 1 << 40), max_length=MAX_DIMS)(entry["shape"], f"{key} shape")
        list_of(integer(0, data_bytes), min_length=2, max_length=2)(entry["data_offsets"], f"{key} data_offsets")
        begin, end = entry["data_offsets"]
        expected = math.prod(entry["shape"]) * DTYPE_SIZES[entry["dtype"]]
        if end - begin != expected:
            raise invalid(key, f"has data_offsets [{begin}, {end}] holding {end - begin} bytes, where its dtype "
                               f"and shape need {expected}")
        spans.append((begin, end, name))
    position = 0
    for begin, end, name in sorted(spans):
        if begin != position:
            raise invalid(f"tensor {name!r}", f"starts at byte {begin}, not {position} (overlapping or gapped data)")
        position = end
    if position != data_bytes:
        raise invalid("the tensors", f"hold {position} bytes, the file {data_bytes} after its header")


def check_dtypes(model: nn.Module, state: dict[str, torch.Tensor], where: str) -> None:
    """Refuse a tensor whose kind of dtype (floating, integer, bool, complex) is not the model's own
    for that key: loading would silently convert its bits (an int32 tensor into float32 weights)."""
    own = model.state_dict()
    for key, tensor in state.items():
        if key in own and _dtype_kind(tensor.dtype) != _dtype_kind(own[key].dtype):
            raise refuse(where, f"tensor {key!r} is {tensor.dtype}, the model's is {own[key].dtype}")


def _dtype_kind(dtype: torch.dtype) -> str:
    if dtype == torch.bool:
        return "bool"
    return "complex" if dtype.is_complex else "floating" if dtype.is_floating_point else "integer"


# --- checkers --------------------------------------------------------------------------------------

Check = Callable[[Any, str], None]


@dataclass(frozen=True)
class Field:
    """One key of a section: how its value is checked, and whether the key must be there."""

    check: Check
    required: bool = True


def _type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", type(None): "null",
            int: "an integer", float: "a number"}.get(type(value), type(value).__name__)


def _shown(value: Any) -> str:
    text = json.dumps(value) if not isinstance(value, (dict, list)) else _type(value)
    return text if len(text) <= 60 else text[:59] + "…"


def integer(low: int, high: int) -> Check:
    def check(value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
            raise invalid(key, f"must be an integer from {low} to {high}, got {_shown(value)}")
    return check


def number(low: float, high: float, *, above: bool = False) -> Check:
    """A finite int or float in ``[low, high]`` (``(low, high]`` with ``above``)."""
    def check(value: Any, key: str) -> None:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                or not (low < value if above else low <= value) or value > high:
            bound = f"above {low}" if above else f"from {low}"
            raise invalid(key, f"must be a number {bound} to {high}, got {_shown(value)}")
    return check


def boolean(value: Any, key: str) -> None:
    if not isinstance(value, bool):
        raise invalid(key, f"must be true or false, got {_shown(value)}")


def string(pattern: str | None = None, *, max_length: int = 1000, meaning: str = "") -> Check:
    """A string of at most ``max_length`` characters, matching ``pattern`` in full where given."""
    compiled = re.compile(pattern) if pattern else None

    def check(value: Any, key: str) -> None:
        if not isinstance(value, str) or len(value) > max_length or "\x00" in value:
            raise invalid(key, f"must be a string of at most {max_length} characters, got {_shown(value)}")
        if compiled is not None and not compiled.fullmatch(value):
            raise invalid(key, f"must be {meaning or 'a string matching ' + pattern}, got {_shown(value)}")
    return check


def one_of(*allowed: Any) -> Check:
    def check(value: Any, key: str) -> None:
        if isinstance(value, bool) or not any(value == a and type(value) is type(a) for a in allowed):
            raise invalid(key, f"must be one of {', '.join(json.dumps(a) for a in allowed)}, got {_shown(value)}")
    return check


def choice(names: Callable[[], Any], what: str) -> Check:
    """A string among ``names()`` (a registry read when checked)."""
    def check(value: Any, key: str) -> None:
        known = list(names())
        if not isinstance(value, str) or value not in known:
            raise invalid(key, f"must name a {what} ({', '.join(map(str, known))}), got {_shown(value)}")
    return check


def optional(inner: Check) -> Check:
    def check(value: Any, key: str) -> None:
        if value is not None:
            inner(value, key)
    return check


def list_of(item: Check, *, min_length: int = 0, max_length: int = 100_000) -> Check:
    def check(value: Any, key: str) -> None:
        if not isinstance(value, list) or not min_length <= len(value) <= max_length:
            size = f"{min_length} to {max_length}" if min_length != max_length else str(min_length)
            raise invalid(key, f"must be a list of {size} items, got {_shown(value)}"
                              + (f" of {len(value)}" if isinstance(value, list) else ""))
        for index, entry in enumerate(value):
            item(entry, f"{key}[{index}]")
    return check


def mapping(key_check: Check, value_check: Check, *, max_length: int = 100_000) -> Check:
    def check(value: Any, key: str) -> None:
        if not isinstance(value, dict) or len(value) > max_length:
            raise invalid(key, f"must be an object (of at most {max_length} keys), got {_shown(value)}")
        for name, entry in value.items():
            key_check(name, f"{key} key {name!r}")
            value_check(entry, f"{key}.{name}")
    return check


def section(table: dict[str, Field]) -> Check:
    """An object with the keys of ``table``: none unknown, every required one present, each checked."""
    def check(value: Any, key: str) -> None:
        if not isinstance(value, dict):
            raise invalid(key, f"must be an object, got {_shown(value)}")
        unknown = sorted(set(value) - set(table))
        if unknown:
            known = list(table)
            raise invalid(key, f"has unknown keys {', '.join(map(repr, unknown[:5]))} (it takes "
                              f"{', '.join(known[:8])}{f' and {len(known) - 8} more' if len(known) > 8 else ''})")
        missing = sorted(name for name, field in table.items() if field.required and name not in value)
        if missing:
            raise invalid(key, f"lacks the keys {', '.join(missing)}")
        for name, field in table.items():
            if name in value:
                field.check(value[name], f"{key}.{name}" if key else name)
    return check


def plain(*, max_integer: int, max_length: int = 100) -> Check:
    """A plain constructor value: null, a boolean, a bounded number, a string, or a list of them."""
    def check(value: Any, key: str) -> None:
        if isinstance(value, list):
            list_of(check, max_length=max_length)(value, key)
        elif isinstance(value, int) and not isinstance(value, bool):
            integer(-max_integer, max_integer)(value, key)
        elif isinstance(value, float):
            number(-max_integer, max_integer)(value, key)
        elif not (value is None or isinstance(value, bool)):
            string(max_length=1000)(value, key)
    return check


# --- names -----------------------------------------------------------------------------------------

IDENTIFIER = r"[A-Za-z_][A-Za-z0-9_]*"
#: a module path: dotted attribute names or indices (``layer1.0``, ``features.denseblock1``); "" is the model
MODULE_PATH = rf"(?:(?:{IDENTIFIER}|\d+)(?:\.(?:{IDENTIFIER}|\d+))*)?"
module_path = string(MODULE_PATH, meaning="a module path such as 'layer1.0' (names and indices joined by dots)")
#: a unit's name: its module's path, and ``@k`` for the module's addition (or join) number k after the first
unit_name = string(rf"{MODULE_PATH}(?:@\d+)?",
                   meaning="a unit name such as 'layer1.0' or 'blocks.0@1' (a module path, then @ and a number)")
python_module = string(rf"{IDENTIFIER}(?:\.{IDENTIFIER})*", max_length=200, meaning="a Python module name")


def module_name(value: Any, key: str) -> None:
    """The attribute a new module gets in its block: a plain identifier that is not part of
    ``nn.Module`` itself (``forward``, ``training``, ``_modules``)."""
    string(IDENTIFIER, max_length=100, meaning="a plain attribute name such as 'se'")(value, key)
    if value.startswith("_") or hasattr(nn.Module, value):
        raise invalid(key, f"{value!r} is an attribute of every nn.Module, not a name a new module can take")


def _positions() -> Any:
    from .positions.base import registered

    return registered()


def _unit_kinds() -> Any:
    from .positions import UNIT_KINDS

    return UNIT_KINDS


def _inits() -> Any:
    from .attention import INITS

    return INITS


def _gates() -> Any:
    from .placement import GATES

    return ["", *GATES]


def _padding_arguments() -> Any:
    from .masking import PADDING_ARGUMENTS

    return PADDING_ARGUMENTS


# --- the tables ------------------------------------------------------------------------------------

#: the largest number a saved site, option or constructor keyword may hold (channels, classes)
MAX_WIDTH = 1 << 20
MAX_OPTION = 1024  # attention options are small numbers (kernel sizes, dilations): a module is built to check them
MAX_CREATE_INTEGER = 1 << 17  # constructor keywords: num_classes 21843 for ImageNet-21k, img_size 1024…

#: constructor keywords that make a library read a file or the network (timm's checkpoint_path loads a pickle)
LOADING_WORDS = ("path", "file", "url", "pretrained", "checkpoint", "cache", "weights", "overlay", "hub")


def create_kwargs(value: Any, key: str) -> None:
    """Constructor keywords: plain, bounded values under names that load nothing (``checkpoint_path``,
    ``pretrained_cfg_overlay``, ``weights``… would make the library read a file or the network)."""
    if not isinstance(value, dict) or len(value) > 100:
        raise invalid(key, f"must be an object of constructor keywords, got {_shown(value)}")
    for name, entry in value.items():
        if _loads(name, entry) or not name.isidentifier() or not _is_plain(entry):
            raise invalid(f"{key}.{name}", "in the config is refused: loading only passes plain constructor values "
                                           "(num_classes, in_chans…), never what makes a library read a file or "
                                           "the network")
        plain(max_integer=MAX_CREATE_INTEGER)(entry, f"{key}.{name}")


def _loads(name: str, value: Any) -> bool:
    """Whether constructor keyword ``name`` set to ``value`` may make the library read a file or the
    network: a keyword the libraries load weights with (:func:`se_retrofit.hub.loading_kwargs`) set to
    anything but None or False, or a name with a loading word (``model_file``, ``cache_dir``) set to
    anything but None, False or a number: a number (``drop_path_rate=0.1``) names nothing to read."""
    if value is None or value is False:
        return False  # weights_backbone: null loads nothing
    if loading_kwargs({name: value}):
        return True
    number = isinstance(value, (int, float)) and not isinstance(value, bool)
    return any(word in name.lower() for word in LOADING_WORDS) and not number


def _is_plain(value: Any) -> bool:
    if isinstance(value, list):
        return all(not isinstance(v, (list, dict)) and _is_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


attention_name = string(r"[A-Za-z0-9_][A-Za-z0-9_.:\-]*", max_length=100, meaning="an attention type name")
patterns = optional(list_of(string(max_length=1000), max_length=10_000))

#: RetrofitConfig, as :meth:`RetrofitConfig.to_dict` writes it
CONFIG: dict[str, Field] = {
    "attention": Field(attention_name),
    "position": Field(optional(choice(_positions, "position")), required=False),
    "reduction": Field(optional(integer(1, MAX_WIDTH)), required=False),
    "divisor": Field(optional(integer(1, MAX_WIDTH)), required=False),
    "stages": Field(optional(list_of(integer(1, 1000), min_length=1, max_length=1000)), required=False),
    "blocks": Field(patterns, required=False),
    "every": Field(optional(integer(1, 100_000)), required=False),
    "exclude": Field(patterns, required=False),
    "init": Field(choice(_inits, "init"), required=False),
    "options": Field(mapping(string(IDENTIFIER, max_length=100, meaning="an option name"),
                             plain(max_integer=MAX_OPTION), max_length=100), required=False),
    "kinds": Field(optional(list_of(choice(_unit_kinds, "unit kind"), min_length=1, max_length=10)), required=False),
    "max_attention_mib": Field(number(0, 1e9, above=True), required=False),
    "attention_module": Field(optional(python_module), required=False),
}

#: Site, as :meth:`Site.to_dict` writes it (keys after ``module_name`` came later and have defaults)
SITE: dict[str, Field] = {
    "block": Field(module_path),
    "add_index": Field(integer(0, 100_000)),
    "shortcut_arg": Field(integer(0, 1)),
    "position": Field(choice(_positions, "position")),
    "channels": Field(integer(1, MAX_WIDTH)),
    "spatial_dims": Field(integer(1, 3)),
    "stage": Field(integer(0, 100_000)),
    "module_name": Field(module_name),
    "channel_dim": Field(integer(-8, 8), required=False),
    "anchor": Field(optional(module_path), required=False),
    "attention_bytes": Field(optional(integer(0, 1 << 62)), required=False),
    "kind": Field(choice(_unit_kinds, "unit kind"), required=False),
    "gate": Field(choice(_gates, "gate"), required=False),
    "operand": Field(integer(0, 100_000), required=False),
    "unit": Field(unit_name, required=False),
    "in_place": Field(boolean, required=False),
    "edit": Field(one_of("rewrite", "wrap"), required=False),
    "wrap_module": Field(optional(module_path), required=False),
    "output_leaf": Field(integer(0, 10_000), required=False),
    "batch_dim": Field(integer(0, 8), required=False),
    "vector": Field(boolean, required=False),
    "padding_mask": Field(optional(choice(_padding_arguments, "padding mask argument")), required=False),
    "mask_from": Field(optional(module_path), required=False),
}

sites = list_of(section(SITE), min_length=1)

#: one earlier edit of a model retrofitted more than once
EARLIER: dict[str, Field] = {"config": Field(section(CONFIG)), "sites": Field(sites)}

SOURCES = ("timm", "torchvision", "transformers")

#: what is known of the base model (:func:`se_retrofit.core.describe_base`, the command line, recipes)
BASE: dict[str, Field] = {
    "class": Field(string(max_length=1000), required=False),
    "weights": Field(optional(string(max_length=10_000)), required=False),
    "name": Field(optional(string(r"[A-Za-z0-9_][A-Za-z0-9_.\-]*", max_length=200, meaning="a model name")),
                  required=False),
    "source": Field(optional(one_of(*SOURCES)), required=False),
    "pretrained_tag": Field(optional(string(max_length=200)), required=False),
    "create_kwargs": Field(optional(create_kwargs), required=False),
    "config": Field(optional(mapping(string(max_length=1000), lambda value, key: None)), required=False),
    "transformers_version": Field(optional(string(max_length=100)), required=False),
    "global_pool": Field(optional(string(IDENTIFIER, max_length=50, meaning="a timm pool type")), required=False),
}

#: one gate's state (not weights: folded or scaled after retrofit())
GATE: dict[str, Field] = {"scale": Field(number(-1e30, 1e30)), "offset": Field(number(-1e30, 1e30))}

FILES: dict[str, Field] = {"model": Field(one_of(MODEL_FILE)), "attention": Field(one_of(ATTENTION_FILE)),
                           "probe": Field(one_of(PROBE_FILE), required=False)}

SHA256 = string(r"[0-9a-f]{64}", max_length=64, meaning="a sha256 digest in hex")
#: one row of the module tree: [path, class, description]
TREE_ROW = list_of(string(max_length=100_000), min_length=3, max_length=3)
MODULE_TREE: dict[str, Field] = {"sha256": Field(SHA256), "modules": Field(list_of(TREE_ROW, max_length=1_000_000))}
#: the probe: its file's tensors and where it ran, or why it was skipped
PROBE: dict[str, Field] = {
    "file": Field(one_of(PROBE_FILE), required=False),
    "outputs": Field(integer(0, 10_000), required=False),
    "device": Field(string(IDENTIFIER, max_length=50, meaning="a device type"), required=False),
    "dtype": Field(string(r"torch\.[a-z0-9_]+", max_length=50, meaning="a torch dtype"), required=False),
    "skipped": Field(string(max_length=10_000), required=False),
}
def probe_entry(value: Any, key: str) -> None:
    """The probe: either why it was skipped, or all of its file, number of outputs, device and dtype."""
    section(PROBE)(value, key)
    parts = {"file", "outputs", "device", "dtype"}
    if set(value) != {"skipped"} and set(value) != parts:
        raise invalid(key, "must hold either 'skipped' alone or all of 'file', 'outputs', 'device' and 'dtype'")


#: the proof a saved model gives of itself (checked by load: see se_retrofit.io.check_module_tree, check_probe)
VERIFY: dict[str, Field] = {
    "module_tree": Field(section(MODULE_TREE)),
    "base_weights_sha256": Field(SHA256),
    "probe": Field(probe_entry),
}

def an_object(value: Any, key: str) -> None:
    if not isinstance(value, dict):
        raise invalid(key, f"must be an object, got {_shown(value)}")


#: the whole retrofit_config.json
TOP_LEVEL: dict[str, Field] = {
    "format": Field(one_of(*READABLE_FORMATS)),
    "config": Field(section(CONFIG)),
    "sites": Field(sites),
    "base": Field(an_object, required=False),  # checked by check_base where load rebuilds the base from it
    "earlier": Field(list_of(section(EARLIER), max_length=1000), required=False),
    "gates": Field(mapping(module_path, mapping(module_path, section(GATE), max_length=100)), required=False),
    "versions": Field(mapping(string(max_length=100), string(max_length=200), max_length=100), required=False),
    "files": Field(section(FILES), required=False),
    "verify": Field(section(VERIFY), required=False),  # written by every save of format 2
}

#: the part of it a RetrofitRecord is read from (RetrofitRecord.from_dict ignores the rest)
RECORD: dict[str, Field] = {key: TOP_LEVEL[key] for key in ("config", "sites", "base", "earlier")}


# --- whole documents -------------------------------------------------------------------------------

def check_saved_config(config: Any, where: str = CONFIG_FILE) -> None:
    """Refuse (:class:`SavedFormatError`) a saved config that is not what :func:`se_retrofit.save`
    writes: unknown or missing keys, wrong types, numbers out of range, names that are not allowed,
    sites on one module twice, gates of modules that no site adds (the ``base`` section is checked
    by :func:`check_base`, where load rebuilds the base from it)."""
    with reported(where):
        if not isinstance(config, dict):
            raise invalid("the config", f"must be a JSON object, got {_shown(config)}")
        if config.get("format") not in READABLE_FORMATS:
            raise invalid("format", f"is {_shown(config.get('format'))}, expected {FORMAT!r}")
        if config.get("format") == FORMAT and "verify" not in config:
            raise invalid("the config", "lacks the key verify (the proof every save of this format writes); pass "
                                        "verify=False to load without it")
        section(TOP_LEVEL)(config, "")
        _check_names(config)
        paths = {_site_path(site) for site in _all_sites(config)}
        for path in config.get("gates", {}):
            if path not in paths:
                raise invalid(f"gates.{path}", "names no module that a site adds")


def check_record(data: Any, where: str = "the retrofit record") -> None:
    """:func:`check_saved_config` for the part a :class:`~se_retrofit.RetrofitRecord` is read from
    (``config``, ``sites``, ``base``, ``earlier``; other keys are left to the caller)."""
    with reported(where):
        if not isinstance(data, dict):
            raise invalid("the record", f"must be a JSON object, got {_shown(data)}")
        section(RECORD)({k: v for k, v in data.items() if k in RECORD}, "the record")
        _check_names(data)


def check_site(data: Any, where: str = "the retrofit record", key: str = "sites[0]") -> None:
    """One site's keys, types and ranges."""
    with reported(where):
        section(SITE)(data, key)


def check_config_section(data: Any, where: str = "the retrofit record", key: str = "config") -> None:
    """The keys, types and ranges of one saved :class:`~se_retrofit.RetrofitConfig`."""
    with reported(where):
        section(CONFIG)(data, key)


def _all_sites(data: dict[str, Any]) -> list[dict[str, Any]]:
    return [*(s for e in data.get("earlier", []) for s in e["sites"]), *data["sites"]]


def _site_path(site: dict[str, Any]) -> str:
    return f"{site['block']}.{site['module_name']}" if site["block"] else site["module_name"]


def _check_names(data: dict[str, Any]) -> None:
    """No two sites add one module; the recorded base model is one its library has."""
    seen: set[str] = set()
    for site in _all_sites(data):
        path = _site_path(site)
        if path in seen:
            raise invalid("sites", f"add the module {path!r} twice")
        seen.add(path)


def check_base(base: Any, where: str = CONFIG_FILE) -> None:
    """The ``base`` section, checked where :func:`se_retrofit.load` rebuilds the base model from it (with
    ``base_model=`` it is only a description): known keys, plain and bounded constructor keywords, and
    a model name its library has (``os.system`` is not a timm model)."""
    with reported(where, FIX_BASE):
        section(BASE)(base, "base")
        _check_base_name(base)


def _check_base_name(base: dict[str, Any]) -> None:
    name, source = base.get("name"), base.get("source")
    if not name or source not in ("timm", "torchvision"):
        return
    if source == "timm":
        import timm

        known = timm.is_model(name)
    else:
        import torchvision

        known = name in torchvision.models.list_models()
    if not known:
        raise invalid("base.name", f"{name!r} is not a {source} model")


# --- building from a well-formed record ------------------------------------------------------------

#: what building a model or inserting a module raises when the record does not fit the model
MISMATCH_ERRORS = (AttributeError, KeyError, IndexError, TypeError, ValueError, RuntimeError, NotImplementedError)


@contextlib.contextmanager
def record_mismatch(where: str, key: str) -> Iterator[None]:
    """Turn what goes wrong while a well-formed record is applied (a module path that is not in the
    model, an operand that does not exist, a constructor keyword the model does not take) into a
    :class:`SavedFormatError` naming ``key``; se_retrofit's own errors pass unchanged.

    Example:
        >>> with record_mismatch("retrofit_config.json", "base.create_kwargs"):
        ...     dict(bogus=1)["num_classes"]
        Traceback (most recent call last):
        ...
        se_retrofit.saved_format.SavedFormatError: retrofit_config.json: base.create_kwargs does not fit the model (KeyError: 'num_classes'); the saved directory was changed or damaged: save the model again (or restore its files)
    """
    try:
        yield
    except RetrofitError:
        raise
    except MISMATCH_ERRORS as error:
        raise refuse(where, f"{key} does not fit the model ({type(error).__name__}: {first_sentence(error)})") \
            from None
