"""Export an edited model to a file other tools read, and check the file against the model.

Formats (the registry :data:`FORMATS`; add one there):

* ``safetensors``: the directory :func:`se_retrofit.save` writes (reload with :func:`se_retrofit.load`);
* ``timm``: a plain ``.safetensors`` state dict of timm's own model that computes the same function
  (``resnet50`` + SE at ``standard`` → ``seresnet50``), loadable without se_retrofit installed;
* ``torchscript``: ``torch.jit.trace`` in eval mode (the edited blocks carry an instance-level
  ``forward`` that ``torch.jit.script`` cannot compile), saved with ``torch.jit.save``;
* ``export``: a ``torch.export`` ExportedProgram saved with ``torch.export.save`` (``.pt2``);
* ``onnx``: ``torch.onnx.export(..., dynamo=True)``, checked with onnxruntime.

``export`` and ``onnx`` files take any batch size where the model allows it, and with
``dynamic_spatial=True`` any height and width too (detection and segmentation backbones run at many
sizes): the file is then checked at two sizes, the example's and one 32 pixels larger each way, and a
model that cannot be traced with a free spatial size (a ViT built for one image size) is refused.

Every file is written into a hidden staging directory next to its destination, read back and run
on the example input there, and only then renamed into place: a failed export or check leaves
nothing behind, and an existing destination is replaced only with ``overwrite=True``. The model is
run in eval mode; its train/eval flags, weights and structure are left as they were.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import tempfile
import warnings
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from safetensors.torch import save_file
from torch import nn

from .errors import RetrofitError
from .hub import first_sentence
from .analysis import default_example_input
from .convert import ConversionError, timm_create_kwargs, timm_native_name, to_timm_native
from .io import _replace_dir, _unshared, default_file_mode, load, save, staging_dir
from .outputs import OutputMismatchError, output_difference, output_tensors
from .tracing import training_mode

TIMM_FORMAT = "se_retrofit/timm-native/1"


class ExportError(RetrofitError):
    """The model cannot be exported as asked (unknown format, existing file, no native twin, …)."""


class ExportCheckError(ExportError):
    """The written file does not compute what the model computes."""


@dataclass(frozen=True)
class ExportResult:
    """What :func:`export` wrote and how closely the file reproduces the model.

    ``max_abs_diff`` is max |Δ| between the model's outputs and the written file's outputs on the
    example input (and, with a dynamic spatial size, on the larger check input too); ``dynamic_batch``
    says whether the file accepts any batch size (``None`` where the format keeps the module itself);
    ``dynamic_spatial`` whether it accepts any height and width (``None`` unless asked for);
    ``checked_sizes`` the spatial sizes the file was checked at; ``timm_model`` is the timm name to
    create (format ``timm``).
    """

    format: str
    path: Path
    max_abs_diff: float
    dynamic_batch: bool | None = None
    timm_model: str | None = None
    timm_kwargs: dict | None = None
    dynamic_spatial: bool | None = None
    checked_sizes: list[tuple[int, ...]] | None = None

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "path": str(self.path)}


#: how much larger (in every spatial dim) the second check input of a dynamic spatial export is
SPATIAL_CHECK_STEP = 32


@dataclass(frozen=True)
class Dynamic:
    """Which input dims an exported graph should leave free: the batch, the spatial dims (H, W)."""

    batch: bool = True
    spatial: bool = False


@dataclass(frozen=True)
class ExportFormat:
    """One entry of :data:`FORMATS`.

    ``write(model, path, example, dynamic)`` writes the file (the model is in eval mode; ``dynamic``
    is a :class:`Dynamic`) and returns facts for :class:`ExportResult`; ``run(path, example, facts)``
    loads the written file and returns its outputs on ``example``; ``check(model)`` refuses a model
    early, before any work; ``suffix`` is the ending the file name must have (timm tells safetensors
    from pickles by it); ``dynamic_spatial`` says whether the writer can leave H and W free.
    """

    summary: str
    filename: Callable[[nn.Module], str]
    write: Callable[[nn.Module, Path, torch.Tensor, Dynamic], dict]
    run: Callable[[Path, torch.Tensor, dict], Any]
    tolerance: float = 1e-5
    check: Callable[[nn.Module], Any] = lambda model: None
    directory: bool = False
    suffix: str = ""
    dynamic_spatial: bool = False


def export(model: nn.Module, path: str | os.PathLike, format: str = "safetensors",
           example_input: torch.Tensor | None = None, *, overwrite: bool = False,
           dynamic_batch: bool = True, dynamic_spatial: bool = False) -> ExportResult:
    """Write ``model`` to ``path`` in ``format`` and check the file reproduces the model's outputs.

    Args:
        model: a model edited by :func:`se_retrofit.retrofit` (``torchscript``, ``export`` and ``onnx``
            take any model).
        path: the file to write (a directory for ``safetensors``).
        format: a key of :data:`FORMATS`: ``safetensors``, ``timm``, ``torchscript``, ``export``, ``onnx``.
        example_input: the input to trace with and to check on (default: the model's configured
            input size, batch 1).
        overwrite: replace an existing ``path``.
        dynamic_batch: let ``export`` and ``onnx`` files take any batch size (they fall back to the
            example's batch size where the model does not allow it; see ``result.dynamic_batch``).
        dynamic_spatial: let ``export`` and ``onnx`` files take any height and width; the file is
            checked at the example's size and at one :data:`SPATIAL_CHECK_STEP` larger each way.

    Returns:
        an :class:`ExportResult` with max |Δ| between the file's and the model's outputs.

    Raises:
        ExportError: unknown format, ``path`` exists, no timm native model matches, the check failed,
            a dynamic spatial size asked of a format or a model that cannot have one.

    Example:
        >>> import tempfile, timm, torch, se_retrofit
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18"))
        >>> x = torch.randn(1, 3, 64, 64)
        >>> out = tempfile.mkdtemp()
        >>> result = se_retrofit.export(model, out + "/seresnet18.safetensors", format="timm", example_input=x)
        >>> result.timm_model, result.max_abs_diff
        ('seresnet18', 0.0)
        >>> native = timm.create_model("seresnet18", pretrained=True,
        ...                            pretrained_cfg_overlay=dict(file=str(result.path))).eval()
        >>> bool(torch.equal(native(x), model.eval()(x)))
        True
        >>> se_retrofit.export(model, out + "/model.onnx", format="onnx", example_input=x).max_abs_diff < 1e-4
        True
        >>> result = se_retrofit.export(model, out + "/any_size.pt2", format="export", example_input=x,
        ...                             dynamic_spatial=True)
        >>> result.dynamic_spatial, result.checked_sizes, result.max_abs_diff
        (True, [(64, 64), (96, 96)], 0.0)
    """
    spec = format_spec(format)
    path = Path(path)
    _check_path(path, format, overwrite)
    example = _example(model, example_input)
    examples = [example, larger_example(example)] if _check_dynamic_spatial(format, example, dynamic_spatial) \
        else [example]
    with eval_mode(model):
        spec.check(model)
        expected = output_tensors(model(example))
        path.parent.mkdir(parents=True, exist_ok=True)
        with _staging(path) as staged:
            facts = spec.write(model, staged, example, Dynamic(dynamic_batch, dynamic_spatial))
            diffs = []
            for x in examples:
                want = expected if x is example else _outputs_at(model, x)
                diffs.append(max_abs_diff(want, spec.run(staged, x, facts)))
                _check(diffs[-1], want, spec, format)
            _move_into_place(staged, path)
    if dynamic_spatial:
        facts = {**facts, "checked_sizes": [tuple(x.shape[2:]) for x in examples]}
    return ExportResult(format=format, path=path, max_abs_diff=max(diffs), **facts)


def larger_example(example: torch.Tensor) -> torch.Tensor:
    """A random input like ``example`` but :data:`SPATIAL_CHECK_STEP` larger in every spatial dim.

    Example:
        >>> import torch
        >>> from se_retrofit.export import larger_example
        >>> tuple(larger_example(torch.zeros(2, 3, 64, 48)).shape)
        (2, 3, 96, 80)
    """
    shape = (*example.shape[:2], *(size + SPATIAL_CHECK_STEP for size in example.shape[2:]))
    generator = torch.Generator().manual_seed(0)
    return torch.randn(shape, generator=generator, dtype=example.dtype).to(example.device)


def _outputs_at(model: nn.Module, x: torch.Tensor) -> list[torch.Tensor]:
    """The model's outputs on the larger check input; a model that refuses that size is refused."""
    try:
        return output_tensors(model(x))
    except Exception as error:
        raise ExportError(f"this model cannot be exported with a dynamic spatial size: it does not run at "
                          f"{'×'.join(map(str, x.shape[2:]))} ({type(error).__name__}: {first_sentence(error)})") \
            from None


def _check_dynamic_spatial(format: str, example: torch.Tensor, dynamic_spatial: bool) -> bool:
    if not dynamic_spatial:
        return False
    if not FORMATS[format].dynamic_spatial:
        capable = ", ".join(name for name, spec in FORMATS.items() if spec.dynamic_spatial)
        raise ExportError(f"a dynamic spatial size applies to the formats that trace a graph ({capable}), "
                          f"not {format!r}")
    if example.dim() < 3 or not example.is_floating_point():
        raise ExportError("a dynamic spatial size needs an image-like example input (N, C, H, W), "
                          f"not one of shape {tuple(example.shape)}")
    return True


def format_spec(format: str) -> ExportFormat:
    """The :data:`FORMATS` entry for ``format``, or an :class:`ExportError` listing the known ones."""
    if format not in FORMATS:
        raise ExportError(f"unknown export format {format!r}; choose one of {', '.join(FORMATS)}")
    return FORMATS[format]


def default_filename(model: nn.Module, format: str) -> str:
    """The file name the command line gives ``format`` inside the saved directory (``model.onnx``).

    Example:
        >>> import timm, se_retrofit
        >>> from se_retrofit.export import default_filename
        >>> default_filename(se_retrofit.retrofit(timm.create_model("resnet18")), "timm")
        'seresnet18.safetensors'
    """
    return format_spec(format).filename(model)


def save_and_export(model: nn.Module, directory: str | os.PathLike, format: str = "safetensors",
                    example_input: torch.Tensor | None = None, *, overwrite: bool = False,
                    dynamic_spatial: bool = False) -> \
        tuple[Path, ExportResult | None]:
    """:func:`se_retrofit.save` to ``directory`` with the ``format`` file inside it, all or nothing.

    For ``safetensors`` this is :func:`se_retrofit.save`; for another format the directory also holds
    :func:`default_filename` (``model.onnx``, ``seresnet50.safetensors``, …). Everything is built in a
    hidden sibling directory and renamed into place once the export's check has passed.

    Example:
        >>> import tempfile, timm, torch, se_retrofit
        >>> from se_retrofit.export import save_and_export
        >>> model = se_retrofit.retrofit(timm.create_model("resnet18"))
        >>> out, result = save_and_export(model, tempfile.mkdtemp() + "/r18", "export", torch.randn(1, 3, 32, 32))
        >>> sorted(p.name for p in out.iterdir()), result.max_abs_diff
        (['attention.safetensors', 'model.pt2', 'model.safetensors', 'probe.safetensors', 'retrofit_config.json'], 0.0)
    """
    spec = format_spec(format)
    directory = Path(directory)
    if format == "safetensors" and not dynamic_spatial:
        return save(model, directory, overwrite=overwrite), None
    _check_path(directory, "safetensors", overwrite)
    _check_dynamic_spatial(format, _example(model, example_input), dynamic_spatial)
    spec.check(model)  # refuse before writing anything
    with staging_dir(directory, overwrite) as staging:  # removed (with the parents it made) on failure
        staged = staging / directory.name
        save(model, staged)
        result = export(model, staged / spec.filename(model), format, example_input,
                        dynamic_spatial=dynamic_spatial)
        _replace_dir(staged, directory, overwrite)
    return directory, replace(result, path=directory / result.path.name)


@contextlib.contextmanager
def eval_mode(model: nn.Module) -> Iterator[nn.Module]:
    """Put ``model`` in eval mode, without gradients, for the block; then restore every submodule's
    own flag."""
    with training_mode(model, False), torch.no_grad():
        yield model


def max_abs_diff(expected: list[torch.Tensor], actual: Any) -> float:
    """max |Δ| over the output tensors (nested outputs are compared leaf by leaf, in order)."""
    try:
        return output_difference(expected, actual)[0]
    except OutputMismatchError as error:
        raise ExportCheckError(f"the exported file does not return what the model does: {error}") from None


# --- checks and staging -------------------------------------------------------------------------

def _check_path(path: Path, format: str, overwrite: bool) -> None:
    spec = FORMATS[format]
    if not path.name.endswith(spec.suffix):
        raise ExportError(f"format {format!r} writes a {spec.suffix} file (its readers go by the ending): "
                          f"name it like {path.stem}{spec.suffix}, not {path.name}")
    if path.exists() and not overwrite:
        raise ExportError(f"{path} already exists; choose another path or pass overwrite=True")
    if path.exists() and path.is_dir() != spec.directory:
        kind = "a directory" if path.is_dir() else "a file"
        raise ExportError(f"{path} is {kind}; this format writes {'a directory' if spec.directory else 'a file'}")


def _example(model: nn.Module, example_input: torch.Tensor | None) -> torch.Tensor:
    example = default_example_input(model) if example_input is None else example_input
    if not isinstance(example, torch.Tensor):
        raise ExportError(f"example_input must be a tensor, not {type(example).__name__}")
    return example


def _check(diff: float, expected: list[torch.Tensor], spec: ExportFormat, format: str) -> None:
    scale = max((e.abs().max().item() for e in expected if e.numel()), default=1.0)
    if not diff <= spec.tolerance * max(1.0, scale):
        raise ExportCheckError(f"the {format} file does not reproduce the model: max |Δ| = {diff:.3g} "
                               f"(allowed {spec.tolerance:g} × max(1, max |output| = {scale:.3g})); "
                               "nothing was written")


@contextlib.contextmanager
def _staging(path: Path) -> Iterator[Path]:
    """A path named like ``path`` inside a hidden directory next to it, removed afterwards."""
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".partial", dir=path.parent))
    try:
        yield staging / path.name
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _move_into_place(staged: Path, path: Path) -> None:
    """Rename the staged result to ``path``; files written beside it (ONNX external data) go first."""
    for extra in sorted(p for p in staged.parent.iterdir() if p != staged):
        extra.chmod(default_file_mode())
        os.replace(extra, path.parent / extra.name)
    if staged.is_dir():
        _replace_dir(staged, path)
        return
    staged.chmod(default_file_mode())
    os.replace(staged, path)


# --- the formats ---------------------------------------------------------------------------------

def _write_safetensors(model: nn.Module, path: Path, example: torch.Tensor, dynamic: Dynamic) -> dict:
    save(model, path)
    return {}


def _run_safetensors(path: Path, example: torch.Tensor, facts: dict) -> Any:
    return load(path).eval()(example)


@contextlib.contextmanager
def _no_native_model() -> Iterator[None]:
    try:
        yield
    except ConversionError as error:
        raise ExportError(f"format 'timm' needs an exact timm native model: {error}") from None


def _timm_name(model: nn.Module) -> str:
    with _no_native_model():
        return timm_native_name(model)


def _write_timm(model: nn.Module, path: Path, example: torch.Tensor, dynamic: Dynamic) -> dict:
    with _no_native_model():
        name, state = to_timm_native(model)
    kwargs = timm_create_kwargs(model)
    save_file(_unshared(state), str(path), metadata={
        "format": TIMM_FORMAT, "timm_model": name, "timm_kwargs": json.dumps(kwargs),
        "usage": timm_usage(name, path.name, kwargs)})
    return {"timm_model": name, "timm_kwargs": kwargs}


def timm_usage(name: str, file: str, kwargs: dict | None = None) -> str:
    """The ``timm.create_model`` call that loads a ``timm`` export (no se_retrofit needed).

    A head other than the pretrained config's (``num_classes``) must be named in both places, or timm
    drops the classifier weights.

    Example:
        >>> from se_retrofit.export import timm_usage
        >>> timm_usage("seresnet50", "seresnet50.safetensors")
        "timm.create_model('seresnet50', pretrained=True, pretrained_cfg_overlay=dict(file='seresnet50.safetensors'))"
    """
    extra = "".join(f", {k}={v!r}" for k, v in (kwargs or {}).items())
    return f"timm.create_model({name!r}, pretrained=True{extra}, pretrained_cfg_overlay=dict(file={file!r}{extra}))"


def _run_timm(path: Path, example: torch.Tensor, facts: dict) -> Any:
    import timm

    kwargs = facts["timm_kwargs"]
    native = timm.create_model(facts["timm_model"], pretrained=True, **kwargs,
                               pretrained_cfg_overlay=dict(file=str(path), **kwargs))
    return native.eval()(example)


@contextlib.contextmanager
def _quiet_jit() -> Iterator[None]:
    """torch marks ``torch.jit`` deprecated; the user asked for TorchScript, so do not repeat it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.jit\.\w+` is deprecated", category=FutureWarning)
        yield


def _write_torchscript(model: nn.Module, path: Path, example: torch.Tensor, dynamic: Dynamic) -> dict:
    with _quiet_jit():
        traced = torch.jit.trace(model, example, check_trace=False)  # checked below, on the saved file
        torch.jit.save(traced, str(path))
    return {}


def _run_torchscript(path: Path, example: torch.Tensor, facts: dict) -> Any:
    with _quiet_jit():
        return torch.jit.load(str(path))(example)


def exported_program(model: nn.Module, example: torch.Tensor, dynamic_batch: bool = True,
                     dynamic_spatial: bool = False) -> torch.export.ExportedProgram:
    """``torch.export.export`` of the model, with a dynamic batch size where the model allows it, and
    with ``dynamic_spatial`` free spatial dims (or an :class:`ExportError` where they cannot be).

    A batch of 1 would be specialised, so the trace sees the example twice over; the program is then
    checked on the example itself. Where the batch cannot stay dynamic, the example's batch is kept.
    """
    if dynamic_batch and example.dim() > 0:
        batched = example if example.shape[0] > 1 else torch.cat([example, example])
        program = _export_with_free_dims(model, batched, batch=True, spatial=dynamic_spatial)
        if _batch_is_dynamic(program):
            return _require_free_spatial(program, dynamic_spatial)
    return _require_free_spatial(_export_with_free_dims(model, example, batch=False, spatial=dynamic_spatial),
                                 dynamic_spatial)


def _export_with_free_dims(model: nn.Module, example: torch.Tensor, *, batch: bool,
                           spatial: bool) -> torch.export.ExportedProgram:
    dims = {**({0: torch.export.Dim.AUTO} if batch else {}),
            **({d: torch.export.Dim.AUTO for d in range(2, example.dim())} if spatial else {})}
    if not spatial:
        return torch.export.export(model, (example,), dynamic_shapes=(dims,) if dims else None)
    try:
        return torch.export.export(model, (example,), dynamic_shapes=(dims,))
    except Exception as error:  # a data-dependent branch on the size, an unsupported op, …
        raise ExportError(f"this model cannot be exported with a dynamic spatial size: {type(error).__name__}: "
                          f"{first_sentence(error)}") from None


def _input_shape(program: torch.export.ExportedProgram) -> tuple:
    name = program.graph_signature.user_inputs[0]
    node = next(n for n in program.graph.nodes if n.op == "placeholder" and n.name == name)
    return tuple(node.meta["val"].shape)


def _batch_is_dynamic(program: torch.export.ExportedProgram) -> bool:
    return isinstance(_input_shape(program)[0], torch.SymInt)


def _spatial_is_dynamic(program: torch.export.ExportedProgram) -> bool:
    return all(isinstance(size, torch.SymInt) for size in _input_shape(program)[2:])


def _require_free_spatial(program: torch.export.ExportedProgram, dynamic_spatial: bool) \
        -> torch.export.ExportedProgram:
    if dynamic_spatial and not _spatial_is_dynamic(program):
        fixed = "×".join(str(s) for s in _input_shape(program)[2:])
        raise ExportError(f"this model cannot be exported with a dynamic spatial size: its forward only works "
                          f"at {fixed} (torch.export fixed the size; a timm ViT needs dynamic_img_size=True)")
    return program


def _facts(program: torch.export.ExportedProgram, dynamic: Dynamic) -> dict:
    return {"dynamic_batch": _batch_is_dynamic(program),
            **({"dynamic_spatial": _spatial_is_dynamic(program)} if dynamic.spatial else {})}


def _write_export(model: nn.Module, path: Path, example: torch.Tensor, dynamic: Dynamic) -> dict:
    program = exported_program(model, example, dynamic.batch, dynamic.spatial)
    torch.export.save(program, str(path))
    return _facts(program, dynamic)


def _run_export(path: Path, example: torch.Tensor, facts: dict) -> Any:
    return torch.export.load(str(path)).module()(example)


def _onnxruntime():
    try:
        import onnxruntime
        import onnxscript  # noqa: F401  (torch.onnx.export(dynamo=True) needs it)
    except ImportError:
        raise ExportError("format 'onnx' needs onnx, onnxscript and onnxruntime: "
                          "pip install 'se-retrofit[onnx]'") from None
    return onnxruntime


def _check_onnx(model: nn.Module) -> None:
    _onnxruntime()


def _write_onnx(model: nn.Module, path: Path, example: torch.Tensor, dynamic: Dynamic) -> dict:
    program = exported_program(model, example, dynamic.batch, dynamic.spatial)
    torch.onnx.export(program, dynamo=True, verbose=False).save(str(path))
    return _facts(program, dynamic)


def _run_onnx(path: Path, example: torch.Tensor, facts: dict) -> Any:
    session = _onnxruntime().InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return session.run(None, {session.get_inputs()[0].name: example.detach().cpu().numpy()})


#: format name → how to write it and read it back. Add an :class:`ExportFormat` here for a new format.
FORMATS: dict[str, ExportFormat] = {
    "safetensors": ExportFormat("se_retrofit.save directory (model + attention safetensors, JSON config)",
                                lambda model: "model", _write_safetensors, _run_safetensors, directory=True),
    "timm": ExportFormat("state dict of timm's native model (seresnet50, …), no se_retrofit needed",
                         lambda model: f"{_timm_name(model)}.safetensors", _write_timm, _run_timm,
                         check=_timm_name, suffix=".safetensors"),
    "torchscript": ExportFormat("torch.jit.trace in eval mode, torch.jit.save",
                                lambda model: "model.torchscript.pt", _write_torchscript, _run_torchscript),
    "export": ExportFormat("torch.export ExportedProgram, torch.export.save (.pt2)",
                           lambda model: "model.pt2", _write_export, _run_export, dynamic_spatial=True),
    "onnx": ExportFormat("torch.onnx.export(dynamo=True), checked with onnxruntime",
                         lambda model: "model.onnx", _write_onnx, _run_onnx, tolerance=1e-4, check=_check_onnx,
                         dynamic_spatial=True),
}
