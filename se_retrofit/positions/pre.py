"""``pre``: at the input of the residual branch; the shortcut still sees the raw input (SE paper,
Sec. 6.5, SE-PRE). Residual blocks only: a join's branches have no one input of their own."""
from __future__ import annotations

from ..analysis import Block
from ..placement import attend, block_input
from ..site import Site
from .base import Position, register_position


def place(graph, add, branch, shortcut, site, modules) -> None:
    """On the block input as the branch sees it; the shortcut keeps the raw input."""
    start, cone = block_input(shortcut, branch)
    users = [u for u in start.users if u in cone]
    first = next(n for n in graph.nodes if n in users)
    with graph.inserting_before(first):
        gated = attend(graph, start, site)
    for user in users:
        user.replace_input_with(start, gated)


class PrePosition(Position):
    def _residual_sites(self, block: Block) -> list[Site] | str:
        if block.branch_outside and not block.rewrite_error:
            return (f"its branch starts in {block.branch_outside}, outside {block.path} where the addition is: "
                    "pre would sit mid-branch")
        return super()._residual_sites(block)


PRE = register_position(PrePosition(
    "pre", "at the input of the residual branch; the shortcut still sees the raw input", residual="in",
    place=place))
