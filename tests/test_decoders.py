"""Decoder layers: sub-layers that read a second sequence are residual blocks (issue 19, item 3).

``x + attn(q=x, k=v=memory)`` is a block of the decoder: the shortcut is ``x``, the branch reads
``x`` through learned layers, and the memory enters only as keys and values, a side input like a
RoPE table. A decoder that starts its target as ``zeros_like`` (DETR) has blocks from its first
layer on. Fusions (FPN, U-Net, HRNet, DPN) stay out: tests/test_idioms.py and tests/test_joins.py.
"""
import re
import warnings

import pytest
import torch
from torch import nn

import se_retrofit
from se_retrofit.analysis import TOKENS

from se_retrofit.outputs import output_tensors

from helpers import as_if_pretrained, run
from test_any_model import check_identity_and_liveness
from test_zoo import _assert_live


@pytest.mark.parametrize("batch_first", [False, True])
def test_torch_transformer_decoder_has_three_blocks_per_layer(batch_first):
    # nn.TransformerDecoderLayer: x + self-attention, x + cross-attention(memory), x + feed-forward
    model = nn.TransformerDecoder(nn.TransformerDecoderLayer(32, 2, 64, batch_first=batch_first), 2).eval()
    target, memory = (torch.randn(5, 7, 32), torch.randn(5, 9, 32)) if batch_first else \
        (torch.randn(5, 7, 32), torch.randn(9, 7, 32))
    analysis = se_retrofit.analyze(model, (target, memory))
    assert [b.name for b in analysis.blocks] == [f"layers.{i}{a}" for i in range(2) for a in ("", "@1", "@2")]
    assert {(b.layout, b.batch_dim) for b in analysis.blocks} == {(TOKENS, 0 if batch_first else 1)}


class CrossAttentionDecoder(nn.Module):
    """A DETR-like decoder: the target starts as zeros plus learned query embeddings; each layer adds
    self-attention, cross-attention on the memory and a feed-forward layer."""

    def __init__(self, width: int = 16, queries: int = 4, layers: int = 2):
        super().__init__()
        self.encoder = nn.Conv2d(3, width, 4, 4)
        self.queries = nn.Parameter(torch.randn(queries, width))
        self.layers = nn.ModuleList(_DecoderLayer(width) for _ in range(layers))

    def forward(self, image):
        memory = self.encoder(image).flatten(2).transpose(1, 2)
        position = self.queries.unsqueeze(0).expand(image.shape[0], -1, -1)
        target = torch.zeros_like(position)
        for layer in self.layers:
            target = layer(target, memory, position)
        return target


class _DecoderLayer(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.cross_attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.norms = nn.ModuleList(nn.LayerNorm(width) for _ in range(3))
        self.mlp = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x, memory, position):
        q = x + position
        x = self.norms[0](x + self.self_attn(q, q, x, need_weights=False)[0])
        x = self.norms[1](x + self.cross_attn(x + position, memory, memory, need_weights=False)[0])
        return self.norms[2](x + self.mlp(x))


def test_cross_attention_and_a_target_started_as_zeros():
    model = as_if_pretrained(CrossAttentionDecoder()).eval()
    x = torch.randn(2, 3, 16, 16)
    analysis = se_retrofit.analyze(model, x[:1])  # additions 0 and 2 of a layer add the query positions
    assert [b.name for b in analysis.blocks] == [f"layers.{i}@{a}" for i in range(2) for a in (1, 3, 4)]
    assert all(b.rewrite_error is None for b in analysis.blocks)
    check_identity_and_liveness(model, x, 6)


def _detr(model_class: str, **config):
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                         layer_type="basic", out_features=["stage2", "stage3", "stage4"])
    torch.manual_seed(0)
    return getattr(transformers, model_class)(getattr(transformers, config.pop("config"))(
        backbone_config=backbone, use_pretrained_backbone=False, d_model=32, decoder_layers=2,
        encoder_attention_heads=2, decoder_attention_heads=2, num_queries=5, **config)).eval()


@pytest.mark.slow
def test_detr_counts_every_decoder_sub_layer():
    # the ResNet backbone with frozen norms: 4 basic layers (depths 1, 1, 1, 1); encoder: 1 layer x
    # (self-attention, feed-forward) = 2; decoder: 2 layers x (self-attention on queries started as
    # zeros_like, cross-attention, feed-forward) = 6
    model = _detr("DetrForObjectDetection", config="DetrConfig", use_timm_backbone=False, encoder_layers=1,
                  encoder_ffn_dim=32, decoder_ffn_dim=32)
    model.config.backbone_config.out_features = ["stage4"]
    analysis = se_retrofit.analyze(model, torch.randn(1, 3, 64, 64))
    names = [b.name for b in analysis.blocks]
    assert len(names) == 12 and sum(n.startswith("model.backbone.") for n in names) == 4
    assert names[-6:] == [f"model.decoder.layers.{i}{a}" for i in range(2) for a in ("", "@1", "@2")]
    for position in ("standard", "post"):  # the encoder layer's forward checks isfinite: fx cannot rewrite it
        _every_unit_edited_or_said(model, position, torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_rt_detr_counts_aifi_and_deformable_decoder_layers():
    # backbone: 4 basic layers; hybrid encoder: AIFI, 1 layer x (self-attention, feed-forward) = 2
    # (its RepVGG and CSP adds are multi-branch layers, its FPN/PAN adds fusions); decoder: 2 layers
    # x (self-attention with positions from the reference boxes, deformable cross-attention on the
    # multi-scale memory, feed-forward) = 6
    model = _detr("RTDetrForObjectDetection", config="RTDetrConfig", encoder_hidden_dim=32,
                  encoder_in_channels=[32, 64, 128], encoder_ffn_dim=64, decoder_ffn_dim=64,
                  decoder_in_channels=[32, 32, 32], num_feature_levels=3, decoder_n_points=2, hidden_expansion=0.5)
    analysis = se_retrofit.analyze(model, torch.randn(1, 3, 64, 64))
    names = [b.name for b in analysis.blocks]
    assert len(names) == 12 and sum(n.startswith("model.backbone.") for n in names) == 4
    assert names[4:6] == ["model.encoder.aifi.0.layers.0", "model.encoder.aifi.0.layers.0@1"]
    assert names[-6:] == [f"model.decoder.layers.{i}{a}" for i in range(2) for a in ("", "@1", "@2")]
    for position in ("standard", "post"):
        _every_unit_edited_or_said(model, position, torch.randn(2, 3, 64, 64))


@pytest.mark.slow
def test_eomt_masked_layers_keep_their_attention_block():
    # EoMT: 6 ViT layers x (attention, MLP) = 12. The last num_blocks = 2 layers attend under a mask the
    # model predicts from the layer's input: mask logits brought up to the token grid (a transposed conv,
    # an interpolation) and thresholded, ``logits > 0``. The upsampled values reach the branch only as
    # "where to attend", so the attention add is a block, not a fusion (10 of 12 found before).
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.EomtForUniversalSegmentation(transformers.EomtConfig(
        hidden_size=32, num_hidden_layers=6, num_attention_heads=2, image_size=32, patch_size=8, num_blocks=2,
        num_queries=4, num_labels=3)).eval()
    analysis = se_retrofit.analyze(model, {"pixel_values": torch.randn(1, 3, 32, 32)})
    assert [b.name for b in analysis.blocks] == [f"layers.{i}{a}" for i in range(6) for a in ("", "@1")]
    for position in ("standard", "post"):
        _every_unit_edited_or_said(model, position, torch.randn(2, 3, 32, 32))


def _every_unit_edited_or_said(model: nn.Module, position: str, x: torch.Tensor) -> None:
    """``retrofit`` on the whole detector, nothing excluded: each unit found is edited, or left out with
    its reason in a LeftOutWarning (never an error); exact in train and eval; the new modules live."""
    units = len(se_retrofit.analyze(model, x[:1]).units)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edited = se_retrofit.retrofit(model, position=position, example_input=x[:1])
    edited_units = len({s.unit or s.block for s in edited.se_retrofit.edits[-1][1]})
    said = [re.match(r"(\d+) of the (\d+) units selected were left unedited; \S+: \S", str(w.message))
            for w in caught if issubclass(w.category, se_retrofit.LeftOutWarning)]
    left_out = int(said[0][1]) if said else 0
    assert edited_units + left_out == units and (not said or int(said[0][2]) == units), (position, said)
    for training in (True, False):
        torch.manual_seed(0)
        expected = output_tensors(model.train(training)(x))
        torch.manual_seed(0)
        got = output_tensors(edited.train(training)(x))
        assert all(torch.equal(a, b) for a, b in zip(got, expected)), (position, training)
    model.eval()
    _assert_live(model, edited, x)


def mask2former() -> nn.Module:
    """A small Mask2Former (ResNet backbone, 1 pixel-decoder encoder layer, 3 decoder layers), with
    trained-looking norms (benchmarks/named_models.py builds it too)."""
    transformers = pytest.importorskip("transformers")
    backbone = transformers.ResNetConfig(embedding_size=16, hidden_sizes=[16, 32, 64, 128], depths=[1, 1, 1, 1],
                                         layer_type="basic", out_features=["stage1", "stage2", "stage3", "stage4"])
    config = transformers.Mask2FormerConfig(
        backbone_config=backbone, use_pretrained_backbone=False, hidden_dim=32, feature_size=32, mask_feature_size=32,
        encoder_feedforward_dim=64, dim_feedforward=64, decoder_layers=3, encoder_layers=1, num_attention_heads=2,
        num_queries=5, common_stride=4)
    torch.manual_seed(0)
    return as_if_pretrained(transformers.Mask2FormerForUniversalSegmentation(config).eval())


@pytest.mark.slow
def test_mask2former_masked_cross_attention_from_learned_queries():
    # ResNet backbone: 4 basic layers; pixel decoder: 1 deformable encoder layer x (self-attention,
    # feed-forward) = 2; transformer decoder: decoder_layers - 1 = 2 layers x (masked cross-attention,
    # self-attention, feed-forward) = 6, the first reading the learned queries repeated per sample.
    # Additions 0 and 1 of each decoder layer add position embeddings to queries and keys.
    model = mask2former()
    analysis = se_retrofit.analyze(model, torch.randn(1, 3, 64, 64))
    names = [b.name for b in analysis.blocks]
    assert len(names) == 12 and sum(n.startswith("model.pixel_level_module.encoder.") for n in names) == 4
    decoder = [f"model.transformer_module.decoder.layers.{i}@{a}" for i in range(2) for a in (2, 3, 4)]
    assert names[-6:] == decoder
    # the key's position embedding is added to an item of a per-level list argument (a tensor addition
    # the traced graph has too), and the forward subscripts that list, so it takes no None for it
    assert all(b.rewrite_error is None for b in analysis.blocks if b.name in decoder)
    assert analysis.never_run == []  # the ResNet's stages are a ModuleList, iterated: they ran
    x = torch.randn(2, 3, 64, 64)
    # the pixel decoder's encoder layer checks isfinite when training: edited from outside at standard;
    # at post a LayerNorm follows each of its sums, so nothing can gate them from outside (skipped)
    for position, outside in (("standard", 2), ("post", 0)):
        edited = se_retrofit.retrofit(model, position=position, example_input=x[:1])
        sites = edited.se_retrofit.edits[-1][1]
        assert [s.unit for s in sites if s.edit == "rewrite" and s.unit in decoder] == decoder
        assert len(sites) == 10 + outside
        for training in (True, False):
            for a, b in zip(output_tensors(run(edited, x, training)), output_tensors(run(model, x, training))):
                assert torch.equal(a, b), (position, training)
    _assert_live(model, edited, x)


class _ResidualPoolingAttention(nn.Module):
    """MViTv2's attention: the pooled queries are added to the attention's output (``q + attn(q, k, v)``),
    keys and values split from the same projection, learned relative positions on the queries: one
    self-attention, no second sequence."""

    def __init__(self, width: int = 16, tokens: int = 5):
        super().__init__()
        self.qkv, self.proj = nn.Linear(width, 3 * width), nn.Linear(width, width)
        self.rel = nn.Parameter(torch.randn(width, tokens))

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return self.proj(torch.softmax(q @ k.transpose(1, 2) + q @ self.rel, -1) @ v + q)


class _PreNormBlock(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.norm, self.attn = nn.LayerNorm(width), _ResidualPoolingAttention(width)

    def forward(self, x):
        return x + self.attn(self.norm(x))


def test_queries_added_to_their_own_attention_are_no_block():
    model = nn.Sequential(nn.Linear(8, 16), _PreNormBlock(), _PreNormBlock()).eval()
    assert [b.name for b in se_retrofit.find_blocks(model, torch.randn(1, 5, 8))] == ["1", "2"]
