"""Where each residual block will be edited: the number surgery gives its addition in the traced
forward of the adding module (a trace counts shape arithmetic as additions too), and the module
outputs an edit from outside that forward can gate (:mod:`.outside_edit`)."""
from __future__ import annotations

from dataclasses import replace
from typing import Any

from torch import nn

from . import op_kinds as K
from .gates import CallCounts
from .probing import _reason
from .recording import Op, Recording
from .residual import _Residual
from .tracing import TRACE_FAILURES, own_tensor_adds
from .units import Block


# --- where surgery will find the additions -----------------------------------------------------

def _place_in_traced_forwards(model: nn.Module, recording: Recording, found: list[tuple[Op, "_Residual"]],
                              per_call: dict[int, int], untraceable: dict[str, str]) -> None:
    """Set each block's ``add_index`` as surgery counts additions: in the graph of the adding module's
    own forward, where shape arithmetic (``H + pad``) is an addition node too; note the blocks whose
    forward cannot be traced."""
    positions: dict[str, list[int] | str] = {}
    for add, residual in found:
        path = add.scope
        if path not in positions:
            positions[path] = _traced_positions(model, recording, add)
        places = positions[path]
        if isinstance(places, str):
            residual.rewrite_error = places
        elif len(places) != per_call[add.call]:
            residual.rewrite_error = (f"its forward runs {per_call[add.call]} tensor additions where its traced "
                                      f"graph has {len(places)}")
        else:
            residual.add_index = places[residual.add_index]
        if residual.rewrite_error:
            name = path if residual.add_index == 0 else f"{path}@{residual.add_index}"
            untraceable[name or "<root>"] = residual.rewrite_error


def _traced_positions(model: nn.Module, recording: Recording, add: Op) -> list[int] | str:
    module = model.get_submodule(add.scope)
    if "forward" in vars(module):  # edited before: its forward was generated from a trace
        return list(range(sum(op.kind == K.ADD and op.call == add.call for op in recording.ops)))
    call = recording.calls.get(add.call)
    args, kwargs = (call.args, call.kwargs) if call is not None else ((), {})
    try:
        return own_tensor_adds(module, args, kwargs)
    except TRACE_FAILURES as error:
        return _reason(error)


# --- where a block can be edited from outside its forward (see :mod:`.outside_edit`) ------------

def _with_outside_edits(blocks: list[Block], found: list[tuple[Op, _Residual]], recording: Recording) -> list[Block]:
    """Each block with where an edit from outside its forward could put ``post`` and ``standard``."""
    calls = CallCounts(recording)
    return [replace(block, **_output_place(add), **_branch_place(add, residual, calls))
            for block, (add, residual) in zip(blocks, found)]


def _output_place(add: Op) -> dict[str, Any]:
    """The adding module returns the sum (or the activation its forward applies right after it)."""
    op = add
    if len(add.users) == 1 and add.users[0].kind == K.ACT and add.users[0].scope == add.scope:
        op = add.users[0]
    leaf = op.returned_leaf.get(add.scope, -1)
    return {"output_module": add.scope, "output_leaf": leaf} if leaf >= 0 else {}


def _branch_place(add: Op, residual: _Residual, calls: CallCounts) -> dict[str, Any]:
    """The module (inside the adding one) whose output is the branch operand, nearest the branch's
    last layer: the outermost call returning that layer's result, else a stochastic-depth or dropout
    module after it; usable where that output reaches the addition and nothing else (through
    stochastic depth or dropout only) and the module runs as often as the adding one. Where the
    outermost one does not (a dropout shared by two branches), the next one in."""
    inside = f"{add.scope}." if add.scope else ""
    chain = [residual.branch]
    while chain[-1].kind in K.PASSTHROUGH_KINDS and len(chain[-1].inputs) == 1 and len(chain[-1].inputs[0].users) == 1:
        chain.append(chain[-1].inputs[0])
    found = [(op, p) for op in reversed(chain) for p in reversed(op.returned_by) if p.startswith(inside) and p != add.scope]
    if not found:
        return {}
    if residual.branch.users != [add] or any(not p.startswith(inside) for o in chain for p in o.returned_by):
        return {"branch_wrap_module": found[0][1],
                "branch_wrap_error": f"the output of {found[0][1]} is used elsewhere than in the addition"}
    block_runs = max(calls.counts.get(add.scope, 0), 1)
    problems = []
    for op, path in found:
        runs, leaf = calls.counts.get(path, 0), op.returned_leaf.get(path, -1)
        if runs == block_runs and leaf >= 0:
            return {"branch_wrap_module": path, "branch_leaf": leaf}
        problems.append(f"{path} runs {runs} times where {add.scope or 'the model'} runs {block_runs} (one module "
                        f"serves more than one branch: give each branch its own {path.rpartition('.')[2]} module, "
                        f"or leave the block out with exclude=[{add.scope!r}])"
                        if runs != block_runs else f"{path} returns the branch more than once")
    return {"branch_wrap_module": found[0][1], "branch_wrap_error": problems[0]}
