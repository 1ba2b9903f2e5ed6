"""Planning: from the blocks found and the config, decide the sites to edit. Reads the model only."""
from __future__ import annotations

from dataclasses import dataclass, field

from torch import nn

from .analysis import SUPPORTED_LAYOUTS, Analysis, Block
from .attention import get_attention
from .config import RetrofitConfig, Site


class NoResidualBlocksError(ValueError):
    """The model has no residual block to retrofit."""


class StageError(ValueError):
    """The stages asked for are not stages of this model."""


@dataclass
class Plan:
    """The sites to edit, and the blocks left alone with the reason why."""

    sites: list[Site]
    skipped: dict[str, str] = field(default_factory=dict)
    stacked: list[str] = field(default_factory=list)


def plan_sites(model: nn.Module, analysis: Analysis, config: RetrofitConfig) -> Plan:
    """Choose one site per selected block, with the channel count and attribute name it needs."""
    blocks = analysis.blocks
    if not blocks:
        raise NoResidualBlocksError(f"no residual blocks found: {analysis.describe()}")
    _check_stages(config.stages, analysis.stages)
    plan = Plan(sites=[])
    taken: dict[str, set[str]] = {}
    attr = get_attention(config.attention).attr_name
    for block in blocks:
        if config.stages is not None and block.stage not in config.stages:
            continue
        if block.layout not in SUPPORTED_LAYOUTS:
            plan.skipped[block.name] = f"layout {block.layout} is not supported yet"
            continue
        if block.has_attention:
            plan.stacked.append(block.name)
        owner = model.get_submodule(block.path)
        name = _free_name(owner, attr, taken.setdefault(block.path, set()))
        plan.sites.append(_site(block, config.position, name))
    return plan


def _check_stages(asked: list[int] | None, available: list[int]) -> None:
    if asked is None:
        return
    missing = [s for s in asked if s not in available]
    if missing:
        have = f"{available[0]}-{available[-1]}" if available == list(range(available[0], available[-1] + 1)) \
            else ", ".join(map(str, available))
        raise StageError(f"stage(s) {', '.join(map(str, missing))} out of range: this model's residual "
                         f"blocks are in stages {have}")


def _site(block: Block, position: str, name: str) -> Site:
    channels = block.in_channels if position == "pre" else block.channels
    return Site(block=block.path, add_index=block.add_index, shortcut_arg=block.shortcut_arg,
                position=position, channels=channels, spatial_dims=len(block.spatial),
                stage=block.stage, module_name=name)


def _free_name(owner: nn.Module, base: str, taken: set[str]) -> str:
    """``se``, else ``se1``, ``se2``…: a name the block does not use (a ``None`` placeholder is free)."""
    index = 0
    while True:
        name = base if index == 0 else f"{base}{index}"
        if name not in taken and getattr(owner, name, None) is None:
            taken.add(name)
            return name
        index += 1
