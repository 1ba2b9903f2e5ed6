"""From matches to blocks: what each block reports (shortcut, branch, activation, existing attention, stage)."""
import timm

import se_retrofit
from se_retrofit.analysis import analyze


def test_resnet50_blocks_in_detail():
    blocks = se_retrofit.find_blocks(timm.create_model("resnet50"))
    assert [b.path for b in blocks[:4]] == ["layer1.0", "layer1.1", "layer1.2", "layer2.0"]
    assert [sum(b.stage == s for b in blocks) for s in (1, 2, 3, 4)] == [3, 4, 6, 3]
    first, second = blocks[0], blocks[1]
    assert (first.channels, first.in_channels, first.spatial) == (256, 64, (56, 56))
    assert first.shortcut == "layer1.0.downsample.1" and first.branch == "layer1.0.bn3"
    assert second.shortcut == "identity" and second.post_activation == "layer1.1.act3"
    assert blocks[-1].channels == 2048 and blocks[-1].stage == 4


def test_existing_attention_is_flagged():
    assert sum(b.has_attention for b in se_retrofit.find_blocks(timm.create_model("efficientnet_b0"))) == 9
    assert sum(b.has_attention for b in se_retrofit.find_blocks(timm.create_model("regnety_008"))) == 14
    assert not any(b.has_attention for b in se_retrofit.find_blocks(timm.create_model("resnet50")))
    assert not any(b.has_attention for b in se_retrofit.find_blocks(timm.create_model("convnext_tiny")))


def test_stages_are_resolution_levels():
    for name in ("resnet50", "convnext_tiny", "efficientnet_b0"):
        assert analyze(timm.create_model(name)).stages == [1, 2, 3, 4], name
