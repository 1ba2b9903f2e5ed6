"""``pre``: at the input of the residual branch; the shortcut still sees the raw input (SE paper,
Sec. 6.5, SE-PRE). Residual blocks only: a join's branches have no one input of their own."""
from __future__ import annotations

from ..placement import attend, block_input
from . import Position, register_position


def place(graph, add, branch, shortcut, site, modules) -> None:
    """On the block input as the branch sees it; the shortcut keeps the raw input."""
    start, cone = block_input(shortcut, branch)
    users = [u for u in start.users if u in cone]
    first = next(n for n in graph.nodes if n in users)
    with graph.inserting_before(first):
        gated = attend(graph, start, site)
    for user in users:
        user.replace_input_with(start, gated)


PRE = register_position(Position(
    "pre", "at the input of the residual branch; the shortcut still sees the raw input", residual="in",
    place=place))
