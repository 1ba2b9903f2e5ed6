"""What a saved model must be when it is loaded again: its module tree, and its output on a probe input.

:func:`se_retrofit.save` records both; :func:`se_retrofit.load` rebuilds the model, then

1. compares the module trees path by path (:func:`module_tree`: each module's class and the
   description of how it was constructed: ``extra_repr()``, a class's own ``repr`` where it has one,
   such as timm's ``SelectAdaptivePool2d(pool_type=max…)``, and a ``global_pool`` kept as a string),
   and refuses with the first differing paths, both sides (:func:`tree_differences`);
2. runs the rebuilt model, in eval mode, on the saved probe input and refuses when its outputs are
   not those saved (:func:`probe_difference`, max |Δ|).

The tree catches what a rebuild from a name gets wrong structurally (a constructor option such as
``global_pool="max"``, ``act_layer="gelu"``, ``output_stride=8``, a layer replaced after creation); the
probe catches what no module describes (a flag read in ``forward``, a weight that did not load).

Example:
    >>> import timm
    >>> from se_retrofit.fingerprint import module_tree, tree_differences
    >>> avg, top = module_tree(timm.create_model("resnet18")), module_tree(timm.create_model("resnet18",
    ...                                                                                       global_pool="max"))
    >>> tree_differences(avg, top)[0][0]
    'global_pool'
"""
from __future__ import annotations

import hashlib
import json
import re
from typing import Any

import torch
from torch import nn

from .outputs import output_tensors
from .tracing import restore_training, snapshot_training

#: a description longer than this is kept as its hash (a class whose repr prints a whole table)
_LONGEST_DESCRIPTION = 240
_ADDRESS = re.compile(r"0x[0-9a-fA-F]+")
#: plain attributes that change what a module computes and that no repr shows (timm's ViT keeps its
#: pooling as the string ``global_pool``)
_BEHAVIOUR_ATTRIBUTES = ("global_pool", "pool_type")


def module_tree(model: nn.Module) -> list[list[str]]:
    """``[path, class, description]`` for every module of ``model`` (root first, path ``""``), in
    registration order; a module registered under several names is described once and then named
    ``same module as PATH``.

    Example:
        >>> from torch import nn
        >>> module_tree(nn.Sequential(nn.Linear(2, 3), nn.ReLU()))
        [['', 'Sequential', ''], ['0', 'Linear', 'in_features=2, out_features=3, bias=True'], ['1', 'ReLU', '']]
    """
    first_path: dict[int, str] = {}
    rows = []
    for path, module in model.named_modules(remove_duplicate=False):
        name = type(module).__qualname__
        if id(module) in first_path:
            rows.append([path, name, f"same module as {first_path[id(module)] or 'the model'}"])
            continue
        first_path[id(module)] = path
        rows.append([path, name, describe_module(module)])
    return rows


def describe_module(module: nn.Module) -> str:
    """How ``module`` was constructed, as far as it tells: ``extra_repr()``, its class's own ``repr``
    (where the class overrides it: timm's pooling), and string attributes such as ``global_pool``."""
    parts = [_safe(module.extra_repr)]
    if type(module).__repr__ is not nn.Module.__repr__:
        parts.append(_ADDRESS.sub("0x…", _safe(lambda: repr(module))))
    parts += [f"{name}={module.__dict__[name]}" for name in _BEHAVIOUR_ATTRIBUTES
              if isinstance(module.__dict__.get(name), str)]
    text = "; ".join(part for part in parts if part)
    if len(text) > _LONGEST_DESCRIPTION:
        text = f"{text[:80]}… (sha256 {hashlib.sha256(text.encode()).hexdigest()[:16]})"
    return text


def _safe(describe) -> str:
    try:
        return str(describe())
    except Exception as error:  # a repr that fails (an uninitialised lazy module) is described by its failure
        return f"<repr failed: {type(error).__name__}>"


def tree_digest(rows: list[list[str]]) -> str:
    """The sha256 of a module tree (what the config stores beside the tree itself)."""
    return hashlib.sha256(json.dumps(rows, separators=(",", ":")).encode()).hexdigest()


def tree_differences(saved: list[list[str]], rebuilt: list[list[str]]) -> list[tuple[str, str, str]]:
    """``(path, saved side, rebuilt side)`` for every path where the two trees differ, in the saved
    order (paths only the rebuilt tree has come last); a side that has no module at the path is
    ``"no module"``."""
    theirs = {row[0]: row for row in rebuilt}
    ours = {row[0]: row for row in saved}
    differences = []
    for path, *what in saved:
        other = theirs.get(path)
        if other is None or other[1:] != what:
            differences.append((path, _side(what), _side(other[1:]) if other else "no module"))
    differences += [(path, "no module", _side(what)) for path, *what in rebuilt if path not in ours]
    return differences


def _side(what: list[str]) -> str:
    name, description = what
    return f"{name}({description})"


def describe_differences(differences: list[tuple[str, str, str]], shown: int = 3) -> str:
    """One line naming the first differing paths, both sides."""
    parts = [f"{path or '<model>'}: saved {saved}, rebuilt {rebuilt}" for path, saved, rebuilt in differences[:shown]]
    more = f" (and {len(differences) - shown} more)" if len(differences) > shown else ""
    return "; ".join(parts) + more


# --- the probe ---------------------------------------------------------------------------------------

def probe_outputs(model: nn.Module, example: Any) -> list[torch.Tensor]:
    """The output tensors of ``model`` (eval mode, no grad) on ``example``, on the CPU; the model's
    training flags are restored afterwards."""
    snapshot = snapshot_training(model)
    try:
        model.eval()
        with torch.no_grad():
            return output_tensors(model(example))
    finally:
        restore_training(snapshot)


def as_model_input(model: nn.Module, example: torch.Tensor) -> torch.Tensor:
    """The saved probe input on ``model``'s device, in its floating dtype (an integer input stays)."""
    param = next(model.parameters(), None)
    if param is None:
        return example
    dtype = param.dtype if example.is_floating_point() and param.is_floating_point() else example.dtype
    return example.to(device=param.device, dtype=dtype)


def tolerance(device: str, dtype: str) -> float:
    """Largest max |Δ|, relative to the largest saved output value, that still counts as the same
    model: a float32/float64 model probed on a CPU comes back bit for bit on the same machine and
    within rounding on another; a GPU (TF32 convolutions) or half precision rounds far more."""
    if device == "cpu" and dtype in ("torch.float32", "torch.float64"):
        return 1e-4
    return 2e-2


def probe_difference(saved: list[torch.Tensor], actual: list[torch.Tensor]) -> tuple[float, float] | None:
    """(max |Δ|, the largest |saved value|) over the output tensors, in float64; None when the outputs
    do not even have the same number and shapes of tensors."""
    if len(saved) != len(actual) or any(s.shape != a.shape for s, a in zip(saved, actual)):
        return None
    pairs = [(s.double(), a.double()) for s, a in zip(saved, actual) if s.numel()]
    delta = max(((a - s).abs().nan_to_num(float("inf")).max().item() for s, a in pairs), default=0.0)
    scale = max((s.abs().nan_to_num(0.0).max().item() for s, _ in pairs), default=0.0)
    nan_agree = all(torch.equal(s.isnan(), a.isnan()) for s, a in pairs)
    return (delta if nan_agree else float("inf")), scale


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over the names, dtypes, shapes and bytes of ``state``'s tensors, in name order."""
    digest = hashlib.sha256()
    for key in sorted(state):
        tensor = state[key].detach()
        digest.update(f"{key}|{tensor.dtype}|{tuple(tensor.shape)}|".encode())
        if tensor.numel():
            digest.update(tensor.cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()
