"""Graph helpers shared by analysis (the executed ops) and surgery (a block's traced fx graph)."""
from __future__ import annotations

from typing import Callable, Iterable, TypeVar

from torch import fx

Node = TypeVar("Node")
_DYNAMIC = "depends_on_input"


def dominated(branch: Node, block_input: Node, inputs: Callable[[Node], Iterable[Node]],
              escapes: Callable[[Node], bool]) -> set[Node] | None:
    """The nodes between ``block_input`` and ``branch`` if every input path to ``branch`` passes
    through ``block_input``; None where a path ``escapes`` (reaches another input of the graph)."""
    cone, stack, reached = set(), [branch], False
    while stack:
        node = stack.pop()
        if node is block_input:
            reached = True
            continue
        if node in cone:
            continue
        if escapes(node):
            return None
        cone.add(node)
        stack.extend(inputs(node))
    return cone if reached else None


def add_operands(node: fx.Node) -> tuple[fx.Node, fx.Node] | None:
    """The two tensors an fx addition node adds (``x + y``, ``torch.add(x, other=y)``), or None."""
    args = list(node.args[:2])
    if len(args) < 2 and "other" in node.kwargs:
        args.append(node.kwargs["other"])
    if len(args) != 2 or not all(isinstance(a, fx.Node) for a in args):
        return None
    return args[0], args[1]


def mark_dynamic(graph: fx.Graph) -> None:
    """Mark in ``node.meta`` which nodes depend on the graph's inputs (parameters do not)."""
    for node in graph.nodes:
        if node.op == "placeholder":
            node.meta[_DYNAMIC] = _is_data_input(node)
        else:
            node.meta[_DYNAMIC] = any(n.op != "get_attr" and n.meta.get(_DYNAMIC, True)
                                      for n in node.all_input_nodes)


def _is_data_input(placeholder: fx.Node) -> bool:
    """A required argument, or an optional one that was given a tensor when probed. Optional
    arguments left at their default (``attn_mask=None``) are constants, not a second input, and so
    are the keyword arguments a forward passes on (``**kwargs``)."""
    if str(placeholder.target).startswith("**"):
        return False
    has_default = bool(placeholder.args)
    return not has_default or placeholder.meta.get("shape") is not None


def dynamic_inputs(node: fx.Node) -> list[fx.Node]:
    """The inputs of ``node`` that depend on the graph's inputs (see :func:`mark_dynamic`)."""
    return [n for n in node.all_input_nodes if n.op != "get_attr" and n.meta.get(_DYNAMIC, True)]


def dominated_cone(branch: fx.Node, block_input: fx.Node) -> set[fx.Node] | None:
    """:func:`dominated` over an fx graph marked by :func:`mark_dynamic`."""
    return dominated(branch, block_input, inputs=dynamic_inputs,
                     escapes=lambda node: node.op == "placeholder" and node.meta.get(_DYNAMIC, True))
