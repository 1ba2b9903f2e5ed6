"""The residual criterion: which additions of the executed graph are residual blocks.

In the graph one forward pass executes (:mod:`se_retrofit.recording`):

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
  or an hourglass comes back up in the adding module, or in a module given a lower resolution; and
  an upsampling whose values reach the sum only through a comparison is a mask, not features
  (EoMT's mask logits, brought up to the token grid and thresholded into its attention mask);
* normalisation-internal adds with no learned layer in ``f`` (ConvNeXt-V2's GRN
  ``γ·(x·N(x)) + β + x``);
* multi-branch layers whose operands are both projections of ``x`` (RepVGG's ``conv_kxk(x) +
  conv_1x1(x)``): a one-layer branch counts only against the identity shortcut;
* the block input is where the shortcut and the branch fork: a branch that runs through the
  shortcut's projection (``p + g(p)`` with ``p = conv(x)``) is judged against ``p``, not ``x``.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._pytree import tree_leaves

from . import op_kinds as K
from .graph import dominated
from .recording import SHAPE_ONLY, ModuleCall, Op, Recording

MAX_PROJECTION_OPS = 6


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
    zeros, or learned queries, used by no op after the addition). Values computed outside the adding
    module and passed in are side inputs too, even where computed from the block input (PP-DocLayoutV4's
    query positions, from boxes each decoder layer refines from its own output without detaching
    them); None where the branch is no such cone."""
    below = _descendants(block_input, branch.index)
    if branch not in below or not block_input.dynamic and any(u.index > add.index for u in block_input.users):
        return None  # a learned value used again after the addition is an embedding added, not a block input
    if not _within(branch, add.scope):
        return None  # the branch of a block of attention is computed in the call that adds it
    cone, entries, sides, stack = set(), [], [], [branch]
    while stack:
        op = stack.pop()
        if op is block_input or op in cone:
            continue
        cone.add(op)
        reads = [a for a in op.args if a is not None and (a.dynamic or a in below)]
        inside = [a for a in reads if a in below and (a is block_input or _within(a, add.scope))]
        if len(inside) < len(reads):
            entries.append(op)
            sides.extend(a for a in reads if a not in inside)
        stack.extend(inside)
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


def _within(op: Op, scope: str) -> bool:
    """``op`` runs in the call of the module ``scope`` (or of a module below it)."""
    return not scope or _where(op) == scope or _where(op).startswith(f"{scope}.")


def _computed_here(op: Op, scope: str) -> set[Op]:
    """``op`` and the ops it is computed from inside the module ``scope``."""
    found, stack = set(), [op]
    while stack:
        node = stack.pop()
        if node not in found and _within(node, scope):
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
        cost += chain[-1].kind not in _FREE_KINDS and chain[-1].name != _REDUCTION_VALUES and not _whole_slice(chain[-1])
        chain.append(inputs[0])
    return chain


def _projects(op: Op) -> bool:
    return op.kind in _SHORTCUT_KINDS or _whole_slice(op) or (
        not op.module and op.name in _REDUCTIONS | {_REDUCTION_VALUES})


def _whole_slice(op: Op) -> bool:
    """A slice by plain indices that keeps the whole tensor (SEW's ``pooled[..., :min_length]`` where
    the pooled sequence is the shorter): a no-op, free like a reshape."""
    return op.name in ("__getitem__", "narrow") and len(op.args) == 1 and op.shape == op.args[0].shape


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
    if not _learns(cone, kinds) or any(op.kind == K.UPSAMPLE and not _only_gates(op) and _reaches_as_values(op, cone, add)
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


#: comparisons: their result says where, not how much
_COMPARISONS = frozenset({"gt", "ge", "lt", "le", "eq", "ne", "__gt__", "__ge__", "__lt__", "__le__", "__eq__", "__ne__",
                          "greater", "greater_equal", "less", "less_equal", "not_equal"})


def _reaches_as_values(upsample: Op, cone: set[Op], add: Op) -> bool:
    """The upsampled values reach the addition other than through a comparison: an FPN's features
    do; EoMT's mask logits, brought up to the tokens' grid and thresholded (``logits > 0``) into the
    mask a block's attention reads, say only where to attend, like a mask made from sizes."""
    seen, stack = set(), [upsample]
    while stack:
        op = stack.pop()
        if op is add:
            return True
        if op not in seen and op.name not in _COMPARISONS:
            seen.add(op)
            stack.extend(user for user in op.users if user in cone or user is add)
    return False


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


def _where(op: Op) -> str:
    return op.module or op.scope
