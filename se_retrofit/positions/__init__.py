"""Positions: where in a unit the attention goes. One file per position, registered here, like the
attention types: a position says how it applies to each kind of unit (:meth:`Position.sites`,
planning) and, for residual blocks, where in the block's traced graph the module goes
(:attr:`Position.place`, surgery). Joins and chain layers name their places as gates
(:mod:`se_retrofit.gates`), which surgery knows for every position.

Example:
    >>> from se_retrofit.positions import POSITIONS, get_position
    >>> POSITIONS
    ('standard', 'pre', 'post', 'identity', 'inner', 'stage')
    >>> get_position("identity").help
    'on the shortcut, in parallel to the residual branch'
"""
from __future__ import annotations

from ..analysis import UNIT_KINDS
from .base import Position, PositionError, get_position, register_position, registered
from . import standard, pre, post, identity, inner, stage  # noqa: E402,F401  (built-ins register themselves)

POSITIONS = tuple(registered())
POSITION_HELP = {name: p.help for name, p in registered().items()}
__all__ = ["POSITIONS", "POSITION_HELP", "Position", "PositionError", "UNIT_KINDS", "get_position",
           "register_position"]
