"""Planning: from the blocks found and the config, decide the sites to edit. Reads the model only."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace

from torch import nn

from .errors import RetrofitError
from .analysis import CHANNELS_FIRST, SUPPORTED_LAYOUTS, Analysis, Block
from .attention import AttentionSpec, get_attention
from .config import RetrofitConfig, Site


class NoResidualBlocksError(RetrofitError):
    """The model has no residual block to retrofit."""


class StageError(RetrofitError):
    """The stages asked for are not stages of this model."""


class BlockPatternError(RetrofitError):
    """A block pattern matches no residual block."""


@dataclass
class Plan:
    """The sites to edit, and the blocks left alone with the reason why."""

    sites: list[Site]
    skipped: dict[str, str] = field(default_factory=dict)
    stacked: list[str] = field(default_factory=list)


def plan_sites(model: nn.Module, analysis: Analysis, config: RetrofitConfig) -> Plan:
    """Choose the sites for ``config``: one per selected block (one per stage transition for
    ``stage``), with the channel count, layout and attribute name each needs."""
    if not analysis.blocks:
        raise NoResidualBlocksError(f"no residual blocks found: {analysis.describe()}")
    _check_stages(config, analysis.stages)
    spec = get_attention(config.attention)
    blocks = select_blocks(analysis.blocks, config.blocks, config.exclude)
    if config.stages is not None:
        blocks = [b for b in blocks if b.stage in config.stages]
    if config.every is not None:
        blocks = every_kth(blocks, config.every)
    if not blocks:
        chosen = ", ".join(f"{k}={v}" for k, v in (("blocks", config.blocks), ("exclude", config.exclude),
                                                    ("stages", config.stages), ("every", config.every))
                           if v is not None)
        raise BlockPatternError(f"{chosen} leave none of the {len(analysis.blocks)} residual blocks "
                                f"({analysis.blocks[0].name} … {analysis.blocks[-1].name}) to edit")
    if config.position == "stage":
        if len(analysis.stages) < 2:
            raise StageError("position 'stage' goes between stages, and all of this model's residual blocks "
                             "are at one resolution; use a block position such as standard")
        blocks = _last_block_of_each_stage(blocks, analysis.stages)
    if spec.default_blocks == "last" and config.stages is None and config.blocks is None and blocks:
        blocks = blocks[-1:]  # the type's own placement (DANet: once, on the backbone's output)
    plan = Plan(sites=[])
    taken: dict[str, set[str]] = {}
    attr = spec.attr_name
    for block in blocks:
        reason = _unplaceable(block, config.position)
        if reason:
            plan.skipped[block.name] = reason
            continue
        if block.has_attention:
            plan.stacked.append(block.name)
        site = _sized(_site(block, config.position), block, spec, config)
        owner = model.get_submodule(site.block)
        plan.sites.append(replace(site, module_name=_free_name(owner, attr, taken.setdefault(site.block, set()))))
    return plan


def every_kth(blocks: list[Block], k: int) -> list[Block]:
    """Every k-th block of each stage, counting from the first one of that stage in ``blocks``."""
    seen: dict[int, int] = {}
    chosen = []
    for block in blocks:
        index = seen.get(block.stage, 0)
        seen[block.stage] = index + 1
        if index % k == 0:
            chosen.append(block)
    return chosen


class AttentionSiteError(RetrofitError):
    """The attention type cannot go on a site's feature map (its rank, shape or memory)."""


def _sized(site: Site, block: Block, spec: AttentionSpec, config: RetrofitConfig) -> Site:
    """The site with its attention-map size; an error where the type cannot go there or the map
    would exceed ``config.max_attention_mib`` (sizes use the block's output resolution)."""
    options = config.attention_options()
    problem = spec.site_problem(site.channels, block.spatial, options)
    if problem:
        raise AttentionSiteError(f"{block.name}: {problem}")
    size = spec.attention_bytes(site.channels, block.spatial, options)
    if size is not None and size > config.max_attention_mib * 2 ** 20:
        hints = ["a later stage (--stages)", "a smaller input"]
        if "sub_sample" in spec.options and options.get("sub_sample", True) is not True:
            hints.insert(0, "sub_sample=True (--sub-sample)")
        raise AttentionSiteError(
            f"{block.name}: {config.attention}'s attention map at {tuple(block.spatial)} would take "
            f"{size / 2 ** 20:,.0f} MiB at batch 1, over the limit of {config.max_attention_mib:g} MiB; use "
            f"{', '.join(hints)}, or raise max_attention_mib")
    return replace(site, attention_bytes=size)


def select_blocks(blocks: list[Block], patterns: list[str] | None, exclude: list[str] | None) -> list[Block]:
    """Blocks whose name or path matches one of ``patterns`` (all when None) and none of ``exclude``.
    A pattern that matches no block is an error: it is almost always a typo."""
    for pattern in (patterns or []) + (exclude or []):
        if not any(_matches(b, pattern) for b in blocks):
            raise BlockPatternError(f"pattern {pattern!r} matches no residual block (they are named like "
                                    f"{blocks[0].name} … {blocks[-1].name})")
    chosen = [b for b in blocks if patterns is None or any(_matches(b, p) for p in patterns)]
    return [b for b in chosen if not any(_matches(b, p) for p in exclude or [])]


def _matches(block: Block, pattern: str) -> bool:
    return fnmatch.fnmatchcase(block.name, pattern) or fnmatch.fnmatchcase(block.path, pattern)


def _last_block_of_each_stage(blocks: list[Block], stages: list[int]) -> list[Block]:
    last = {}
    for block in blocks:
        if block.stage != stages[-1]:
            last[block.stage] = block
    return [last[s] for s in sorted(last)]


def _check_stages(config: RetrofitConfig, available: list[int]) -> None:
    asked = config.stages
    if asked is None:
        return
    usable = available[:-1] if config.position == "stage" else available
    missing = [s for s in asked if s not in usable]
    if missing:
        what = "stage transitions follow stages" if config.position == "stage" else \
            "this model's residual blocks are in stages"
        raise StageError(f"stage(s) {', '.join(map(str, missing))} out of range: {what} {_span(usable)}")


def _span(stages: list[int]) -> str:
    if not stages:
        return "(none)"
    if stages == list(range(stages[0], stages[-1] + 1)):
        return f"{stages[0]}-{stages[-1]}" if len(stages) > 1 else str(stages[0])
    return ", ".join(map(str, stages))


def _unplaceable(block: Block, position: str) -> str | None:
    if position == "inner":
        return None if block.inner_module is not None else "its branch has no spatial (k>1) conv for inner"
    if block.rewrite_error:
        return f"its forward cannot be rewritten ({block.rewrite_error})"
    if position == "pre" and block.branch_outside:
        return (f"its branch starts in {block.branch_outside}, outside {block.path} where the addition is: "
                "pre would sit mid-branch")
    if block.layout not in SUPPORTED_LAYOUTS:
        return f"layout {block.layout}: the channel dimension could not be told from the probes"
    return None


def _site(block: Block, position: str) -> Site:
    if position == "inner":
        return Site(block=block.inner_module, add_index=0, shortcut_arg=0, position=position,
                    channels=block.inner_channels, spatial_dims=len(block.spatial), stage=block.stage,
                    module_name="", channel_dim=1, anchor=block.inner_anchor)
    channels = block.in_channels if position == "pre" else block.channels
    channel_dim = 1 if block.layout == CHANNELS_FIRST else -1
    return Site(block=block.path, add_index=block.add_index, shortcut_arg=block.shortcut_arg,
                position=position, channels=channels, spatial_dims=len(block.spatial),
                stage=block.stage, module_name="", channel_dim=channel_dim)


def _free_name(owner: nn.Module, base: str, taken: set[str]) -> str:
    """``se``, else ``se1``, ``se2``…: a name the block does not use (a ``None`` placeholder is free)."""
    index = 0
    while True:
        name = base if index == 0 else f"{base}{index}"
        if name not in taken and getattr(owner, name, None) is None:
            taken.add(name)
            return name
        index += 1
