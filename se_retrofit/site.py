"""A planned site: the contract between planning and surgery (and what a saved model records)."""
from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any


@dataclass(frozen=True)
class Site:
    """One planned insertion: the module whose forward is edited, where in it, and the new module.

    ``block`` is the module whose forward is edited: a residual block, or the module holding a
    join's concatenation, or the one whose call or return value is gated. ``gate`` says how
    surgery finds the place in that forward: empty for a residual block's own positions (the
    addition number ``add_index``, its shortcut operand ``shortcut_arg``), else ``child`` (the one
    call of the child ``anchor``), ``output`` (the value the forward returns), ``cat`` (after
    concatenation number ``add_index`` and the activation right after it) or ``cat_operand`` (its
    tensor number ``operand`` only). ``kind`` is the unit it belongs to (``residual``, ``join``,
    ``chain``); ``channel_dim`` is where the channels are at that point (1 for NCHW, -1 for NHWC
    maps and token sequences); ``attention_bytes`` is the size of the attention type's largest
    intermediate at batch 1 in float32 (Non-local's and PAM's N×N map), None where the type does
    not tell. ``in_place``: the block's forward added in place into its first operand (``x +=
    shortcut``); surgery keeps it so where the module it inserts there returns a fresh tensor.
    ``batch_dim``: where the batch is (1 for the sequence-first tokens of an ``nn.MultiheadAttention``
    with ``batch_first=False``); ``vector``: the tensor is one vector per sample ``(N, C)``, given a
    length-1 axis for the module (built for one spatial dimension). ``padding_mask``: the argument of
    the block's forward carrying the padding mask of its sequence, over whose real positions the
    module squeezes (:mod:`se_retrofit.masking`); ``mask_from``: for an edit from outside a forward
    (``edit="wrap"``), the module whose forward receives that argument (the block's adding module), which
    hands it to the gate.
    """

    block: str
    add_index: int
    shortcut_arg: int
    position: str
    channels: int
    spatial_dims: int
    stage: int
    module_name: str
    channel_dim: int = 1
    anchor: str | None = None
    attention_bytes: int | None = None
    kind: str = "residual"
    gate: str = ""
    operand: int = 0
    unit: str = ""
    in_place: bool = False
    edit: str = "rewrite"
    wrap_module: str | None = None
    output_leaf: int = 0
    batch_dim: int = 0
    vector: bool = False
    padding_mask: str | None = None
    mask_from: str | None = None

    def __post_init__(self) -> None:
        if not self.gate and self.position == "inner":  # records written before gates existed
            object.__setattr__(self, "gate", "child")

    @property
    def module_path(self) -> str:
        return f"{self.block}.{self.module_name}" if self.block else self.module_name

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Site":
        """The site ``to_dict`` wrote, checked first (keys, types, ranges, allowed names): anything
        else is a :class:`~se_retrofit.saved_format.SavedFormatError`.

        Example:
            >>> site = Site("layer1.0", 0, 1, "standard", 64, 2, 1, "se")
            >>> Site.from_dict(site.to_dict()) == site
            True
        """
        from .saved_format import check_site

        check_site(data)
        return cls(**data)
