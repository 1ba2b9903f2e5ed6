"""Planning: from the blocks found and the config, decide the sites to edit. Reads the model only."""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any

from torch import nn

from .errors import RetrofitError
from .analysis import Analysis, Block
from .attention import AttentionSpec, get_attention
from .config import RetrofitConfig
from .masking import padding_argument
from .positions import get_position
from .positions.base import REWRITE, WRAP
from .site import Site


class NoResidualBlocksError(RetrofitError):
    """The model has no residual block to retrofit."""


class StageError(RetrofitError):
    """The stages asked for are not stages of this model."""


class BlockPatternError(RetrofitError):
    """A block pattern matches no residual block."""


@dataclass
class Plan:
    """The sites to edit, and the blocks left alone with the reason why; ``choice``: what a budget
    chose (:class:`se_retrofit.budget.Choice`) where one made the plan."""

    sites: list[Site]
    skipped: dict[str, str] = field(default_factory=dict)
    stacked: list[str] = field(default_factory=list)
    choice: Any = field(default=None, repr=False, compare=False)
    no_outside: dict[str, str] = field(default_factory=dict, repr=False, compare=False)

    def copy(self) -> "Plan":
        """A plan to hand to an edit (which moves the sites it cannot make to ``skipped``), leaving
        this one as planned."""
        return Plan(sites=list(self.sites), skipped=dict(self.skipped), stacked=list(self.stacked), choice=self.choice,
                    no_outside=dict(self.no_outside))

    def explain_skipped(self) -> None:
        """Add to the reason of each unit an edit skipped, its forward found not rewritable only then
        (in a mode or for an argument the analysis did not try), why no edit from outside could do it."""
        for unit, reason in self.skipped.items():
            why = self.no_outside.get(unit)
            if why and why not in reason and "cannot be rewritten" in reason:
                head, sep, tail = reason.partition("; leave it out")
                self.skipped[unit] = f"{head}, and {why}{sep}{tail}"


def plan_sites(model: nn.Module, analysis: Analysis, config: RetrofitConfig) -> Plan:
    """Choose the sites for ``config``: one per selected unit (one per new branch of a join at
    ``standard``; one per stage transition for ``stage``), with the channel count, layout and
    attribute name each needs."""
    units = analysis.units_of(config.kinds)
    if not units:
        raise NoResidualBlocksError(_nothing_found(analysis, config))
    stages = sorted({u.stage for u in units})
    _check_stages(config, stages, _kind_words(units))
    spec = get_attention(config.attention)
    position = get_position(config.position)
    chosen = _selected(units, config)
    if position.select is not None:
        if len(stages) < 2:
            raise StageError(f"position {position.name!r} goes between stages, and all of this model's "
                             f"{_kind_words(units)} are at one resolution; use a block position such as standard")
        chosen = position.select(chosen, stages)
    if spec.default_blocks == "last" and config.stages is None and config.blocks is None and chosen:
        chosen = chosen[-1:]  # the type's own placement (DANet: once, on the backbone's output)
    plan = Plan(sites=[])
    taken: dict[str, set[str]] = {}
    for unit in chosen:
        drafts = position.sites(unit)
        if isinstance(drafts, str):
            plan.skipped[unit.name] = drafts
            continue
        if unit.has_attention:
            plan.stacked.append(unit.name)
        if any(d.edit == REWRITE and d.wrap_module is None and not d.gate for d in drafts):
            why = position.outside_place(unit)
            if isinstance(why, str):
                plan.no_outside[unit.name] = why
        for draft in drafts:
            site = _sized(draft, unit, spec, config)
            owner = model.get_submodule(site.block)
            site = _masked(model, unit, site, spec)
            name = _free_name(owner, spec.attr_name, taken.setdefault(site.block, set()))
            plan.sites.append(replace(site, module_name=name))
    return plan


def nothing_editable(analysis: Analysis, plan: Plan) -> str:
    """Why a plan has no site: the one reason all units share, or the first few."""
    reasons = set(plan.skipped.values())
    if len(reasons) == 1:
        kinds = {u.kind for u in analysis.units if u.name in plan.skipped}
        what = _kind_words([u for u in analysis.units if u.name in plan.skipped]) if len(kinds) == 1 else "units"
        return f"no block could be edited: for all {len(plan.skipped)} {what}, {reasons.pop()}"
    listed = "; ".join(f"{k}: {v}" for k, v in list(plan.skipped.items())[:3])
    return f"no block could be edited ({analysis.describe()}): {listed}"


def _nothing_found(analysis: Analysis, config: RetrofitConfig) -> str:
    if config.kinds is None:
        return f"no residual blocks found, nor joins of branches or conv chain layers: {analysis.describe()}"
    return f"no units of kind {', '.join(config.kinds)} found: {analysis.describe()}"


def _selected(units: list[Block], config: RetrofitConfig) -> list[Block]:
    """The units ``blocks``, ``exclude``, ``stages`` and ``every`` leave; an error where none is left."""
    chosen = select_blocks(units, config.blocks, config.exclude)
    if config.stages is not None:
        chosen = [u for u in chosen if u.stage in config.stages]
    if config.every is not None:
        chosen = every_kth(chosen, config.every)
    if not chosen:
        given = ", ".join(f"{k}={v}" for k, v in (("blocks", config.blocks), ("exclude", config.exclude),
                                                   ("stages", config.stages), ("every", config.every))
                          if v is not None)
        raise BlockPatternError(f"{given} leave none of the {len(units)} {_kind_words(units)} "
                                f"({units[0].name} … {units[-1].name}) to edit")
    return chosen


def _kind_words(units: list[Block]) -> str:
    return {"residual": "residual blocks", "join": "joins", "chain": "chain layers"}.get(units[0].kind, "units")


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


def _masked(model: nn.Module, unit: Block, site: Site, spec: AttentionSpec) -> Site:
    """The site, squeezing over the real positions of its sequence where the forward of the module
    that adds (``unit.path``) receives the padding mask and the type squeezes by statistics
    (:mod:`.masking`); an edit from outside a forward reads the mask from that module's call."""
    if site.vector or site.spatial_dims != 1 or site.gate or not getattr(spec.cls, "SQUEEZES_BY_STATISTICS", False):
        return site
    argument = padding_argument(model.get_submodule(unit.path))
    if argument is None:
        return site
    return replace(site, padding_mask=argument, mask_from=unit.path if site.edit == WRAP else None)


def select_blocks(blocks: list[Block], patterns: list[str] | None, exclude: list[str] | None) -> list[Block]:
    """Blocks whose name or path matches one of ``patterns`` (all when None) and none of ``exclude``.
    A pattern that matches no block is an error: it is almost always a typo."""
    for pattern in (patterns or []) + (exclude or []):
        if not any(_matches(b, pattern) for b in blocks):
            raise BlockPatternError(f"pattern {pattern!r} matches no {_kind_words(blocks)[:-1]} (they are named "
                                    f"like {blocks[0].name} … {blocks[-1].name})")
    chosen = [b for b in blocks if patterns is None or any(_matches(b, p) for p in patterns)]
    return [b for b in chosen if not any(_matches(b, p) for p in exclude or [])]


def _matches(block: Block, pattern: str) -> bool:
    return fnmatch.fnmatchcase(block.name, pattern) or fnmatch.fnmatchcase(block.path, pattern)


def _check_stages(config: RetrofitConfig, available: list[int], units: str) -> None:
    asked = config.stages
    if asked is None:
        return
    usable = available[:-1] if config.position == "stage" else available
    missing = [s for s in asked if s not in usable]
    if missing:
        what = "stage transitions follow stages" if config.position == "stage" else \
            f"this model's {units} are in stages"
        raise StageError(f"stage(s) {', '.join(map(str, missing))} out of range: {what} {_span(usable)}")


def _span(stages: list[int]) -> str:
    if not stages:
        return "(none)"
    if stages == list(range(stages[0], stages[-1] + 1)):
        return f"{stages[0]}-{stages[-1]}" if len(stages) > 1 else str(stages[0])
    return ", ".join(map(str, stages))


def _free_name(owner: nn.Module, base: str, taken: set[str]) -> str:
    """``se``, else ``se1``, ``se2``…: a name the block does not use (a ``None`` placeholder is free)."""
    index = 0
    while True:
        name = base if index == 0 else f"{base}{index}"
        if name not in taken and getattr(owner, name, None) is None:
            taken.add(name)
            return name
        index += 1
