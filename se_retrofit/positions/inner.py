"""``inner``: inside the residual branch, right after its spatial conv and that conv's norm (the SE
paper's SE_3×3 variant, Sec. 6.5). The site is a gate: the call of that conv (or norm) in the
module whose forward makes it."""
from __future__ import annotations

from ..analysis import Block
from ..site import Site
from .base import Position, register_position


class InnerPosition(Position):
    def _residual_sites(self, block: Block) -> list[Site] | str:
        if block.inner_module is None:
            return "its branch has no spatial (k>1) conv for inner"
        return [Site(block=block.inner_module, add_index=0, shortcut_arg=0, position=self.name,
                     channels=block.inner_channels, spatial_dims=len(block.spatial), stage=block.stage,
                     module_name="", channel_dim=1, anchor=block.inner_anchor, gate="child", unit=block.name)]


INNER = register_position(InnerPosition(
    "inner", "inside the branch, right after its spatial conv and that conv's norm (the paper's SE_3x3)"))
