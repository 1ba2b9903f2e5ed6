"""The position registry: what a position is, and where positions are registered."""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

from ..analysis import CHANNELS_FIRST, FEATURES, RESIDUAL, SUPPORTED_LAYOUTS, Block
from ..errors import RetrofitError
from ..gates import CHILD, Gate
from ..site import Site

#: how a site is edited: its block's forward rewritten, or a module's output gated from outside
REWRITE, WRAP = "rewrite", "wrap"
#: (graph, addition node, branch node, shortcut node, site, modules) -> None
Placer = Callable[..., None]


@dataclass(frozen=True)
class Position:
    """One integration point.

    Attributes:
        name: what users type (``--position NAME``).
        help: one line for ``--help`` and the docs.
        residual: the channels a residual block's site works on (``out``: the sum's, ``in``: the
            block input's); None where the position does not apply to residual blocks.
        place: puts the module into a residual block's graph at its addition.
        select: narrows the selected units, given the model's stages (``stage``: the last one of each).
        gate_position: the position whose gates a join or chain layer uses (``stage`` uses ``post``'s).
        outside: where a residual block's site can be edited from outside a forward (see
            :mod:`se_retrofit.outside_edit`): the module whose output is gated and which tensor of
            it, or why it cannot be; None where the position cannot be placed that way.
    """

    name: str
    help: str
    residual: str | None = "out"
    place: Placer | None = None
    select: Callable[[list[Block], list[int]], list[Block]] | None = None
    gate_position: str | None = None
    outside: Callable[[Block], tuple[str, int] | str] | None = None

    def sites(self, unit: Block) -> list[Site] | str:
        """The sites for ``unit`` (names not yet chosen), or why the position does not apply to it."""
        if unit.kind == RESIDUAL:
            return self._residual_sites(unit)
        gates = unit.gates_for(self.gate_position or self.name)
        error = dict(unit.gate_errors).get(self.gate_position or self.name)
        if not gates:
            usable = ", ".join(p for p in _REGISTRY if unit.gates_for(p))
            return f"position {self.name!r} does not apply to a {unit.kind} unit (use {usable})"
        outside = [_child_path(g) for g in gates] if error else []
        if error and not all(outside):
            return (f"its forward cannot be rewritten ({error}), and its modules go where only a rewrite can put "
                    "them (not after one child layer's single call)")
        channel_dim = 1 if unit.layout == CHANNELS_FIRST else -1
        sites = [Site(block=g.module, add_index=g.index, shortcut_arg=0, position=self.name, channels=g.channels,
                      spatial_dims=len(unit.spatial), stage=unit.stage, module_name="", channel_dim=channel_dim,
                      anchor=g.anchor or None, kind=unit.kind, gate=g.how, operand=g.operand, unit=unit.name)
                 for g in gates]
        if error:  # after a child layer that runs once: its output, gated from outside (MobileNetV1's TF padding)
            return [replace(site, block=path, anchor=None, gate="", add_index=0, operand=0, edit=WRAP, output_leaf=0)
                    for site, path in zip(sites, outside)]
        return sites

    def _residual_sites(self, block: Block) -> list[Site] | str:
        if self.residual is None:
            return f"position {self.name!r} does not apply to residual blocks"
        outside = self.outside_place(block)
        if block.rewrite_error and isinstance(outside, str):
            return f"its forward cannot be rewritten ({block.rewrite_error}), and {outside}"
        if block.layout not in SUPPORTED_LAYOUTS:
            return f"layout {block.layout}: the channel dimension could not be told from the probes"
        channels = block.in_channels if self.residual == "in" else block.channels
        channel_dim = 1 if block.layout == CHANNELS_FIRST else -1
        site = Site(block=block.path, add_index=block.add_index, shortcut_arg=block.shortcut_arg,
                    position=self.name, channels=channels, spatial_dims=len(block.spatial), stage=block.stage,
                    module_name="", channel_dim=channel_dim, unit=block.name, in_place=block.in_place,
                    batch_dim=block.batch_dim, vector=block.layout == FEATURES)
        if isinstance(outside, str):
            return [site]
        module, leaf = outside
        if block.rewrite_error:
            return [replace(site, block=module, edit=WRAP, output_leaf=leaf, in_place=False)]
        return [replace(site, wrap_module=module, output_leaf=leaf)]

    def outside_place(self, block: Block) -> tuple[str, int] | str:
        """Where an edit from outside a forward puts this position's module on ``block`` (the module
        whose output is gated, and which tensor of it), or why it cannot."""
        if self.outside is None:
            return (f"{self.name} cannot be placed from outside a forward (standard and post can, where the "
                    "block's modules allow)")
        return self.outside(block)


def _child_path(gate: Gate) -> str | None:
    """The layer whose output a ``child`` gate gates (a child that runs once in the whole forward, so
    every call of it is that place), or None for the other gates."""
    if gate.how != CHILD:
        return None
    return f"{gate.module}.{gate.anchor}" if gate.module else gate.anchor


class PositionError(RetrofitError):
    """A position name that is not registered, or registered twice."""


_REGISTRY: dict[str, Position] = {}


def register_position(position: Position, override: bool = False) -> Position:
    """Add a position (one file per position: see :mod:`se_retrofit.positions.post`)."""
    if position.name in _REGISTRY and not override:
        raise PositionError(f"position {position.name!r} is already registered; pass override=True to replace it")
    _REGISTRY[position.name] = position
    return position


def get_position(name: str) -> Position:
    try:
        return _REGISTRY[name]
    except KeyError:
        raise PositionError(f"unknown position {name!r}; choose one of {', '.join(_REGISTRY)}") from None


def registered() -> dict[str, Position]:
    """The registered positions, by name, in registration order."""
    return dict(_REGISTRY)
