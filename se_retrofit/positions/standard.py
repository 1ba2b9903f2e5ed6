"""``standard``: on the residual branch after its last layer, before the addition (SE paper, Fig. 3;
Sec. 6.5 calls it SE); on each newly computed branch of a join before the concatenation (SE-DenseNet,
SE-ShuffleNet); after a chain layer's activation, where SE-VGG-16 has it (a chain has no branch, so
``standard`` and ``post`` coincide there)."""
from __future__ import annotations

from .. import op_kinds as K
from ..graph import dynamic_inputs
from ..placement import wrap_output
from ..analysis import Block
from .base import Position, register_position


def place(graph, add, branch, shortcut, site, modules) -> None:
    """After the branch's last layer, before stochastic depth / dropout and the addition."""
    target = branch
    while K.node_kind(target, modules) in K.PASSTHROUGH_KINDS and len(target.users) == 1:
        inputs = dynamic_inputs(target)
        if len(inputs) != 1 or len(inputs[0].users) != 1:
            break
        target = inputs[0]
    wrap_output(graph, target, site)


def outside(block: Block) -> tuple[str, int] | str:
    """The branch's last module, where its output reaches the addition and nothing else."""
    if block.branch_wrap_module is None:
        return (f"its branch ends in {block.branch}, an operation of {block.path or 'the model'}'s own forward, not in a "
                "module whose output standard could gate from outside" + ("; post can go there" if
                                                                          block.output_module is not None else ""))
    if block.branch_wrap_error:
        return f"standard cannot gate it from outside: {block.branch_wrap_error}"
    return block.branch_wrap_module, block.branch_leaf


STANDARD = register_position(Position(
    "standard", "on the residual branch, after its last layer, before the addition (SE paper default); "
                "on each new branch of a join, before the concatenation; after a chain layer's activation (SE-VGG)",
    place=place, outside=outside))
