"""The residual criterion: additions that mix activations or add what does not depend on the input are not blocks."""
import pytest
import timm
import torch

from se_retrofit.analysis import TOKENS, analyze

from helpers import small_input


def test_res2net_hierarchical_adds_are_not_blocks():
    analysis = analyze(timm.create_model("res2net50_26w_4s"))
    assert analysis.additions == 40 and len(analysis.blocks) == 16
    assert {b.path.count(".") for b in analysis.blocks} == {1}  # layerN.M, never an inner split


def test_vit_position_embedding_add_is_not_a_block():
    model = timm.create_model("test_vit", dynamic_img_size=True)
    analysis = analyze(model, torch.randn(1, 3, 160, 160))
    depth = len(model.blocks)
    assert len(analysis.blocks) == 2 * depth  # attention and MLP residual of each block
    assert all(b.path.startswith("blocks.") for b in analysis.blocks)
    assert analysis.additions == 2 * depth + 1  # plus the position embedding
    assert {b.layout for b in analysis.blocks} == {TOKENS}
    assert {b.name for b in analysis.blocks if b.add_index == 1} == {f"blocks.{i}@1" for i in range(depth)}


@pytest.mark.slow
def test_dual_path_network_has_additions_but_no_residual_blocks():
    # its additions mix two paths (a fusion, not a residual); its dense path's concatenations are joins
    analysis = analyze(timm.create_model("dpn68"), small_input(1))
    assert analysis.additions == 22 and analysis.blocks == []
    assert analysis.describe() == "0 of its 22 additions are residual connections; 22 join units"
