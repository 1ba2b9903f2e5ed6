"""``identity``: on the shortcut, in parallel to the residual branch (SE paper, Sec. 6.5, SE-Identity).
Residual blocks only: a chain layer or a join has no shortcut."""
from __future__ import annotations

from ..placement import attend
from .base import Position, register_position


def place(graph, add, branch, shortcut, site, modules) -> None:
    """On the shortcut, just before the addition; the branch is untouched."""
    with graph.inserting_before(add):
        gated = attend(graph, shortcut, site)
    add.replace_input_with(shortcut, gated)


IDENTITY = register_position(Position(
    "identity", "on the shortcut, in parallel to the residual branch", place=place))
