"""One small model per way of writing a residual block, and per addition that is not one.

The residual ones are also retrofitted: outputs equal the original (torch.equal, train and eval)
and every inserted module is live (perturbing its parameters moves the output).
"""

import pytest
import torch
from torch import nn

import se_retrofit
from se_retrofit.analysis import TOKENS

from helpers import as_if_pretrained, run

C = 8


def conv_bn(cin=C, cout=C, k=3, stride=1):
    return nn.Sequential(nn.Conv2d(cin, cout, k, stride, k // 2, bias=False), nn.BatchNorm2d(cout))


class Branch(nn.Module):
    """conv-bn-relu-conv-bn: the usual residual branch."""

    def __init__(self, cin=C, cout=C, stride=1):
        super().__init__()
        self.a, self.b, self.act = conv_bn(cin, cout, stride=stride), conv_bn(cout, cout), nn.ReLU()

    def forward(self, x):
        return self.b(self.act(self.a(x)))


class Plus(nn.Module):
    def __init__(self):
        super().__init__()
        self.f = Branch()

    def forward(self, x):
        return x + self.f(x)


class Swapped(Plus):
    def forward(self, x):
        return self.f(x) + x


class InPlaceOperator(Plus):
    def forward(self, x):
        identity = x
        out = self.f(x)
        out += identity
        return out


class AddUnderscore(Plus):
    def forward(self, x):
        out = self.f(x)
        return out.add_(x)


class TorchAddAlpha(Plus):
    def forward(self, x):
        return torch.add(x, self.f(x), alpha=1.0)


class LayerScaled(Plus):
    def __init__(self):
        super().__init__()
        self.gamma = nn.Parameter(torch.full((C, 1, 1), 0.5))

    def forward(self, x):
        return x + self.gamma * self.f(x)


class OneLayer(nn.Module):
    """``x + bn(conv(x))``: a branch of one learned layer is a residual branch."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(C, C, 3, 1, 1), nn.BatchNorm2d(C)

    def forward(self, x):
        return x + self.bn(self.conv(x))


class Project(nn.Module):
    """HF EfficientNet's last layer: the addition happens here, the branch starts in its siblings."""

    def __init__(self):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(2 * C, C, 1, bias=False), nn.BatchNorm2d(C)

    def forward(self, hidden, shortcut):
        return self.bn(self.conv(hidden)) + shortcut


class SiblingBranch(nn.Module):
    def __init__(self):
        super().__init__()
        self.expand = nn.Sequential(nn.Conv2d(C, 2 * C, 1), nn.BatchNorm2d(2 * C), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(2 * C, 2 * C, 3, 1, 1, groups=2 * C), nn.BatchNorm2d(2 * C))
        self.projection = Project()

    def forward(self, x):
        return self.projection(self.depthwise(self.expand(x)), x)


class Strided(nn.Module):
    """A downsampling block: the shortcut is a strided 1x1 conv and BN."""

    def __init__(self, cin=C, cout=2 * C):
        super().__init__()
        self.f = Branch(cin, cout, stride=2)
        self.down = conv_bn(cin, cout, k=1, stride=2)

    def forward(self, x):
        return torch.relu(self.f(x) + self.down(x))


class Pooled(nn.Module):
    """ResNet-D style: the shortcut is average pooling, then a 1x1 conv and BN."""

    def __init__(self, cin=2 * C, cout=4 * C):
        super().__init__()
        self.f = Branch(cin, cout, stride=2)
        self.down = nn.Sequential(nn.AvgPool2d(2), nn.Conv2d(cin, cout, 1, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        return self.f(x) + self.down(x)


class Nested(nn.Module):
    """A residual whose branch holds two residual blocks: three blocks."""

    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(Plus(), Plus(), nn.Conv2d(C, C, 3, 1, 1))

    def forward(self, x):
        return x + self.body(x)


class Flat(nn.Module):
    """Several residuals in one forward, the last one spanning the first two."""

    def __init__(self):
        super().__init__()
        self.f1, self.f2, self.g = Branch(), Branch(), nn.Conv2d(C, C, 1)

    def forward(self, x):
        y = x + self.f1(x)
        z = y + self.f2(y)
        return x + self.g(z)


def rope_table(n: int, dim: int) -> torch.Tensor:
    position = torch.arange(n, dtype=torch.float32)[:, None]
    return torch.sin(position / 10 ** (torch.arange(dim, dtype=torch.float32) / dim))


class RopeAttention(nn.Module):
    def __init__(self, dim=C):
        super().__init__()
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x, rope, mask):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        q, k = q * rope, k * rope
        attn = (q @ k.transpose(-1, -2)).masked_fill(mask, -1e4).softmax(-1)
        return self.proj(attn @ v)


class RopeBlock(nn.Module):
    """A transformer block whose attention takes a RoPE table and a mask besides its input."""

    def __init__(self, dim=C):
        super().__init__()
        self.norm1, self.attn = nn.LayerNorm(dim), RopeAttention(dim)
        self.norm2, self.mlp = nn.LayerNorm(dim), nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(),
                                                                nn.Linear(2 * dim, dim))

    def forward(self, x, rope, mask):
        x = x + self.attn(self.norm1(x), rope, mask)
        return x + self.mlp(self.norm2(x))


class RopeNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Conv2d(3, C, 4, 4)
        self.blocks = nn.ModuleList([RopeBlock(), RopeBlock()])

    def forward(self, x):
        x = self.embed(x).flatten(2).transpose(1, 2)
        n = x.shape[1]
        rope = rope_table(n, x.shape[-1])
        mask = torch.ones(n, n, dtype=torch.bool).triu(1)
        for block in self.blocks:
            x = block(x, rope, mask)
        return x.mean(1)


class DownUpLayer(nn.Module):
    """LowFormer's strided attention: down by a strided conv, mixed, back up by a transposed conv,
    cropped to the shape it was given."""

    def __init__(self):
        super().__init__()
        self.down = nn.Conv2d(C, C, 3, 2, 1, groups=C)
        self.mix = nn.Conv2d(C, C, 1)
        self.up = nn.Sequential(nn.ConvTranspose2d(C, C, 4, 2, 1, groups=C))

    def forward(self, x):
        h, w = x.shape[-2:]
        return self.up(self.mix(self.down(x)))[..., :h, :w]


class DownUpBlock(nn.Module):
    """A residual whose branch resamples inside one of its layers: a block, not an encoder-decoder skip."""

    def __init__(self):
        super().__init__()
        self.attn = DownUpLayer()

    def forward(self, x):
        return x + self.attn(x)


class UpsampledGateBlock(nn.Module):
    """GhostNetV2's DFC attention: a gate computed at half resolution, brought back up and multiplied
    in; the branch changes width, so it is no layer returning its input's shape."""

    def __init__(self):
        super().__init__()
        self.expand, self.short, self.project = nn.Conv2d(C, 2 * C, 1), nn.Conv2d(C, 2 * C, 1), nn.Conv2d(2 * C, C, 1)

    def forward(self, x):
        gate = torch.sigmoid(self.short(nn.functional.avg_pool2d(x, 2)))
        out = self.expand(x) * nn.functional.interpolate(gate, size=x.shape[-2:], mode="nearest")
        return x + self.project(out)


class KwargsBlock(nn.Module):
    """A forward fx cannot trace (``**kwargs`` and data-dependent control flow): found all the same."""

    def __init__(self):
        super().__init__()
        self.f = Branch()

    def forward(self, x, **kwargs):
        out = self.f(x)
        if out.abs().sum() > 0:
            out = out + x
        return out


class Net(nn.Module):
    """A stem, then the blocks under test, then a head."""

    def __init__(self, *blocks, width=C):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, C, 3, 1, 1, bias=False), nn.BatchNorm2d(C), nn.ReLU())
        self.blocks = nn.Sequential(*blocks)
        self.head = nn.Linear(width, 4)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


RESIDUAL_IDIOMS = {
    "plus": (lambda: Net(Plus(), Plus()), 2),
    "swapped": (lambda: Net(Swapped()), 1),
    "iadd": (lambda: Net(InPlaceOperator(), InPlaceOperator()), 2),
    "add_": (lambda: Net(AddUnderscore()), 1),
    "torch_add_alpha": (lambda: Net(TorchAddAlpha()), 1),
    "layer_scaled": (lambda: Net(LayerScaled()), 1),
    "one_layer": (lambda: Net(OneLayer(), OneLayer()), 2),
    "sibling_branch": (lambda: Net(SiblingBranch(), SiblingBranch()), 2),
    "strided_and_pooled": (lambda: Net(Plus(), Strided(), Pooled(), width=4 * C), 3),
    "nested": (lambda: Net(Nested()), 3),
    "flat_and_spanning": (lambda: Net(Flat()), 3),
    "rope_and_mask": (lambda: RopeNet(), 4),
    "resampling_inside_a_layer": (lambda: Net(DownUpBlock(), DownUpBlock()), 2),
    "upsampled_attention_gate": (lambda: Net(UpsampledGateBlock(), UpsampledGateBlock()), 2),
}


def _x(batch=2):
    return torch.randn(batch, 3, 16, 16, generator=torch.Generator().manual_seed(3))


@pytest.mark.parametrize("name", RESIDUAL_IDIOMS)
def test_residual_idiom_is_found(name):
    make, count = RESIDUAL_IDIOMS[name]
    analysis = se_retrofit.analyze(make())
    assert len(analysis.blocks) == count
    assert all(b.rewrite_error is None for b in analysis.blocks)


@pytest.mark.parametrize("name", RESIDUAL_IDIOMS)
@pytest.mark.parametrize("position", ["standard", "post", "identity"])
@pytest.mark.slow
def test_residual_idiom_retrofits_at_identity_and_live(name, position):
    make, count = RESIDUAL_IDIOMS[name]
    torch.manual_seed(0)
    base = as_if_pretrained(make())
    edited = se_retrofit.retrofit(base, position=position, example_input=_x(1))
    x = _x()
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(base, x, training)), training
    new = [n for n in edited.state_dict() if n not in base.state_dict()]
    assert len({n.rsplit(".", 2)[0] for n in new}) == count  # one attention module per block
    reference = run(edited, x, False)
    with torch.no_grad():
        for name_, param in edited.named_parameters():
            if name_ in new:
                param.add_(torch.randn(param.shape, generator=torch.Generator().manual_seed(5)))
    assert not torch.equal(run(edited, x, False), reference)


def test_block_paths_and_indices():
    flat = se_retrofit.analyze(Net(Flat())).blocks
    assert [b.name for b in flat] == ["blocks.0", "blocks.0@1", "blocks.0@2"]
    assert flat[2].in_channels == C and flat[2].shortcut == "identity"
    sibling = se_retrofit.analyze(Net(SiblingBranch())).blocks[0]
    assert (sibling.path, sibling.container, sibling.shortcut_arg) == ("blocks.0.projection", "blocks.0", 1)
    assert sibling.branch == "blocks.0.projection.bn"
    swapped = se_retrofit.analyze(Net(Swapped())).blocks[0]
    assert swapped.shortcut_arg == 1 and swapped.branch_module == "blocks.0.f"
    alpha = se_retrofit.analyze(Net(TorchAddAlpha())).blocks[0]
    assert alpha.shortcut_arg == 0
    strided = se_retrofit.analyze(Net(Plus(), Strided(), Pooled(), width=4 * C)).blocks
    assert [(b.in_channels, b.channels, b.stage) for b in strided] == [(C, C, 1), (C, 2 * C, 2), (2 * C, 4 * C, 3)]
    assert [b.shortcut for b in strided] == ["identity", "blocks.1.down.1", "blocks.2.down.2"]
    assert [b.post_activation for b in strided] == [None, "blocks.1:relu", None]
    rope = se_retrofit.analyze(RopeNet()).blocks
    assert {b.layout for b in rope} == {TOKENS} and [b.name for b in rope][:2] == ["blocks.0", "blocks.0@1"]



def test_pre_is_refused_where_the_branch_starts_outside_the_adding_module():
    # HF EfficientNet: the branch runs in the adding module's siblings; pre on `projection`'s input
    # would sit mid-branch, so that block is skipped for pre with the reason, and kept for the rest
    base = as_if_pretrained(Net(SiblingBranch(), Plus()))
    blocks = se_retrofit.analyze(base).blocks
    assert [b.branch_outside for b in blocks] == ["blocks.0.expand.0", None]
    _, plan = se_retrofit.plan(base, position="pre", example_input=_x(1))
    assert [s.block for s in plan.sites] == ["blocks.1"]
    assert plan.skipped == {"blocks.0.projection": "its branch starts in blocks.0.expand.0, outside "
                            "blocks.0.projection where the addition is: pre would sit mid-branch"}
    edited = se_retrofit.retrofit(base, position="pre", example_input=_x(1))
    x = _x()
    for training in (True, False):
        assert torch.equal(run(edited, x, training), run(base, x, training)), training
    assert not hasattr(edited.blocks[0].projection, "se") and hasattr(edited.blocks[1], "se")
    with pytest.raises(se_retrofit.RetrofitError, match="pre would sit mid-branch"):
        se_retrofit.retrofit(Net(SiblingBranch()), position="pre", example_input=_x(1))

def test_untraceable_block_is_reported_with_its_reason():
    analysis = se_retrofit.analyze(Net(KwargsBlock(), Plus()))
    assert [b.path for b in analysis.blocks] == ["blocks.0", "blocks.1"]
    assert analysis.blocks[0].rewrite_error and analysis.blocks[1].rewrite_error is None
    assert analysis.blocks[0].branch_module == "blocks.0.f"
    assert list(analysis.untraceable) == ["blocks.0"]
    assert "1 in forwards that cannot be rewritten: blocks.0: " in analysis.describe()


# --- additions that are not residual blocks ----------------------------------------------------

class FPN(nn.Module):
    """A two-stage backbone and an FPN: the top-down add is a fusion of scales."""

    def __init__(self):
        super().__init__()
        self.body = nn.ModuleDict({"c3": conv_bn(C, C, stride=2), "c4": conv_bn(C, 2 * C, stride=2)})
        self.lateral3, self.lateral4 = nn.Conv2d(C, C, 1), nn.Conv2d(2 * C, C, 1)
        self.smooth = nn.Conv2d(C, C, 3, 1, 1)

    def forward(self, x):
        c3 = self.body["c3"](x)
        c4 = self.body["c4"](c3)
        p4 = self.lateral4(c4)
        p3 = self.lateral3(c3) + nn.functional.interpolate(p4, scale_factor=2.0)
        return self.smooth(p3)


class EncoderDecoder(nn.Module):
    """A U-Net with an additive skip: ``up(x) + skip``."""

    def __init__(self):
        super().__init__()
        self.down = nn.Sequential(nn.MaxPool2d(2), conv_bn(C, C), nn.ReLU())
        self.up = nn.ConvTranspose2d(C, C, 2, 2)

    def forward(self, skip):
        return self.up(self.down(skip)) + skip


class HRFusion(nn.Module):
    """Two resolutions, each fused with the other."""

    def __init__(self):
        super().__init__()
        self.high, self.low = conv_bn(C, C), conv_bn(C, C, stride=2)
        self.high_b, self.low_b = conv_bn(C, C), conv_bn(C, C)
        self.low_to_high, self.high_to_low = conv_bn(C, C, k=1), conv_bn(C, C, stride=2)

    def forward(self, x):
        high, low = self.high_b(self.high(x)), self.low_b(self.low(x))
        high = high + nn.functional.interpolate(self.low_to_high(low), scale_factor=2.0)
        low = low + self.high_to_low(high)
        return high.mean((2, 3)) + low.mean((2, 3))


class PositionEmbedding(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed, self.pos = nn.Conv2d(C, C, 4, 4), nn.Parameter(torch.randn(1, C, 4, 4))

    def forward(self, x):
        return self.embed(x) + self.pos


class GRN(nn.Module):
    """ConvNeXt-V2's global response norm: its addition has no learned layer on the branch."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv2d(C, C, 1)
        self.gamma, self.beta = nn.Parameter(torch.ones(1, C, 1, 1)), nn.Parameter(torch.zeros(1, C, 1, 1))

    def forward(self, x):
        x = self.conv(x)
        gx = torch.linalg.vector_norm(x, ord=2, dim=(2, 3), keepdim=True)
        nx = gx / (gx.mean(dim=1, keepdim=True) + 1e-6)
        return self.gamma * (x * nx) + self.beta + x


class RepVggLike(nn.Module):
    """``bn(conv3x3(x)) + bn(conv1x1(x))``: parallel branches of one layer each, no shortcut."""

    def __init__(self):
        super().__init__()
        self.kxk, self.one = conv_bn(k=3), conv_bn(k=1)

    def forward(self, x):
        return self.kxk(x) + self.one(x)


NOT_RESIDUAL = {
    "fpn_top_down": (lambda: nn.Sequential(nn.Conv2d(3, C, 3, 1, 1), FPN()), 1),
    "encoder_decoder_skip": (lambda: nn.Sequential(nn.Conv2d(3, C, 3, 1, 1), EncoderDecoder()), 1),
    "hrnet_fusion": (lambda: nn.Sequential(nn.Conv2d(3, C, 3, 1, 1), HRFusion()), 3),
    "position_embedding": (lambda: nn.Sequential(nn.Conv2d(3, C, 3, 1, 1), PositionEmbedding()), 1),
    "grn": (lambda: nn.Sequential(nn.Conv2d(3, C, 3, 1, 1), GRN()), 3),
    "parallel_branches": (lambda: nn.Sequential(nn.Conv2d(3, C, 3, 1, 1), RepVggLike()), 1),
}


@pytest.mark.parametrize("name", NOT_RESIDUAL)
def test_addition_that_is_not_a_residual_block(name):
    make, additions = NOT_RESIDUAL[name]
    analysis = se_retrofit.analyze(make(), _x(1))
    assert (len(analysis.blocks), analysis.additions) == (0, additions)
    assert analysis.describe().startswith(f"0 of its {additions} additions are residual connections")


def test_no_additions_at_all_only_when_none_run():
    analysis = se_retrofit.analyze(nn.Sequential(nn.Conv2d(3, C, 3), nn.ReLU()), _x(1))
    assert analysis.describe().startswith("the model has no additions at all")
