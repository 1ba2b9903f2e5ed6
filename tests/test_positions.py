"""Positions (se_retrofit.positions): a registry, one file per position; a new position is one file."""
import pytest
import torch
import timm

import se_retrofit
from se_retrofit.placement import wrap_output
from se_retrofit.positions import POSITIONS, Position, PositionError, get_position, register_position
from se_retrofit.positions.base import _REGISTRY
from se_retrofit.tracing import trace

from helpers import as_if_pretrained, run


def test_the_built_in_positions_in_the_papers_order():
    assert POSITIONS == ("standard", "pre", "post", "identity", "inner", "stage")
    assert all(get_position(name).help for name in POSITIONS)


def test_a_name_taken_is_refused_unless_overridden():
    with pytest.raises(PositionError, match="position 'post' is already registered; pass override=True"):
        register_position(Position("post", "again"))


@pytest.fixture
def after_sum():
    """A position defined in a few lines: right after the addition, before the block's activation."""
    def place(graph, add, branch, shortcut, site, modules):
        wrap_output(graph, add, site)

    position = register_position(Position("after_sum", "right after the addition", place=place))
    yield position
    del _REGISTRY["after_sum"]


def test_a_new_position_is_one_registration(after_sum):
    torch.manual_seed(0)
    base = as_if_pretrained(timm.create_model("resnet18")).eval()
    x = torch.randn(2, 3, 64, 64)
    edited = se_retrofit.retrofit(base, position="after_sum", example_input=x[:1])
    assert len(edited.se_retrofit.sites) == 8
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(base, x, training))
    graph = trace(edited.layer1[0], leaf_children=True)
    se = next(n for n in graph.nodes if n.op == "call_module" and n.target == "se")
    assert getattr(se.args[0].target, "__name__", se.args[0].target) in ("add", "iadd", "add_")  # right after the sum
    assert [u.target for u in se.users] == ["act2"]  # and the block's activation follows it


@pytest.mark.slow
def test_a_position_without_a_placement_at_residual_blocks_is_refused_with_the_reason():
    with pytest.raises(ValueError, match="position 'identity' does not apply to a join unit"):
        se_retrofit.retrofit(timm.create_model("inception_v3"), position="identity",
                             example_input=torch.randn(1, 3, 96, 96))
