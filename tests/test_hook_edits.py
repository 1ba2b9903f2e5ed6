"""Blocks whose forward torch.fx cannot rewrite are edited from outside (se_retrofit.outside_edit): post on
the output of the module returning the sum, standard on the output of the branch's last module; every
guarantee of a rewrite holds (identity in train and eval, liveness, keys, pickling, deepcopy, save/load,
torch.jit.trace); a block that cannot be edited either way is skipped with its reason, never an error."""
from __future__ import annotations

import copy
import io
import pickle

import warnings

import pytest
import torch
from torch import nn

import se_retrofit
from se_retrofit.config import RetrofitConfig
from se_retrofit.outputs import output_tensors
from se_retrofit.outside_edit import is_wrapped
from se_retrofit.placement import SurgeryError
from se_retrofit.surgery import apply_sites

from helpers import as_if_pretrained

from dataclasses import replace


class Mlp(nn.Module):
    def __init__(self, c: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(c, 2 * c), nn.GELU(), nn.Linear(2 * c, c)

    def forward(self, x):
        return self.fc2(self.act(self.fc1(x)))


class LenConv(nn.Module):
    """``len(x.shape)`` in forward (MONAI's SwinUNETR)."""

    def __init__(self, c: int):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.conv2, self.bn2 = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.relu = nn.ReLU()

    def forward(self, x):
        if len(x.shape) != 4:
            raise ValueError("expects NCHW")
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


class DtypeTokens(nn.Module):
    """A branch on the input's dtype (Whisper's encoder layer), pre-norm tokens."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.mlp, self.drop = nn.LayerNorm(c), Mlp(c), nn.Dropout(0.1)

    def forward(self, x):
        x = x + self.drop(self.mlp(self.norm(x)))
        if x.dtype == torch.float16:
            x = x.clamp(-1e4, 1e4)
        return x


class PlainTokens(DtypeTokens):
    """The same block, traceable."""

    def forward(self, x):
        return x + self.drop(self.mlp(self.norm(x)))


class FiniteInTraining(nn.Module):
    """``if not torch.isfinite(x).all()`` under ``self.training`` (DETR's encoder layer): it traces in eval
    mode only, so analysis (eval) passes it and surgery's train-mode trace fails."""

    def __init__(self, c: int):
        super().__init__()
        self.norm, self.mlp = nn.LayerNorm(c), Mlp(c)

    def forward(self, x):
        x = x + self.mlp(self.norm(x))
        if self.training and not torch.isfinite(x).all():
            x = x.clamp(-1e4, 1e4)
        return x, None  # a tuple, as Hugging Face layers return


class ShapeBranch(nn.Module):
    """A branch on a size (``if x.shape[-1] > 4``): data-dependent for fx, and a sum used further."""

    def __init__(self, c: int):
        super().__init__()
        self.conv, self.bn = nn.Conv2d(c, c, 3, padding=1, bias=False), nn.BatchNorm2d(c)
        self.out = nn.BatchNorm2d(c)

    def forward(self, x):
        y = x + self.bn(self.conv(x))
        if y.shape[-1] > 4:
            y = y * 1.0
        return self.out(y)  # post-norm: no module returns the sum itself


class Net(nn.Module):
    def __init__(self, block: type, c: int = 16, tokens: bool = False):
        super().__init__()
        self.tokens = tokens
        self.stem = nn.Conv2d(3, c, 3, stride=2, padding=1)
        self.blocks = nn.ModuleList([block(c), block(c)])
        self.head = nn.Linear(c, 5)

    def forward(self, x):
        x = self.stem(x)
        if self.tokens:
            x = x.flatten(2).transpose(1, 2)
        for block in self.blocks:
            x = block(x)
            x = x[0] if isinstance(x, tuple) else x
        return self.head(x.mean(1) if self.tokens else x.mean((2, 3)))


X = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(0))

# (block, tokens, position) -> units edited from outside (of 2 found); None: all skipped, with this reason
CASES = [
    (LenConv, False, "standard", 2), (LenConv, False, "post", 2),
    (DtypeTokens, True, "standard", 2), (DtypeTokens, True, "post", 2),
    (FiniteInTraining, True, "standard", 2), (FiniteInTraining, True, "post", 2),
    (ShapeBranch, False, "standard", 2), (ShapeBranch, False, "post", "no module returns its sum"),
]


def build(block: type, tokens: bool) -> nn.Module:
    torch.manual_seed(0)
    return as_if_pretrained(Net(block, tokens=tokens)).eval()


def run(model: nn.Module, training: bool) -> torch.Tensor:
    model.train(training)
    torch.manual_seed(1)
    with torch.no_grad():
        return model(X)


@pytest.mark.parametrize("block,tokens,position,expected", CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.slow
def test_untraceable_blocks_are_edited_from_outside_at_identity_and_live(block, tokens, position, expected):
    base = build(block, tokens)
    assert len(se_retrofit.find_blocks(base, X)) == 2
    if isinstance(expected, str):
        with pytest.raises(se_retrofit.RetrofitError, match=expected):
            se_retrofit.retrofit(base, position=position, example_input=X)
        return
    model = se_retrofit.retrofit(base, position=position, example_input=X)
    sites = se_retrofit.record_of(model).sites
    assert len(sites) == expected and all(s.edit == "wrap" for s in sites)
    for training in (False, True):
        assert torch.equal(run(model, training), run(base, training))
    assert sum(is_wrapped(m) for m in model.modules()) == expected
    assert all(f"{s.block}.{s.module_name}.fc1.weight" in model.state_dict() for s in sites)
    assert set(base.state_dict()) < set(model.state_dict())
    # live: the new modules get gradient, and one step changes the output
    model.train()
    new = [p for n, p in model.named_parameters() if n not in dict(base.named_parameters())]
    optimizer = torch.optim.SGD(new, lr=0.5)
    for _ in range(2):
        optimizer.zero_grad()
        model(X).square().mean().backward()
        optimizer.step()
    assert all(p.grad is not None for p in new) and any(p.grad.abs().sum() > 0 for p in new)
    assert not torch.equal(run(model, False), run(base, False))


@pytest.mark.parametrize("position", ["standard", "post"])
def test_an_outside_edit_survives_pickle_deepcopy_save_and_load_and_jit_trace(tmp_path, position):
    base = build(LenConv, False)
    model = se_retrofit.retrofit(base, position=position, example_input=X)
    with torch.no_grad():
        for p in se_retrofit.attention_parameters(model):
            p.add_(torch.randn(p.shape) * 0.1)
    expected = run(model, False)
    buffer = io.BytesIO()
    torch.save(model, buffer)
    for again in (pickle.loads(pickle.dumps(model)), copy.deepcopy(model),
                  torch.load(io.BytesIO(buffer.getvalue()), weights_only=False)):
        assert torch.equal(run(again, False), expected)
        assert sum(is_wrapped(m) for m in again.modules()) == 2  # not lost, not doubled
    deep = copy.deepcopy(copy.deepcopy(model))
    assert torch.equal(run(deep, False), expected)
    se_retrofit.save(model, tmp_path / "saved")
    loaded = se_retrofit.load(tmp_path / "saved", base_model=build(LenConv, False))
    assert torch.equal(run(loaded, False), expected)
    assert [s.edit for s in se_retrofit.record_of(loaded).sites] == ["wrap", "wrap"]
    traced = torch.jit.trace(model.eval(), X, check_trace=False)
    assert torch.equal(traced(X), expected)
    with pytest.raises(se_retrofit.RetrofitError, match="from outside its forward.*torch.jit.trace"):
        torch.jit.script(model)
    moved = copy.deepcopy(model).to(torch.float64)
    assert moved.blocks[0].se.fc1.weight.dtype == torch.float64 if position == "post" else \
        moved.blocks[0].bn2.se.fc1.weight.dtype == torch.float64


def test_a_site_whose_additions_do_not_match_falls_back_to_the_outside_edit_or_is_skipped():
    """Analysis and surgery disagree (RT-DETR: 'its forward has 3 additions, the plan expects addition
    #4'): the site is edited from outside where it can be, else skipped with the reason; replaying a
    record (skipped=None) still raises."""
    base = build(PlainTokens, True)
    config = RetrofitConfig(position="standard")
    _, plan = se_retrofit.plan(base, config, example_input=X)
    wrong = [replace(s, edit="rewrite", block="blocks.0", add_index=4, wrap_module="blocks.0.mlp")
             for s in plan.sites[:1]]
    model, skipped = copy.deepcopy(base), {}
    edited = apply_sites(model, wrong, config, skipped=skipped)
    assert [(s.edit, s.block) for s in edited] == [("wrap", "blocks.0.mlp")] and not skipped
    assert torch.equal(run(model, True), run(base, True))
    no_way = [replace(s, wrap_module=None) for s in wrong]
    model, skipped = copy.deepcopy(base), {}
    assert apply_sites(model, no_way, config, skipped=skipped) == []
    assert "the plan expects addition #4" in skipped["blocks.0"]
    assert not any(is_wrapped(m) or "se" in dict(m.named_children()) for m in model.modules())
    with pytest.raises(SurgeryError, match="addition #4"):
        apply_sites(copy.deepcopy(base), no_way, config)


def test_positions_that_cannot_be_placed_from_outside_are_skipped_with_the_reason():
    base = build(LenConv, False)
    analysis, plan = se_retrofit.plan(base, example_input=X, position="pre")
    assert not plan.sites and len(plan.skipped) == 2
    assert all("pre cannot be placed from outside a forward (standard and post can" in r for r in plan.skipped.values())
    with pytest.raises(se_retrofit.RetrofitError, match="'len' is not supported"):
        se_retrofit.retrofit(base, position="pre", example_input=X)


transformers = pytest.importorskip("transformers")


def _swin():
    from transformers import SwinConfig, SwinModel
    config = SwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)
    return SwinModel(config), torch.randn(1, 3, 32, 32)


def _swinv2():
    from transformers import Swinv2Config, Swinv2Model
    config = Swinv2Config(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)
    return Swinv2Model(config), torch.randn(1, 3, 32, 32)


def _donut_swin():
    from transformers import DonutSwinConfig, DonutSwinModel
    config = DonutSwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2], window_size=4)
    return DonutSwinModel(config), torch.randn(1, 3, 32, 32)


def _maskformer_swin():
    from transformers import MaskFormerSwinConfig, MaskFormerSwinModel
    config = MaskFormerSwinConfig(image_size=32, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 2],
                                  window_size=4)
    return MaskFormerSwinModel(config), torch.randn(1, 3, 32, 32)


def _whisper():
    from transformers import WhisperConfig
    from transformers.models.whisper.modeling_whisper import WhisperEncoder
    config = WhisperConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                           num_mel_bins=8, max_source_positions=8)
    return WhisperEncoder(config), torch.randn(1, 8, 16)


def _detr_encoder():
    from transformers import DetrConfig
    from transformers.models.detr.modeling_detr import DetrEncoder
    config = DetrConfig(d_model=16, encoder_layers=2, encoder_attention_heads=2, encoder_ffn_dim=32,
                        use_timm_backbone=False, use_pretrained_backbone=False)
    return DetrEncoder(config), torch.randn(1, 10, 16)


# expected residual adds from the sources: Swin/Swinv2/DonutSwin/MaskFormerSwin two per layer (attention, MLP)
# x 4 layers; Whisper's
# and DETR's encoder layers two each x 2. post gates only the sums a layer returns (Swin's MLP add, Whisper's
# MLP add); DETR's layers are post-norm, so no module returns a sum: post is refused with the reason.
HF_CASES = [(_swin, 8, 8, 4), (_swinv2, 8, 8, 4), (_donut_swin, 8, 8, 4), (_maskformer_swin, 8, 8, 4),
            (_whisper, 4, 4, 2), (_detr_encoder, 4, 4, 0)]


@pytest.mark.parametrize("make,found,standard,post", HF_CASES, ids=lambda v: getattr(v, "__name__", str(v)))
@pytest.mark.slow
def test_transformers_blocks_fx_cannot_trace(make, found, standard, post):
    torch.manual_seed(0)
    base, x = make()
    base = as_if_pretrained(base).eval()
    assert len(se_retrofit.find_blocks(base, x)) == found
    for position, count in (("standard", standard), ("post", post)):
        if not count:
            with pytest.raises(se_retrofit.RetrofitError, match=r"cannot be rewritten \(torch.fx: .*\), and no module "
                                                                r"returns its sum for post to gate from outside"):
                se_retrofit.retrofit(base, position=position, example_input=x)
            continue
        _, plan = se_retrofit.plan(base, example_input=x, position=position)
        model = se_retrofit.retrofit(base, position=position, example_input=x)
        assert len(se_retrofit.record_of(model).sites) == count
        for training in (False, True):
            base.train(training), model.train(training)
            torch.manual_seed(0)
            expected = output_tensors(base(x))
            torch.manual_seed(0)
            assert all(torch.equal(a, b) for a, b in zip(output_tensors(model(x)), expected))
        model.eval()
        with torch.no_grad():
            for p in se_retrofit.attention_parameters(model):
                p.add_(0.1)
        changed = output_tensors(model(x))[0]
        again = pickle.loads(pickle.dumps(model))
        assert torch.equal(output_tensors(again(x))[0], changed)
        assert not torch.equal(changed, output_tensors(base.eval()(x))[0])


class _FirstLayerFlag(nn.Module):
    """A layer whose forward branches on a flag with a constant default (fx traces it only with the
    flag fixed at its default); the model calls its first layer with the other value
    (ConditionalDetr's ``is_first=True``)."""

    def __init__(self, channels: int = 8):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)
        self.norm = nn.BatchNorm2d(channels)

    def forward(self, x, is_first: bool = False):
        y = self.norm(self.conv(x))
        if is_first:
            y = y * 0.5
        return x + y


class _FlagNet(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 8, 3, padding=1)
        self.layers = nn.ModuleList([_FirstLayerFlag(), _FirstLayerFlag()])

    def forward(self, x):
        x = self.stem(x)
        for i, layer in enumerate(self.layers):
            x = layer(x, is_first=i == 0)
        return x.mean((2, 3))


@pytest.mark.parametrize("position", ["standard", "post"])
def test_a_block_called_with_another_value_than_its_trace_fixed_is_not_rewritten_for_the_default(position):
    """The rewrite of a forward traced with ``is_first=False`` is not the forward a call with
    ``is_first=True`` runs: that block is edited from outside or skipped with the reason, and the
    edited model runs (it raised 'cannot be called with is_first=True' before)."""
    base = as_if_pretrained(_FlagNet()).eval()
    x = torch.randn(2, 3, 16, 16)
    analysis, plan = se_retrofit.plan(base, RetrofitConfig(position=position), x)
    assert sorted(b.path for b in analysis.blocks) == ["layers.0", "layers.1"]
    model = se_retrofit.retrofit(base, position=position, example_input=x)
    for training in (False, True):
        torch.manual_seed(0)
        expected = base.train(training)(x)
        torch.manual_seed(0)
        assert torch.equal(model.train(training)(x), expected)
    first = [s for s in plan.sites if s.block == "layers.0"]
    reasons = {k: v for k, v in plan.skipped.items() if k.startswith("layers.0")}
    assert first or "is_first=True" in " ".join(reasons.values())
    assert "forward" not in vars(model.layers[0]) or is_wrapped(model.layers[0])


class _MixedNet(Net):
    """A block pre can go into (its forward traces) and one it cannot (``len`` in its forward)."""

    def __init__(self, c: int = 16):
        super().__init__(LenConv, c)
        self.blocks[0] = _Traceable(c)


class _Traceable(LenConv):
    def forward(self, x):
        return self.relu(self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x))))) + x)


def test_retrofit_warns_when_a_selected_unit_is_left_unedited():
    """pre goes into the traceable block and cannot go into the other: retrofit edits one, says so
    with the reason (before: silently one of two), and stays exact; all edited: no warning."""
    torch.manual_seed(0)
    base = as_if_pretrained(_MixedNet()).eval()
    with pytest.warns(se_retrofit.LeftOutWarning, match=r"1 of the 2 units selected were left unedited; "
                                                             r"blocks\.1: its forward cannot be rewritten .* and pre cannot be placed from outside"):
        model = se_retrofit.retrofit(base, position="pre", example_input=X)
    assert [s.block for s in model.se_retrofit.edits[-1][1]] == ["blocks.0"]
    assert torch.equal(model(X), base(X))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        se_retrofit.retrofit(base, position="pre", example_input=X, exclude="blocks.1")
