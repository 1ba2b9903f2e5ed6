"""Surgery: insert attention modules at planned sites by rewriting each block's own forward.

Each edited block is traced alone with all of its children kept as leaves, so only the block's
own ``forward`` is regenerated: children keep their code, hooks and train/eval behaviour, the
block keeps its class, and every state-dict key stays where it was. The block is traced in
train and in eval mode; where the two graphs differ (a block that reads ``self.training``), the
new forward dispatches on ``self.training`` so both behaviours are kept.
"""
from __future__ import annotations

import itertools
from collections import defaultdict
from typing import Callable

from torch import fx, nn
from torch.fx.proxy import TraceError

from .errors import RetrofitError
from . import op_kinds as K
from .graph import add_operands, dominated_cone, dynamic_inputs, mark_dynamic
from .attention import create_attention
from .config import RetrofitConfig, Site
from .hub import first_sentence
from .edited import EditSpec, Variant, base_class, install, takes_var_keyword
from .tracing import forward_function, optional_arguments, trace, trace_fixing_defaults, training_mode


class SurgeryError(RetrofitError):
    """A planned site could not be found again in its block's forward."""


def apply_sites(model: nn.Module, sites: list[Site], config: RetrofitConfig) -> None:
    """Insert one attention module per site into ``model`` (edited in place)."""
    by_block: dict[str, list[Site]] = defaultdict(list)
    for site in sites:
        by_block[site.block].append(site)
    for path, block_sites in by_block.items():
        try:
            block = model.get_submodule(path)
        except AttributeError:
            raise SurgeryError(f"the model has no module {path!r}: it does not match the sites planned "
                               "for it") from None
        attention = {s.module_name: _new_attention(s, config, block) for s in block_sites}
        edit_block(block, block_sites, attention)


def _new_attention(site: Site, config: RetrofitConfig, block: nn.Module) -> nn.Module:
    """The site's module, on the block's device and in its floating dtype (half, bfloat16, meta)."""
    module = create_attention(config.attention, site.channels, init=config.init,
                              spatial_dims=site.spatial_dims, **config.attention_options())
    like = next((t for t in itertools.chain(block.parameters(), block.buffers()) if t.is_floating_point()), None)
    return module if like is None else module.to(device=like.device, dtype=like.dtype)


def edit_block(block: nn.Module, sites: list[Site], attention: dict[str, nn.Module]) -> None:
    """Give ``block`` the attention modules (by attribute name) and a forward that calls them."""
    optional = _optional_arguments(block)
    try:
        graphs, fixed = _trace_variants(block, optional)
    except (TraceError, TypeError, AttributeError, NotImplementedError, RuntimeError) as error:
        raise SurgeryError(f"{type(block).__name__} at {sites[0].block!r}: its forward cannot be rewritten "
                           f"(torch.fx: {type(error).__name__}: {first_sentence(error)}); leave it out with exclude=[{sites[0].block!r}] "
                           "(--exclude on the command line)") from None
    for name, module in attention.items():
        _attach(block, name, module)
    modules = dict(block.named_modules())
    forwards = {}
    for key, graph in graphs.items():
        mark_dynamic(graph)
        for site in sites:
            _insert(graph, site, modules)
        graph.lint()
        forwards[key] = graph.python_code(root_module="self")
    _install_forward(block, forwards, optional, fixed)


MAX_OPTIONAL = 3


def _optional_arguments(block: nn.Module) -> list[str]:
    """Arguments defaulting to None (``shortcut=None``): the tracer cannot see ``if x is None``, so
    the forward is traced once for each combination of them being None or given."""
    return optional_arguments(block)[:MAX_OPTIONAL]


def _trace_variants(block: nn.Module, optional: list[str]) -> tuple[dict[Variant, fx.Graph], dict[str, object]]:
    """Trace every variant (see :func:`.tracing.trace_fixing_defaults` for the arguments fixed)."""
    return trace_fixing_defaults(block, lambda fixed: {key: _trace_block(block, key, optional, fixed)
                                                       for key in _variants(optional)})


def _variants(optional: list[str]) -> list[Variant]:
    return [(training, nones) for training in (True, False)
            for nones in itertools.product((False, True), repeat=len(optional))]


def _trace_block(block: nn.Module, variant: Variant, optional: list[str], fixed: dict[str, object]) -> fx.Graph:
    training, nones = variant
    concrete = {**fixed, **{name: None for name, none in zip(optional, nones) if none}}
    with training_mode(block, training):
        return trace(block, leaf_children=True, concrete_args=concrete or None)


def _attach(block: nn.Module, name: str, module: nn.Module) -> None:
    if name in vars(block) and vars(block)[name] is None:
        delattr(block, name)  # timm keeps `self.se = None` where a block has no attention
    module.train(block.training)  # a new module follows the mode of the block it joins
    block.add_module(name, module)


# --- placing one module in a block's graph ----------------------------------------------------

def _insert(graph: fx.Graph, site: Site, modules: dict[str, nn.Module]) -> None:
    if site.position == "inner":
        _place_inner(graph, site)
        return
    adds = [n for n in graph.nodes if K.node_kind(n, modules) == K.ADD]
    if site.add_index >= len(adds):
        raise SurgeryError(f"{site.block}: its forward has {len(adds)} additions, the plan expects "
                           f"addition #{site.add_index}")
    add = adds[site.add_index]
    operands = add_operands(add)
    if operands is None:
        raise SurgeryError(f"{site.block}: addition #{site.add_index} does not add two tensors")
    shortcut, branch = operands[site.shortcut_arg], operands[1 - site.shortcut_arg]
    _PLACERS[site.position](graph, add, branch, shortcut, site, modules)


def _attend(graph: fx.Graph, source: fx.Node, site: Site) -> fx.Node:
    """Call the site's module on ``source`` at the graph's insertion point; channels-last maps and
    token sequences are moved to channels-first around the call."""
    if site.channel_dim == 1:
        return graph.call_module(site.module_name, (source,))
    moved = graph.call_method("movedim", (source, site.channel_dim, 1))
    gated = graph.call_module(site.module_name, (moved,))
    return graph.call_method("movedim", (gated, 1, site.channel_dim))


def _wrap_output(graph: fx.Graph, target: fx.Node, site: Site) -> None:
    """Route every existing use of ``target`` through the attention module."""
    users = list(target.users)
    with graph.inserting_before(target.next):  # in order, right after target
        gated = _attend(graph, target, site)
    for user in users:
        user.replace_input_with(target, gated)


def _place_standard(graph, add, branch, shortcut, site, modules) -> None:
    """After the branch's last layer, before stochastic depth / dropout and the addition."""
    target = branch
    while K.node_kind(target, modules) in K.PASSTHROUGH_KINDS and len(target.users) == 1:
        inputs = dynamic_inputs(target)
        if len(inputs) != 1 or len(inputs[0].users) != 1:
            break
        target = inputs[0]
    _wrap_output(graph, target, site)


def _place_post(graph, add, branch, shortcut, site, modules) -> None:
    """After the addition, and after the activation that directly follows it."""
    users = list(add.users)
    follows = len(users) == 1 and K.node_kind(users[0], modules) == K.ACT
    _wrap_output(graph, users[0] if follows else add, site)


def _place_identity(graph, add, branch, shortcut, site, modules) -> None:
    """On the shortcut, just before the addition; the branch is untouched."""
    with graph.inserting_before(add):
        gated = _attend(graph, shortcut, site)
    add.replace_input_with(shortcut, gated)


def _place_pre(graph, add, branch, shortcut, site, modules) -> None:
    """On the block input as the branch sees it; the shortcut keeps the raw input."""
    block_input, cone = _block_input(shortcut, branch)
    users = [u for u in block_input.users if u in cone]
    first = next(n for n in graph.nodes if n in users)
    with graph.inserting_before(first):
        gated = _attend(graph, block_input, site)
    for user in users:
        user.replace_input_with(block_input, gated)


def _place_inner(graph: fx.Graph, site: Site) -> None:
    """After the call of the child ``site.anchor`` (the branch's spatial conv, or its norm)."""
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target == site.anchor]
    if len(calls) != 1:
        raise SurgeryError(f"{site.block}: expected one call of {site.anchor!r} in its forward, found "
                           f"{len(calls)}")
    _wrap_output(graph, calls[0], site)


_PLACERS: dict[str, Callable] = {
    "standard": _place_standard, "pre": _place_pre, "post": _place_post, "identity": _place_identity,
    "stage": _place_post,
}


def _block_input(shortcut: fx.Node, branch: fx.Node) -> tuple[fx.Node, set[fx.Node]]:
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


# --- the new forward ---------------------------------------------------------------------------

def _install_forward(block: nn.Module, code: dict[Variant, fx.graph.PythonCode], optional: list[str],
                     fixed: dict[str, object]) -> None:
    """Give ``block`` the edited class generated from each variant's code (see :mod:`.edited`)."""
    spec = EditSpec(base=base_class(block), sources={key: c.src for key, c in code.items()},
                    globals={key: c.globals for key, c in code.items()}, optional=tuple(optional),
                    fixed=tuple(fixed.items()), var_keyword=takes_var_keyword(forward_function(block)))
    install(block, spec)
