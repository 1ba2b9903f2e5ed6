"""Norms told by what they compute (frozen, fused, a user's own), and layouts told by the layer that
writes the sum where a second probe cannot run (issue 19, items 1 and 2)."""
import pytest
import torch
import torchvision
from torch import nn
from torchvision.ops.misc import FrozenBatchNorm2d

import se_retrofit
from se_retrofit.analysis import TOKENS
from se_retrofit.recording import record

from helpers import as_if_pretrained, run
from test_any_model import check_identity_and_liveness


@torch.no_grad()
def _trained_frozen_norms(model: nn.Module) -> nn.Module:
    """Frozen norms keep their statistics in buffers, which ``as_if_pretrained`` leaves alone."""
    generator = torch.Generator().manual_seed(4)
    for module in model.modules():
        if isinstance(module, (FrozenBatchNorm2d, AffineNorm)):
            for tensor in module.state_dict().values():
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
    return as_if_pretrained(model)


class AffineNorm(nn.Module):
    """A user's fused norm: a scale and a shift per channel, no torch base class."""

    def __init__(self, channels: int):
        super().__init__()
        self.scale = nn.Parameter(torch.ones(channels))
        self.shift = nn.Parameter(torch.zeros(channels))

    def forward(self, x):
        return x * self.scale[:, None, None] + self.shift[:, None, None]


class LayerScale(nn.Module):
    def __init__(self, channels: int):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((channels,), 0.5))

    def forward(self, x):
        return x * self.gamma[:, None, None]


@pytest.mark.parametrize("norm,kind", [(FrozenBatchNorm2d, "norm"), (AffineNorm, "norm"), (LayerScale, "mul")])
def test_a_norm_is_told_by_what_it_computes(norm, kind):
    """A scale and a shift per channel from the layer's own tensors is one norm operation; a scale
    alone (a layer scale) stays a multiplication."""
    model = nn.Sequential(nn.Conv2d(3, 8, 3), norm(8)).eval()
    kinds = [op.kind for op in record(model, torch.randn(1, 3, 8, 8)).ops if op.dynamic]
    assert kinds[-1] == kind and kinds.count("norm") == (kind == "norm")


@pytest.mark.slow
def test_frozen_batchnorm_resnet50_has_all_projection_shortcuts():
    # torchvision's ResNet-50: 3 + 4 + 6 + 3 = 16 bottlenecks, layerN.0 projecting (conv1x1 → norm)
    model = _trained_frozen_norms(torchvision.models.resnet50(norm_layer=FrozenBatchNorm2d))
    analysis = se_retrofit.analyze(model, torch.randn(1, 3, 32, 32))
    assert (len(analysis.blocks), analysis.additions) == (16, 16)  # no addition inside a frozen norm counted
    assert [b.shortcut for b in analysis.blocks if b.shortcut != "identity"] == [
        f"layer{i}.0.downsample.1" for i in range(1, 5)]
    check_identity_and_liveness(model, torch.randn(2, 3, 32, 32), 16)


class _Bottleneck(nn.Module):
    def __init__(self, cin, cout, stride):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.norm1 = AffineNorm(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.norm2 = AffineNorm(cout)
        self.down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), AffineNorm(cout))

    def forward(self, x):
        return torch.relu(self.norm2(self.conv2(torch.relu(self.norm1(self.conv1(x))))) + self.down(x))


def test_a_users_affine_norm_on_a_projection_shortcut():
    model = _trained_frozen_norms(nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), _Bottleneck(8, 16, 2),
                                                _Bottleneck(16, 32, 2)))
    blocks = se_retrofit.find_blocks(model, torch.randn(1, 3, 16, 16))
    assert [(b.path, b.shortcut) for b in blocks] == [("1", "1.down.1"), ("2", "2.down.1")]
    check_identity_and_liveness(model, torch.randn(2, 3, 16, 16), 2)


def test_detection_backbone_with_frozen_norms_and_fpn():
    # what torchvision's pretrained Faster/Mask R-CNN build: 16 bottlenecks; the FPN's top-down
    # additions (3) are fusions, not blocks
    from torchvision.models.detection.backbone_utils import resnet_fpn_backbone

    torch.manual_seed(0)
    model = resnet_fpn_backbone(backbone_name="resnet50", weights=None, norm_layer=FrozenBatchNorm2d).eval()
    analysis = se_retrofit.analyze(model, torch.randn(1, 3, 64, 64))
    assert (len(analysis.blocks), analysis.additions) == (16, 19)
    assert all(b.path.startswith("body.layer") for b in analysis.blocks)
    assert sum(b.shortcut != "identity" for b in analysis.blocks) == 4


def test_vit_b_16_every_add_has_a_layout_without_a_second_probe():
    # torchvision's vit_b_16: 12 encoder layers, each x + attention and x + MLP = 24 residuals (the
    # 25th addition is the position embedding); fixed to 224 px, so no second probe can run
    model = torchvision.models.vit_b_16(weights=None)
    analysis = se_retrofit.analyze(model)
    assert (len(analysis.blocks), analysis.additions) == (24, 25)
    assert {(b.layout, b.channel_dim, b.batch_dim) for b in analysis.blocks} == {(TOKENS, 2, 0)}
    assert analysis.probes["second"].startswith("not run")


@pytest.mark.parametrize("position", ["standard", "post"])
@pytest.mark.slow
def test_fixed_size_vit_is_edited_at_every_add(position):
    torch.manual_seed(0)  # vit_b_16's class, narrow: 12 layers, 24 residuals
    model = as_if_pretrained(torchvision.models.VisionTransformer(32, 8, 12, 2, 32, 64)).eval()
    x = torch.randn(2, 3, 32, 32)
    edited = se_retrofit.retrofit(model, position=position, example_input=x[:1])
    new = {n.rsplit(".", 2)[0] for n in edited.state_dict() if n not in model.state_dict()}
    assert len(new) == 24
    for training in (True, False):
        torch.manual_seed(1)
        a = edited.train(training)(x)
        torch.manual_seed(1)
        assert torch.equal(a, model.train(training)(x))


class _ResidualMLP(nn.Module):
    def __init__(self, width: int = 64):
        super().__init__()
        self.f = nn.Sequential(nn.Linear(width, 2 * width), nn.ReLU(), nn.Linear(2 * width, width))

    def forward(self, x):
        return x + self.f(x)


def test_residual_mlp_on_tabular_input():
    """A (B, C) sum has one candidate for its channels: no probe needed, and the squeeze of a
    vector per sample is the vector itself (the batch is never averaged)."""
    model = as_if_pretrained(nn.Sequential(_ResidualMLP(), _ResidualMLP(), nn.Linear(64, 2))).eval()
    x = torch.randn(4, 64)
    analysis = se_retrofit.analyze(model, x[:1])
    assert [(b.layout, b.channel_dim, b.channels) for b in analysis.blocks] == [("features", 1, 64)] * 2
    check_identity_and_liveness(model, x, 2)
    edited = se_retrofit.retrofit(model, example_input=x[:1])
    with torch.no_grad():
        for name, param in edited.named_parameters():
            if name not in model.state_dict():
                param.normal_()
        alone = edited(x[:1])
        assert torch.allclose(edited(x)[:1], alone, atol=1e-6)  # sample 0 does not see the others


@pytest.mark.parametrize("batch_first,batch_dim", [(False, 1), (True, 0)])
def test_transformer_encoder_layout_from_its_attention(batch_first, batch_dim):
    # nn.TransformerEncoder: 2 layers, x + self-attention and x + feed-forward each = 4 residuals; its
    # layers refuse a wider input, and batch_first=False puts the batch on dimension 1
    layer = nn.TransformerEncoderLayer(32, 2, 64, batch_first=batch_first)
    model = nn.TransformerEncoder(layer, 2, enable_nested_tensor=False).eval()
    analysis = se_retrofit.analyze(model, torch.randn(5, 7, 32))
    assert [(b.layout, b.channel_dim, b.batch_dim) for b in analysis.blocks] == [(TOKENS, 2, batch_dim)] * 4


class _SequenceFirstBlock(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)  # batch_first=False: (L, N, C)

    def forward(self, x):
        h = self.norm(x)
        return x + self.attn(h, h, h, need_weights=False)[0]


def test_sequence_first_tokens_are_squeezed_per_sample():
    model = nn.Sequential(_SequenceFirstBlock(), _SequenceFirstBlock()).eval()
    x = torch.randn(6, 3, 16)  # 6 tokens, 3 samples
    assert [b.batch_dim for b in se_retrofit.find_blocks(model, x)] == [1, 1]
    check_identity_and_liveness(model, x, 2)
    edited = se_retrofit.retrofit(model, example_input=x)
    with torch.no_grad():
        for name, param in edited.named_parameters():
            if name not in model.state_dict():
                param.normal_()
        assert torch.allclose(edited(x)[:, :1], edited(x[:, :1]), atol=1e-5)  # samples stay apart


class _TokenModel(nn.Module):
    """Integer token ids in, a dict in: no second probe can be made from either."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Embedding(50, width)
        self.blocks = nn.ModuleList(_ResidualMLP(width) for _ in range(2))

    def forward(self, batch):
        x = self.embed(batch["ids"])
        for block in self.blocks:
            x = block(x)
        return x


def test_integer_ids_in_a_dict_have_their_layout_from_the_linear_layers():
    model = _TokenModel().eval()
    batch = {"ids": torch.randint(0, 50, (1, 7))}
    analysis = se_retrofit.analyze(model, (batch,))
    assert [(b.layout, b.channel_dim, b.channels) for b in analysis.blocks] == [(TOKENS, 2, 16)] * 2
    edited = se_retrofit.retrofit(model, example_input=(batch,), allow_token_models=True)  # ids: the padding refusal, opted out
    batch = {"ids": torch.randint(0, 50, (3, 7))}
    with torch.no_grad():
        assert torch.equal(edited(batch), model(batch))


class _ConformerLikeLayer(nn.Module):
    """torchaudio's ConformerLayer in small: on sequence-first tokens ``(T, N, C)``, a half-step
    feed-forward add before any attention ran, a ``batch_first=False`` attention add, and a conv
    module add whose branch is convolved as ``(N, C, T)`` and transposed back (4 adds)."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.ffn1 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, 2 * width), nn.SiLU(), nn.Linear(2 * width, width))
        self.norm = nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2)
        self.conv_norm = nn.LayerNorm(width)
        self.conv = nn.Conv1d(width, width, 3, padding=1)
        self.ffn2 = nn.Sequential(nn.LayerNorm(width), nn.Linear(width, width))

    def forward(self, x):
        x = self.ffn1(x) * 0.5 + x
        h = self.norm(x)
        x = x + self.attn(h, h, h, need_weights=False)[0]
        c = self.conv(self.conv_norm(x).transpose(0, 1).transpose(1, 2))  # (N, C, T)
        x = x + c.transpose(1, 2).transpose(0, 1)
        return self.ffn2(x) * 0.5 + x


class _ConformerLike(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.layers = nn.ModuleList(_ConformerLikeLayer(width) for _ in range(2))

    def forward(self, x):  # (N, T, C) in, as torchaudio's Conformer
        x = x.transpose(0, 1)
        for layer in self.layers:
            x = layer(x)
        return x.transpose(0, 1)


def _samples_stay_apart(model: nn.Module, edited: nn.Module, x: torch.Tensor) -> None:
    """Moved gates change the output, and a sample's output does not depend on the other samples."""
    with torch.no_grad():
        for name, param in edited.named_parameters():
            if name not in model.state_dict():
                param.normal_()
        assert not torch.allclose(edited(x), model(x))
        assert torch.allclose(edited(x)[:1], edited(x[:1]), atol=1e-5)


@pytest.mark.parametrize("position", ["standard", "post"])
def test_sequence_first_before_any_attention_and_a_transposed_conv_branch(position):
    # 2 layers x 4 adds: the first add reads tokens the model transposed to sequence-first (no
    # attention before it says so: the attention reading it does); the conv add's writer is a conv on
    # (N, C, T) whose channels two transposes move to the last dimension
    model = as_if_pretrained(_ConformerLike().eval())
    x = torch.randn(3, 10, 16)
    analysis = se_retrofit.analyze(model, x[:1])
    assert [(b.layout, b.channel_dim, b.batch_dim) for b in analysis.blocks] == [(TOKENS, 2, 1)] * 8
    edited = se_retrofit.retrofit(model, position=position, example_input=x[:1])
    assert len(edited.se_retrofit.edits[-1][1]) == 8
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(model, x, training)), training
    _samples_stay_apart(model, edited, x)


class _PositionalConv(nn.Module):
    """Wav2Vec2's positional conv embedding in small: tokens ``(N, T, C)`` transposed, a grouped conv
    of even kernel (one frame too many, trimmed), an activation, transposed back; added to the tokens."""

    def __init__(self, width: int = 16, kernel: int = 4):
        super().__init__()
        self.conv = nn.Conv1d(width, width, kernel, padding=kernel // 2, groups=2)
        self.trim = 1 if kernel % 2 == 0 else 0

    def forward(self, x):
        y = self.conv(x.transpose(1, 2))
        y = y[:, :, :-self.trim] if self.trim else y
        return x + nn.functional.gelu(y).transpose(1, 2).to(x.dtype)


@pytest.mark.parametrize("position", ["standard", "post"])
def test_a_conv_branch_cropped_and_transposed_says_its_layout(position):
    # the writer is a conv on (N, C, T + 1); a crop and a transpose (and a cast) lie between it and the
    # sum: the channels are found again by their size. Before: "layout unknown" (Wav2Vec2's encoder, 24/25)
    model = as_if_pretrained(nn.Sequential(nn.Linear(8, 16), _PositionalConv()).eval())
    x = torch.randn(3, 10, 8)
    analysis = se_retrofit.analyze(model, x[:1])
    assert [(b.layout, b.channel_dim, b.batch_dim) for b in analysis.blocks] == [(TOKENS, 2, 0)]
    edited = se_retrofit.retrofit(model, position=position, example_input=x[:1])
    assert len(edited.se_retrofit.edits[-1][1]) == 1
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(model, x, training)), training
    _samples_stay_apart(model, edited, x)


def test_torchaudio_conformer_every_residual_add():
    # torchaudio.models.Conformer, 2 layers: ffn1 half-step, self-attention, convolution module, ffn2
    # half-step = 4 adds per layer, 8. Its lengths argument is an integer tensor (the padding refusal,
    # opted out: all frames are real here)
    models = pytest.importorskip("torchaudio.models")
    torch.manual_seed(0)
    model = as_if_pretrained(models.Conformer(input_dim=32, num_heads=2, ffn_dim=64, num_layers=2,
                                              depthwise_conv_kernel_size=3).eval())
    x, lengths = torch.randn(3, 10, 32), torch.full((3,), 10)
    analysis = se_retrofit.analyze(model, (x[:1], lengths[:1]))
    assert [(b.layout, b.batch_dim) for b in analysis.blocks] == [(TOKENS, 1)] * 8
    for position in ("standard", "post"):
        edited = se_retrofit.retrofit(model, position=position, example_input=(x[:1], lengths[:1]),
                                      allow_token_models=True)
        assert len(edited.se_retrofit.edits[-1][1]) == 8
        for training in (True, False):
            torch.manual_seed(1)
            expected = run_model(model, (x, lengths), training)
            torch.manual_seed(1)
            assert torch.equal(run_model(edited, (x, lengths), training), expected)


def run_model(model: nn.Module, args: tuple, training: bool) -> torch.Tensor:
    model.train(training)
    try:
        with torch.no_grad():
            return model(*args)[0]
    finally:
        model.eval()


# torchvision builds every detector it ships weights for with FrozenBatchNorm2d (``is_trained``) and
# three trainable stages; the sweep builds them untrained (BatchNorm2d). Here the builder's own path
# for pretrained weights, with only the ResNet-50 download replaced by a fresh one of the norm it asks.
# Every one: ResNet-50's 16 bottlenecks, the four layerN.0 projecting; the FPN's top-down adds, the
# heads' box arithmetic are no blocks.
DETECTORS = [("fasterrcnn_resnet50_fpn", {"box_score_thresh": 0.0}), ("maskrcnn_resnet50_fpn", {}),
             ("keypointrcnn_resnet50_fpn", {}), ("retinanet_resnet50_fpn", {"score_thresh": 0.0}),
             ("fcos_resnet50_fpn", {"score_thresh": 0.0})]


def _as_built_for_pretrained_weights(name: str, options: dict, monkeypatch) -> nn.Module:
    import importlib

    builder = torchvision.models.get_model_builder(name)
    monkeypatch.setattr(importlib.import_module(builder.__module__), "resnet50",
                        lambda **kw: torchvision.models.resnet50(norm_layer=kw["norm_layer"]))
    torch.manual_seed(0)
    model = builder(weights=None, weights_backbone="DEFAULT", min_size=64, max_size=64, **options)
    assert isinstance(model.backbone.body.layer1[0].bn1, FrozenBatchNorm2d)  # the builder chose it
    return _trained_frozen_norms(model).eval()


def _targets(name: str) -> list[dict]:
    target = {"boxes": torch.tensor([[8.0, 8.0, 40.0, 48.0]]), "labels": torch.tensor([1])}
    if name.startswith("mask"):
        target["masks"] = torch.zeros(1, 64, 64, dtype=torch.uint8).index_fill_(1, torch.arange(8, 48), 1)
    if name.startswith("keypoint"):
        target["keypoints"] = torch.cat([torch.rand(1, 17, 2) * 32 + 8, torch.ones(1, 17, 1)], dim=2)
    return [target]


def _losses(model: nn.Module, images: list, targets: list) -> list[torch.Tensor]:
    torch.manual_seed(0)
    losses = model.train()(images, targets)
    return [losses[k] for k in sorted(losses)]


@pytest.mark.slow
@pytest.mark.parametrize("name,options", DETECTORS, ids=[d[0] for d in DETECTORS])
def test_pretrained_detectors_keep_every_block(name, options, monkeypatch):
    from se_retrofit.outputs import output_tensors

    model = _as_built_for_pretrained_weights(name, options, monkeypatch)
    images, targets = [torch.rand(3, 64, 64)], _targets(name)
    blocks = se_retrofit.find_blocks(model, (images,))
    assert len(blocks) == 16 and all(b.path.startswith("backbone.body.layer") for b in blocks)
    assert [b.shortcut for b in blocks if b.shortcut != "identity"] == [
        f"backbone.body.layer{i}.0.downsample.1" for i in range(1, 5)]
    for position in ("standard", "post"):
        edited = se_retrofit.retrofit(model, position=position, example_input=(images,))
        assert len(edited.se_retrofit.edits[-1][1]) == 16
        with torch.no_grad():
            assert all(torch.equal(a, b) for a, b in zip(output_tensors(edited.eval()(images)),
                                                          output_tensors(model.eval()(images))))
        losses = _losses(model, images, targets)
        assert all(torch.equal(a, b) for a, b in zip(_losses(edited, images, targets), losses))
        with torch.no_grad():
            for key, param in edited.named_parameters():
                if key not in model.state_dict():
                    param.add_(1.0)
        assert any(not torch.equal(a, b) for a, b in zip(_losses(edited, images, targets), losses))
