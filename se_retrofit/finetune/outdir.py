"""The output directory of a fine-tuning run: held by one run at a time, and a record of what it wrote.

* :func:`hold` takes ``OUT/.se-retrofit.lock`` (created with ``O_EXCL``, holding the PID) for the
  run's whole life and removes it on exit; a lock whose PID is dead is stale and taken over. A second
  run on the same directory is refused before it builds anything.
* :func:`record` writes ``OUT/.se-retrofit-manifest.json``: the names of the files this tool writes
  there. ``--overwrite`` removes only those (:func:`check_replaceable` refuses anything else, with the
  path), and a directory with a manifest but no checkpoint is this tool's unfinished run (a
  ``kill -9`` before the first epoch ended), which a new run may take over.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> with hold(out):
    ...     (out / LOCK_FILE).exists()
    True
    >>> (out / LOCK_FILE).exists()
    False
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path
from typing import Iterable, Iterator

from ..errors import RetrofitError
from ..io import process_alive, replaceable

LOCK_FILE = ".se-retrofit.lock"
MANIFEST_FILE = ".se-retrofit-manifest.json"


class OutDirError(RetrofitError):
    """The output directory is in use by another run, or holds files this tool did not write."""


def _holder(lock: Path) -> int | None:
    try:
        text = lock.read_text().strip()
    except (OSError, UnicodeDecodeError):
        return None
    return int(text) if text.isdigit() and 0 < int(text) < 2 ** 31 else None


def _take(lock: Path) -> bool:
    try:
        handle = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
    except FileExistsError:
        return False
    with os.fdopen(handle, "w") as file:
        file.write(f"{os.getpid()}\n")
    return True


@contextlib.contextmanager
def hold(out: Path) -> Iterator[Path]:
    """Hold ``out`` (created if needed) for the duration of the block; refuse if a live run holds it."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    lock = out / LOCK_FILE
    for _ in range(3):
        if _take(lock):
            break
        pid = _holder(lock)
        if pid is not None and pid != os.getpid() and process_alive(pid):
            raise OutDirError(f"{out} is in use by another se-retrofit finetune run (PID {pid}); wait for it to "
                              "finish or choose another --out")
        if pid is None and lock.exists() and lock.stat().st_size == 0:
            continue  # being written by the run that just created it; look again
        lock.unlink(missing_ok=True)  # stale: its run is dead
    else:
        raise OutDirError(f"{out} is in use by another se-retrofit finetune run (lock {lock}); choose another --out")
    try:
        yield out
    finally:
        if _holder(lock) == os.getpid():
            lock.unlink(missing_ok=True)


def read_manifest(out: Path) -> set[str]:
    """The names this tool wrote in ``out`` (empty when there is no readable manifest)."""
    try:
        data = json.loads((Path(out) / MANIFEST_FILE).read_text())
    except (OSError, ValueError):
        return set()
    files = data.get("files") if isinstance(data, dict) else None
    return {name for name in files if isinstance(name, str)} if isinstance(files, list) else set()


def record(out: Path, names: Iterable[str]) -> None:
    """Add ``names`` to ``out``'s manifest (before they are written, so a killed run still owns them)."""
    files = sorted(read_manifest(out) | set(names))
    path = Path(out) / MANIFEST_FILE
    temp = path.with_name(f"{MANIFEST_FILE}.{os.getpid()}.tmp")
    temp.write_text(json.dumps({"tool": "se_retrofit.finetune", "files": files}, indent=1) + "\n")
    os.replace(temp, path)


def check_replaceable(out: Path, names: Iterable[str]) -> list[Path]:
    """The existing paths among ``out/NAME`` that ``--overwrite`` may remove; :class:`OutDirError` for the
    first one this tool did not write (not in the manifest, a symbolic link, or a ``model`` directory that
    is not a saved model)."""
    owned, found = read_manifest(out), []
    for name in names:
        path = Path(out) / name
        if not os.path.lexists(path):
            continue
        if name not in owned or path.is_symlink() or (path.is_dir() and not replaceable(path)):
            raise OutDirError(f"{path} was not written by se-retrofit finetune (no record of it in "
                              f"{Path(out) / MANIFEST_FILE}); refusing to remove it with --overwrite (remove it "
                              "yourself or choose another --out)")
        found.append(path)
    return found


def remove(paths: Iterable[Path]) -> None:
    """Remove ``paths`` (checked by :func:`check_replaceable`)."""
    for path in paths:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)
        else:
            path.unlink(missing_ok=True)


def unfinished(out: Path, names: Iterable[str], checkpoint: str) -> bool:
    """Whether ``out`` holds only an unfinished run of this tool: every run file it holds is in the
    manifest, and there is no checkpoint (killed before its first epoch ended) and no final model."""
    owned = read_manifest(out)
    present = [name for name in names if os.path.lexists(Path(out) / name)]
    return bool(owned) and checkpoint not in present and "model" not in present and set(present) <= owned

