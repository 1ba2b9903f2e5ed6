"""``post``: after the addition and the block's final activation (SE paper, Sec. 6.5, SE-POST); after
a join's concatenation (SE on the output of each Inception module); after a chain layer's activation
(SE-VGG-16)."""
from __future__ import annotations

from ..placement import wrap_with_activation
from ..analysis import Block
from .base import Position, register_position


def place(graph, add, branch, shortcut, site, modules) -> None:
    """After the addition, and after the activation that directly follows it."""
    wrap_with_activation(graph, add, site, modules)


def outside(block: Block) -> tuple[str, int] | str:
    """The module whose call returns the sum (or the activation right after it)."""
    if block.output_module is None:
        return f"no module returns its sum for post to gate from outside ({block.path or 'the model'} uses it further)"
    return block.output_module, block.output_leaf


POST = register_position(Position(
    "post", "after the addition and the block's final activation (after the join, or after a chain layer's "
            "activation)", place=place, outside=outside))
