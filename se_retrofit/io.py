"""Save and load edited models: full and attention-only safetensors plus a JSON config.

A saved directory holds:

* ``model.safetensors``: every weight of the edited model;
* ``attention.safetensors``: the new attention weights alone (an adapter, as in PEFT);
* ``retrofit_config.json``: base model (name, source, where its weights came from, library
  versions), attention type, position, r, stages, init and the list of sites.

Loading re-creates the base model (or takes one you pass), re-applies the recorded sites and loads
the weights strictly. Writes go to a hidden sibling directory that is renamed into place at the
end, so an interrupted save never leaves a directory that looks complete.
"""
from __future__ import annotations

import contextlib
import copy
import ctypes
import errno
import json
import os
import re
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Any, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import RetrofitError
from ._version import __version__
from .attention._layers import gate_state, set_gate_state
from .config import RetrofitRecord
from . import hf
from .copying import deepcopy_module
from .core import apply_record, record_of
from .training import attention_state_dict
from .hub import ModelRef, WeightsError, check_state_dict, create, first_sentence

from .saved_format import (ATTENTION_FILE, CONFIG_FILE, FORMAT, MODEL_FILE, check_base, check_dtypes,
                           read_config_file, read_weights, record_mismatch)


class SaveError(RetrofitError):
    """The edited model cannot be saved where asked."""


def save(model: nn.Module, path: str | os.PathLike, *, overwrite: bool = False) -> Path:
    """Write ``model`` (edited by :func:`se_retrofit.retrofit`) to the directory ``path``.

    All or nothing: the files are written in a hidden staging directory next to ``path``, which is
    renamed into place at the end. Without ``overwrite`` an existing ``path`` is never replaced,
    even one that appears while the files are being written (the final rename refuses); with it,
    only a saved se_retrofit model or an empty directory is replaced, never a file or another
    directory. Staging directories of saves that were killed are removed by the next save.

    Example:
        >>> import tempfile, timm, se_retrofit
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18"))
        >>> out = se_retrofit.save(model, tempfile.mkdtemp() + "/resnet18-se")
        >>> sorted(p.name for p in out.iterdir())
        ['attention.safetensors', 'model.safetensors', 'retrofit_config.json']
    """
    record = record_of(model)
    path = Path(path)
    with staging_dir(path, overwrite) as staging:
        _write(model, record, staging)
        _set_default_permissions(staging)
        _replace_dir(staging, path, overwrite)
    return path


def _write(model: nn.Module, record: RetrofitRecord, directory: Path) -> None:
    state = _unshared(model.state_dict())
    save_file(state, str(directory / MODEL_FILE), metadata={"format": FORMAT})
    save_file(attention_state_dict(model), str(directory / ATTENTION_FILE), metadata={"format": FORMAT})
    gates = {site.module_path: gate_state(model.get_submodule(site.module_path)) for site in record.all_sites}
    config = {"format": FORMAT, **record.to_dict(), "gates": {k: v for k, v in gates.items() if v},
              "versions": library_versions(), "files": {"model": MODEL_FILE, "attention": ATTENTION_FILE}}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def _set_default_permissions(directory: Path) -> None:
    """mkdtemp makes private files; give the result the permissions a plain mkdir would."""
    directory.chmod(0o777 & ~current_umask())
    for file in directory.iterdir():
        file.chmod(default_file_mode())


def current_umask() -> int:
    """The process's umask (reading it means setting it; it is put back at once)."""
    umask = os.umask(0)
    os.umask(umask)
    return umask


def default_file_mode() -> int:
    """The mode a plain ``open(path, "w")`` gives a new file: temporary files are made private."""
    return 0o666 & ~current_umask()


def _unshared(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Safetensors refuses tensors sharing memory (tied weights): give each its own copy."""
    seen: set[int] = set()
    out = {}
    for key, tensor in state.items():
        pointer = tensor.untyped_storage().data_ptr() if tensor.numel() else -1
        out[key] = tensor.detach().clone().contiguous() if pointer in seen else tensor.detach().contiguous()
        seen.add(pointer)
    return out


STAGING_TAG = "se-retrofit"  # staging names: .NAME.se-retrofit-PID-RANDOM.partial (and .old)


def check_target(path: str | os.PathLike, overwrite: bool) -> None:
    """Refuse, before anything is built or written, a ``path`` that :func:`save` would refuse.

    Raises :class:`SaveError` when ``path`` is the current directory (or holds it), exists and
    ``overwrite`` is false, is a file or a directory other than a saved model or an empty one, or
    lies under a file or a directory that cannot be written.
    """
    path = Path(path)
    absolute = Path(os.path.abspath(path))
    cwd = Path.cwd()
    if absolute == cwd or absolute in cwd.parents:
        raise SaveError(f"refusing to save to {path}: it is the current directory or holds it; name a new "
                        "directory such as ./model-se")
    if os.path.lexists(path):
        if not overwrite:
            raise SaveError(f"{path} already exists; choose another directory or pass overwrite=True")
        if path.is_symlink() or not path.is_dir():
            raise SaveError(f"{path} is a file, not a saved model directory; refusing to replace it (remove it "
                            "yourself or choose another directory)")
        if not _replaceable(path):
            raise SaveError(f"{path} is a directory that is not a saved se_retrofit model (no {CONFIG_FILE}); "
                            "refusing to replace it (remove it yourself or choose another directory)")
    ancestor = absolute.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SaveError(f"cannot save to {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SaveError(f"cannot save to {path}: {ancestor} is not writable")


def _replaceable(path: Path) -> bool:
    """A directory ``save(..., overwrite=True)`` may replace: a saved model, or an empty directory."""
    try:
        return (path / CONFIG_FILE).is_file() or not any(path.iterdir())
    except OSError:
        return False


@contextlib.contextmanager
def staging_dir(path: Path, overwrite: bool) -> Iterator[Path]:
    """A fresh hidden directory next to ``path`` to write into; removed afterwards whatever happens,
    with the parent directories it had to create (when nothing was saved), and OS errors turned
    into :class:`SaveError`. Stale staging directories of dead processes are removed first."""
    path = Path(path)
    check_target(path, overwrite)
    created = _make_parents(path.parent)
    staging = None
    try:
        remove_stale_staging(path.parent)
        staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.{STAGING_TAG}-{os.getpid()}-", suffix=".partial",
                                        dir=path.parent))
        yield staging
    except OSError as error:
        raise SaveError(f"cannot save to {path}: {error.strerror or error}") from None
    finally:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if not os.path.lexists(path):
            for directory in reversed(created):
                _remove_if_empty(directory)


def _make_parents(directory: Path) -> list[Path]:
    """``mkdir -p directory``; the directories it created, outermost first."""
    missing = []
    while not os.path.lexists(directory) and directory != directory.parent:
        missing.append(directory)
        directory = directory.parent
    created = []
    try:
        for item in reversed(missing):
            try:
                item.mkdir()
            except FileExistsError:  # made meanwhile by another process: not ours to remove
                if not item.is_dir():
                    raise
                continue
            created.append(item)
    except OSError as error:
        for item in reversed(created):
            _remove_if_empty(item)
        raise SaveError(f"cannot create directory {missing[0]}: {error.strerror or error}") from None
    return created


def _remove_if_empty(directory: Path) -> None:
    try:
        directory.rmdir()
    except OSError:
        pass


def remove_stale_staging(parent: Path) -> list[Path]:
    """Remove the staging directories in ``parent`` left by saves whose process is gone (killed
    mid-save); the ones of running processes stay. A previous save moved aside by a killed
    overwrite goes back to its place when that place is still free. Returns those removed."""
    removed = []
    try:
        entries = list(Path(parent).iterdir())
    except OSError:
        return removed
    for entry in entries:
        match = _STAGING_NAME.fullmatch(entry.name)
        if match and entry.is_dir() and not entry.is_symlink() and not _alive(int(match.group(2))):
            previous, place = entry / "previous", Path(parent) / match.group(1)
            if match.group(3) == "old" and previous.is_dir() and not os.path.lexists(place):
                try:
                    _rename_noreplace(previous, place)
                except (OSError, SaveError):
                    pass
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


_STAGING_NAME = re.compile(rf"\.(.*)\.{STAGING_TAG}-(\d+)-[^.]*\.(partial|old)")


def _alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True
    return True


def _replace_dir(staging: Path, path: Path, overwrite: bool = True) -> None:
    """Rename ``staging`` to ``path`` atomically. A ``path`` that exists is replaced only when
    ``overwrite`` is true and it is a saved model or empty; one that appeared meanwhile otherwise
    makes this fail rather than be replaced."""
    if not overwrite or not os.path.lexists(path):
        _rename_noreplace(staging, path)
        return
    check_target(path, overwrite=True)
    old = Path(tempfile.mkdtemp(prefix=f".{path.name}.{STAGING_TAG}-{os.getpid()}-", suffix=".old", dir=path.parent))
    try:
        os.replace(path, old / "previous")
        try:
            _rename_noreplace(staging, path)
        except BaseException:
            try:
                _rename_noreplace(old / "previous", path)  # put the previous save back where it was
            except (OSError, SaveError):
                pass
            raise
    finally:
        shutil.rmtree(old, ignore_errors=True)


def _rename_noreplace(source: Path, target: Path) -> None:
    """Rename ``source`` to ``target``, failing (never replacing) when ``target`` exists: Linux's
    ``renameat2(RENAME_NOREPLACE)``; elsewhere a check and ``os.rename`` (which refuses a non-empty
    directory and a file in the way)."""
    if _renameat2 is not None:
        if _renameat2(_AT_FDCWD, os.fsencode(source), _AT_FDCWD, os.fsencode(target), _RENAME_NOREPLACE) == 0:
            return
        code = ctypes.get_errno()
        if code == errno.EEXIST:
            raise SaveError(f"{target} appeared while this model was being saved (another run?); it was left as "
                            "it is and nothing was saved")
        if code not in (errno.ENOSYS, errno.EINVAL):
            raise OSError(code, os.strerror(code), str(target))
    if os.path.lexists(target):
        raise SaveError(f"{target} appeared while this model was being saved (another run?); it was left as it "
                        "is and nothing was saved")
    try:
        os.rename(source, target)
    except OSError as error:
        if error.errno in (errno.EEXIST, errno.ENOTEMPTY, errno.ENOTDIR, errno.EISDIR):
            raise SaveError(f"{target} appeared while this model was being saved (another run?); it was left "
                            "as it is and nothing was saved") from None
        raise


def _load_renameat2():
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        function = libc.renameat2
    except (OSError, AttributeError):
        return None
    function.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    function.restype = ctypes.c_int
    return function


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1
_renameat2 = _load_renameat2() if sys.platform.startswith("linux") else None


def library_versions() -> dict[str, str]:
    import timm
    import torchvision

    return {"se_retrofit": __version__, "torch": torch.__version__, "torchvision": torchvision.__version__,
            "timm": timm.__version__}


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """The JSON config of a saved directory, read strictly and checked against the saved format's
    schema (:mod:`se_retrofit.saved_format`); anything malformed is a ``SavedFormatError``."""
    return read_config_file(path)


def load(path: str | os.PathLike, base_model: nn.Module | None = None, *,
         weights: str = "full", trust_code: bool = False) -> nn.Module:
    """Rebuild a model saved by :func:`save`.

    Args:
        path: the saved directory.
        base_model: a model to edit (copied, never changed); by default the base is re-created
            from the config, with no download.
        weights: ``full`` loads every weight; ``attention`` loads only the attention weights onto
            ``base_model``'s own weights (the adapter use).
        trust_code: import the module the config names for a user-registered attention type that is
            not registered yet. Off by default: loading reads safetensors and JSON and runs no code
            named by the files (built-in types never import anything).

    Example:
        >>> import tempfile, timm, torch, se_retrofit
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18")).eval()
        >>> out = se_retrofit.save(model, tempfile.mkdtemp() + "/m")
        >>> again = se_retrofit.load(out).eval()
        >>> x = torch.randn(1, 3, 64, 64)
        >>> bool(torch.equal(again(x), model(x)))
        True
    """
    if weights not in ("full", "attention"):
        raise SaveError(f"weights must be 'full' or 'attention', not {weights!r}")
    config = read_config(path)
    record = RetrofitRecord.from_dict(config, trust_code=trust_code)
    where = str(Path(path) / CONFIG_FILE)
    if base_model is not None:
        model = deepcopy_module(base_model)
    else:
        check_base(record.base, where)
        with record_mismatch(where, "base (its name and create_kwargs)"):
            model = _fresh_base(record, weights)
    with record_mismatch(where, "sites"):
        apply_record(model, record)
    _set_gates(model, config.get("gates", {}), Path(path) / CONFIG_FILE)
    if weights == "full":
        state = read_weights(Path(path) / MODEL_FILE)
        check_state_dict(model, state, str(Path(path) / MODEL_FILE))
        _match_saved_dtype(model, state)
        check_dtypes(model, state, str(Path(path) / MODEL_FILE))
        model.load_state_dict(state, strict=True)
    else:
        _load_attention(model, Path(path) / ATTENTION_FILE)
    return model


def _match_saved_dtype(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    """A model saved in one floating dtype (half, bfloat16) comes back in it, not in the default one."""
    dtypes = {t.dtype for t in state.values() if t.is_floating_point()}
    if len(dtypes) == 1:
        model.to(dtype=dtypes.pop())


def _set_gates(model: nn.Module, gates: dict[str, Any], file: Path) -> None:
    """Gate scales and offsets (not weights: folded or scaled after retrofit()) recorded in the config."""
    for module_path, state in gates.items():
        try:
            set_gate_state(model.get_submodule(module_path), state)
        except (AttributeError, KeyError, TypeError) as error:
            raise WeightsError(f"{file}: the gate state of {module_path} does not match the model "
                               f"({first_sentence(error)})") from None


def _fresh_base(record: RetrofitRecord, weights: str) -> nn.Module:
    if weights == "attention":
        raise SaveError("weights='attention' needs the base_model to put the attention weights on")
    name, source = record.base.get("name"), record.base.get("source")
    if source == hf.SOURCE:
        return hf.rebuild(record.base)
    if not name or source not in ("timm", "torchvision"):
        raise WeightsError("the config does not say which timm/torchvision/transformers model is the base; pass "
                           "base_model= to load onto your own model")
    model, _ = create(ModelRef(name, source), weights="none", **safe_create_kwargs(record.base.get("create_kwargs")))
    return model


#: constructor keywords that make a library read a file or the network (timm's checkpoint_path loads a pickle)
_LOADING_WORDS = ("path", "file", "url", "pretrained", "checkpoint", "cache", "weights", "overlay", "hub")


def safe_create_kwargs(kwargs: Any) -> dict[str, Any]:
    """Constructor keywords from a saved config, refused where they would make the library load
    something (``checkpoint_path``, ``pretrained_cfg_overlay``, ``weights``…) or are not plain values."""
    if kwargs is None:
        return {}
    if not isinstance(kwargs, dict):
        raise WeightsError(f"base.create_kwargs in the config must be a mapping, not {type(kwargs).__name__}")
    for key, value in kwargs.items():
        if any(word in str(key).lower() for word in _LOADING_WORDS) or not _plain(value):
            raise WeightsError(f"base.create_kwargs.{key} in the config is refused: loading only passes plain "
                               "constructor values (num_classes, in_chans…), never what makes a library read a "
                               "file or the network")
    return dict(kwargs)


def _plain(value: Any) -> bool:
    if isinstance(value, (list, tuple)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str))


def _load_attention(model: nn.Module, file: Path) -> None:
    state = read_weights(file)
    check_dtypes(model, state, str(file))
    expected = attention_state_dict(model)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsError(f"attention weights in {file} do not match: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)
