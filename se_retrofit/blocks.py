"""From matches to blocks: each addition the residual criterion (:mod:`.residual`) accepts, as the
:class:`~se_retrofit.units.Block` the analysis reports.

The block is reported at the module whose own forward performs the addition (``path``, with
``add_index`` counting the additions of that forward as surgery's trace of it sees them:
:mod:`.edit_places`), with the smallest module holding the addition and the whole branch as
``container``. Stages are resolution levels among the blocks, largest maps first.
"""
from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

from torch import nn

from . import op_kinds as K
from .layout import FEATURES, TOKENS, UNKNOWN, _layout
from .recording import Op
from .residual import _Residual, _where
from .units import Block


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
