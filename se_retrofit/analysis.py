"""Analysis: find the residual blocks of a model. Pure: the model is not changed.

A residual block is an addition ``y = branch + shortcut`` where ``shortcut`` is the block's
input ``x`` (or ``x`` through a short projection: conv, norm, pooling, padding) and ``branch``
is a transformed function of ``x`` alone: every path from the model's inputs to ``branch``
passes through ``x``, and the branch applies learned weights and is more than a projection.
This rejects position-embedding adds (the embedding does not depend on ``x``), res2net's
hierarchical in-block adds (the shortcut is a slice, not a projection), HRNet fusion adds and
DPN's dual paths (the operands come from different inputs).

Layout is told by probing with two input sizes: the dimensions that change are spatial, the one
non-batch dimension that does not is the channel dimension.
"""
from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import fx, nn

from .errors import RetrofitError
from . import op_kinds as K
from .shapes import record_shapes
from .tracing import (MODULE_PATH, TracedRegion, TraceResult, restore_training, snapshot_training, split_region,
                      trace_regions)

MAX_PROJECTION_OPS = 6
CHANNELS_FIRST, CHANNELS_LAST, TOKENS, UNKNOWN = "channels_first", "channels_last", "tokens", "unknown"
SUPPORTED_LAYOUTS = (CHANNELS_FIRST, CHANNELS_LAST, TOKENS)
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
        layout: ``channels_first`` (N, C, *spatial), ``channels_last``, ``tokens`` or ``unknown``.
        channel_dim: index of the channel dimension at the addition.
        branch: the module or operation producing the branch operand.
        shortcut: ``identity``, or the module/operation ending the shortcut projection.
        shortcut_arg: which argument of the addition (0 or 1) is the shortcut.
        post_activation: the activation applied right after the addition, if any.
        has_attention: the branch already applies channel attention (SE-like gating).
        inner_module, inner_anchor, inner_channels: where the ``inner`` position goes: the module
            whose forward calls the branch's spatial conv (or that conv's norm), the child's name
            within it, and its channel count; None where the branch has no spatial conv.
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

    @property
    def name(self) -> str:
        """Unique name: the path, with ``@i`` where a module's forward holds several residual adds."""
        return self.path if self.add_index == 0 else f"{self.path}@{self.add_index}"

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["spatial"] = list(self.spatial)
        return data


@dataclass
class Analysis:
    """Everything :func:`analyze` learned about a model."""

    blocks: list[Block]
    additions: int
    traced_whole: bool
    untraceable: dict[str, str] = field(default_factory=dict)
    probe_shape: tuple[int, ...] = ()

    @property
    def stages(self) -> list[int]:
        return sorted({b.stage for b in self.blocks})

    def describe(self) -> str:
        """One line saying what was found, for messages."""
        how = "the model traced as a whole" if self.traced_whole else \
            f"traced in parts, untraceable: {', '.join(self.untraceable) or 'none'}"
        if not self.additions:
            return f"the model has no additions at all, it chains or concatenates features ({how})"
        return f"{len(self.blocks)} of its {self.additions} additions are residual connections ({how})"


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


def analyze(model: nn.Module, example_input: Any = None) -> Analysis:
    """Like :func:`find_blocks`, returning also the counts and tracing notes."""
    example = example_input if example_input is not None else default_example_input(model)
    snapshot = snapshot_training(model)
    try:
        model.eval()
        return _analyze(model, example)
    finally:
        restore_training(snapshot)


def default_example_input(model: nn.Module, batch: int = 1) -> torch.Tensor:
    """A random input of the size the model was made for (timm's ``pretrained_cfg``, else 3×224×224)."""
    size = _configured_input_size(model) or (3, 224, 224)
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
    return None


def second_probe(example: Any) -> Any:
    """The same input with every spatial dimension 32 larger (or None when that is not defined)."""
    if not isinstance(example, torch.Tensor) or example.dim() < 3 or not example.is_floating_point():
        return None
    size = (*example.shape[:2], *(s + 32 for s in example.shape[2:]))
    generator = torch.Generator().manual_seed(1)
    return torch.randn(size, generator=generator).to(example)


def _analyze(model: nn.Module, example: Any) -> Analysis:
    traced = trace_regions(model)
    _probe(model, traced, example, _SHAPE_A, required=True)
    second = second_probe(example)
    if second is not None:
        _probe(model, traced, second, _SHAPE_B, required=False)
    found: list[tuple[fx.Node, _Residual]] = []
    additions = 0
    for region in traced.regions:
        modules = dict(region.module.named_modules())
        mark_dynamic(region.graph)
        adds = [n for n in region.graph.nodes if K.node_kind(n, modules) == K.ADD]
        additions += len(adds)
        scope_counts: dict[str, int] = {}
        for node in adds:
            scope = node.meta.get(MODULE_PATH, "")
            index = scope_counts.get(scope, 0)
            scope_counts[scope] = index + 1
            residual = _match_residual(node, modules)
            if residual is not None:
                residual.add_index = index
                found.append((node, residual))
    blocks = _to_blocks(found)
    return Analysis(blocks, additions, traced.whole, traced.untraceable, tuple(_shape_of(example)))


def _shape_of(example: Any) -> tuple[int, ...]:
    return tuple(example.shape) if isinstance(example, torch.Tensor) else ()


# --- probing ---------------------------------------------------------------------------------

def _probe(model: nn.Module, traced: TraceResult, example: Any, key: str, required: bool) -> None:
    """Write each node's shape under ``key`` by running the regions on ``example``'s activations.

    A region whose traced graph fails where the model itself runs (the tracer baked in a branch the
    real input does not take) is split into its children, which are traced and probed instead.
    """
    for _ in range(MAX_SPLITS):
        try:
            inputs = _region_inputs(model, traced.regions, example)
        except Exception as error:
            if required:
                raise _probe_error(example, error) from error
            return
        failed = [r for r in traced.regions if r.path in inputs and not _record(r, inputs[r.path], key)]
        if not failed or not required:
            return
        for region in failed:
            split_region(traced, region)
    raise ProbeError(f"the traced graphs of this model do not run on an input of shape {_shape_of(example)}")


MAX_SPLITS = 6


def _record(region: TracedRegion, call: tuple, key: str) -> bool:
    try:
        record_shapes(region.module, region.graph, call[0], call[1], key=key)
        return True
    except Exception:
        return False


def _probe_error(example: Any, error: BaseException) -> "ProbeError":
    return ProbeError(f"running the model on an input of shape {_shape_of(example)} failed: "
                      f"{type(error).__name__}: {str(error).splitlines()[0] if str(error) else ''}. "
                      "Pass example_input= with a shape the model accepts.")


class ProbeError(RetrofitError):
    """The model could not be run on the example input."""


def _region_inputs(model: nn.Module, regions: list[TracedRegion], example: Any) -> dict[str, tuple]:
    """Capture the arguments each traced region is called with, by one real forward pass."""
    captured: dict[str, tuple] = {}
    handles = []
    for region in regions:
        if region.path == "":
            captured[""] = (_as_args(example), {})
            continue

        def hook(module, args, kwargs, path=region.path):
            captured.setdefault(path, (args, kwargs))
        handles.append(region.module.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        with torch.no_grad():
            _call(model, example)
    finally:
        for handle in handles:
            handle.remove()
    return captured


def _as_args(example: Any) -> tuple:
    return example if isinstance(example, tuple) else (example,)


def _call(model: nn.Module, example: Any) -> Any:
    if isinstance(example, dict):
        return model(**example)
    return model(*_as_args(example))


# --- the residual criterion ------------------------------------------------------------------

@dataclass
class _Residual:
    block_input: fx.Node
    shortcut: fx.Node
    branch: fx.Node
    shortcut_arg: int
    projection: list[fx.Node]
    cone: set[fx.Node]
    modules: dict[str, nn.Module]
    add_index: int = 0


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    args = list(node.args[:2])
    if len(args) < 2 and "other" in node.kwargs:
        args.append(node.kwargs["other"])
    if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
        return None
    return args[0], args[1]


def _match_residual(add: fx.Node, modules: dict[str, nn.Module]) -> _Residual | None:
    operands = add_operands(add)
    if operands is None or "alpha" in add.kwargs:
        return None
    shape_a, shape_b = (op.meta.get(_SHAPE_A) for op in operands)
    if shape_a is None or shape_a != shape_b or shape_a != add.meta.get(_SHAPE_A):
        return None
    if _writes_into_slice(add):
        return None
    for shortcut_arg in (1, 0):
        shortcut, branch = operands[shortcut_arg], operands[1 - shortcut_arg]
        chain = _projection_chain(shortcut, modules)
        for depth, block_input in enumerate(chain):
            if block_input is branch:
                continue
            cone = dominated_cone(branch, block_input)
            if cone and _inside(cone, add.meta.get(MODULE_PATH, "")) and _transforms(cone, block_input, modules):
                return _Residual(block_input, shortcut, branch, shortcut_arg, chain[:depth], cone, modules)
    return None


def _writes_into_slice(add: fx.Node) -> bool:
    """``x[:, :c] += y`` (rexnet) adds into part of a tensor: not a whole-block residual."""
    return any(user.op == "call_function" and getattr(user.target, "__name__", "") == "setitem" for user in add.users)


_DYNAMIC = "depends_on_input"


def mark_dynamic(graph: fx.Graph) -> None:
    """Mark in ``node.meta`` which nodes depend on the graph's inputs (parameters do not)."""
    for node in graph.nodes:
        if node.op == "placeholder":
            node.meta[_DYNAMIC] = _is_data_input(node)
        else:
            node.meta[_DYNAMIC] = any(n.op != "get_attr" and n.meta.get(_DYNAMIC, True)
                                      for n in node.all_input_nodes)


def _is_data_input(placeholder: fx.Node) -> bool:
    """A required argument, or an optional one that was given a tensor when probed. Optional
    arguments left at their default (``attn_mask=None``) are constants, not a second input."""
    has_default = bool(placeholder.args)
    return not has_default or placeholder.meta.get(_SHAPE_A) is not None


def dynamic_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` that depend on the graph's inputs (see :func:`mark_dynamic`)."""
    return [n for n in node.all_input_nodes if n.op != "get_attr" and n.meta.get(_DYNAMIC, True)]


def _projection_chain(node: fx.Node, modules: dict[str, nn.Module]) -> list[fx.Node]:
    """``node`` and the nodes it projects from, back through at most a few projection ops."""
    chain = [node]
    while len(chain) <= MAX_PROJECTION_OPS and K.node_kind(chain[-1], modules) in K.PROJECTION_KINDS:
        inputs = dynamic_inputs(chain[-1])
        if len(inputs) != 1:
            break
        chain.append(inputs[0])
    return chain


def dominated_cone(branch: fx.Node, block_input: fx.Node) -> set[fx.Node] | None:
    """Nodes between ``block_input`` and ``branch`` if every input path to ``branch`` passes
    through ``block_input``; None otherwise."""
    cone, stack, reached = set(), [branch], False
    while stack:
        node = stack.pop()
        if node is block_input:
            reached = True
            continue
        if node in cone:
            continue
        if node.op == "placeholder" and node.meta.get(_DYNAMIC, True):
            return None
        cone.add(node)
        stack.extend(dynamic_inputs(node))
    return cone if reached else None


def _inside(cone: set[fx.Node], scope: str) -> bool:
    """The branch is computed inside the module that adds it. An FPN's top-down add has a branch that
    runs back through the backbone: a fusion of scales, not a residual block."""
    if not scope:
        return True
    prefix = f"{scope}."
    return all((path := n.meta.get(MODULE_PATH, "")) == scope or path.startswith(prefix) for n in cone)


def _transforms(cone: set[fx.Node], block_input: fx.Node, modules: dict[str, nn.Module]) -> bool:
    """The branch applies learned weights and is more than one projection of the input.

    A lone conv/norm (``x + bn(conv(x))``: RepVGG's parallel branches, conditional position
    encodings) is a multi-branch layer, not a residual block; two convs in series are a branch.
    """
    if not any(K.has_weights(n, modules) for n in cone):
        return False
    kinds = [K.node_kind(n, modules) for n in cone]
    only_projection = all(kind in K.PROJECTION_KINDS for kind in kinds)
    return not only_projection or kinds.count(K.CONV) >= 2


# --- from matches to blocks --------------------------------------------------------------------

def _to_blocks(found: list[tuple[fx.Node, _Residual]]) -> list[Block]:
    drafts = []
    for add, residual in found:
        layout, channel_dim = _layout(add, residual)
        shape = add.meta[_SHAPE_A]
        spatial = tuple(s for d, s in enumerate(shape) if d not in (0, channel_dim)) if channel_dim else ()
        drafts.append((add, residual, layout, channel_dim, spatial))
    sizes = sorted({math.prod(d[4]) for d in drafts if d[2] != UNKNOWN}, reverse=True)
    blocks = []
    for add, residual, layout, channel_dim, spatial in drafts:
        shape = add.meta[_SHAPE_A]
        in_shape = residual.block_input.meta.get(_SHAPE_A) or shape
        stage = sizes.index(math.prod(spatial)) + 1 if layout != UNKNOWN else 0
        blocks.append(Block(
            path=add.meta.get(MODULE_PATH, ""),
            add_index=residual.add_index,
            channels=int(shape[channel_dim]) if channel_dim else 0,
            in_channels=int(in_shape[channel_dim]) if channel_dim and len(in_shape) > channel_dim else 0,
            stage=stage,
            spatial=spatial,
            layout=layout,
            channel_dim=channel_dim,
            branch=_describe(residual.branch),
            shortcut=_describe(residual.projection[0]) if residual.projection else "identity",
            shortcut_arg=residual.shortcut_arg,
            post_activation=_post_activation(add, residual.modules),
            has_attention=_has_channel_attention(residual.cone, channel_dim),
            **_inner_site(residual),
        ))
    return blocks


def _inner_site(residual: _Residual) -> dict[str, Any]:
    """Where ``inner`` goes: after the branch's first spatial (k > 1) conv, or after the norm that
    directly follows it, as a call in the forward of the module that makes it."""
    convs = [(n, path) for n in residual.cone for path in [_conv_module_path(n, residual.modules)]
             if path is not None and math.prod(residual.modules[path].kernel_size) > 1]
    if not convs:
        return {}
    order = {n: i for i, n in enumerate(residual.branch.graph.nodes)}
    conv, path = min(convs, key=lambda pair: order[pair[0]])
    caller = conv.meta.get(MODULE_PATH, "") if conv.op == "call_module" else path.rpartition(".")[0]
    anchor, users = conv, list(conv.users)
    if len(users) == 1 and users[0].op == "call_module" and \
            K.node_kind(users[0], residual.modules) in (K.NORM, K.NORM_ACT):
        anchor, path, caller = users[0], str(users[0].target), users[0].meta.get(MODULE_PATH, "")
    shape = anchor.meta.get(_SHAPE_A)
    if not shape or (caller and not path.startswith(f"{caller}.")):
        return {}
    child = path[len(caller) + 1:] if caller else path
    return {"inner_module": caller, "inner_anchor": child, "inner_channels": int(shape[1])}


def _conv_module_path(node: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    """The conv module a node applies: a leaf conv call, or ``F.convNd`` inside a conv subclass's
    own forward (torchvision's Conv3DSimple, timm's Conv2dSame)."""
    if K.node_kind(node, modules) != K.CONV:
        return None
    if node.op == "call_module":
        return str(node.target)
    scope = node.meta.get(MODULE_PATH, "")
    return scope if isinstance(modules.get(scope), nn.modules.conv._ConvNd) else None


def _describe(node: fx.Node) -> str:
    if node.op == "call_module":
        return str(node.target)
    target = getattr(node.target, "__name__", str(node.target))
    scope = node.meta.get(MODULE_PATH, "")
    return f"{scope}:{target}" if scope else str(target)


def _layout(add: fx.Node, residual: _Residual) -> tuple[str, int]:
    """(layout, channel dim) from the two probes; 0 as channel dim means unknown.

    Where the second probe did not run, or the model resized it back to its own size (CrossViT
    interpolates every input to ``img_size``), the layers of the branch decide."""
    shape_a, shape_b = add.meta.get(_SHAPE_A), add.meta.get(_SHAPE_B)
    rank = len(shape_a)
    if rank < 3:
        return UNKNOWN, 0
    if shape_b is not None and len(shape_b) == rank and shape_b != shape_a:
        constant = [d for d in range(1, rank) if shape_a[d] == shape_b[d]]
        if len(constant) == 1 and len(shape_a) - 2 == sum(shape_a[d] != shape_b[d] for d in range(1, rank)):
            dim = constant[0]
            if dim == 1:
                return CHANNELS_FIRST, 1
            if dim == rank - 1:
                return (TOKENS if rank == 3 else CHANNELS_LAST), dim
        return UNKNOWN, 0
    if _conv_says_channels_first(residual, shape_a):
        return CHANNELS_FIRST, 1
    if _linear_says_channels_last(residual, shape_a):
        return (TOKENS if rank == 3 else CHANNELS_LAST), rank - 1
    return UNKNOWN, 0


def _linear_says_channels_last(residual: _Residual, shape: tuple[int, ...]) -> bool:
    """Without a second probe: the branch ends in a Linear producing the last dimension, and no
    conv in it produces dimension 1 (tokens in ViTs, NHWC maps in Swin)."""
    for node in residual.cone:
        if node.op == "call_module" and K.node_kind(node, residual.modules) == K.LINEAR \
                and residual.modules[node.target].out_features == shape[-1] \
                and node.meta.get(_SHAPE_A, ())[-1:] == shape[-1:]:
            return True
    return False


def _conv_says_channels_first(residual: _Residual, shape: tuple[int, ...]) -> bool:
    """Without a second probe: a conv in the branch producing this channel count and rank."""
    for node in residual.cone:
        if node.op == "call_module" and K.node_kind(node, residual.modules) == K.CONV:
            conv = residual.modules[node.target]
            if conv.out_channels == shape[1] and len(shape) == len(conv.kernel_size) + 2:
                return True
    return False


def _post_activation(add: fx.Node, modules: dict[str, nn.Module]) -> str | None:
    users = list(add.users)
    if len(users) == 1 and K.node_kind(users[0], modules) == K.ACT:
        return _describe(users[0])
    return None


def _has_channel_attention(cone: set[fx.Node], channel_dim: int) -> bool:
    """A multiplication of a feature map by a per-channel vector computed from the input."""
    for node in cone:
        if node.op == "call_module" or K.node_kind(node, {}) != K.MUL:
            continue
        operands = [a for a in node.args[:2] if isinstance(a, fx.Node) and a.meta.get(_DYNAMIC, True)]
        shapes = [a.meta.get(_SHAPE_A) for a in operands]
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
