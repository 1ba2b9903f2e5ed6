"""Multi-branch joins: branches computed from one common input and concatenated along the channels.

What the SE paper does for Inception (SE on the output of each whole Inception module), and what
SE-DenseNet and SE-ShuffleNet do (SE on the newly computed branch), found from what the model
executes (:mod:`se_retrofit.recording`), not from per-family code. A concatenation ``y = cat([b₁,
…, bₖ], channel_dim)`` is a **join** where

* at least two of the ``bᵢ`` depend on the model input;
* they are concatenated along the channel dimension (the one dimension, besides the batch, that
  does not change when the input grows; a concatenation of tokens or of spatial tiles is not a join);
* the **unit input** ``x`` is the nearest operation that every path from the model input to every
  ``bᵢ`` passes through, and at least one ``bᵢ`` is computed from ``x`` through a learned layer
  (a conv, linear map or norm with parameters). Concatenations of slices, of pixel tiles
  (space-to-depth) or of a model's input channels are not joins;
* no branch comes back up from a lower resolution (an upsampling or transposed conv in it: the
  skip concatenations of U-Nets and feature-pyramid necks are fusions, as for additions);
* it is not part of a larger unit: not inside the branch of a residual block (Res2Net's and
  Inception-ResNet's concatenations belong to their residual block), and not a join whose result
  is, through reshapes only, a branch of another join computed from a wider input (InceptionE's
  split 3×3 branches are part of the Inception module).

The *new* branches of a join are the operands with a learned layer that no earlier join already
concatenated: every branch of an Inception module, the one new feature map of each DenseNet
concatenation, the transformed half of a ShuffleNetV2 unit. ``standard`` gates each new branch (at
the module returning it, so every later use sees the gated tensor: SE-DenseNet); ``post`` gates the
concatenation.
"""
from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from torch import nn

from . import op_kinds as K
from .gates import CAT, CAT_OPERAND, CallCounts, Gate, gate_after, own_index
from .graph import dominated
from .recording import Op, Recording


@dataclass
class Join:
    """One join found: the concatenation, its unit input, the new branches and their gates."""

    cat: Op
    unit_input: Op
    channel_dim: int
    new_branches: list[int]
    post: Gate
    standard: list[Gate]
    container: str


def find_joins(recording: Recording, modules: dict[str, nn.Module], shapes_b: Mapping[int, tuple],
               inside_residuals: set[Op]) -> list[Join]:
    """The joins of the executed graph, in execution order (see the module docstring)."""
    calls = CallCounts(recording)
    candidates = []
    for op in recording.ops:
        if op.kind == K.CAT and op not in inside_residuals:
            join = _match_join(op, modules, shapes_b, calls, recording.ops)
            if join is not None:
                candidates.append(join)
    kept = [j for j in candidates if not any(_nested(j, outer) for outer in candidates if outer is not j)]
    return _with_new_branches(kept, modules, calls)


def _match_join(cat: Op, modules: dict[str, nn.Module], shapes_b: Mapping[int, tuple], calls: CallCounts,
                ops: list[Op]) -> Join | None:
    operands = list(cat.args)
    if len(operands) < 2 or not all(a is not None and a.dynamic and a.shape for a in operands) \
            or not cat.shape:
        return None  # a parameter concatenated (a class token) or an operand the recording did not see
    channel_dim = _channel_dim(cat, operands, shapes_b)
    if channel_dim is None:
        return None
    unit_input = _common_input(operands)
    if unit_input is None:
        return None
    cones = [_between(o, unit_input) for o in operands]
    if any(cone is not None and any(op.kind == K.UPSAMPLE for op in cone) for cone in cones):
        return None
    learned = [i for i, cone in enumerate(cones) if cone and _learns(cone)]
    if not learned:
        return None
    post = Gate(cat.scope, CAT, int(cat.shape[channel_dim]), index=own_index(cat, ops), channel_dim=channel_dim)
    return Join(cat, unit_input, channel_dim, learned, post, [], _container(cat, unit_input))


def _channel_dim(cat: Op, operands: list[Op], shapes_b: Mapping[int, tuple]) -> int | None:
    """The dimension the operands are concatenated along, where it is the channel dimension (the
    second probe's shapes are looked up last: the lookup runs that probe)."""
    shape = cat.shape
    if len(shape) < 3 or any(len(o.shape) != len(shape) for o in operands):
        return None
    differing = [d for d in range(len(shape)) if any(o.shape[d] != shape[d] for o in operands)]
    if len(differing) != 1 or sum(o.shape[differing[0]] for o in operands) != shape[differing[0]]:
        return None
    dim = differing[0]
    shape_b = shapes_b.get(cat.index)
    if shape_b is not None and len(shape_b) == len(shape) and shape_b != shape:
        constant = [d for d in range(1, len(shape)) if shape[d] == shape_b[d]]
        return dim if constant == [dim] else None
    return dim if dim == 1 and len(shape) >= 4 else None  # one probe only: channels-first maps


def _common_input(operands: list[Op]) -> Op | None:
    """The nearest op every operand's input paths pass through (an operand itself, possibly)."""
    first = min(operands, key=lambda op: op.index)
    for candidate in sorted(_ancestors(first), key=lambda op: -op.index):
        if all(o is candidate or _between(o, candidate) is not None for o in operands):
            return candidate
    return None


def _ancestors(op: Op) -> set[Op]:
    seen, stack = set(), [op]
    while stack:
        node = stack.pop()
        if node not in seen:
            seen.add(node)
            stack.extend(node.inputs)
    return seen


def _between(op: Op, unit_input: Op) -> set[Op] | None:
    """Ops between ``unit_input`` and ``op`` if every input path of ``op`` passes through it."""
    if op is unit_input:
        return set()
    return dominated(op, unit_input, inputs=lambda o: o.inputs,
                     escapes=lambda o: o.index < unit_input.index or not o.args and o.dynamic)


def _learns(cone: set[Op]) -> bool:
    return any(op.kind in K.LAYER_KINDS and op.weights for op in cone)


def _container(cat: Op, unit_input: Op) -> str:
    """The smallest module whose forward runs the concatenation and computes its branches."""
    parts = cat.scope.split(".") if cat.scope else []
    other = (unit_input.scope.split(".") if unit_input.scope else [])
    common = 0
    while common < min(len(parts), len(other)) and parts[common] == other[common]:
        common += 1
    return ".".join(parts[:common])


_THROUGH = frozenset({K.RESHAPE, K.IDENTITY, K.DROPOUT})


def _nested(inner: Join, outer: Join) -> bool:
    """``inner`` is, through reshapes only, a branch of ``outer``, from an input inside ``outer``."""
    if inner.unit_input is outer.unit_input or inner.cat.index > outer.cat.index:
        return False
    op = inner.cat
    while len(op.users) == 1 and op.users[0].kind in _THROUGH:
        op = op.users[0]
    reaches = any(user is outer.cat for user in op.users)
    return reaches and _between(inner.unit_input, outer.unit_input) is not None


def _with_new_branches(joins: list[Join], modules: dict[str, nn.Module], calls: CallCounts) -> list[Join]:
    """Each join's new branches (not concatenated by an earlier join) and their gates; joins with
    none left are dropped."""
    seen: set[Op] = set()
    kept = []
    for join in joins:
        operands = list(join.cat.args)
        new = [i for i in join.new_branches if operands[i] not in seen]
        seen.update(operands)
        if not new:
            continue
        join.new_branches = new
        join.standard = [_branch_gate(join, i, operands[i], modules, calls) for i in new]
        kept.append(join)
    return kept


def _branch_gate(join: Join, position: int, operand: Op, modules: dict[str, nn.Module],
                 calls: CallCounts) -> Gate:
    channels = int(operand.shape[join.channel_dim])
    gate = gate_after(operand, modules, calls, channels, within=join.container)
    if gate is not None:
        return Gate(gate.module, gate.how, channels, gate.anchor, channel_dim=join.channel_dim)
    return Gate(join.post.module, CAT_OPERAND, channels, index=join.post.index, operand=position,
                channel_dim=join.channel_dim)
