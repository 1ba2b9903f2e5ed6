"""What the analysis reports of one unit attention can go on: a :class:`Block`, of one of the
kinds of unit (a residual block, a join of branches, a layer of a plain chain)."""
from __future__ import annotations

from dataclasses import dataclass

from .gates import Gate

#: the kinds of unit: residual blocks, multi-branch joins (:mod:`.joins`), plain chain layers (:mod:`.chains`)
RESIDUAL, JOIN, CHAIN = "residual", "join", "chain"
UNIT_KINDS = (RESIDUAL, JOIN, CHAIN)


@dataclass(frozen=True)
class Block:
    """One residual block: an addition of a transformed branch and a shortcut of the same input.

    Attributes:
        path: dotted path of the module whose forward performs the addition (``layer1.0``).
        add_index: which addition of that module's own forward it is (0 for ordinary blocks).
        channels: channel count at the addition.
        in_channels: channel count of the block input (differs where the shortcut projects).
        stage: 1-based resolution level among the residual blocks (layer1 of a ResNet is 1).
        spatial: spatial size at the addition for the probe input.
        layout: ``channels_first`` (N, C, *spatial), ``channels_last``, ``tokens``, ``features``
            (N, C: a vector per sample) or ``unknown``.
        channel_dim: index of the channel dimension at the addition.
        batch_dim: index of the batch dimension (1 for the sequence-first tokens (L, N, C) of an
            ``nn.MultiheadAttention`` with ``batch_first=False``).
        branch: the module or operation producing the branch operand.
        shortcut: ``identity``, or the module/operation ending the shortcut projection.
        shortcut_arg: which argument of the addition (0 or 1) is the shortcut.
        post_activation: the activation applied right after the addition, if any.
        has_attention: the branch already applies channel attention (SE-like gating).
        inner_module, inner_anchor, inner_channels: where the ``inner`` position goes: the module
            whose forward calls the branch's spatial conv (or that conv's norm), the child's name
            within it, and its channel count; None where the branch has no spatial conv.
        container: the smallest module holding the addition, the whole branch and the shortcut
            (``path`` itself, or a parent where the branch runs in modules beside the adding one).
        branch_module: the outermost child call inside ``path``'s forward that returns the branch
            operand (a hook there edits the branch without rewriting ``path``); None where the
            branch comes from ``path``'s own operations or from outside it.
        rewrite_error: why the forward of ``path`` cannot be rewritten (fx cannot trace it, or
            its additions could not be matched to the traced graph); None where it can.
        branch_outside: the module where the branch starts when that is outside ``path`` (HF
            EfficientNet computes the branch in siblings of the adding module, which receives it as an
            argument: ``pre`` there would sit mid-branch); None where ``path``'s forward starts it
            (DLA's blocks, given their shortcut as an argument, start their branch themselves).
        in_place: the forward adds in place into its first operand (``x += shortcut``, ``add_``),
            which an fx trace does not keep: surgery writes the edited addition in place again
            where that is safe (see :mod:`.surgery`).
        output_module, output_leaf: the module whose call returns the sum (after the activation
            that directly follows it in the same forward), and which tensor of its output (pytree
            order) the sum is: ``post`` can be edited from outside that module's forward (see
            :mod:`.outside_edit`); None where no module returns it.
        branch_wrap_module, branch_leaf, branch_wrap_error: the module inside ``path`` whose output
            is the branch operand (``branch_module``, else a stochastic-depth or dropout module
            right after the branch's last operation), which tensor of its output that is, and why
            ``standard`` cannot be edited from outside it (its output also feeds something other
            than the addition, or it runs more often than ``path``); None where it can.
    """

    path: str
    add_index: int
    channels: int
    in_channels: int
    stage: int
    spatial: tuple[int, ...]
    layout: str
    channel_dim: int
    branch: str
    shortcut: str
    shortcut_arg: int
    post_activation: str | None = None
    has_attention: bool = False
    inner_module: str | None = None
    inner_anchor: str | None = None
    inner_channels: int = 0
    container: str | None = None
    branch_module: str | None = None
    rewrite_error: str | None = None
    branch_outside: str | None = None
    in_place: bool = False
    output_module: str | None = None
    output_leaf: int = 0
    branch_wrap_module: str | None = None
    branch_leaf: int = 0
    branch_wrap_error: str | None = None
    kind: str = RESIDUAL
    batch_dim: int = 0
    gates: tuple[tuple[str, tuple[Gate, ...]], ...] = ()
    gate_errors: tuple[tuple[str, str], ...] = ()
    label: str | None = None

    @property
    def name(self) -> str:
        """Unique name: the path, with ``@i`` where a module's forward holds several residual adds."""
        if self.label:
            return self.label
        return self.path if self.add_index == 0 else f"{self.path}@{self.add_index}"

    def gates_for(self, position: str) -> tuple[Gate, ...] | None:
        """For a join or a chain layer: where ``position`` puts its modules (None: it does not apply)."""
        return dict(self.gates).get(position)
