"""Words for the command line's report: a transformer block's two residual sub-layers named by what
their branch is (``blocks.0 (attention)``, ``blocks.0 (mlp)``) rather than by the block's internal
name (``blocks.0``, ``blocks.0@1``, which ``--blocks`` patterns and saved records keep using), and
the count of units with their stages.

Example:
    >>> from torch import nn
    >>> sublayer_word("attn", nn.MultiheadAttention(8, 2)), sublayer_word("mlp", nn.Linear(2, 2))
    ('attention', 'mlp')
    >>> sublayer_word("branch", nn.Identity()) is None
    True
"""
from __future__ import annotations

from collections import defaultdict

from torch import nn

_ATTENTION_WORDS = ("attn", "attention")
#: names of a decoder's attention on the encoder's output (torch's TransformerDecoderLayer, BART, BERT, DETR)
_CROSS_WORDS = ("cross", "multihead_attn", "encoder_attn")
_MLP_WORDS = ("mlp", "ffn", "feedforward", "feed_forward", "intermediate", "linear", "fc")
_KIND_WORDS = {"residual": "blocks", "join": "joins", "chain": "chain layers"}
_KINDS = ("residual", "join", "chain")


def sublayer_word(child: str, module: nn.Module) -> str | None:
    """``attention`` (``cross-attention`` for a decoder's attention on the encoder's output) or ``mlp``
    from a branch's module (its attribute name, then its class), or None."""
    if any(w in child.lower() for w in _CROSS_WORDS):
        return "cross-attention"
    for text in (child.lower(), type(module).__name__.lower()):
        if any(w in text for w in _ATTENTION_WORDS):
            return "attention"
        if any(w in text for w in _MLP_WORDS):
            return "mlp"
    return None


def sublayer_labels(model: nn.Module, units) -> dict[str, str]:
    """For each residual unit that shares its block's path with others (a transformer block's
    attention and MLP sub-layers): its name → ``path (attention)`` / ``path (mlp)`` (a decoder's:
    ``(attention)``, ``(cross-attention)``, ``(mlp)``); a word met twice in one block is numbered
    (``attention 2``), a branch whose module says nothing is ``sub-layer k``."""
    by_path: dict[str, list] = defaultdict(list)
    for unit in units:
        if unit.kind == "residual":
            by_path[unit.path].append(unit)
    labels = {}
    for path, members in by_path.items():
        if len(members) < 2:
            continue
        words = [_word(model, path, unit) for unit in members]
        for k, (unit, word) in enumerate(zip(members, words), 1):
            if word is None:
                word = f"sub-layer {k}"
            elif words.count(word) > 1:
                word = f"{word} {words[:k].count(word)}"
            labels[unit.name] = f"{path or '<root>'} ({word})"
    return labels


def _word(model: nn.Module, path: str, unit) -> str | None:
    branch = unit.branch_module or ""
    prefix = f"{path}." if path else ""
    if not branch.startswith(prefix) or branch == path:
        return None
    child = branch[len(prefix):].split(".")[0]
    try:
        module = model.get_submodule(prefix + child)
    except AttributeError:
        return None
    return sublayer_word(child, module)


def units_text(units) -> str:
    """``blocks found: 16 (stages 1,2,3,4)``; ``joins found: 11 (stages 1,2,3)``; for blocks of several
    residual sub-layers (a ViT): ``blocks found: 12, with 24 residual sub-layers (1 stage: one resolution)``."""
    if not units:
        return "units found: 0"
    kinds = sorted({u.kind for u in units}, key=_KINDS.index)
    counts = []
    for kind in kinds:
        members = [u for u in units if u.kind == kind]
        paths = {u.path for u in members}
        if kind == "residual" and len(paths) < len(members):
            counts.append(f"blocks found: {len(paths)}, with {len(members)} residual sub-layers")
        else:
            counts.append(f"{_KIND_WORDS[kind]} found: {len(members)}")
    stages = sorted({u.stage for u in units})
    where = "1 stage: one resolution" if len(stages) == 1 else "stages " + ",".join(map(str, stages))
    return f"{', '.join(counts)} ({where})"
