"""Analysis: find the residual blocks of a model from what it executes. Pure: the model is not changed.

The model is run once on a probe input while every tensor operation is recorded (:mod:`.probing`,
:mod:`se_retrofit.recording`), so nothing needs to be traceable. In the executed graph, the additions
that meet the residual criterion (:mod:`.residual`, which defines a residual block and says what is
kept out) are the blocks; the layers of a block's branch, or a second probe, tell its layout
(:mod:`.layout`); :mod:`.blocks` turns each into the :class:`~se_retrofit.units.Block` reported and
:mod:`.edit_places` says where surgery and an edit from outside a forward will find it. Joins of
branches and plain chain layers are units too (:mod:`.other_units`). Norms are told by what they
compute (:mod:`.norms`: a frozen BatchNorm is a norm).

This module is the entry: :func:`analyze`, :func:`find_blocks`, :func:`find_units`, and the names
the rest of the package and its users import from here.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from . import op_kinds as K
from .blocks import _to_blocks
from .edit_places import _place_in_traced_forwards, _with_outside_edits
from .layout import (CHANNELS_FIRST, CHANNELS_LAST, FEATURES, SUPPORTED_LAYOUTS, TOKENS, UNKNOWN,
                     _sequence_first)
from .other_units import _other_units
from .probing import (NOT_NEEDED, NOT_RUN, _SECOND, ProbeError, SecondProbe, _probe, _shape_of,
                      default_example_input, second_probe)
from .recording import Op, never_run
from .residual import MAX_PROJECTION_OPS, _match_residual, _Residual, _started
from .tracing import graph_cache, restore_training, snapshot_training
from .units import CHAIN, JOIN, RESIDUAL, UNIT_KINDS, Block

__all__ = ["Analysis", "Block", "analyze", "find_blocks", "find_units", "never_run_text", "default_example_input",
           "second_probe", "SecondProbe", "ProbeError", "NOT_RUN", "NOT_NEEDED", "MAX_PROJECTION_OPS", "RESIDUAL",
           "JOIN", "CHAIN", "UNIT_KINDS", "CHANNELS_FIRST", "CHANNELS_LAST", "TOKENS", "FEATURES", "UNKNOWN",
           "SUPPORTED_LAYOUTS"]


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
