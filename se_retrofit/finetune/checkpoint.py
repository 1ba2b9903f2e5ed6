"""Checkpoints written atomically each epoch, and the checks made before resuming from one.

A checkpoint holds the model, optimiser, scheduler and gradient-scaler states, the last finished
epoch and its phase, the random-number states of every process, the metrics so far, and the
recipe it was made for. It is written to a temporary file in the same directory, flushed to disk
and renamed over the old one (``os.replace``), so a run killed at any moment leaves either the
previous checkpoint or the new one, never a torn file.

Example:
    >>> import tempfile, pathlib
    >>> path = pathlib.Path(tempfile.mkdtemp()) / "notes.txt"
    >>> atomic_write(path, lambda f: f.write(b"epoch 3"))
    >>> path.read_bytes(), sorted(p.name for p in path.parent.iterdir())
    (b'epoch 3', ['notes.txt'])
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any, BinaryIO, Callable, Iterator

import torch

from ..errors import RetrofitError
from ..io import default_file_mode
from .recipe import Recipe, recipe_differences

FORMAT = "se_retrofit.finetune/1"
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RetrofitError):
    """A checkpoint is missing, unreadable, or belongs to another recipe (its message is always one line,
    whatever values of a damaged file it quotes)."""

    def __init__(self, message: str):
        super().__init__(" ".join(str(message).split()))


def atomic_write(path: str | os.PathLike, write: Callable[[BinaryIO], Any]) -> None:
    """Call ``write(file)`` on a temporary file next to ``path``, then rename it to ``path``."""
    path = Path(path)
    handle, temp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(handle, "wb") as file:
            write(file)
            file.flush()
            os.fsync(file.fileno())
        os.chmod(temp, default_file_mode())
        os.replace(temp, path)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise


def rng_state() -> dict[str, Any]:
    """This process's random states: Python's, torch's CPU generator and (when present) CUDA's."""
    state = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: dict[str, Any]) -> None:
    """Restore what :func:`rng_state` captured (CUDA's only where this process has the same GPUs)."""
    python = state["python"]
    random.setstate((python[0], tuple(python[1]), python[2]))
    torch.set_rng_state(state["torch"])
    cuda = state.get("cuda")
    if cuda is not None and torch.cuda.is_available() and len(cuda) == torch.cuda.device_count():
        torch.cuda.set_rng_state_all(cuda)


def save_checkpoint(directory: str | os.PathLike, state: dict[str, Any]) -> Path:
    """Write ``state`` (see :func:`make_state`) to ``directory/checkpoint.pt`` atomically."""
    path = Path(directory) / CHECKPOINT_FILE
    atomic_write(path, lambda file: torch.save(state, file))
    return path


def make_state(recipe: Recipe, run: dict[str, Any], *, epoch: int, phase: int, model, optimizer, scheduler,
               scaler, rng: list[dict[str, Any]], metrics: list[dict[str, Any]]) -> dict[str, Any]:
    """Everything needed to continue after ``epoch`` (1-based, finished)."""
    return {"format": FORMAT, "recipe": recipe.identity(), "fingerprint": recipe.fingerprint(), "run": run,
            "epoch": epoch, "phase": phase, "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "scheduler": scheduler.state_dict(), "scaler": scaler.state_dict() if scaler is not None else None,
            "rng": rng, "metrics": metrics}


def load_checkpoint(directory: str | os.PathLike, recipe: Recipe, run: dict[str, Any]) -> dict[str, Any]:
    """Read ``directory/checkpoint.pt`` and check it was made by ``recipe`` on the same data.

    ``run`` holds what the data decided (classes, num_classes); a checkpoint made with other
    classes or another recipe (another name, model, retrofit, schedule or override) is refused
    with the keys that differ.
    """
    path = Path(directory) / CHECKPOINT_FILE
    if not path.is_file():
        kind = "is not a regular file" if os.path.lexists(path) else "does not exist"
        raise CheckpointError(f"nothing to resume: {path} {kind} (start without --resume)")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # the error below says what is wrong; no torch warning before it
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: "
                              f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a se-retrofit finetune checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else None!r}, expected {FORMAT!r})")
    check_state(state, path, recipe)
    if state["fingerprint"] != recipe.fingerprint():
        differences = recipe_differences(state["recipe"], recipe.identity())
        raise CheckpointError(f"checkpoint {path} belongs to another recipe: {state['recipe'].get('name')!r} with "
                              f"{'; '.join(differences[:4])}{' …' if len(differences) > 4 else ''} (checkpoint vs "
                              "this run). Resume with the same recipe and overrides, or choose another --out")
    for key in ("classes", "num_classes"):
        if state["run"].get(key) != run.get(key):
            raise CheckpointError(f"checkpoint {path} was made with {key} {state['run'].get(key)!r}, this data "
                                  f"gives {run.get(key)!r}; resume on the same data or choose another --out")
    return state


# --- the checkpoint's schema: every key, type and range, checked in one place ---------------------------

def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _tensor_dict(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in value.items())


def _rng_entry(value: Any) -> bool:
    if not isinstance(value, dict) or set(value) - {"python", "torch", "cuda"} or "python" not in value:
        return False
    python, cpu = value["python"], value.get("torch")
    ok_python = (isinstance(python, (tuple, list)) and len(python) == 3 and _is_int(python[0])
                 and isinstance(python[1], (tuple, list)) and len(python[1]) == 625
                 and all(_is_int(x) and 0 <= x < 2 ** 32 for x in python[1]) and 0 <= python[1][-1] <= 624
                 and (python[2] is None or isinstance(python[2], float)))
    ok_torch = (isinstance(cpu, torch.Tensor) and cpu.dtype == torch.uint8 and cpu.dim() == 1
                and cpu.numel() == torch.get_rng_state().numel())
    cuda = value.get("cuda")
    ok_cuda = cuda is None or (isinstance(cuda, (list, tuple)) and all(isinstance(t, torch.Tensor)
                                                                      and t.dtype == torch.uint8 for t in cuda))
    return ok_python and ok_torch and ok_cuda


def _metrics_row(value: Any) -> bool:
    return isinstance(value, dict) and all(isinstance(k, str) for k in value) and _is_int(value.get("epoch"))


def check_state(state: dict[str, Any], path: Path, recipe: Recipe) -> None:
    """Raise :class:`CheckpointError` unless ``state`` has every key of :func:`make_state` with the right
    type and range for ``recipe`` (epoch, phase, metrics and random states consistent with each other)."""
    total = recipe.total_epochs

    def bad(key: str, wanted: str) -> CheckpointError:
        value = repr(state.get(key))
        return CheckpointError(f"checkpoint {path} is damaged: {key!r} is {value[:60]}{'…' if len(value) > 60 else ''},"
                               f" expected {wanted}; start again with --overwrite (or restore the file)")

    missing = [key for key in ("recipe", "fingerprint", "run", "epoch", "phase", "model", "optimizer",
                               "scheduler", "rng", "metrics") if key not in state]
    if missing:
        raise CheckpointError(f"checkpoint {path} is damaged: no {', '.join(map(repr, missing))}; start again with "
                              "--overwrite (or restore the file)")
    checks = [
        ("fingerprint", lambda v: isinstance(v, str), "a string"),
        ("recipe", lambda v: isinstance(v, dict), "a mapping"),
        ("run", lambda v: isinstance(v, dict) and isinstance(v.get("weights"), str)
         and (v.get("classes") is None or (isinstance(v["classes"], list) and all(isinstance(c, str)
                                                                                   for c in v["classes"])))
         and (v.get("num_classes") is None or _is_int(v["num_classes"])), "a mapping with weights, classes, "
                                                                          "num_classes"),
        ("epoch", lambda v: _is_int(v) and 1 <= v < total, f"a finished epoch from 1 to {total - 1}"),
        ("phase", lambda v: _is_int(v) and v == recipe.epoch_phases()[state["epoch"] - 1],
         "the phase of its epoch"),
        ("model", _tensor_dict, "a state dict of tensors"),
        ("optimizer", lambda v: isinstance(v, dict) and isinstance(v.get("state"), dict)
         and isinstance(v.get("param_groups"), list) and len(v["param_groups"]) > 0
         and all(isinstance(g, dict) and isinstance(g.get("params"), list) for g in v["param_groups"]),
         "an optimiser state dict"),
        ("scheduler", lambda v: isinstance(v, dict) and _is_int(v.get("last_epoch")) and v["last_epoch"] >= 0,
         "a scheduler state dict"),
        ("scaler", lambda v: v is None or isinstance(v, dict), "None or a gradient-scaler state dict"),
        ("rng", lambda v: isinstance(v, list) and 1 <= len(v) <= 65536 and all(_rng_entry(e) for e in v),
         "one random state per process"),
        ("metrics", lambda v: isinstance(v, list) and len(v) == state["epoch"] and all(_metrics_row(r) for r in v)
         and [r["epoch"] for r in v] == list(range(1, len(v) + 1)), "one metrics row per finished epoch"),
    ]
    for key, test, wanted in checks:
        if not test(state.get(key)):
            raise bad(key, wanted)


@contextlib.contextmanager
def restoring(path: str | os.PathLike, what: str) -> Iterator[None]:
    """A context in which applying part of a checkpoint (model weights, optimiser, random states) that
    does not fit this run becomes a :class:`CheckpointError` naming ``what``."""
    try:
        yield
    except RetrofitError:
        raise
    except Exception as error:
        path = Path(path)
        text = str(error).strip().splitlines()[0] if str(error).strip() else ""
        raise CheckpointError(f"checkpoint {path / CHECKPOINT_FILE if path.is_dir() else path} "
                              f"does not fit this run: its {what} cannot be restored ({type(error).__name__}: "
                              f"{text[:200]}); start again with --overwrite (or restore the file)") from None
