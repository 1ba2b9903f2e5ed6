"""``stage``: once per stage transition, after the last unit of every stage but the last (BAM,
Park et al. 2018, Fig. 1), placed as ``post`` there."""
from __future__ import annotations

from ..analysis import Block
from .base import Position, register_position
from .post import outside, place


def last_of_each_stage(units: list[Block], stages: list[int]) -> list[Block]:
    """The last of ``units`` in every one of the model's ``stages`` but the last one."""
    last = {u.stage: u for u in units if u.stage != stages[-1]}
    return [last[s] for s in sorted(last)]


STAGE = register_position(Position(
    "stage", "once per stage transition, after the last block of every stage but the last (BAM)",
    place=place, outside=outside, select=last_of_each_stage, gate_position="post"))
