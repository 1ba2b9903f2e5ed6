"""Fuzzing se_retrofit.load: mutate a valid saved directory and classify what loading it does.

Shared by tests/test_load_fuzz.py (a few hundred examples in CI) and benchmarks/fuzz_load.py
(thousands). Every outcome must be one of

* ``exact``: the model loads and computes exactly what the saved model computed on a fixed input;
* ``refused``: a :class:`se_retrofit.RetrofitError` whose message is one line;

never ``differs`` (it loads and computes something else, or fails when run: a silent success) nor
``other`` (any other exception, a multi-line message, or a hang past :data:`SECONDS`).
"""
from __future__ import annotations

import contextlib
import copy
import json
import os
import shutil
import signal
import struct
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import se_retrofit
from se_retrofit.saved_format import CONFIG_FILE, MODEL_FILE

SECONDS = 30  # one load of the small model takes about 0.05 s; past this it is a hang
OUTCOMES = ("exact", "refused", "differs", "other")


def make_saved(directory: Path) -> tuple[Path, torch.Tensor, torch.Tensor]:
    """Save a small timm ResNet edited twice (so ``earlier`` is there), its attention weights and
    one gate moved off their identity start as fine-tuning would; returns the directory, a fixed
    input and the saved model's output on it (eval mode)."""
    import timm

    torch.manual_seed(0)
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(1))
    base = timm.create_model("test_resnet", num_classes=10)
    model = se_retrofit.retrofit(base, stages=[1, 2], example_input=x)
    model = se_retrofit.retrofit(model, attention="eca", stages=[3, 4], example_input=x)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if ".se." in name or ".eca." in name:
                parameter.add_(torch.randn_like(parameter) * 0.1)
    gate = next(m for m in model.modules() if type(m).__name__ == "Gate")
    gate.scale = 1.75
    saved = se_retrofit.save(model.eval(), directory / "saved")
    with torch.no_grad():
        return saved, x, model(x)


# --- mutations -------------------------------------------------------------------------------------

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats(allow_nan=True, allow_infinity=True)
    | st.text(max_size=12) | st.sampled_from(["", "se", "a.b", "forward", "layer1.0", "64", "timm", "os.system"]),
    lambda children: st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=8)


def paths(value: Any, prefix: tuple = ()) -> list[tuple]:
    """Every path to a value inside ``value`` (keys and indices), the root first."""
    found = [prefix]
    if isinstance(value, dict):
        for key, child in value.items():
            found += paths(child, prefix + (key,))
    elif isinstance(value, list):
        for index, child in enumerate(value):
            found += paths(child, prefix + (index,))
    return found


def get(value: Any, path: tuple) -> Any:
    for step in path:
        value = value[step]
    return value


def put(document: Any, path: tuple, new: Any) -> Any:
    if not path:
        return new
    get(document, path[:-1])[path[-1]] = new
    return document


def mutate_json(document: Any, data: st.DataObject) -> Any:
    """One mutation of a JSON document: a value replaced by random JSON of any type, a key dropped,
    added or renamed, a value wrapped in a list or an object, or a list or object emptied."""
    document = copy.deepcopy(document)
    path = data.draw(st.sampled_from(paths(document)), label="path")
    target = get(document, path)
    kind = data.draw(st.sampled_from(["replace", "nudge", "drop", "add", "rename", "wrap", "empty"]), label="mutation")
    if kind == "nudge" and isinstance(target, (int, float, str)):  # a plausible value of the same type
        return put(document, path, data.draw(_near(target), label="value"))
    if kind in ("replace", "nudge") or (kind in ("drop", "add", "rename") and not isinstance(target, dict)) \
            or (kind in ("drop", "rename") and not target):
        return put(document, path, data.draw(json_values, label="value"))
    if kind == "drop":
        del target[data.draw(st.sampled_from(sorted(target)), label="key")]
    elif kind == "add":
        target[data.draw(st.text(max_size=12) | st.sampled_from(_KNOWN_KEYS), label="key")] = \
            data.draw(json_values, label="value")
    elif kind == "rename":
        old = data.draw(st.sampled_from(sorted(target)), label="key")
        new = data.draw(st.text(max_size=12) | st.sampled_from(_KNOWN_KEYS), label="new key")
        target[new] = target.pop(old)
    elif kind == "wrap":
        return put(document, path, data.draw(st.sampled_from([[target], {"value": target}]), label="wrapper"))
    else:
        return put(document, path, type(target)() if isinstance(target, (dict, list)) else None)
    return document


def _near(value: Any) -> st.SearchStrategy:
    if isinstance(value, bool):
        return st.just(not value)
    if isinstance(value, int):
        return st.integers(value - 2, value + 2) | st.sampled_from([0, 1, -1, 2 * value])
    if isinstance(value, float):
        return st.floats(-4, 4) | st.sampled_from([0.0, 1.0, 2.0, -value, value * 2])
    return st.sampled_from(["", "se", "eca", "cbam", "post", "pre", "standard", "identity", "inner", "child",
                            "output", "cat", "join", "chain", "layer1.0", "layer2.0", "act1", "conv1", "resnet18",
                            "F16", "I32", "BF16", "U8", value + "x"])


_KNOWN_KEYS = ["format", "config", "sites", "base", "earlier", "gates", "files", "versions", "block", "channels",
               "module_name", "scale", "offset", "dtype", "shape", "data_offsets", "__metadata__", "name",
               "create_kwargs", "num_classes", "position", "options"]


def mutate_config(directory: Path, data: st.DataObject) -> None:
    file = directory / CONFIG_FILE
    how = data.draw(st.sampled_from(["json", "json", "json", "json", "bytes", "deep"]), label="config mutation")
    if how == "json":
        document = mutate_json(json.loads(file.read_text()), data)
        file.write_text(json.dumps(document, allow_nan=True))
    elif how == "deep":
        levels = data.draw(st.sampled_from([65, 1000, 200_000]), label="depth")
        file.write_text("[" * levels + "]" * levels)
    else:
        file.write_bytes(mutate_bytes(file.read_bytes(), data))


def mutate_bytes(content: bytes, data: st.DataObject) -> bytes:
    """Truncated, cut at a point and something random inserted, or bytes overwritten."""
    at = data.draw(st.integers(0, len(content)), label="offset")
    how = data.draw(st.sampled_from(["truncate", "insert", "overwrite"]), label="bytes mutation")
    if how == "truncate":
        return content[:at]
    junk = data.draw(st.binary(min_size=1, max_size=16) | st.sampled_from([b"\xff", b"\x00", b"NaN", b'"a":1,']),
                     label="bytes")
    return content[:at] + junk + content[at + (len(junk) if how == "overwrite" else 0):]


def mutate_weights(directory: Path, data: st.DataObject) -> None:
    """The header of model.safetensors (its length prefix, its JSON: dtypes, shapes, offsets, names),
    the file truncated, or the file replaced by something that is not a regular file."""
    file = directory / MODEL_FILE
    content = file.read_bytes()
    (length,) = struct.unpack("<Q", content[:8])
    header, body = json.loads(content[8:8 + length]), content[8 + length:]
    how = data.draw(st.sampled_from(["header", "header", "prefix", "truncate", "header bytes", "kind"]),
                    label="weights mutation")
    if how == "header":
        encoded = json.dumps(mutate_json(header, data), allow_nan=True).encode()
        file.write_bytes(struct.pack("<Q", len(encoded)) + encoded + body)
    elif how == "prefix":
        new = data.draw(st.integers(0, 2**64 - 1) | st.integers(max(0, length - 16), length + 16), label="length")
        file.write_bytes(struct.pack("<Q", new) + content[8:])
    elif how == "truncate":
        file.write_bytes(content[:data.draw(st.integers(0, len(content) - 1), label="size")])
    elif how == "header bytes":
        file.write_bytes(content[:8] + mutate_bytes(content[8:8 + length], data) + body)
    else:
        replace_file(file, data.draw(st.sampled_from(["missing", "empty", "directory", "fifo", "/dev/zero",
                                                      "dangling link", "link loop"]), label="file kind"))


def replace_file(file: Path, kind: str) -> None:
    file.unlink()
    if kind == "empty":
        file.write_bytes(b"")
    elif kind == "directory":
        file.mkdir()
    elif kind == "fifo":
        os.mkfifo(file)
    elif kind == "/dev/zero":
        file.symlink_to("/dev/zero")
    elif kind == "dangling link":
        file.symlink_to(file.with_name("nowhere"))
    elif kind == "link loop":
        file.symlink_to(file)


# --- running one example ---------------------------------------------------------------------------

class Hang(Exception):
    """An example ran past :data:`SECONDS`."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    def expire(*_):
        raise Hang(f"no outcome after {seconds} s")

    previous = signal.signal(signal.SIGALRM, expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def outcome(directory: Path, x: torch.Tensor, expected: torch.Tensor) -> tuple[str, str]:
    """``(class, detail)`` of loading ``directory``: see the module docstring."""
    try:
        with time_limit(SECONDS):
            model = se_retrofit.load(directory)
            try:
                with torch.no_grad():
                    got = model.eval()(x)
            except Exception as error:
                return "differs", f"loads, then fails when run: {type(error).__name__}: {error}"
    except se_retrofit.RetrofitError as error:
        message = str(error)
        if "\n" in message or not message.strip():
            return "other", f"{type(error).__name__} message is not one line: {message!r}"
        return "refused", f"{type(error).__name__}: {message}"
    except Exception as error:  # a Hang too
        return "other", f"{type(error).__name__}: {error}"
    if isinstance(got, torch.Tensor) and got.shape == expected.shape and torch.equal(got, expected):
        return "exact", ""
    return "differs", "loads and computes something else"


def what_changed(saved: Path, mutated: Path) -> str:
    """The config values that differ (by path), or which file changed, to report a failing example."""
    try:
        before, after = (json.loads((d / CONFIG_FILE).read_text()) for d in (saved, mutated))
    except ValueError:
        return f"{CONFIG_FILE} made unreadable"
    if before == after:
        return f"{MODEL_FILE} changed"
    flat = {}
    for name, document in (("before", before), ("after", after)):
        flat[name] = {p: get(document, p) for p in paths(document) if not isinstance(get(document, p), (dict, list))}
    changed = [p for p in flat["before"].keys() | flat["after"].keys()
               if flat["before"].get(p, "∅") != flat["after"].get(p, "∅")]
    return "; ".join(f"{'.'.join(map(str, p))}: {flat['before'].get(p, '∅')!r} -> {flat['after'].get(p, '∅')!r}"
                     for p in sorted(changed, key=str)[:3]) or "a container changed"


def fuzz(saved: Path, x: torch.Tensor, expected: torch.Tensor, workdir: Path, *, max_examples: int,
         counts: Counter, check: Callable[[str, str], None] = lambda kind, detail: None):
    """A Hypothesis test over ``max_examples`` mutations of ``saved``; counts each outcome class in
    ``counts`` and calls ``check(class, detail)`` (which may fail the example)."""
    @settings(max_examples=max_examples, deadline=None, derandomize=True, database=None,
              suppress_health_check=list(HealthCheck))
    @given(data=st.data())
    def run(data: st.DataObject) -> None:
        directory = workdir / "mutated"
        if directory.exists() or directory.is_symlink():
            shutil.rmtree(directory)
        shutil.copytree(saved, directory)
        target = data.draw(st.sampled_from(["config", "config", "weights"]), label="file")
        (mutate_config if target == "config" else mutate_weights)(directory, data)
        kind, detail = outcome(directory, x, expected)
        if kind in ("differs", "other"):
            detail = f"{detail} [after {what_changed(saved, directory)}]"
        counts[kind] += 1
        check(kind, detail)

    return run
