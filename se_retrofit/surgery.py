"""Surgery: insert attention modules at planned sites by rewriting each block's own forward.

Each edited block is traced alone with all of its children kept as leaves, so only the block's
own ``forward`` is regenerated: children keep their code, hooks and train/eval behaviour, the
block keeps its class, and every state-dict key stays where it was. The block is traced in
train and in eval mode; where the two graphs differ (a block that reads ``self.training``), the
new forward dispatches on ``self.training`` so both behaviours are kept.
"""
from __future__ import annotations

import copy
import itertools
import operator
from collections import defaultdict
from dataclasses import replace
from typing import Callable

from torch import fx, nn
from torch.fx.proxy import TraceError

from . import op_kinds as K
from .graph import add_operands, dynamic_inputs, mark_dynamic
from .attention import attention_builder
from .config import RetrofitConfig
from .placement import GATES, SurgeryError
from .positions import get_position
from .site import Site
from .outside_edit import OutputGate, is_wrapped, provide_masks, wrap_output
from .positions.base import WRAP
from .hub import first_sentence
from .edited import EditSpec, Variant, base_class, install, takes_var_keyword
from .tracing import (TRACE_FAILURES, cache_memo, forward_function, is_shared, optional_arguments, trace,
                      trace_fixing_defaults)


def apply_sites(model: nn.Module, sites: list[Site], config: RetrofitConfig,
                skipped: dict[str, str] | None = None) -> list[Site]:
    """Insert one attention module per site into ``model`` (edited in place); return the sites as
    edited. A site whose block's forward cannot be rewritten after all (fx fails on a mode or on an
    argument the analysis did not try, or finds other additions than the model ran) is edited from
    outside instead where its ``wrap_module`` says how (see :mod:`.outside_edit`). Where ``skipped``
    is given, a site that cannot be edited either way is left out and its unit noted there with the
    reason; else that raises :class:`SurgeryError` (replaying a record must edit every site)."""
    build = attention_builder(config.attention, init=config.init, **config.attention_options())
    edited: list[Site] = []
    outside: list[Site] = [s for s in sites if s.edit == WRAP]
    for path, block_sites in _by_block(s for s in sites if s.edit != WRAP).items():
        try:
            block = _module(model, path)
            edit_block(block, block_sites, {s.module_name: _new_attention(build, s, block) for s in block_sites})
            edited += block_sites
        except SurgeryError as error:
            for site in block_sites:
                fallback = _outside_instead(model, site, outside)
                if fallback is not None and skipped is not None:
                    outside.append(fallback)
                elif skipped is not None:
                    skipped[site.unit or site.block] = str(error)
                else:
                    raise
    for path, block_sites in _by_block(outside).items():
        try:
            module = _module(model, path)
            wrap_output(module, [OutputGate(s.module_name, s.output_leaf, s.channel_dim, s.padding_mask, s.mask_from)
                                 for s in block_sites],
                        {s.module_name: _new_attention(build, s, module) for s in block_sites})
            edited += block_sites
        except SurgeryError as error:
            if skipped is None:
                raise
            skipped.update({site.unit or site.block: str(error) for site in block_sites})
    _hand_masks(model, [s for s in edited if s.edit == WRAP and s.padding_mask])
    order = {id(s): i for i, s in enumerate(sites)}
    return sorted(edited, key=lambda s: order.get(id(s), len(order)))


def _hand_masks(model: nn.Module, sites: list[Site]) -> None:
    """Make each module whose forward receives the padding mask of outside-edited sites hand it to
    their gates during its call (:func:`.outside_edit.provide_masks`)."""
    arguments: dict[str, set[str]] = defaultdict(set)
    for site in sites:
        arguments[site.mask_from].add(site.padding_mask)
    for path, names in arguments.items():
        provide_masks(_module(model, path), tuple((path, name) for name in sorted(names)))


def _by_block(sites) -> dict[str, list[Site]]:
    by_block: dict[str, list[Site]] = defaultdict(list)
    for site in sites:
        by_block[site.block].append(site)
    return by_block


def _module(model: nn.Module, path: str) -> nn.Module:
    try:
        return model.get_submodule(path)
    except AttributeError:
        raise SurgeryError(f"the model has no module {path!r}: it does not match the sites planned "
                           "for it") from None


def _outside_instead(model: nn.Module, site: Site, planned: list[Site]) -> Site | None:
    """The site edited from outside ``site.wrap_module`` (under a name free there), or None where it
    names none."""
    if site.wrap_module is None or site.gate:
        return None
    owner = _module(model, site.wrap_module)
    taken = {s.module_name for s in planned if s.block == site.wrap_module}
    index, name = 0, site.module_name
    while name in taken or getattr(owner, name, None) is not None:
        index += 1
        name = f"{site.module_name}{index}"
    return replace(site, block=site.wrap_module, edit=WRAP, wrap_module=None, module_name=name, in_place=False,
                   mask_from=site.block if site.padding_mask else None)


def _new_attention(build: Callable[[int, int], nn.Module], site: Site, block: nn.Module) -> nn.Module:
    """The site's module, on the block's device and in its floating dtype (half, bfloat16, meta)."""
    module = build(site.channels, site.spatial_dims)
    like = next((t for t in itertools.chain(block.parameters(), block.buffers()) if t.is_floating_point()), None)
    return module if like is None else module.to(device=like.device, dtype=like.dtype)


def edit_block(block: nn.Module, sites: list[Site], attention: dict[str, nn.Module]) -> None:
    """Give ``block`` the attention modules (by attribute name) and a forward that calls them."""
    if is_wrapped(block):
        raise SurgeryError(f"{type(block).__name__} at {sites[0].block!r}: its forward cannot be rewritten: it was "
                           "edited from outside its forward before")
    optional = _optional_arguments(block)
    try:
        graphs, fixed = _trace_variants(block, optional)
    except TRACE_FAILURES as error:
        raise SurgeryError(f"{type(block).__name__} at {sites[0].block!r}: its forward cannot be rewritten "
                           f"(torch.fx: {type(error).__name__}: {first_sentence(error)}); leave it out with exclude=[{sites[0].block!r}] "
                           "(--exclude on the command line)") from None
    before = {name: block._modules.get(name, vars(block).get(name, _ABSENT)) for name in attention}
    for name, module in attention.items():
        _attach(block, name, module)
    try:
        code = _edited_code(block, graphs, sites)
    except SurgeryError:
        for name, module in before.items():  # the block as it was: the site may be edited another way
            delattr(block, name)
            if module is not _ABSENT:
                setattr(block, name, module)
        raise
    _install_forward(block, code, optional, fixed)


_ABSENT = object()


def _edited_code(block: nn.Module, graphs: dict[Variant, fx.Graph], sites: list[Site]) -> dict[Variant, fx.graph.PythonCode]:
    """The code of each variant with the sites inserted. A graph shared by the blocks of one structure
    (and often by both modes, see :func:`.tracing.is_shared`) edited at the same places gives the same
    code: it is generated once, on a copy of that graph."""
    memo = cache_memo()
    modules = dict(block.named_modules())
    places = tuple((_place_of(site), type(modules[site.module_name])) for site in sites)
    forwards = {}
    for variant, graph in graphs.items():
        key = ("edited code", id(graph), places) if memo is not None and is_shared(graph) else None
        if key is not None and key in memo:
            forwards[variant] = memo[key]
            continue
        graph = copy.deepcopy(graph) if is_shared(graph) else graph
        mark_dynamic(graph)
        for site in sites:
            _insert(graph, site, modules)
        graph.lint()
        _free_root_name(graph)
        forwards[variant] = graph.python_code(root_module="self")
        if key is not None:
            memo[key] = forwards[variant]
    return forwards


def _place_of(site: Site) -> Site:
    """What of a site the edited code depends on (with the class of the module inserted, see
    :func:`_writable`): where the module goes and its name, not the block path, the unit, the widths,
    the stage or the outside-edit fallback (a path of its own in each block)."""
    return replace(site, block="", unit="", channels=0, stage=0, attention_bytes=None, wrap_module=None)


def _free_root_name(graph: fx.Graph) -> None:
    """Rename the nodes fx named ``self`` after a child called ``self`` (transformers' attention layers
    have ``self.self``): in the generated forward they would rebind the module itself."""
    for node in graph.nodes:
        if node.name == "self" and node.op != "placeholder":
            node._rename(f"{node.name}_output")


MAX_OPTIONAL = 3


def _optional_arguments(block: nn.Module) -> list[str]:
    """Arguments defaulting to None (``shortcut=None``): the tracer cannot see ``if x is None``, so
    the forward is traced once for each combination of them being None or given."""
    return optional_arguments(block)[:MAX_OPTIONAL]


def _trace_variants(block: nn.Module, optional: list[str]) -> tuple[dict[Variant, fx.Graph], dict[str, object]]:
    """Trace every variant the forward accepts (see :func:`.tracing.trace_fixing_defaults` for the
    arguments fixed)."""
    return trace_fixing_defaults(block, lambda fixed: _traced_variants(block, optional, fixed))


def _traced_variants(block: nn.Module, optional: list[str], fixed: dict[str, object]) -> dict[Variant, fx.Graph]:
    """Every variant the forward accepts: one that raises when traced with an optional argument given
    (ImageGPT's block refuses ``encoder_hidden_states`` without cross-attention layers) is left out,
    and calling the edited block so raises; the variant with all of them None must trace, unless
    the forward itself fails on one of those Nones (Mask2Former's decoder layer subscripts its
    ``position_embeddings``): such a forward does not accept that None, and a variant of each mode
    must trace."""
    graphs, refused = {}, {}
    for key in _variants(optional):
        try:
            graphs[key] = _trace_block(block, key, optional, fixed)
        except TraceError:
            raise
        except (ValueError, TypeError, AttributeError) as error:
            if not _refuses_a_none(key, error):
                raise
            refused[key[0]] = error
    for training, error in refused.items():
        if not any(key[0] == training for key in graphs):
            raise error
    return graphs


def _refuses_a_none(variant: Variant, error: Exception) -> bool:
    """Whether tracing ``variant`` failed because the forward does not take one of the arguments it
    left None: it raised a ValueError for it (ImageGPT), or used the None as a value (``None[i]``,
    ``None.shape``), which the forward run untraced does as well."""
    nones = variant[1]
    if isinstance(error, ValueError):
        return not all(nones)
    return any(nones) and "NoneType" in str(error)


def _variants(optional: list[str]) -> list[Variant]:
    return [(training, nones) for training in (True, False)
            for nones in itertools.product((False, True), repeat=len(optional))]


def _trace_block(block: nn.Module, variant: Variant, optional: list[str], fixed: dict[str, object]) -> fx.Graph:
    training, nones = variant
    concrete = {**fixed, **{name: None for name, none in zip(optional, nones) if none}}
    return trace(block, leaf_children=True, concrete_args=concrete or None, shared=True, training=training)


def _attach(block: nn.Module, name: str, module: nn.Module) -> None:
    if name in vars(block) and vars(block)[name] is None:
        delattr(block, name)  # timm keeps `self.se = None` where a block has no attention
    module.train(block.training)  # a new module follows the mode of the block it joins
    block.add_module(name, module)


# --- placing one module in a block's graph ----------------------------------------------------

def _insert(graph: fx.Graph, site: Site, modules: dict[str, nn.Module]) -> None:
    """A gate where the site names one (joins, chain layers, ``inner``), else the position's own
    placement at the residual addition."""
    if site.gate:
        if site.gate not in GATES:
            raise SurgeryError(f"{site.block}: unknown gate {site.gate!r} (written by a newer se_retrofit?)")
        GATES[site.gate](graph, site, modules)
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
    position = get_position(site.position)
    if position.place is None:
        raise SurgeryError(f"{site.block}: position {site.position!r} has no placement at a residual addition")
    position.place(graph, add, branch, shortcut, site, modules)
    if site.in_place and _writable(add, site, modules):
        add.op, add.target = "call_method", "add_"


def _writable(add: fx.Node, site: Site, modules: dict[str, nn.Module]) -> bool:
    """Whether the edited addition may again write into its first operand, as the original forward
    did (``x += shortcut``, which an fx trace records as ``x + shortcut``: one more block-sized
    tensor per block, a few percent of a ResNet's CPU time). It may where nothing else reads that
    operand, and where it is still what the original wrote into, or comes from the inserted module
    (through dropout or stochastic depth) whose class declares ``writable_output``: a fresh tensor
    (a product or a sum) that no backward formula keeps."""
    if add.op != "call_function" or add.target is not operator.add or add.kwargs or len(add.args) != 2:
        return False
    node = add.args[0]
    while not (node.op == "call_module" and node.target == site.module_name):
        if len(node.users) != 1:
            return False
        inputs = dynamic_inputs(node)
        if K.node_kind(node, modules) not in K.PASSTHROUGH_KINDS or len(inputs) != 1:
            return True  # the original's own operand (the branch's last layer, or the shortcut)
        node = inputs[0]
    if len(node.users) != 1:
        return False
    return getattr(type(modules[site.module_name]), "writable_output", False)


# --- the new forward ---------------------------------------------------------------------------

def _install_forward(block: nn.Module, code: dict[Variant, fx.graph.PythonCode], optional: list[str],
                     fixed: dict[str, object]) -> None:
    """Give ``block`` the edited class generated from each variant's code (see :mod:`.edited`)."""
    spec = EditSpec(base=base_class(block), sources={key: c.src for key, c in code.items()},
                    globals={key: c.globals for key, c in code.items()}, optional=tuple(optional),
                    fixed=tuple(fixed.items()), var_keyword=takes_var_keyword(forward_function(block)))
    install(block, spec)
