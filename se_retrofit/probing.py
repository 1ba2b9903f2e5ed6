"""Probing: run the model on a probe input while it is recorded (:mod:`se_retrofit.recording`), as
cheaply as the model allows: on meta tensors (a copy of it whose norms, activations and convs only
give shapes: :mod:`.shape_only`), else on fake tensors, else on the input itself. A second probe, the
input with larger spatial dimensions, tells which dimensions are spatial where the layers do not
(:mod:`.layout`); it runs only when its shapes are first looked up. Where the caller gives no input,
the probe input is one of the size the model was made for."""
from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping
from typing import Any, Callable

import torch
from torch import nn

from .copying import fake_copy, meta_copy
from .errors import RetrofitError
from .fake_runs import caches_emptied_after
from .recording import Recording, record
from .shape_only import shape_only_forward

_FIRST, _SECOND = "first", "second"
NOT_RUN = "not run"
NOT_NEEDED = f"{NOT_RUN}: the layers told every layout"
#: what running a model on meta or fake tensors raises where its forward needs real values
#: (``.item()``, ``if x.any()``), makes tensors of its own on a real device, or lacks a meta
#: kernel: any of these means "run on real numbers instead", never a failure of the analysis
_SYMBOLIC_FAILURES = (RuntimeError, NotImplementedError, TypeError, ValueError, AssertionError, IndexError)
#: what a model raises when it refuses an input of another size (fixed ``img_size``, asserts)
_INPUT_REFUSED = (RuntimeError, ValueError, AssertionError, IndexError, TypeError, NotImplementedError)


def _probe(model: nn.Module, example: Any, probes: dict[str, str], notes: list[str]) -> Recording:
    """Record one forward pass: on meta tensors, then fake tensors where the model allows (shapes
    without arithmetic), else on the example itself. How it ran goes into ``probes``."""
    recording = _record_symbolically(model, example, _FIRST, probes, notes)
    if recording is not None:
        return recording
    try:
        recording = record(model, example)
    except Exception as error:  # the model itself failed on the input: the user's input is wrong
        raise _probe_error(example, error) from error
    probes[_FIRST] = "real"
    return recording


class SecondProbe(Mapping):
    """The shapes of the second probe (see :func:`_second_shapes`) by op index, probed when first
    looked up: where the layers tell every layout (a conv producing the block's channels), the
    analysis needs one run of the model, not two."""

    def __init__(self, model: nn.Module, first: Recording, example: Any, probes: dict[str, str],
                 notes: list[str]):
        self._probe = lambda: _second_shapes(model, first, example, probes, notes)
        self._shapes: dict[int, tuple[int, ...]] | None = None

    @property
    def shapes(self) -> dict[int, tuple[int, ...]]:
        if self._shapes is None:
            self._shapes = self._probe()
        return self._shapes

    def __getitem__(self, index: int) -> tuple[int, ...]:
        return self.shapes[index]

    def __iter__(self) -> Iterator[int]:
        return iter(self.shapes)

    def __len__(self) -> int:
        return len(self.shapes)


def _second_shapes(model: nn.Module, first: Recording, example: Any, probes: dict[str, str],
                   notes: list[str]) -> dict[int, tuple[int, ...]]:
    """Shapes of the first run's operations at the larger input, where the run executes the same ops.
    Only shapes are needed, so the run is on meta or fake tensors where the model allows."""
    if example is None:
        probes[_SECOND] = f"{NOT_RUN}: the input is not a floating-point tensor with spatial dimensions"
        return {}
    try:
        recording = _record_symbolically(model, example, _SECOND, probes, notes, refusals=(AssertionError,))
    except AssertionError as error:  # a check of the input's size (ViT's img_size): it does not depend on values
        probes[_SECOND] = f"{NOT_RUN}: the model refuses an input of shape {_shape_of(example)} ({_reason(error)})"
        return {}
    if recording is None:
        try:
            recording = record(model, example)
        except _INPUT_REFUSED as error:
            probes[_SECOND] = f"{NOT_RUN}: the model refuses an input of shape {_shape_of(example)} " \
                              f"({_reason(error)})"
            return {}
        probes[_SECOND] = "real"
    ops = recording.ops
    if len(ops) != len(first.ops) or any(a.name != b.name for a, b in zip(ops, first.ops)):
        probes[_SECOND] = f"{NOT_RUN}: at input shape {_shape_of(example)} the model runs other operations"
        return {}
    return {op.index: op.shape for op in ops if op.shape is not None}


def _record_symbolically(model: nn.Module, example: Any, probe: str, probes: dict[str, str],
                         notes: list[str], refusals: tuple[type[BaseException], ...] = ()) -> Recording | None:
    """The recording on meta tensors, else on fake tensors; None (and why, in ``notes``) where neither
    runs. The errors in ``refusals`` are raised: they would come from a real run all the same."""
    if not isinstance(example, torch.Tensor) or example.device.type == "meta":
        notes.append(f"{probe} probe on real tensors: meta and fake tensors are made from one real tensor")
        return None
    for name, how in (("meta", _record_on_meta_tensors), ("fake", _record_on_fake_tensors)):
        try:
            recording = how(model, example)
        except refusals:
            raise
        except _SYMBOLIC_FAILURES as error:
            notes.append(f"{probe} probe not on {name} tensors: {_reason(error)}")
            continue
        probes[probe] = name
        return recording
    return None


def _record_on_meta_tensors(model: nn.Module, example: torch.Tensor) -> Recording:
    """Record a copy of ``model``'s module tree whose parameters and buffers are meta tensors (shape and
    dtype, no data): the cheapest run that gives every shape. ``model`` itself is never changed, not
    even for the call (:func:`~se_retrofit.copying.meta_copy`): a module registered under two names, a
    tied weight or a failure part-way cannot leave anything of it swapped.

    Norm and activation layers keep the shape of their input, and torch computes their shape on meta
    tensors the long way (in Python, op by op): in the copy they return an empty tensor like their
    input, and conv layers one of their output's shape. The recording holds each as one operation all
    the same (it sees layers, not their insides)."""
    twin = _copied(meta_copy, model)
    for module in twin.modules():
        forward = shape_only_forward(module)
        if forward is not None:
            module.forward = forward
    return record(twin, example.to("meta"))


class _Uncopyable(RuntimeError):
    """The meta or fake copy of a model could not be made: the probe runs on fake or real tensors instead."""


def _copied(copy: Callable[[nn.Module], nn.Module], model: nn.Module) -> nn.Module:
    """``copy(model)``, or an :class:`_Uncopyable` where a module refuses to be copied (a lock, a
    non-leaf tensor attribute)."""
    try:
        return copy(model)
    except Exception as error:  # whatever a module's deepcopy raises
        raise _Uncopyable(f"the model cannot be copied ({_reason(error)})") from error


def _record_on_fake_tensors(model: nn.Module, example: torch.Tensor) -> Recording:
    """Record a fake copy of ``model`` (:func:`~se_retrofit.copying.fake_copy`) on a fake ``example``,
    emptying the caches the run filled: nothing fake is left where a real call would find it (see
    :mod:`.fake_runs`)."""
    from torch._subclasses import fake_tensor

    mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    twin = _copied(lambda module: fake_copy(module, mode), model)
    # a model that refuses the probe's size (a fixed position embedding) fails in a meta kernel, which
    # torch logs with its traceback before raising: the error is caught and reported here instead
    logger = fake_tensor.log
    level = logger.level
    logger.setLevel(logging.CRITICAL)
    try:
        with mode, caches_emptied_after():
            return record(twin, mode.from_tensor(example))
    finally:
        logger.setLevel(level)


def _reason(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0] if text else ''}".strip()


def _probe_error(example: Any, error: BaseException) -> "ProbeError":
    return ProbeError(f"running the model on an input of shape {_shape_of(example)} failed: "
                      f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
                      "Pass example_input= with a shape the model accepts (--input-size on the command line).")


class ProbeError(RetrofitError):
    """The model could not be run on the example input."""


def default_example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A random input of the size the model was made for: timm's ``pretrained_cfg``, else one the
    first layer it applies takes (a Conv1d/2d/3d: its channels over 4096 samples, 224×224 pixels or
    16×112×112 frames; a Linear: its features). A :class:`ProbeError` where neither tells.

    Example:
        >>> import torchvision
        >>> tuple(default_example_input(torchvision.models.video.r3d_18()).shape)
        (1, 3, 16, 112, 112)
    """
    size = _configured_input_size(model) or _size_from_first_layer(model)
    param = next(model.parameters(), None)
    dtype = param.dtype if param is not None and param.is_floating_point() else torch.float32
    device = param.device if param is not None else "cpu"
    generator = torch.Generator().manual_seed(0)
    return torch.randn(batch, *size, generator=generator).to(device=device, dtype=dtype)


def _configured_input_size(model: nn.Module) -> tuple[int, ...] | None:
    for attr in ("pretrained_cfg", "default_cfg"):
        cfg = getattr(model, attr, None)
        if isinstance(cfg, dict) and cfg.get("input_size"):
            return tuple(cfg["input_size"])
    config = getattr(model, "config", None)  # transformers: image_size and num_channels
    image_size, channels = getattr(config, "image_size", None), getattr(config, "num_channels", None)
    if isinstance(channels, int) and isinstance(image_size, int):
        return channels, image_size, image_size
    if isinstance(channels, int) and isinstance(image_size, (list, tuple)) and len(image_size) == 2:
        return (channels, *map(int, image_size))
    return None


_SPATIAL_BY_RANK = {1: (4096,), 2: (224, 224), 3: (16, 112, 112)}


def _size_from_first_layer(model: nn.Module) -> tuple[int, ...]:
    for module in model.modules():
        if isinstance(module, nn.modules.conv._ConvNd) and not isinstance(module, nn.modules.conv._ConvTransposeNd):
            return (module.in_channels, *_SPATIAL_BY_RANK[len(module.kernel_size)])
        if isinstance(module, nn.Linear):
            return (module.in_features,)
        if isinstance(module, (nn.Embedding, nn.EmbeddingBag, nn.RNNBase)):
            break
    raise ProbeError("cannot tell what input this model takes (its first layer is neither a conv nor a "
                     "linear layer): pass example_input= (--input-size on the command line)")


def second_probe(example: Any) -> Any:
    """The same input with every spatial dimension 32 larger (or None when that is not defined)."""
    if not isinstance(example, torch.Tensor) or example.dim() < 3 or not example.is_floating_point():
        return None
    size = (*example.shape[:2], *(s + 32 for s in example.shape[2:]))
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, generator=generator).to(example)


def _shape_of(example: Any) -> tuple[int, ...]:
    return tuple(example.shape) if isinstance(example, torch.Tensor) else ()
