"""Placement: put one attention call into a block's traced graph. The graph-level vocabulary the
positions (:mod:`se_retrofit.positions`) are written in, and the gates of joins and chain layers
(:mod:`se_retrofit.gates`), which any position may name."""
from __future__ import annotations

import operator
import re
from typing import Callable

from torch import fx, nn

from . import op_kinds as K
from .errors import RetrofitError
from .graph import dominated_cone, dynamic_inputs
from .masking import PADDING_ARGUMENTS, padding_filled, real_positions_gated
from .site import Site


class SurgeryError(RetrofitError):
    """A planned site could not be found again in its block's forward."""


def attend(graph: fx.Graph, source: fx.Node, site: Site) -> fx.Node:
    """Call the site's module on ``source`` at the graph's insertion point; channels-last maps and
    token sequences are moved to channels-first around the call."""
    if site.vector:  # (N, C) -> (N, C, 1)
        gated = graph.call_module(site.module_name, (graph.call_method("unsqueeze", (source, -1)),))
        return graph.call_method("squeeze", (gated, -1))
    if site.batch_dim:  # (L, N, C) -> (N, L, C)
        source = graph.call_method("movedim", (source, site.batch_dim, 0))
    if site.channel_dim == 1:
        gated = _call(graph, source, site)
    else:
        moved = graph.call_method("movedim", (source, site.channel_dim, 1))
        gated = graph.call_method("movedim", (_call(graph, moved, site), 1, site.channel_dim))
    return graph.call_method("movedim", (gated, 0, site.batch_dim)) if site.batch_dim else gated


def _call(graph: fx.Graph, x: fx.Node, site: Site) -> fx.Node:
    """The site's module on ``x`` (channels first); over the real positions only where the forward
    receives the padding mask the site names (:mod:`.masking`)."""
    mask = _placeholder(graph, site.padding_mask) if site.padding_mask else None
    if mask is None:
        return graph.call_module(site.module_name, (x,))
    filled = graph.call_function(padding_filled, (x, mask, PADDING_ARGUMENTS[site.padding_mask]))
    gated = graph.call_module(site.module_name, (graph.call_function(operator.getitem, (filled, 0)),))
    return graph.call_function(real_positions_gated, (gated, x, graph.call_function(operator.getitem, (filled, 1))))


def _placeholder(graph: fx.Graph, name: str) -> fx.Node | None:
    """The forward's argument ``name`` (fx renames an argument it specialised: ``name_1``)."""
    return next((node for node in graph.nodes if node.op == "placeholder"
                 and re.fullmatch(rf"{name}(_\d+)?", str(node.target))), None)


def wrap_output(graph: fx.Graph, target: fx.Node, site: Site) -> None:
    """Route every existing use of ``target`` through the attention module."""
    users = list(target.users)
    with graph.inserting_before(target.next):  # in order, right after target
        gated = attend(graph, target, site)
    for user in users:
        user.replace_input_with(target, gated)


def wrap_with_activation(graph: fx.Graph, node: fx.Node, site: Site, modules: dict[str, nn.Module]) -> None:
    """After ``node``, and after the activation that directly follows it (``post``)."""
    users = list(node.users)
    follows = len(users) == 1 and K.node_kind(users[0], modules) == K.ACT
    wrap_output(graph, users[0] if follows else node, site)


def block_input(shortcut: fx.Node, branch: fx.Node) -> tuple[fx.Node, set[fx.Node]]:
    """The node the shortcut starts from: the nearest one on its way back that dominates the branch.
    Where the shortcut arrives as an argument of its own (DLA's trees pass it in), the branch's
    input is the argument the branch is computed from."""
    node = shortcut
    for _ in range(16):
        cone = dominated_cone(branch, node) if node is not branch else None
        if cone:
            return node, cone
        inputs = dynamic_inputs(node)
        if len(inputs) != 1:
            break
        node = inputs[0]
    for placeholder in (n for n in branch.graph.nodes if n.op == "placeholder" and n is not shortcut):
        cone = dominated_cone(branch, placeholder)
        if cone:
            return placeholder, cone
    raise SurgeryError(f"could not find the block input feeding both {shortcut.name} and {branch.name}")


# --- gates: places named by the analysis of joins and chain layers ----------------------------

def gate_child(graph: fx.Graph, site: Site, modules: dict[str, nn.Module]) -> None:
    """After the one call of the child ``site.anchor``."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == site.anchor]
    if len(calls) != 1:
        raise SurgeryError(f"{site.block}: expected one call of {site.anchor!r} in its forward, found {len(calls)}")
    wrap_output(graph, calls[0], site)


def gate_child_call(graph: fx.Graph, site: Site, modules: dict[str, nn.Module]) -> None:
    """After call number ``site.add_index`` of the child ``site.anchor`` (a child called several times)."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == site.anchor]
    if len(calls) <= site.add_index:
        raise SurgeryError(f"{site.block}: expected call #{site.add_index} of {site.anchor!r} in its forward, "
                           f"found {len(calls)} calls")
    wrap_output(graph, calls[site.add_index], site)


def gate_output(graph: fx.Graph, site: Site, modules: dict[str, nn.Module]) -> None:
    """On the value the forward returns."""
    output = next(n for n in graph.nodes if n.op == "output")
    value = output.args[0]
    if not isinstance(value, fx.Node):
        raise SurgeryError(f"{site.block}: its forward returns {type(value).__name__}, not one tensor")
    with graph.inserting_before(output):
        gated = attend(graph, value, site)
    output.replace_input_with(value, gated)


def _concatenation(graph: fx.Graph, site: Site, modules: dict[str, nn.Module]) -> fx.Node:
    cats = [n for n in graph.nodes if K.node_kind(n, modules) == K.CAT]
    if site.add_index >= len(cats):
        raise SurgeryError(f"{site.block}: its forward has {len(cats)} concatenations, the plan expects "
                           f"concatenation #{site.add_index}")
    return cats[site.add_index]


def gate_cat(graph: fx.Graph, site: Site, modules: dict[str, nn.Module]) -> None:
    """After concatenation number ``site.add_index``, and the activation right after it."""
    wrap_with_activation(graph, _concatenation(graph, site, modules), site, modules)


def gate_cat_operand(graph: fx.Graph, site: Site, modules: dict[str, nn.Module]) -> None:
    """On tensor number ``site.operand`` of that concatenation, for the concatenation only."""
    cat = _concatenation(graph, site, modules)
    tensors = cat.args[0] if cat.args else cat.kwargs.get("tensors")
    if not isinstance(tensors, (list, tuple)) or site.operand >= len(tensors) \
            or not isinstance(tensors[site.operand], fx.Node):
        raise SurgeryError(f"{site.block}: concatenation #{site.add_index} has no tensor #{site.operand} of its own")
    with graph.inserting_before(cat):
        gated = attend(graph, tensors[site.operand], site)
    new = list(tensors)
    new[site.operand] = gated
    if cat.args:
        cat.update_arg(0, type(tensors)(new))
    else:
        cat.update_kwarg("tensors", type(tensors)(new))


GATES: dict[str, Callable[[fx.Graph, Site, dict[str, nn.Module]], None]] = {
    "child": gate_child, "child_call": gate_child_call, "output": gate_output, "cat": gate_cat,
    "cat_operand": gate_cat_operand,
}
