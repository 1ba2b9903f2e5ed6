"""Save and load edited models: full and attention-only safetensors plus a JSON config, and the
evidence that a loaded model is the one saved.

A saved directory (format ``se_retrofit/2``) holds:

* ``model.safetensors``: every weight of the edited model;
* ``attention.safetensors``: the new attention weights alone (an adapter, as in PEFT);
* ``probe.safetensors``: a fixed, seeded probe input (the model's own input size, batch 1) and the
  edited model's outputs on it, in eval mode;
* ``retrofit_config.json``: base model (name, source, constructor keywords, head and where its
  weights came from, as the model is at save time), attention type, position, r, stages, init, the
  list of sites, library versions, and under ``verify`` the module tree (class and constructor
  description of every module, path by path, with its sha256) and a digest of the base weights.

Loading re-creates the base model (or takes one you pass), re-applies the recorded sites and loads
the weights strictly. Then it proves the result is the saved model (see :mod:`se_retrofit.fingerprint`):
the rebuilt module tree must equal the saved one, path by path (else a :class:`VerificationError`
names the first differing paths, both sides, and says to pass ``base_model=``), and the model's
outputs on the saved probe input must be the saved outputs (else the error gives max |Δ|).
``verify=False`` skips both, for users who know better. An attention-only load
(``weights="attention"``) checks the module tree, and the probe only where ``base_model``'s own
weights are the saved model's base weights (same digest): onto other weights, which is what an
adapter is for, the outputs are meant to differ. Directories of format ``se_retrofit/1`` (saved
before verification existed) still load, with an :class:`UnverifiedLoadWarning`.

Writes go to a hidden sibling directory that is renamed into place at the end, so an interrupted
save never leaves a directory that looks complete. Nothing is written for a model that cannot be
loaded back: one with weights on the meta device, a wrapper that adds modules of its own (a PEFT
model: merge or unload the adapter first), or an unedited model.
"""
from __future__ import annotations

import contextlib
import ctypes
import errno
import hashlib
import json
import os
import re
import shutil
import sys
import tempfile
import warnings
from itertools import chain
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
from .core import RECORD_ATTR, apply_record, base_at_save, global_pool_of, record_of
from .analysis import default_example_input
from . import fingerprint
from .training import attention_state_dict
from .hub import ModelRef, WeightsError, check_state_dict, create, file_kind, first_sentence

from .saved_format import (ATTENTION_FILE, CONFIG_FILE, FORMAT, MODEL_FILE, PROBE_FILE,
                           UNVERIFIED_FORMAT, check_base, check_dtypes, read_config_file, read_weights,
                           record_mismatch)


class SaveError(RetrofitError):
    """The edited model cannot be saved where asked."""


class VerificationError(RetrofitError):
    """The loaded model is not the saved one (another module tree, or other outputs on the probe)."""


class UnverifiedLoadWarning(UserWarning):
    """A directory saved before verification existed (format se_retrofit/1): loaded without proof."""


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
        ['attention.safetensors', 'model.safetensors', 'probe.safetensors', 'retrofit_config.json']
    """
    model = edited_model(model)
    record = record_of(model)
    _refuse_meta(model)
    path = Path(path)
    check_target(path, overwrite)  # before the probe runs; checked again as the files are written
    base = base_at_save(model, record)
    verification, probe = _verification(model)
    with staging_dir(path, overwrite) as staging:
        _write(model, record, base, verification, probe, staging)
        _set_default_permissions(staging)
        _replace_dir(staging, path, overwrite)
    return path


def _write(model: nn.Module, record: RetrofitRecord, base: dict[str, Any], verification: dict[str, Any],
           probe: dict[str, torch.Tensor], directory: Path) -> None:
    state = _unshared(model.state_dict())
    save_file(state, str(directory / MODEL_FILE), metadata={"format": FORMAT})
    save_file(attention_state_dict(model), str(directory / ATTENTION_FILE), metadata={"format": FORMAT})
    files = {"model": MODEL_FILE, "attention": ATTENTION_FILE}
    if probe:
        save_file(probe, str(directory / PROBE_FILE), metadata={"format": FORMAT})
        files["probe"] = PROBE_FILE
    gates = {site.module_path: gate_state(model.get_submodule(site.module_path)) for site in record.all_sites}
    config = {"format": FORMAT, **record.to_dict(), "base": base, "gates": {k: v for k, v in gates.items() if v},
              "versions": library_versions(), "files": files, "verify": verification}
    (directory / CONFIG_FILE).write_text(json.dumps(config, indent=2) + "\n")


def edited_model(model: nn.Module) -> nn.Module:
    """The edited model :func:`save` writes: ``model`` itself, or the edited model a plain wrapper
    holds (``torch.compile``'s ``_orig_mod``, DDP's ``module``: the wrapper adds no weight).

    Refused with :class:`SaveError`: a wrapper with modules of its own, and a model that carries PEFT
    adapter layers (LoRA). :func:`load` rebuilds only what the record describes, so saving either would
    write a directory that cannot be read back; merging the adapter into the weights silently would
    change the weights the user kept apart on purpose, and dropping it would lose its training."""
    holder = _record_holder(model)
    if holder is not None and holder[0] and not _peft_layers(model):  # model wraps the edited model
        path, inner = holder
        outer_keys, inner_keys = set(model.state_dict()), {f"{path}.{key}" for key in inner.state_dict()}
        if outer_keys != inner_keys:
            extra = sorted(outer_keys - inner_keys)
            raise SaveError(f"{type(model).__name__} holds the edited model at {path!r} plus weights of its own "
                            f"({', '.join(extra[:3])}{', …' if len(extra) > 3 else ''}) that se_retrofit.load could "
                            f"not rebuild; save the edited model itself (model.{path})")
        model = inner
    peft = _peft_layers(model)
    if peft:
        raise SaveError(f"this model carries PEFT adapter layers ({len(peft)} modules, first: {peft[0]}) that "
                        "se_retrofit.load cannot rebuild; merge them into the weights first (merged = "
                        "peft_model.merge_and_unload(); se_retrofit.save(merged, dir)), or keep the adapter "
                        "apart: peft_model.save_pretrained(adapter_dir) for it, and se_retrofit.save of the edited "
                        "model without it (peft_model.unload())")
    return model


def _record_holder(model: nn.Module) -> tuple[str, nn.Module] | None:
    """(path, module) of the module that holds the retrofit record as its own attribute."""
    for path, module in model.named_modules():
        if isinstance(module.__dict__.get(RECORD_ATTR), RetrofitRecord):
            return path, module
    return None


def _peft_layers(model: nn.Module) -> list[str]:
    """Paths of the innermost modules of the ``peft`` package inside ``model`` (its LoRA layers, not
    the wrappers around them)."""
    paths = [path for path, module in model.named_modules() if type(module).__module__.split(".")[0] == "peft"]
    return [path or type(model).__name__ for path in paths
            if not any(other.startswith(f"{path}.") or (not path and other) for other in paths)]


def _refuse_meta(model: nn.Module) -> None:
    on_meta = [name for name, t in chain(model.named_parameters(), model.named_buffers()) if t.is_meta]
    if on_meta:
        raise SaveError(f"{len(on_meta)} weights of this model are on the meta device (first: {on_meta[0]}): they "
                        "hold no values to save; load real weights first (model.to_empty(device='cpu') then "
                        "load_state_dict, or load_state_dict(..., assign=True))")


def _verification(model: nn.Module) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The ``verify`` entry of the config (module tree, base weights digest, probe description) and
    the probe tensors (input and outputs) for :data:`PROBE_FILE`; the probe is described as skipped,
    with the reason, for a model that does not run on its default input."""
    rows = fingerprint.module_tree(model)
    info: dict[str, Any] = {"module_tree": {"sha256": fingerprint.tree_digest(rows), "modules": rows},
                            "base_weights_sha256": fingerprint.weights_digest(_base_state(model))}
    try:
        example = default_example_input(model)
        outputs = fingerprint.probe_outputs(model, example)
    except Exception as error:  # any model that cannot run its default input: the tree is still checked
        info["probe"] = {"skipped": f"{type(error).__name__}: {first_sentence(error)}"}
        return info, {}
    param = next(model.parameters(), None)
    info["probe"] = {"file": PROBE_FILE, "outputs": len(outputs),
                     "device": param.device.type if param is not None else "cpu",
                     "dtype": str(param.dtype) if param is not None else "torch.float32"}
    tensors = {"input": example.detach().cpu().clone().contiguous()}
    tensors.update({f"output.{i}": t.clone().contiguous() for i, t in enumerate(outputs)})
    return info, tensors


def _base_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The weights of ``model`` that are not attention weights (the base's, gates aside)."""
    attention = attention_state_dict(model)
    return {k: v for k, v in model.state_dict().items() if k not in attention}


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
            raise SaveError(f"{path} {_what_is_there(path)}, not a saved model directory; refusing to replace it "
                            "(remove it yourself or choose another directory)")
        if not replaceable(path):
            raise SaveError(f"{path} is a directory that is not a saved se_retrofit model (no {CONFIG_FILE}); "
                            "refusing to replace it (remove it yourself or choose another directory)")
    ancestor = absolute.parent
    while not os.path.lexists(ancestor) and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        raise SaveError(f"cannot save to {path}: {ancestor} is a file, not a directory")
    if not os.access(ancestor, os.W_OK | os.X_OK):
        raise SaveError(f"cannot save to {path}: {ancestor} is not writable")


def _what_is_there(path: Path) -> str:
    """'is a file', 'is a symbolic link (to …)', 'is a symbolic link in a loop', …, for messages."""
    if path.is_symlink():
        try:
            path.resolve(strict=True)
        except RuntimeError:
            return "is a symbolic link in a loop"
        except OSError:
            return f"is a symbolic link to {os.readlink(path)}, which does not exist"
        return f"is a symbolic link to {os.readlink(path)}"
    return "is a file" if path.is_file() else f"is {file_kind(os.stat(path).st_mode) or 'not a regular file'}"


def _staging_prefix(path: Path) -> str:
    """The start of a staging directory's name next to ``path``: ``.NAME.se-retrofit-PID-``; a long
    NAME is cut and given a digest of itself, so a valid name never makes an invalid staging name."""
    name = path.name
    if len(name.encode()) > 120:
        name = name.encode()[:80].decode(errors="ignore") + "~" + hashlib.sha256(path.name.encode()).hexdigest()[:16]
    return f".{name}.{STAGING_TAG}-{os.getpid()}-"


def replaceable(path: Path) -> bool:
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
        staging = Path(tempfile.mkdtemp(prefix=_staging_prefix(path), suffix=".partial", dir=path.parent))
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
        if match and entry.is_dir() and not entry.is_symlink() and not process_alive(int(match.group(2))):
            previous, place = entry / "previous", Path(parent) / _recorded_place(entry, match.group(1))
            if match.group(3) == "old" and previous.is_dir() and not os.path.lexists(place):
                try:
                    _rename_noreplace(previous, place)
                except (OSError, SaveError):
                    pass
            shutil.rmtree(entry, ignore_errors=True)
            removed.append(entry)
    return removed


def _recorded_place(old: Path, name: str) -> str:
    """The name a moved-aside save had: recorded in the ``.old`` directory (its own name may be cut)."""
    try:
        recorded = (old / "place").read_text()
    except (OSError, UnicodeDecodeError):
        return name
    return recorded if recorded and "/" not in recorded and recorded not in (".", "..") else name


_STAGING_NAME = re.compile(rf"\.(.*)\.{STAGING_TAG}-(\d+)-[^.]*\.(partial|old)")


def process_alive(pid: int) -> bool:
    """Whether process ``pid`` runs (this one included; one we may not signal counts as running)."""
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
    old = Path(tempfile.mkdtemp(prefix=_staging_prefix(path), suffix=".old", dir=path.parent))
    try:
        (old / "place").write_text(path.name)  # where a killed overwrite's previous save goes back
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
         weights: str = "full", trust_code: bool = False, verify: bool = True) -> nn.Module:
    """Rebuild a model saved by :func:`save`, and prove it is the saved one.

    Args:
        path: the saved directory.
        base_model: the plain base model to edit (copied, never changed; not a model edited already,
            which would get the attention twice); by default the base is re-created from the config,
            with no download.
        weights: ``full`` loads every weight; ``attention`` loads only the attention weights onto
            ``base_model``'s own weights (the adapter use).
        trust_code: import the module the config names for a user-registered attention type that is
            not registered yet. Off by default: loading reads safetensors and JSON and runs no code
            named by the files (built-in types never import anything).
        verify: check that the rebuilt module tree is the saved one, path by path, and that the model
            computes the saved outputs on the saved probe input (for ``weights="attention"``: the
            tree, and the probe only when ``base_model`` has the saved base weights). A
            :class:`VerificationError` says where they differ. ``False`` skips both.

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
    directory = Path(path)
    config = read_config(directory)
    record = RetrofitRecord.from_dict(config, trust_code=trust_code)
    where = str(directory / CONFIG_FILE)
    if base_model is not None:
        refuse_edited_base(base_model)
        model = deepcopy_module(base_model)
    else:
        check_base(record.base, where)
        with record_mismatch(where, "base (its name and create_kwargs)"):
            model = _fresh_base(record, weights)
    with record_mismatch(where, "sites"):
        apply_record(model, record)
    _set_gates(model, config.get("gates", {}), directory / CONFIG_FILE)
    checks = _checks(config, directory) if verify else None
    if checks is not None:
        check_module_tree(model, checks, record, base_model is not None)
    if weights == "full":
        state = read_weights(directory / MODEL_FILE)
        check_state_dict(model, state, str(directory / MODEL_FILE))
        _match_saved_dtype(model, state)
        check_dtypes(model, state, str(directory / MODEL_FILE))
        model.load_state_dict(state, strict=True)
    else:
        _load_attention(model, directory / ATTENTION_FILE)
    if checks is not None and (weights == "full" or _has_saved_base_weights(model, checks)):
        check_probe(model, checks, directory)
    return model


def refuse_edited_base(base_model: nn.Module) -> None:
    """Refuse a ``base_model`` that se_retrofit edited already: loading would apply the saved attention
    a second time (each block's attention would run twice per forward)."""
    record = getattr(base_model, RECORD_ATTR, None)
    inserted = [site.module_path for site in record.all_sites] if isinstance(record, RetrofitRecord) else [
        path for path, module in base_model.named_modules()
        if type(module).__module__.startswith("se_retrofit.attention")]
    if inserted:
        raise SaveError(f"base_model was edited by se_retrofit already (attention at {', '.join(inserted[:2])}"
                        f"{', …' if len(inserted) > 2 else ''}): loading onto it would apply the saved attention a "
                        "second time. Pass the plain base model, built as the one given to retrofit() was (e.g. "
                        "timm.create_model(name, ...)), or no base_model to rebuild it from the config")


def _checks(config: dict[str, Any], directory: Path) -> dict[str, Any] | None:
    """The ``verify`` entry of the config; None (with a warning) for a directory saved before
    verification existed."""
    if config.get("format") == UNVERIFIED_FORMAT or "verify" not in config:
        warnings.warn(f"{directory} was saved by an se_retrofit without verification ({config.get('format')}): "
                      "it loads, but nothing proves it is the model that was saved; save it again to add the "
                      "proof", UnverifiedLoadWarning, stacklevel=3)
        return None
    return config["verify"]  # its keys, types and ranges are checked with the rest (saved_format.VERIFY)


def check_module_tree(model: nn.Module, checks: dict[str, Any], record: RetrofitRecord, given: bool) -> None:
    """Refuse (:class:`VerificationError`) a rebuilt model whose module tree is not the saved one."""
    saved = checks["module_tree"]["modules"]
    rebuilt = fingerprint.module_tree(model)
    if fingerprint.tree_digest(rebuilt) == checks["module_tree"]["sha256"] and rebuilt == saved:
        return
    differences = fingerprint.tree_differences(saved, rebuilt)
    where = fingerprint.describe_differences(differences)
    if given:
        hint = ("the base_model passed is not built like the saved model's base; pass one built as that was "
                "(the same constructor options and layers)")
    else:
        base = record.base
        built = f"{base.get('source')}:{base.get('name')} with {base.get('create_kwargs') or 'its defaults'}"
        hint = (f"the config rebuilds the base as {built}, and the saved model was not that (built with other "
                "constructor options, or changed after it was built); pass base_model= a model built as the "
                "saved one was (e.g. timm.create_model(name, global_pool=..., act_layer=...))")
    raise VerificationError(f"the model rebuilt from the saved directory is not the saved model: {where}. {hint}, "
                            "or verify=False to load it anyway")


def _has_saved_base_weights(model: nn.Module, checks: dict[str, Any]) -> bool:
    return fingerprint.weights_digest(_base_state(model)) == checks.get("base_weights_sha256")


def check_probe(model: nn.Module, checks: dict[str, Any], directory: Path) -> None:
    """Refuse (:class:`VerificationError`) a loaded model whose outputs on the saved probe input are
    not the saved outputs (within the rounding of the device and dtype the probe ran on)."""
    probe = checks.get("probe") or {}
    if "skipped" in probe:
        return
    try:
        saved = read_weights(directory / PROBE_FILE)
    except RetrofitError as error:
        raise WeightsError(f"{error}; or pass verify=False to load it without its proof") from None
    names = ["input", *(f"output.{i}" for i in range(probe["outputs"]))]
    if set(saved) != set(names):
        raise WeightsError(f"{directory / PROBE_FILE} holds {sorted(saved)[:4]}, not the probe the config describes "
                           f"({names[:4]}); pass verify=False to load without it")
    example, outputs = saved["input"], [saved[name] for name in names[1:]]
    try:
        actual = fingerprint.probe_outputs(model, fingerprint.as_model_input(model, example))
    except Exception as error:
        raise VerificationError(f"the loaded model does not run on the saved probe input ({type(error).__name__}: "
                                f"{first_sentence(error)}), which the saved model ran on; pass verify=False to load "
                                "it anyway") from None
    difference = fingerprint.probe_difference(outputs, actual)
    if difference is None:
        raise VerificationError(f"the loaded model's outputs on the saved probe input have other shapes than the "
                                f"saved model's ({[tuple(t.shape) for t in actual]} against "
                                f"{[tuple(t.shape) for t in outputs]}); pass verify=False to load it anyway")
    delta, scale = difference
    allowed = fingerprint.tolerance(probe.get("device", "cpu"), probe.get("dtype", "")) * max(scale, 1e-6)
    if not delta <= allowed:
        raise VerificationError(f"the loaded model does not compute what the saved model computed: on the saved probe "
                                f"input its outputs differ by max |Δ| {delta:.3g} (largest saved value {scale:.3g}, "
                                f"allowed {allowed:.2g}); the base was rebuilt or loaded differently from the one "
                                "saved (pass base_model= the model you edited), or verify=False to load it anyway")


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
    model, _ = create(ModelRef(name, source), weights="none", **_constructor_kwargs(record.base.get("create_kwargs")))
    _set_global_pool(model, record.base.get("global_pool"))
    return model


def _set_global_pool(model: nn.Module, pool: Any) -> None:
    """Give a rebuilt timm model the global pooling recorded at save time (``reset_classifier(n,
    global_pool=...)`` after the edit, or a ``global_pool=`` constructor keyword); a model that cannot
    take it is left as it is, and the module tree check then says where it differs."""
    if not isinstance(pool, str) or global_pool_of(model) in (None, pool):
        return
    try:
        model.reset_classifier(model.num_classes, global_pool=pool)
    except Exception:  # the tree check reports the difference with its paths
        pass


def _constructor_kwargs(kwargs: dict[str, Any] | None) -> dict[str, Any]:
    """The saved constructor keywords (checked by :func:`check_base` before the base is built), less
    ``pretrained``/``weights``, which load sets itself."""
    return {key: value for key, value in (kwargs or {}).items() if key not in ("pretrained", "weights")}


def _load_attention(model: nn.Module, file: Path) -> None:
    state = read_weights(file)
    check_dtypes(model, state, str(file))
    expected = attention_state_dict(model)
    missing, unexpected = sorted(expected.keys() - state.keys()), sorted(state.keys() - expected.keys())
    if missing or unexpected:
        raise WeightsError(f"attention weights in {file} do not match: missing {missing[:3]}, "
                           f"unexpected {unexpected[:3]}")
    model.load_state_dict(state, strict=False)
