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


# --- the three causes behind the transformers sweep's short rows (issue 19) -------------------------


class _PooledPositionSum(torch.nn.Module):
    """SEW's encoder input: ``pool(x)[..., :n] + conv(x)[..., :n]``, both cut to the shorter length;
    here the pooled sequence is the shorter, so its slice keeps it whole."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.pool = torch.nn.AvgPool1d(2, 2)
        self.conv = torch.nn.Conv1d(width, width, 4, stride=2, padding=2)

    def forward(self, x):
        pooled, position = self.pool(x), torch.nn.functional.gelu(self.conv(x))
        n = min(pooled.shape[-1], position.shape[-1])
        return pooled[..., :n] + position[..., :n]


def test_a_slice_that_keeps_the_whole_shortcut_is_free():
    analysis = analyze(_PooledPositionSum(), torch.randn(1, 8, 32))
    assert [(b.name, b.shortcut == "identity") for b in analysis.blocks] == [("", False)]


class _ChannelSliceSum(torch.nn.Module):
    """ReXNet-like partial residual: the first channels of the input plus a branch; the slice cuts
    the shortcut, so it is no free op and the sum no whole block."""

    def __init__(self):
        super().__init__()
        self.branch = torch.nn.Conv2d(12, 8, 3, padding=1)

    def forward(self, x):
        return x[:, :8] + self.branch(x)


def test_a_slice_that_cuts_the_shortcut_is_not_free():
    assert analyze(_ChannelSliceSum(), torch.randn(1, 12, 8, 8)).blocks == []


class _MaskedAttentionLayer(torch.nn.Module):
    """EoMT's last layers: attention under a mask predicted from the layer's input, the mask logits
    computed at half resolution, brought up (``interpolate``) and thresholded."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.norm, self.mask_head = torch.nn.LayerNorm(width), torch.nn.Conv2d(width, 1, 2, stride=2)
        self.qkv, self.out = torch.nn.Linear(width, 3 * width), torch.nn.Linear(width, width)

    def forward(self, x, side: int = 4):
        grid = x.transpose(1, 2).reshape(x.shape[0], -1, side, side)
        logits = torch.nn.functional.interpolate(self.mask_head(grid), size=(side, side), mode="bilinear")
        mask = (logits.flatten(1) > 0)[:, None, None, :].expand(-1, 1, x.shape[1], -1)
        q, k, v = self.qkv(self.norm(x)).unsqueeze(1).chunk(3, dim=-1)
        attended = torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=mask.float().masked_fill(~mask, -1e4))
        return x + self.out(attended.squeeze(1))


class _FusionUp(torch.nn.Module):
    """An FPN's top-down add: the upsampled values are features, not a mask."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.down, self.lateral = torch.nn.Conv2d(width, width, 2, stride=2), torch.nn.Conv2d(width, width, 1)

    def forward(self, x):
        return self.lateral(x) + torch.nn.functional.interpolate(self.down(x), scale_factor=2.0)


def test_an_upsampling_read_only_through_a_comparison_is_a_mask():
    analysis = analyze(_MaskedAttentionLayer(), torch.randn(2, 16, 8))
    assert [b.name for b in analysis.blocks] == [""]
    assert analyze(_FusionUp(), torch.randn(1, 8, 8, 8)).blocks == []


class _RefiningDecoder(torch.nn.Module):
    """PP-DocLayoutV4's decoder: each layer's query positions come from boxes the previous layer
    refined from its own output, not detached; the positions join the queries in the layer."""

    def __init__(self, width: int = 8, layers: int = 3):
        super().__init__()
        self.box, self.position = torch.nn.Linear(width, 4), torch.nn.Linear(4, width)
        self.layers = torch.nn.ModuleList(_SelfAttention(width) for _ in range(layers))

    def forward(self, queries, boxes):
        for layer in self.layers:
            queries = layer(queries, self.position(boxes))
            boxes = torch.sigmoid(self.box(queries) + boxes)
        return queries


class _SelfAttention(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = _PositionedAttention(width)

    def forward(self, x, position):
        return x + self.attn(x, position)


class _PositionedAttention(torch.nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.attn = torch.nn.MultiheadAttention(width, 2, batch_first=True)

    def forward(self, x, position):
        q = x + position
        return self.attn(q, q, x, need_weights=False)[0]


def test_positions_refined_from_the_layer_before_are_a_side_input():
    analysis = analyze(_RefiningDecoder(), (torch.randn(2, 5, 8), torch.rand(2, 5, 4)))
    assert [b.name for b in analysis.blocks if b.name.startswith("layers")] == ["layers.0", "layers.1", "layers.2"]


class _ZeroedPaddingConv(torch.nn.Module):
    """Wav2Vec2's encoder: padded frames zeroed in place (``x[~mask] = 0``), then ``x + conv(x)``.
    ``__setitem__`` returns None; the value the sum reads is ``x``, changed, of ``x``'s shape."""

    def __init__(self, width: int = 8):
        super().__init__()
        self.conv = torch.nn.Conv1d(width, width, 3, padding=1)

    def forward(self, x, mask):
        x = x.clone()
        x[~mask.bool().unsqueeze(1).expand_as(x)] = 0
        return x + self.conv(x)


def test_a_shortcut_written_in_place_is_a_block_input():
    mask = torch.ones(2, 16, dtype=torch.long)
    mask[1, 10:] = 0
    analysis = analyze(_ZeroedPaddingConv(), (torch.randn(2, 8, 16), mask))
    assert [b.name for b in analysis.blocks] == [""]
