"""Analysis: find the residual blocks of a model from what it executes. Pure: the model is not changed.

The model is run once on a probe input while every tensor operation is recorded
(:mod:`se_retrofit.recording`), so nothing needs to be traceable. In the executed graph:

**A residual block** is an addition ``y = x' + f(x)`` (or ``f(x) + x'``), written any way: ``+``,
``+=``, ``add_``, ``torch.add`` with or without ``alpha``, a scaled or layer-scaled branch
``x + γ·f(x)``, where

* ``x'``, the *shortcut*, is the block input ``x`` or a short projection of it (at most
  ``MAX_PROJECTION_OPS`` convs, norms, poolings, paddings, scales, linear maps; reshapes are free);
* ``f(x)``, the *branch*, depends on ``x`` through at least one learned layer (a conv, linear map or
  matrix product with parameters, or a norm with parameters), however short (``x + bn(conv(x))``
  is a residual block), or is a pooling token mixer with a learned scale (``x + γ·(pool(x) − x)``);
* ``f`` depends on no other *activation* of the network: every path from the model input to the
  branch passes through ``x``. Side inputs that do not depend on the input's values (RoPE tables,
  relative-position indices, masks made from sizes, parameters, constants) are free, and so is a
  second sequence a layer of the branch attends to (a decoder's cross-attention ``x + attn(q=x,
  k=v=memory)``: it enters as keys and values, or as positions added inside the attending layer);
  a decoder's stream started by the model itself (``zeros_like``, learned queries repeated per
  sample) is a block input like an activation;
* both operands and the sum have one shape (no broadcasting), and the sum is not written into a
  slice of another tensor (rexnet's ``x[:, :c] += y`` is a partial residual).

What is kept out, and by which clause:

* position embeddings: the embedding does not depend on the input;
* HRNet fusion, DPN's dual paths, res2net's hierarchical in-block adds: the operands come from
  different activations (the branch is not dominated by the shortcut's source);
* FPN top-down adds, encoder-decoder additive skips (``up(x) + skip``), hourglass modules: the
  branch goes down through the rest of the network and comes back *up* (an interpolation,
  upsampling or transposed conv in ``f``): a fusion of resolutions, not a block. This is what
  tells an FPN from HF EfficientNet, whose branch is computed in modules beside the one that adds.
  An upsampling is part of a block's branch only inside a layer below the adding module that
  returns the shape it was given (LowFormer's and CPUBone's strided attention, down by a strided
  conv and back up by a transposed conv): that layer resamples by itself, where an FPN, a decoder
  or an hourglass comes back up in the adding module, or in a module given a lower resolution;
* normalisation-internal adds with no learned layer in ``f`` (ConvNeXt-V2's GRN
  ``γ·(x·N(x)) + β + x``);
* multi-branch layers whose operands are both projections of ``x`` (RepVGG's ``conv_kxk(x) +
  conv_1x1(x)``): a one-layer branch counts only against the identity shortcut;
* the block input is where the shortcut and the branch fork: a branch that runs through the
  shortcut's projection (``p + g(p)`` with ``p = conv(x)``) is judged against ``p``, not ``x``.

The block is reported at the module whose own forward performs the addition (``path``, with
``add_index`` counting the additions of that forward as surgery's trace of it sees them), with the
smallest module holding the addition and the whole branch as ``container``.

Layout is told by the layer that writes the branch where it says one (a conv or BatchNorm:
channels-first; a Linear, LayerNorm or ``nn.MultiheadAttention``: channels-last, the attention's
``batch_first`` saying where the batch is), a ``(N, C)`` sum being one vector per sample; else by
probing with a second input size: the dimensions that change are spatial, the one non-batch
dimension that does not is the channel dimension. The second probe runs only when it is needed.
Norms are told by what they compute (:mod:`.norms`: a frozen BatchNorm is a norm).
"""
from __future__ import annotations

import logging
import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Callable

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from .errors import RetrofitError
from . import op_kinds as K
from .chains import find_chain_layers
from .gates import CallCounts, Gate, gate_problem
from .graph import dominated
from .joins import find_joins
from .copying import fake_copy, meta_copy
from .fake_runs import caches_emptied_after
from .recording import SHAPE_ONLY, ModuleCall, Op, Recording, never_run, record
from .tracing import TRACE_FAILURES, graph_cache, own_tensor_adds, restore_training, snapshot_training

MAX_PROJECTION_OPS = 6
#: the kinds of unit: residual blocks, multi-branch joins (:mod:`.joins`), plain chain layers (:mod:`.chains`)
RESIDUAL, JOIN, CHAIN = "residual", "join", "chain"
UNIT_KINDS = (RESIDUAL, JOIN, CHAIN)
CHANNELS_FIRST, CHANNELS_LAST, TOKENS, FEATURES, UNKNOWN = (
    "channels_first", "channels_last", "tokens", "features", "unknown")
SUPPORTED_LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST, TOKENS, FEATURES)
_SHAPE_A, _SHAPE_B = "shape", "shape_probe2"


@dataclass(frozen=True)
class Block:
    """One residual block: an addition of a transformed branch and a shortcut of the same input.

    Attributes:
        path: dotted path of the module whose forward performs the addition (``layer1.0``).
        add_index: which addition of that module's own forward it is (0 for ordinary blocks).
        channels: channel count at the addition.
        in_channels: channel count of the block input (differs where the shortcut projects).
        stage: 1-based resolution level among the residual blocks (layer1 of a ResNet is 1).
        spatial: spatial size at the addition for the probe input.
        layout: ``channels_first`` (N, C, *spatial), ``channels_last``, ``tokens``, ``features``
            (N, C: a vector per sample) or ``unknown``.
        channel_dim: index of the channel dimension at the addition.
        batch_dim: index of the batch dimension (1 for the sequence-first tokens (L, N, C) of an
            ``nn.MultiheadAttention`` with ``batch_first=False``).
        branch: the module or operation producing the branch operand.
        shortcut: ``identity``, or the module/operation ending the shortcut projection.
        shortcut_arg: which argument of the addition (0 or 1) is the shortcut.
        post_activation: the activation applied right after the addition, if any.
        has_attention: the branch already applies channel attention (SE-like gating).
        inner_module, inner_anchor, inner_channels: where the ``inner`` position goes: the module
            whose forward calls the branch's spatial conv (or that conv's norm), the child's name
            within it, and its channel count; None where the branch has no spatial conv.
        container: the smallest module holding the addition, the whole branch and the shortcut
            (``path`` itself, or a parent where the branch runs in modules beside the adding one).
        branch_module: the outermost child call inside ``path``'s forward that returns the branch
            operand (a hook there edits the branch without rewriting ``path``); None where the
            branch comes from ``path``'s own operations or from outside it.
        rewrite_error: why the forward of ``path`` cannot be rewritten (fx cannot trace it, or
            its additions could not be matched to the traced graph); None where it can.
        branch_outside: the module where the branch starts when that is outside ``path`` (HF
            EfficientNet computes the branch in siblings of the adding module, which receives it as an
            argument: ``pre`` there would sit mid-branch); None where ``path``'s forward starts it
            (DLA's blocks, given their shortcut as an argument, start their branch themselves).
        in_place: the forward adds in place into its first operand (``x += shortcut``, ``add_``),
            which an fx trace does not keep: surgery writes the edited addition in place again
            where that is safe (see :mod:`.surgery`).
        output_module, output_leaf: the module whose call returns the sum (after the activation
            that directly follows it in the same forward), and which tensor of its output (pytree
            order) the sum is: ``post`` can be edited from outside that module's forward (see
            :mod:`.outside_edit`); None where no module returns it.
        branch_wrap_module, branch_leaf, branch_wrap_error: the module inside ``path`` whose output
            is the branch operand (``branch_module``, else a stochastic-depth or dropout module
            right after the branch's last operation), which tensor of its output that is, and why
            ``standard`` cannot be edited from outside it (its output also feeds something other
            than the addition, or it runs more often than ``path``); None where it can.
    """

    path: str
    add_index: int
    channels: int
    in_channels: int
    stage: int
    spatial: tuple[int, ...]
    layout: str
    channel_dim: int
    branch: str
    shortcut: str
    shortcut_arg: int
    post_activation: str | None = None
    has_attention: bool = False
    inner_module: str | None = None
    inner_anchor: str | None = None
    inner_channels: int = 0
    container: str | None = None
    branch_module: str | None = None
    rewrite_error: str | None = None
    branch_outside: str | None = None
    in_place: bool = False
    output_module: str | None = None
    output_leaf: int = 0
    branch_wrap_module: str | None = None
    branch_leaf: int = 0
    branch_wrap_error: str | None = None
    kind: str = RESIDUAL
    batch_dim: int = 0
    gates: tuple[tuple[str, tuple[Gate, ...]], ...] = ()
    gate_errors: tuple[tuple[str, str], ...] = ()
    label: str | None = None

    @property
    def name(self) -> str:
        """Unique name: the path, with ``@i`` where a module's forward holds several residual adds."""
        if self.label:
            return self.label
        return self.path if self.add_index == 0 else f"{self.path}@{self.add_index}"

    def gates_for(self, position: str) -> tuple[Gate, ...] | None:
        """For a join or a chain layer: where ``position`` puts its modules (None: it does not apply)."""
        return dict(self.gates).get(position)


@dataclass
class Analysis:
    """Everything :func:`analyze` learned about a model.

    ``untraceable`` maps the blocks whose forward cannot be rewritten to the reason (they are
    found all the same: the analysis runs the model rather than tracing it). ``probes`` says how
    each probe ran (``meta``, ``fake`` or ``real`` tensors) or why the second one did not;
    ``notes`` why a cheaper way of running a probe was given up. ``never_run``: the outermost modules
    with parameters the probe did not run (a stage picked by a condition): blocks there are not seen.
    """

    blocks: list[Block]
    additions: int
    untraceable: dict[str, str] = field(default_factory=dict)
    probe_shape: tuple[int, ...] = ()
    probes: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    units: list[Block] = field(default_factory=list)
    never_run: list[str] = field(default_factory=list)

    @property
    def stages(self) -> list[int]:
        return sorted({b.stage for b in self.blocks})

    def units_of(self, kinds: list[str] | None = None) -> list[Block]:
        """The units of these kinds, in execution order; by default the first kind the model has,
        in the order residual, join, chain (a ResNet's stem conv is no chain layer)."""
        if kinds is None:
            kinds = next(([k] for k in UNIT_KINDS if any(u.kind == k for u in self.units)), [])
        return [u for u in self.units if u.kind in kinds]

    def count(self, kind: str) -> int:
        return sum(u.kind == kind for u in self.units)

    def describe(self) -> str:
        """One line saying what was found, for messages."""
        others = ", ".join(f"{self.count(k)} {k} unit{'s' * (self.count(k) != 1)}" for k in (JOIN, CHAIN)
                           if self.count(k))
        if not self.additions:
            found = others or "no concatenation of branches and no conv → activation chain either"
            return f"the model has no additions at all ({found}; one forward pass on an input of shape " \
                   f"{self.probe_shape} analysed)" + self.never_run_note()
        text = f"{len(self.blocks)} of its {self.additions} additions are residual connections"
        if others:
            text += f"; {others}"
        if self.untraceable:
            parts = "; ".join(f"{k}: {v}" for k, v in list(self.untraceable.items())[:3])
            more = f" and {len(self.untraceable) - 3} more" if len(self.untraceable) > 3 else ""
            text += f" ({len(self.untraceable)} in forwards that cannot be rewritten: {parts}{more})"
        second = self.probes.get(_SECOND, "")
        if second.startswith(NOT_RUN) and any(b.layout == UNKNOWN for b in self.blocks):
            text += f"; layout told from the layers alone: the second probe {second}"
        return text + self.never_run_note()

    def never_run_note(self) -> str:
        """``""``, or a clause naming the modules with parameters the probe did not run."""
        return f"; {never_run_text(self.never_run)}" if self.never_run else ""


def never_run_text(paths: list[str]) -> str:
    """What to tell a user about modules with parameters the probe never ran (for messages and the CLI).

    Example:
        >>> never_run_text(["stages.2", "stages.3"])
        '2 modules with parameters never ran on the probe input (stages.2, stages.3): blocks there are not seen; pass an example_input that runs them'
    """
    listed = ", ".join(paths[:5]) + (f" and {len(paths) - 5} more" if len(paths) > 5 else "")
    return f"{len(paths)} module{'s' * (len(paths) != 1)} with parameters never ran on the probe input " \
           f"({listed}): blocks there are not seen; pass an example_input that runs them"


def find_blocks(model: nn.Module, example_input: Any = None) -> list[Block]:
    """Return the residual blocks of ``model``, in execution order.

    Pure: neither the parameters nor the train/eval mode of ``model`` change.

    Example:
        >>> import timm, se_retrofit
        >>> blocks = se_retrofit.find_blocks(timm.create_model("resnet18"))
        >>> len(blocks), blocks[0].path, blocks[0].channels, blocks[-1].stage
        (8, 'layer1.0', 64, 4)
    """
    return analyze(model, example_input).blocks


def find_units(model: nn.Module, example_input: Any = None, kinds: list[str] | None = None) -> list[Block]:
    """Return every unit attention can go on, in execution order: residual blocks, joins of
    branches (Inception modules, dense layers, ShuffleNet units: :mod:`.joins`) and, in a model
    with neither, the layers of its plain conv chain (VGG, MobileNetV1: :mod:`.chains`). Each has
    a ``kind``; ``kinds`` keeps those kinds only.

    Example:
        >>> import torchvision, se_retrofit
        >>> units = se_retrofit.find_units(torchvision.models.googlenet(init_weights=False))
        >>> len(units), units[0].kind, units[0].name, units[0].channels
        (9, 'join', 'inception3a', 256)
    """
    units = analyze(model, example_input).units
    return units if kinds is None else [u for u in units if u.kind in kinds]


def analyze(model: nn.Module, example_input: Any = None) -> Analysis:
    """Like :func:`find_blocks`, returning also the counts and notes on what could not be rewritten."""
    example = example_input if example_input is not None else default_example_input(model)
    snapshot = snapshot_training(model)
    try:
        model.eval()
        with graph_cache():
            return _analyze(model, example)
    finally:
        restore_training(snapshot)


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


def _analyze(model: nn.Module, example: Any) -> Analysis:
    probes: dict[str, str] = {}
    notes: list[str] = []
    recording = _probe(model, example, probes, notes)
    shapes_b = SecondProbe(model, recording, second_probe(example), probes, notes)
    modules = dict(model.named_modules(remove_duplicate=False))  # paths as the recording names them
    adds = [op for op in recording.ops if op.kind == K.ADD]
    started = _started(recording)
    found: list[tuple[Op, _Residual]] = []
    seen: set[tuple[str, int]] = set()
    per_call: dict[int, int] = {}
    for add in adds:
        index = per_call.get(add.call, 0)
        per_call[add.call] = index + 1
        residual = _match_residual(add, recording.calls, started)
        if residual is not None and (add.scope, index) not in seen:
            seen.add((add.scope, index))
            residual.add_index = index
            found.append((add, residual))
    untraceable: dict[str, str] = {}
    _place_in_traced_forwards(model, recording, found, per_call, untraceable)
    blocks = _to_blocks(found, shapes_b, modules, _sequence_first(recording, modules))
    blocks = _with_outside_edits(blocks, found, recording)
    units = blocks + _other_units(recording, found, shapes_b, modules, has_residuals=bool(blocks))
    probes.setdefault(_SECOND, NOT_NEEDED)
    return Analysis(blocks, len(adds), untraceable, tuple(_shape_of(example)), probes, notes, units,
                    never_run(model, recording))


def _shape_of(example: Any) -> tuple[int, ...]:
    return tuple(example.shape) if isinstance(example, torch.Tensor) else ()


# --- probing ---------------------------------------------------------------------------------

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
    try:
        twin = meta_copy(model)
    except Exception as error:  # a module deepcopy refuses (a lock, a non-leaf tensor attribute)
        raise _Uncopyable(f"the model cannot be copied ({_reason(error)})") from error
    for module in twin.modules():
        forward = _empty_like if _keeps_shape(module) else _activation_shape_only(module) or _conv_shape_only(module)
        if forward is not None:
            module.forward = forward
    return record(twin, example.to("meta"))


class _Uncopyable(RuntimeError):
    """The meta copy of a model could not be made: the probe runs on fake or real tensors instead."""


_SHAPE_KEEPING_FORWARDS = frozenset({nn.modules.batchnorm._BatchNorm.forward, nn.LayerNorm.forward,
                                     nn.GroupNorm.forward})


def _keeps_shape(module: nn.Module) -> bool:
    """A norm layer with torch's own forward (or timm's norm + activation), learned parameters (so the
    recording marks it as learned either way) and no forward of its own on the instance."""
    forward = type(module).forward
    timm_norm_act = type(module).__module__ == "timm.layers.norm_act" and isinstance(module, nn.BatchNorm2d)
    return (forward in _SHAPE_KEEPING_FORWARDS or timm_norm_act) and "forward" not in vars(module) \
        and any(True for _ in module.parameters(recurse=False))


def _empty_like(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return torch.empty_like(input)


_ACTIVATION_FORWARDS = frozenset(cls.forward for types, kind in K._MODULE_KINDS if kind == K.ACT for cls in types)


def _activation_shape_only(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """An activation layer (torch's or timm's own forward, none on the instance) keeps the shape of
    its input: on meta tensors it returns a new empty tensor like its input, or the input itself
    where it works in place (as the layer would: the recording follows tensors by identity)."""
    forward = type(module).forward
    known = forward in _ACTIVATION_FORWARDS or (type(module).__module__ == "timm.layers.activations"
                                                and K.module_kind(module) == K.ACT)
    if not known or "forward" in vars(module):
        return None
    return _same_tensor if getattr(module, "inplace", False) else _empty_like


def _same_tensor(input: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
    return input


_CONV_FORWARDS = {nn.Conv1d.forward: 1, nn.Conv2d.forward: 2, nn.Conv3d.forward: 3}


def _conv_shape_only(module: nn.Module) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """A conv layer with torch's own forward returns, on meta tensors, an empty tensor of the shape
    torch's conv gives (out channels; each size ``(s + 2p - d(k - 1) - 1) // stride + 1``, kept
    with ``padding="same"``), where the meta conv computes the same in Python, op by op. An input
    the conv would refuse (other channels or rank, smaller than the kernel) raises as torch does,
    so a bad example input is still told. Any padding mode pads by ``padding`` first, to the same
    shape."""
    dims = _CONV_FORWARDS.get(type(module).forward)
    if dims is None or "forward" in vars(module):
        return None

    def forward(input: torch.Tensor) -> torch.Tensor:
        if input.dim() not in (dims + 1, dims + 2) or input.shape[-dims - 1] != module.in_channels:
            raise RuntimeError(f"{type(module).__name__} expected {module.in_channels} input channels and "
                               f"{dims}-D maps, got an input of shape {tuple(input.shape)}")
        sizes = input.shape[-dims:]
        if module.padding != "same":
            padding = (0,) * dims if module.padding == "valid" else module.padding
            sizes = [(size + 2 * pad - dilation * (kernel - 1) - 1) // stride + 1 for size, pad, dilation, kernel, stride
                     in zip(sizes, padding, module.dilation, module.kernel_size, module.stride)]
        if min(sizes) < 1:
            raise RuntimeError(f"{type(module).__name__}: the input {tuple(input.shape)} is smaller than the kernel")
        return input.new_empty((*input.shape[:-dims - 1], module.out_channels, *sizes))

    return forward


def _record_on_fake_tensors(model: nn.Module, example: torch.Tensor) -> Recording:
    """Record a fake copy of ``model`` (:func:`~se_retrofit.copying.fake_copy`) on a fake ``example``,
    emptying the caches the run filled: nothing fake is left where a real call would find it (see
    :mod:`.fake_runs`)."""
    from torch._subclasses import fake_tensor

    mode = fake_tensor.FakeTensorMode(allow_non_fake_inputs=True)
    try:
        twin = fake_copy(model, mode)
    except Exception as error:  # a module deepcopy refuses (a lock, a non-leaf tensor attribute)
        raise _Uncopyable(f"the model cannot be copied ({_reason(error)})") from error
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


# --- the residual criterion ------------------------------------------------------------------

@dataclass
class _Residual:
    block_input: Op
    shortcut: Op
    branch: Op
    shortcut_arg: int
    projection: list[Op]
    cone: set[Op]
    add_index: int = 0
    rewrite_error: str | None = None


def _match_residual(add: Op, calls: dict[int, ModuleCall] | None = None,
                    started: frozenset[Op] = frozenset()) -> _Residual | None:
    operands = add.args
    if len(operands) != 2 or any(a is None or not (a.dynamic or a in started) for a in operands):
        return None
    if operands[0].shape is None or operands[0].shape != operands[1].shape or operands[0].shape != add.shape:
        return None
    if any(user.name == "__setitem__" for user in add.users):
        return None  # x[:, :c] += y (rexnet) adds into part of a tensor: not a whole-block residual
    for shortcut_arg in (1, 0):
        shortcut, branch = operands[shortcut_arg], operands[1 - shortcut_arg]
        chain = _projection_chain(shortcut)
        for depth, block_input in enumerate(chain):
            if block_input is branch:
                continue
            cone = _dominated_ops(branch, block_input) or _attending_cone(branch, block_input, add)
            if cone and not cone.intersection(chain[:depth]) and _is_branch(cone, depth > 0, add, calls or {}):
                return _Residual(block_input, shortcut, branch, shortcut_arg, chain[:depth], cone)
    return None


#: how a learned tensor is made one per sample (Mask2Former's queries ``weight.unsqueeze(1).repeat(1, B, 1)``)
_PER_SAMPLE = frozenset({"repeat", "expand", "expand_as", "tile"})


def _started(recording: Recording) -> frozenset[Op]:
    """The values computed from a tensor made from a shape alone (``torch.zeros_like(queries)``: the
    first target of DETR's decoder) or from learned queries repeated for each sample (Mask2Former's):
    a sequence the model starts itself, which its decoder layers then transform as they would an
    input."""
    seeds = [op for op in recording.ops if op.shape and len(op.shape) >= 2 and not op.dynamic and (
        op.name in SHAPE_ONLY or op.name in _PER_SAMPLE and op.weights)]
    found, stack = set(), seeds
    while stack:
        op = stack.pop()
        if op not in found:
            found.add(op)
            stack.extend(op.users)
    return frozenset(found)


#: operations that attend: a product of two values computed from activations (queries and keys,
#: weights and values) or a sampling of values at places computed from the queries (deformable
#: attention), where a second sequence (a decoder's memory) enters a branch
_ATTENDING = frozenset({"matmul", "__matmul__", "bmm", "baddbmm", "einsum", "scaled_dot_product_attention",
                        "multi_head_attention_forward", "grid_sample"})


def _attending_cone(branch: Op, block_input: Op, add: Op) -> set[Op] | None:
    """The ops between ``block_input`` and ``branch`` where every input path to ``branch`` passes
    through ``block_input``, except paths from other activations that enter an attention (a
    decoder's cross-attention ``x + attn(q=x, k=v=memory)``; DETR's and RT-DETR's queries plus
    position embeddings computed from reference boxes): they join the branch at an attending
    operation, or inside the call of a layer below the adding module that attends. The memory is
    then a side input, like a RoPE table; a concatenation or an addition of another activation in
    the adding module itself (DPN's dual paths, DLA's roots) is not, nor a branch that runs outside
    the adding module (a position embedding added to a decoder's stream), nor keys and values the
    adding module computes from what it computes the block input from (a self-attention whose queries
    are the shortcut: MViTv2's residual pooling ``q + attn(q, k, v)``). Values computed from the block
    input count as activations where it is a value the model starts itself (a decoder's first target:
    zeros, or learned queries, used by no op after the addition); None where the branch is no such
    cone."""
    below = _descendants(block_input, branch.index)
    if branch not in below or not block_input.dynamic and any(u.index > add.index for u in block_input.users):
        return None  # a learned value used again after the addition is an embedding added, not a block input
    cone, entries, sides, stack = set(), [], [], [branch]
    while stack:
        op = stack.pop()
        if op is block_input or op in cone:
            continue
        cone.add(op)
        reads = [a for a in op.args if a is not None and (a.dynamic or a in below)]
        inside = [a for a in reads if a in below]
        if len(inside) < len(reads):
            entries.append(op)
            sides.extend(a for a in reads if a not in below)
        stack.extend(inside)
    inside = f"{add.scope}." if add.scope else ""
    if any(not (_where(op) == add.scope or _where(op).startswith(inside)) for op in cone):
        return None  # the branch of a block of attention is computed in the call that adds it
    if sides and _computed_here(block_input, add.scope) & set().union(*(_computed_here(a, add.scope) for a in sides)):
        return None  # keys and values split from the queries' own projection (MViTv2's residual pooling)
    attending = [op.scope for op in cone if op.name in _ATTENDING]
    for entry in entries:
        within = f"{entry.scope}."
        in_a_layer = entry.scope != add.scope and (not add.scope or entry.scope.startswith(f"{add.scope}."))
        if entry.name not in _ATTENDING and not (in_a_layer and any(
                scope == entry.scope or scope.startswith(within) for scope in attending)):
            return None
    return cone


def _computed_here(op: Op, scope: str) -> set[Op]:
    """``op`` and the ops it is computed from inside the module ``scope``."""
    inside = f"{scope}." if scope else ""
    found, stack = set(), [op]
    while stack:
        node = stack.pop()
        if node not in found and (_where(node) == scope or _where(node).startswith(inside)):
            found.add(node)
            stack.extend(node.inputs)
    return found


def _descendants(op: Op, until: int) -> set[Op]:
    """``op`` and every op computed from it, up to the op number ``until``; a detached value is
    another input (RT-DETR's reference boxes, refined by each decoder layer and detached)."""
    found, stack = set(), [op]
    while stack:
        node = stack.pop()
        if node not in found and node.index <= until and (node is op or node.name != "detach"):
            found.add(node)
            stack.extend(node.users)
    return found


#: a shortcut may also scale (MetaFormer's res_scale: x · s) or apply a linear map (MViTv2's token projection)
_SHORTCUT_KINDS = K.PROJECTION_KINDS | {K.MUL, K.LINEAR}
_FREE_KINDS = frozenset({K.RESHAPE, K.IDENTITY, K.DROPOUT})


#: a pooling written as a reduction over a dimension (Hiera's unrolled max-pool ``x.view(...).amax(1)``);
#: ``max[0]`` is the values of ``max(dim=...)``
_REDUCTIONS = frozenset({"max", "amax", "mean"})
_REDUCTION_VALUES = "max[0]"


def _projection_chain(op: Op) -> list[Op]:
    """``op`` and the ops it projects from, back through at most ``MAX_PROJECTION_OPS`` projection
    ops (reshapes and no-ops are free)."""
    chain, cost = [op], 0
    while cost < MAX_PROJECTION_OPS and len(chain) < 4 * MAX_PROJECTION_OPS:
        source = _pooled_source(chain[-1]) if chain[-1].name == "cat" else None
        if source is not None:  # cat([amax(x), mean(x)]): poolings of one tensor side by side
            cost += 1
            chain.append(source)
            while source.name in _SPLITS and len(source.inputs) == 1:  # all its pieces, joined again
                source = source.inputs[0]
                chain.append(source)
            continue
        inputs = chain[-1].inputs
        if not _projects(chain[-1]) or len(inputs) != 1:
            break
        cost += chain[-1].kind not in _FREE_KINDS and chain[-1].name != _REDUCTION_VALUES
        chain.append(inputs[0])
    return chain


def _projects(op: Op) -> bool:
    return op.kind in _SHORTCUT_KINDS or (not op.module and op.name in _REDUCTIONS | {_REDUCTION_VALUES})


#: a piece of a split tensor (torchvision MViT's ``class_token, x = tensor_split(x, (1,), dim=2)``)
_PIECES = ("tensor_split[", "split[", "chunk[", "unbind[", "tensor_split", "split", "chunk")
_SPLITS = frozenset({"tensor_split", "split", "chunk"})


def _pooled_source(cat: Op) -> Op | None:
    """The one tensor a concatenation pools in each of its parts, each part reshapes, slices, poolings
    and parameter-free reductions of it (Hiera's stage transition without a projection: ``cat([amax(x),
    mean(x)])``; MViTv2's pooled shortcut with a class token: ``cat([x[:, :1], pool(x[:, 1:])])``): the
    nearest op every part's way back passes."""
    ways = [_way_back(part) for part in cat.inputs]
    if len(ways) < 2 or any(len(way) < 2 for way in ways):
        return None
    return next((op for op in ways[0][1:] if all(op in way[1:] for way in ways[1:])), None)


def _way_back(part: Op) -> list[Op]:
    way = [part]
    while len(way) < 10 and not part.weights and len(part.inputs) == 1 and (
            part.kind in _FREE_KINDS or part.kind == K.POOL or part.name.startswith(_PIECES)
            or part.name in _REDUCTIONS | {_REDUCTION_VALUES, "__getitem__"}):
        part = part.inputs[0]
        way.append(part)
    return way


def _dominated_ops(branch: Op, block_input: Op) -> set[Op] | None:
    """Ops between ``block_input`` and ``branch`` if every input path to ``branch`` passes through
    ``block_input``; None otherwise. Ops run before ``block_input`` cannot lie between."""
    return dominated(branch, block_input, inputs=lambda op: op.inputs,
                     escapes=lambda op: op.index < block_input.index or not op.args and op.dynamic)


def _is_branch(cone: set[Op], projected: bool, add: Op, calls: dict[int, ModuleCall]) -> bool:
    """The branch applies a learned layer and does not come back up from a lower resolution; next
    to a projected shortcut it must be more than a projection itself (else: a multi-branch layer)."""
    kinds = [op.kind for op in cone]
    if not _learns(cone, kinds) or any(op.kind == K.UPSAMPLE and not _only_gates(op)
                                       and not _resamples_within_a_layer(op, cone, add, calls) for op in cone):
        return False
    if projected and all(kind in _SHORTCUT_KINDS for kind in kinds):
        return kinds.count(K.CONV) + kinds.count(K.LINEAR) >= 2
    return True


def _only_gates(op: Op, depth: int = 0) -> bool:
    """Every use of the upsampled result multiplies a map, directly or through an activation: an
    attention gate brought back to full resolution (GhostNetV2's DFC attention), not features fused."""
    return bool(op.users) and depth < 4 and all(
        user.kind == K.MUL or (user.kind == K.ACT and _only_gates(user, depth + 1)) for user in op.users)


def _resamples_within_a_layer(upsample: Op, cone: set[Op], add: Op, calls: dict[int, ModuleCall]) -> bool:
    """The upsampling runs inside a layer of the branch, below the adding module, that returns the
    shape it was given: the layer went down and came back up by itself (LowFormer's and CPUBone's
    strided attention ``upsample(attend(conv_s(x)))``), unlike an FPN, a decoder or an hourglass,
    which come back up in the module that adds, or in one that takes a lower resolution in."""
    inside = f"{add.scope}." if add.scope else ""
    call = calls.get(upsample.call)
    while call is not None and call.path != add.scope and call.path.startswith(inside):
        given = _tensor_shapes((call.args, call.kwargs))
        returned = min((op for op in cone if op.index > upsample.index and call.path in op.returned_by),
                       key=lambda op: op.index, default=None)
        if returned is not None and returned.shape is not None and given[:1] == [returned.shape]:
            return True
        call = calls.get(call.parent)
    return False


def _tensor_shapes(value: Any) -> list[tuple[int, ...]]:
    return [tuple(t.shape) for t in tree_leaves(value) if isinstance(t, torch.Tensor)]


def _learns(cone: set[Op], kinds: list[str]) -> bool:
    """A learned layer on the branch; or a pooling token mixer scaled by learned parameters
    (PoolFormer / EfficientFormer: ``x + γ·(pool(x) − x)``)."""
    if any(op.kind in K.LAYER_KINDS and op.weights for op in cone):
        return True
    return K.POOL in kinds and any(op.weights for op in cone)


# --- where surgery will find the additions -----------------------------------------------------

def _place_in_traced_forwards(model: nn.Module, recording: Recording, found: list[tuple[Op, "_Residual"]],
                              per_call: dict[int, int], untraceable: dict[str, str]) -> None:
    """Set each block's ``add_index`` as surgery counts additions: in the graph of the adding module's
    own forward, where shape arithmetic (``H + pad``) is an addition node too; note the blocks whose
    forward cannot be traced."""
    positions: dict[str, list[int] | str] = {}
    for add, residual in found:
        path = add.scope
        if path not in positions:
            positions[path] = _traced_positions(model, recording, add)
        places = positions[path]
        if isinstance(places, str):
            residual.rewrite_error = places
        elif len(places) != per_call[add.call]:
            residual.rewrite_error = (f"its forward runs {per_call[add.call]} tensor additions where its traced "
                                      f"graph has {len(places)}")
        else:
            residual.add_index = places[residual.add_index]
        if residual.rewrite_error:
            name = path if residual.add_index == 0 else f"{path}@{residual.add_index}"
            untraceable[name or "<root>"] = residual.rewrite_error


def _traced_positions(model: nn.Module, recording: Recording, add: Op) -> list[int] | str:
    module = model.get_submodule(add.scope)
    if "forward" in vars(module):  # edited before: its forward was generated from a trace
        return list(range(sum(op.kind == K.ADD and op.call == add.call for op in recording.ops)))
    call = recording.calls.get(add.call)
    args, kwargs = (call.args, call.kwargs) if call is not None else ((), {})
    try:
        return own_tensor_adds(module, args, kwargs)
    except TRACE_FAILURES as error:
        return _reason(error)


# --- where a block can be edited from outside its forward (see :mod:`.outside_edit`) ------------

def _with_outside_edits(blocks: list[Block], found: list[tuple[Op, _Residual]], recording: Recording) -> list[Block]:
    """Each block with where an edit from outside its forward could put ``post`` and ``standard``."""
    calls = CallCounts(recording)
    return [replace(block, **_output_place(add), **_branch_place(add, residual, calls))
            for block, (add, residual) in zip(blocks, found)]


def _output_place(add: Op) -> dict[str, Any]:
    """The adding module returns the sum (or the activation its forward applies right after it)."""
    op = add
    if len(add.users) == 1 and add.users[0].kind == K.ACT and add.users[0].scope == add.scope:
        op = add.users[0]
    leaf = op.returned_leaf.get(add.scope, -1)
    return {"output_module": add.scope, "output_leaf": leaf} if leaf >= 0 else {}


def _branch_place(add: Op, residual: _Residual, calls: CallCounts) -> dict[str, Any]:
    """The module (inside the adding one) whose output is the branch operand, nearest the branch's
    last layer: the outermost call returning that layer's result, else a stochastic-depth or dropout
    module after it; usable where that output reaches the addition and nothing else (through
    stochastic depth or dropout only) and the module runs as often as the adding one. Where the
    outermost one does not (a dropout shared by two branches), the next one in."""
    inside = f"{add.scope}." if add.scope else ""
    chain = [residual.branch]
    while chain[-1].kind in K.PASSTHROUGH_KINDS and len(chain[-1].inputs) == 1 and len(chain[-1].inputs[0].users) == 1:
        chain.append(chain[-1].inputs[0])
    found = [(op, p) for op in reversed(chain) for p in reversed(op.returned_by) if p.startswith(inside) and p != add.scope]
    if not found:
        return {}
    if residual.branch.users != [add] or any(not p.startswith(inside) for o in chain for p in o.returned_by):
        return {"branch_wrap_module": found[0][1],
                "branch_wrap_error": f"the output of {found[0][1]} is used elsewhere than in the addition"}
    block_runs = max(calls.counts.get(add.scope, 0), 1)
    problems = []
    for op, path in found:
        runs, leaf = calls.counts.get(path, 0), op.returned_leaf.get(path, -1)
        if runs == block_runs and leaf >= 0:
            return {"branch_wrap_module": path, "branch_leaf": leaf}
        problems.append(f"{path} runs {runs} times where {add.scope or 'the model'} runs {block_runs} (one module "
                        f"serves more than one branch: give each branch its own {path.rpartition('.')[2]} module, "
                        f"or leave the block out with exclude=[{add.scope!r}])"
                        if runs != block_runs else f"{path} returns the branch more than once")
    return {"branch_wrap_module": found[0][1], "branch_wrap_error": problems[0]}


# --- from matches to blocks --------------------------------------------------------------------

def _to_blocks(found: list[tuple[Op, _Residual]], shapes_b: Mapping[int, tuple], modules: dict[str, nn.Module],
               sequence_first: set[Op] = frozenset()) -> list[Block]:
    drafts = []
    for add, residual in found:
        layout, channel_dim, batch_dim = _layout(add, residual, shapes_b, modules)
        batch_dim = 1 if layout == TOKENS and add in sequence_first else batch_dim
        spatial = tuple(s for d, s in enumerate(add.shape) if d not in (batch_dim, channel_dim)) if channel_dim else ()
        spatial = (1,) if layout == FEATURES else spatial  # a vector per sample: a map of one position
        drafts.append((add, residual, layout, channel_dim, batch_dim, spatial))
    sizes = sorted({math.prod(d[5]) for d in drafts if d[2] != UNKNOWN}, reverse=True)
    blocks = []
    for add, residual, layout, channel_dim, batch_dim, spatial in drafts:
        shape = add.shape
        in_shape = residual.block_input.shape or shape
        stage = sizes.index(math.prod(spatial)) + 1 if layout != UNKNOWN else 0
        blocks.append(Block(
            path=add.scope,
            add_index=residual.add_index,
            channels=int(shape[channel_dim]) if channel_dim else 0,
            in_channels=int(in_shape[channel_dim]) if channel_dim and len(in_shape) > channel_dim else 0,
            stage=stage,
            spatial=spatial,
            layout=layout,
            channel_dim=channel_dim,
            batch_dim=batch_dim,
            branch=_describe(residual.branch),
            shortcut=_describe(residual.projection[0]) if residual.projection else "identity",
            shortcut_arg=residual.shortcut_arg,
            post_activation=_post_activation(add),
            has_attention=_has_channel_attention(residual.cone, channel_dim),
            container=_container(add, residual),
            branch_module=_branch_module(add, residual),
            rewrite_error=residual.rewrite_error,
            branch_outside=_branch_outside(add, residual),
            in_place=add.name in _IN_PLACE_ADDS,
            **_inner_site(residual, modules),
        ))
    return blocks


_IN_PLACE_ADDS = frozenset({"add_", "__iadd__"})


def _sequence_first(recording: Recording, modules: dict[str, nn.Module]) -> set[Op]:
    """The ops whose result holds sequence-first tokens ``(L, N, C)``: the outputs and the inputs of
    the ``nn.MultiheadAttention`` layers with ``batch_first=False``, what is computed from them and
    what they are computed from without a reshape or a change of rank (the sums, norms and
    feed-forward layers around them: torchaudio's Conformer adds its first half-step feed-forward
    layer before any attention ran, on tokens its model transposed to sequence-first)."""
    def sequence_first(module: str) -> bool:
        return isinstance(modules.get(module), nn.MultiheadAttention) and not modules[module].batch_first

    seeds = [op for op in recording.ops if op.shape and len(op.shape) == 3 and any(map(sequence_first, op.returned_by))]
    seeds += [i for op in recording.ops if op.module and sequence_first(op.module)
              for i in op.inputs if i.shape and len(i.shape) == 3]
    found, stack = set(), seeds
    while stack:
        op = stack.pop()
        if op in found:
            continue
        found.add(op)
        near = [*op.users, *(op.inputs if op.kind != K.RESHAPE else ())]
        stack.extend(n for n in near if n.kind != K.RESHAPE and n.shape and len(n.shape) == 3
                     and n.shape[:2] == op.shape[:2])
    return found


def _where(op: Op) -> str:
    return op.module or op.scope


def _container(add: Op, residual: _Residual) -> str:
    """The smallest module whose call holds the addition, the branch and the shortcut projection."""
    parts = add.scope.split(".") if add.scope else []
    for op in [*residual.cone, *residual.projection]:
        other = _where(op).split(".") if _where(op) else []
        common = 0
        while common < min(len(parts), len(other)) and parts[common] == other[common]:
            common += 1
        parts = parts[:common]
    return ".".join(parts)


def _branch_module(add: Op, residual: _Residual) -> str | None:
    """The outermost call of a module inside ``add.scope`` returning the branch operand (skipping
    stochastic depth and dropout, where a standard site goes before them)."""
    op = residual.branch
    while op.kind in K.PASSTHROUGH_KINDS and len(op.inputs) == 1 and len(op.inputs[0].users) == 1:
        op = op.inputs[0]
    prefix = f"{add.scope}." if add.scope else ""
    inside = [p for p in op.returned_by if p.startswith(prefix) and p != add.scope]
    return inside[-1] if inside else None


def _branch_outside(add: Op, residual: _Residual) -> str | None:
    """Where the branch starts (its first op reading the block input) when no such op runs inside
    ``add.scope``; None where one does."""
    starts = sorted((op for op in residual.cone if residual.block_input in op.inputs), key=lambda op: op.index)
    if not add.scope or not starts:
        return None
    inside = [op for op in starts if _where(op) == add.scope or _where(op).startswith(f"{add.scope}.")]
    return None if inside else _where(starts[0]) or "<root>"


def _inner_site(residual: _Residual, modules: dict[str, nn.Module]) -> dict[str, Any]:
    """Where ``inner`` goes: after the branch's first spatial (k > 1) conv, or after the norm that
    directly follows it, as a call in the forward of the module that makes it."""
    convs = [op for op in residual.cone if op.kind == K.CONV and op.module
             and isinstance(modules.get(op.module), nn.modules.conv._ConvNd)
             and math.prod(modules[op.module].kernel_size) > 1]
    if not convs:
        return {}
    anchor = min(convs, key=lambda op: op.index)
    users = anchor.users
    if len(users) == 1 and users[0].module and users[0].kind in (K.NORM, K.NORM_ACT):
        anchor = users[0]
    path, caller, shape = anchor.module, anchor.scope, anchor.shape
    if not shape or len(shape) < 2 or (caller and not path.startswith(f"{caller}.")):
        return {}
    child = path[len(caller) + 1:] if caller else path
    return {"inner_module": caller, "inner_anchor": child, "inner_channels": int(shape[1])}


def _describe(op: Op) -> str:
    if op.module:
        return op.module
    return f"{op.scope}:{op.name}" if op.scope else op.name


def _layout(add: Op, residual: _Residual, shapes_b: Mapping[int, tuple],
            modules: dict[str, nn.Module]) -> tuple[str, int, int]:
    """(layout, channel dim, batch dim); 0 as channel dim means unknown.

    A ``(N, C)`` sum has one candidate. Else the layer that writes the branch (:func:`_writer_says`)
    tells where its channels are: a conv of the branch that produces the sum's very shape, with a
    channel count that no spatial size shares, says channels-first (no permutation keeps that shape);
    a Linear, a LayerNorm or an ``nn.MultiheadAttention`` writing the sum says channels-last (the
    attention also where the batch is). Where none does, the two probes tell it: the dimensions that
    change are spatial. Where the second probe did not run, or the model resized it back to its own
    size (CrossViT interpolates every input to ``img_size``), or more than one dimension kept its
    size (MobileViTV2's (N, C, pixels per patch, patches)), the layers of the branch decide."""
    shape_a = add.shape
    rank = len(shape_a)
    if rank == 2:
        return FEATURES, 1, 0
    if rank < 2:
        return UNKNOWN, 0, 0
    if shape_a[1] not in shape_a[2:] and _conv_says_channels_first(residual, shape_a, modules, exact=True):
        return CHANNELS_FIRST, 1, 0
    written = _writer_says(residual, shape_a, modules)
    if written is not None:
        return written
    shape_b = shapes_b.get(add.index)
    if shape_b is not None and len(shape_b) == rank and shape_b != shape_a:
        constant = [d for d in range(1, rank) if shape_a[d] == shape_b[d]]
        if len(constant) == 1 and len(shape_a) - 2 == sum(shape_a[d] != shape_b[d] for d in range(1, rank)):
            dim = constant[0]
            if dim == 1:
                return CHANNELS_FIRST, 1, 0
            if dim == rank - 1:
                return _channels_last(rank)
        if len(constant) != 2:
            return UNKNOWN, 0, 0
    if _conv_says_channels_first(residual, shape_a, modules):
        return CHANNELS_FIRST, 1, 0
    if _linear_says_channels_last(residual, shape_a, modules):
        return _channels_last(rank)
    return UNKNOWN, 0, 0


def _channels_last(rank: int, batch_dim: int = 0) -> tuple[str, int, int]:
    return (TOKENS if rank == 3 else CHANNELS_LAST), rank - 1, batch_dim


#: ops a branch may end with after the layer that writes it: stochastic depth, dropout, activations
_AFTER_WRITER = frozenset({K.DROPOUT, K.IDENTITY, K.ACT})


def _writer_says(residual: _Residual, shape: tuple[int, ...], modules: dict[str, nn.Module]
                 ) -> tuple[str, int, int] | None:
    """The layout the layer writing the branch operand says, where it says one: walking back from
    the operand through dropout, activations, casts and a layer scale (``γ · f(x)``) to the first
    layer, that layer's output of the sum's shape carries its channels where its kind puts them.
    Through a transpose, or a crop or pad (Wav2Vec2's positional conv trims the frame its padding
    added), the channels are found again by their size (:func:`_through_permutes`)."""
    op, rank = residual.branch, len(shape)
    permuted = False  # a transpose, permute, crop or pad between the writer and the sum
    for _ in range(12):
        if op.shape is None or len(op.shape) != rank or (sorted(op.shape) != sorted(shape) and not permuted):
            return None
        if op not in residual.cone and op is not residual.branch:
            return None
        if op.shape != tuple(shape) and not permuted:
            return None
        attention = next((modules[p] for p in op.returned_by if isinstance(modules.get(p), nn.MultiheadAttention)),
                         None)
        if attention is not None:
            said = _channels_last(len(op.shape)) if attention.embed_dim == op.shape[-1] else None
            return _through_permutes(said, op.shape, shape) if permuted else said
        said = _layer_says(op, op.shape, modules)
        if said is not None or op.weights:
            return _through_permutes(said, op.shape, shape) if permuted else said
        if (op.kind == K.RESHAPE and op.name in _PERMUTES or _crops_or_pads(op)) and len(op.inputs) == 1:
            permuted, op = True, op.inputs[0]
        elif op.kind == K.MUL:  # a layer scale: follow the map it scales
            maps = [i for i in op.inputs if i.shape == op.shape]
            if len(maps) != 1:
                return None
            op = maps[0]
        elif op.kind in _AFTER_WRITER and len(op.inputs) == 1:
            op = op.inputs[0]
        else:
            return None
    return None


#: reshapes that only reorder dimensions: the channels keep their size (torchaudio's Conformer
#: convolves ``(N, C, T)`` and transposes back to ``(T, N, C)`` before its addition)
_PERMUTES = frozenset({"transpose", "permute", "swapaxes", "swapdims", "movedim", "t"})


def _crops_or_pads(op: Op) -> bool:
    """A slice (``x[:, :, :-1]``, ``narrow``) or a pad of one tensor that keeps its rank."""
    if op.kind != K.PAD and op.name not in ("__getitem__", "narrow"):
        return False
    source = op.inputs[0] if len(op.inputs) == 1 else None
    return source is not None and source.shape is not None and op.shape is not None \
        and len(source.shape) == len(op.shape)


def _through_permutes(said: tuple[str, int, int] | None, written: tuple[int, ...], shape: tuple[int, ...]
                      ) -> tuple[str, int, int] | None:
    """The layout of a sum whose branch was written as ``written`` and then had its dimensions
    reordered: the channels are where their size is, where no other dimension of the sum has it; the
    batch too (where it is not 1, a size others can share)."""
    if said is None:
        return None
    channels = written[said[1]]
    if list(shape).count(channels) != 1:
        return None
    channel_dim = shape.index(channels)
    batch = written[said[2]]
    batch_dim = shape.index(batch) if list(shape).count(batch) == 1 else 0
    rank = len(shape)
    if channel_dim == 1 and batch_dim == 0:
        return CHANNELS_FIRST, 1, 0
    if channel_dim == rank - 1:
        return _channels_last(rank, batch_dim)
    return None


def _layer_says(op: Op, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> tuple[str, int, int] | None:
    """Where this layer writes its channels: a Linear's ``out_features``, a one-dimensional
    LayerNorm's ``normalized_shape`` or a functional linear map on the last dimension; a conv's
    ``out_channels`` or a BatchNorm's / GroupNorm's channels on dimension 1."""
    rank = len(shape)
    layer = modules.get(op.module) if op.module else None
    if isinstance(layer, nn.Linear) and layer.out_features == shape[-1]:
        return _channels_last(rank)
    if isinstance(layer, nn.LayerNorm) and tuple(layer.normalized_shape) == (shape[-1],):
        return _channels_last(rank)
    if not op.module and op.kind == K.LINEAR and op.weights and op.name in _LINEAR_MAPS:
        return _channels_last(rank)
    if isinstance(layer, nn.modules.conv._ConvNd) and not isinstance(layer, nn.modules.conv._ConvTransposeNd):
        channels = layer.out_channels if rank == len(layer.kernel_size) + 2 else None
    elif isinstance(layer, nn.modules.batchnorm._BatchNorm):
        channels = layer.num_features
    elif isinstance(layer, nn.GroupNorm):
        channels = layer.num_channels
    else:
        return None
    return (CHANNELS_FIRST, 1, 0) if channels == shape[1] else None


#: functional maps that write the last dimension (``F.linear``; transformers' ``Conv1D`` as ``addmm``)
_LINEAR_MAPS = frozenset({"linear", "addmm"})


def _linear_says_channels_last(residual: _Residual, shape: tuple[int, ...], modules: dict[str, nn.Module]) -> bool:
    """Without a second probe: the branch has a Linear producing the last dimension, or a linear map
    with parameters doing so (transformers' ``Conv1D``: ``addmm(bias, x, weight)``); the conv check
    runs first (tokens in ViTs and GPTs, NHWC maps in Swin)."""
    for op in residual.cone:
        layer = modules.get(op.module) if op.module else None
        if isinstance(layer, nn.Linear) and layer.out_features == shape[-1] and (op.shape or ())[-1:] == shape[-1:]:
            return True
        if not op.module and op.kind == K.LINEAR and op.weights and (op.shape or ())[-1:] == shape[-1:]:
            return True
    return False


def _conv_says_channels_first(residual: _Residual, shape: tuple[int, ...], modules: dict[str, nn.Module],
                              exact: bool = False) -> bool:
    """A conv in the branch producing this channel count and rank (with ``exact``: this very shape)."""
    for op in residual.cone:
        conv = modules.get(op.module) if op.module else None
        if isinstance(conv, nn.modules.conv._ConvNd) and conv.out_channels == shape[1] \
                and len(shape) == len(conv.kernel_size) + 2 and (not exact or op.shape == tuple(shape)):
            return True
    return False


def _post_activation(add: Op) -> str | None:
    users = add.users
    if len(users) == 1 and users[0].kind == K.ACT:
        return _describe(users[0])
    return None


def _has_channel_attention(cone: set[Op], channel_dim: int) -> bool:
    """A multiplication of a feature map by a per-channel vector computed from the input."""
    for op in cone:
        if op.kind != K.MUL or op.module:
            continue
        shapes = [a.shape for a in op.args if a is not None and a.dynamic]
        if len(shapes) == 2 and all(shapes) and (_is_channel_gate(shapes[0], shapes[1], channel_dim)
                                                 or _is_channel_gate(shapes[1], shapes[0], channel_dim)):
            return True
    return False


def _is_channel_gate(gate: tuple, features: tuple, channel_dim: int) -> bool:
    if len(gate) != len(features) or len(gate) < 3 or not channel_dim:
        return False
    spatial = [d for d in range(1, len(gate)) if d != channel_dim]
    return gate[channel_dim] == features[channel_dim] > 1 and all(gate[d] == 1 for d in spatial) \
        and any(features[d] > 1 for d in spatial)


# --- units that are not residual blocks: joins and plain chain layers --------------------------

def _other_units(recording: Recording, found: list[tuple[Op, _Residual]], shapes_b: Mapping[int, tuple],
                 modules: dict[str, nn.Module], has_residuals: bool) -> list[Block]:
    """The joins (outside residual branches), and where a model has neither residual blocks nor
    joins, the layers of its plain chain, as blocks of kind ``join`` / ``chain``."""
    inside = {op for _, r in found for op in (*r.cone, *r.projection)}
    joins = [_join_block(j) for j in find_joins(recording, modules, shapes_b, inside)]
    if joins or has_residuals:
        return _checked(_staged(_labelled(joins)), modules, recording)
    return _checked(_staged([_chain_block(layer) for layer in find_chain_layers(recording, modules)]), modules,
                    recording)


def _checked(units: list[Block], modules: dict[str, nn.Module], recording: Recording) -> list[Block]:
    """Each unit with ``rewrite_error`` set where one of its gates cannot be found again in the
    traced forward of the module it edits (that forward cannot be traced, or lacks the place)."""
    problems: dict[Gate, str | None] = {}
    checked = []
    for unit in units:
        for gate in {g for _, position_gates in unit.gates for g in position_gates}:
            if gate not in problems:
                problems[gate] = gate_problem(modules[gate.module], gate, recording.first_call.get(gate.module))
        errors = tuple((position, problem) for position, gates in unit.gates
                       for problem in [next((problems[g] for g in gates if problems[g]), None)] if problem)
        checked.append(replace(unit, gate_errors=errors) if errors else unit)
    return checked


def _join_block(join) -> Block:
    cat, dim = join.cat, join.channel_dim
    shape = cat.shape
    in_shape = join.unit_input.shape or shape
    rank = len(shape)
    return Block(
        path=join.post.module, add_index=join.post.index, channels=int(shape[dim]),
        in_channels=int(in_shape[dim]) if len(in_shape) == rank else 0, stage=0,
        spatial=tuple(s for d, s in enumerate(shape) if d not in (0, dim)),
        layout=CHANNELS_FIRST if dim == 1 else TOKENS if rank == 3 else CHANNELS_LAST, channel_dim=dim,
        branch=", ".join(_describe(cat.args[i]) for i in join.new_branches), shortcut="", shortcut_arg=0,
        post_activation=_post_activation(cat), container=join.container, kind=JOIN,
        gates=(("post", (join.post,)), ("standard", tuple(join.standard)), ("stage", (join.post,))))


def _chain_block(layer) -> Block:
    shape = layer.end.shape
    return Block(
        path=layer.conv.module, add_index=0, channels=int(shape[1]), in_channels=int(shape[1]), stage=0,
        spatial=tuple(shape[2:]), layout=CHANNELS_FIRST, channel_dim=1, branch=layer.conv.module, shortcut="",
        shortcut_arg=0, post_activation=_describe(layer.end), kind=CHAIN,
        gates=(("standard", (layer.gate,)), ("post", (layer.gate,)), ("stage", (layer.gate,))))


def _labelled(units: list[Block]) -> list[Block]:
    """Names: the path, ``path@k`` for the k-th unit of a forward holding several."""
    seen: dict[str, int] = {}
    labelled = []
    for unit in units:
        k = seen.get(unit.path, 0)
        seen[unit.path] = k + 1
        labelled.append(replace(unit, label=unit.path if k == 0 else f"{unit.path}@{k}"))
    return labelled


def _staged(units: list[Block]) -> list[Block]:
    """Stages: 1-based resolution levels among these units, largest maps first."""
    sizes = sorted({math.prod(u.spatial) for u in units}, reverse=True)
    return [replace(u, stage=sizes.index(math.prod(u.spatial)) + 1) for u in units]
