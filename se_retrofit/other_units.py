"""Units that are not residual blocks: the joins of branches (:mod:`.joins`) and, in a model with
neither residual blocks nor joins, the layers of its plain chain (:mod:`.chains`), as
:class:`~se_retrofit.units.Block` s of kind ``join`` / ``chain``, staged and labelled."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import replace

from torch import nn

from .blocks import _describe, _post_activation
from .chains import find_chain_layers
from .gates import Gate, gate_problem
from .joins import find_joins
from .layout import CHANNELS_FIRST, CHANNELS_LAST, TOKENS
from .recording import Op, Recording
from .residual import _Residual
from .units import CHAIN, JOIN, Block


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
