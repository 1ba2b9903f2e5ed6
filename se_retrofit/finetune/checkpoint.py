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

import os
import random
import tempfile
from pathlib import Path
from typing import Any, BinaryIO, Callable

import torch

from ..errors import RetrofitError
from ..io import default_file_mode
from .recipe import Recipe, recipe_differences

FORMAT = "se_retrofit.finetune/1"
CHECKPOINT_FILE = "checkpoint.pt"


class CheckpointError(RetrofitError):
    """A checkpoint is missing, unreadable, or belongs to another recipe."""


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
        raise CheckpointError(f"nothing to resume: {path} does not exist (start without --resume)")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:
        raise CheckpointError(f"cannot read checkpoint {path}: {type(error).__name__}: "
                              f"{str(error).strip().splitlines()[0] if str(error).strip() else ''}") from None
    if not isinstance(state, dict) or state.get("format") != FORMAT:
        raise CheckpointError(f"{path} is not a se-retrofit finetune checkpoint (format "
                              f"{state.get('format') if isinstance(state, dict) else None!r}, expected {FORMAT!r})")
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
