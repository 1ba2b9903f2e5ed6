"""Padded sequences: a block whose forward receives the padding mask squeezes over the real positions
only (se_retrofit.masking), so once the gates move a real token's output does not depend on how much
padding its batch had; the edit stays exact at identity, padded or not."""
from __future__ import annotations

import pickle

import pytest
import torch
from torch import nn

import se_retrofit
from se_retrofit.masking import PADDING_ARGUMENTS, padding_filled, real_positions
from se_retrofit.site import Site

from helpers import as_if_pretrained


class _PreNormLayer(nn.Module):
    """A transformer encoder layer as transformers writes them: tokens ``(N, L, C)`` and the padding
    mask of the batch, 1 where a token is real."""

    def __init__(self, width: int = 16):
        super().__init__()
        self.norm1, self.norm2 = nn.LayerNorm(width), nn.LayerNorm(width)
        self.attn = nn.MultiheadAttention(width, 2, batch_first=True)
        self.fc1, self.fc2 = nn.Linear(width, 2 * width), nn.Linear(2 * width, width)

    def forward(self, hidden_states, attention_mask=None):
        padding = None if attention_mask is None else attention_mask == 0
        h = self.norm1(hidden_states)
        hidden_states = hidden_states + self.attn(h, h, h, key_padding_mask=padding, need_weights=False)[0]
        return hidden_states + self.fc2(nn.functional.gelu(self.fc1(self.norm2(hidden_states))))


class _Encoder(nn.Module):
    def __init__(self, width: int = 16):
        super().__init__()
        self.embed = nn.Linear(8, width)
        self.layers = nn.ModuleList(_PreNormLayer(width) for _ in range(2))

    def forward(self, x, attention_mask=None):
        x = self.embed(x)
        for layer in self.layers:
            x = layer(x, attention_mask)
        return x


def _gates_moved(edited: nn.Module, base: nn.Module) -> nn.Module:
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in edited.named_parameters():
            if name not in base.state_dict():
                param.add_(torch.randn(param.shape, generator=generator))
    return edited


def _padded(x: torch.Tensor, extra: int) -> tuple[torch.Tensor, torch.Tensor]:
    junk = torch.randn(x.shape[0], extra, x.shape[2], generator=torch.Generator().manual_seed(9)) * 5
    mask = torch.cat([torch.ones(x.shape[:2], dtype=torch.long), torch.zeros(x.shape[0], extra, dtype=torch.long)], 1)
    return torch.cat([x, junk], 1), mask


@pytest.mark.parametrize("position", ["standard", "post"])
def test_padding_does_not_reach_the_real_tokens_once_the_gates_move(position):
    torch.manual_seed(0)
    base = as_if_pretrained(_Encoder()).eval()
    x = torch.randn(2, 6, 8)
    padded, mask = _padded(x, 4)
    edited = se_retrofit.retrofit(base, position=position, example_input=x)
    sites = edited.se_retrofit.edits[-1][1]
    assert len(sites) == 4 and {s.padding_mask for s in sites} == {"attention_mask"}
    for training in (True, False):  # exact at identity, padded or not
        torch.manual_seed(1)
        expected = base.train(training)(padded, mask)
        torch.manual_seed(1)
        assert torch.equal(edited.train(training)(padded, mask), expected), training
    edited = _gates_moved(edited.eval(), base.eval())
    with torch.no_grad():
        alone, with_padding = edited(x, torch.ones(2, 6, dtype=torch.long)), edited(padded, mask)[:, :6]
        assert not torch.allclose(edited(x), base(x), atol=1e-3)  # the gates do move the output
    assert torch.allclose(with_padding, alone, atol=1e-5), (with_padding - alone).abs().max()


def _encoder_of(layer: type) -> tuple[nn.Module, torch.Tensor, torch.Tensor, torch.Tensor]:
    """An encoder of two ``layer`` s with trained-looking norms, tokens, and those tokens padded."""
    torch.manual_seed(0)
    base = _Encoder()
    base.layers = nn.ModuleList(layer(16) for _ in range(2))
    x = torch.randn(2, 6, 8)
    return (as_if_pretrained(base).eval(), x, *_padded(x, 4))


class _UnnamedMaskLayer(_PreNormLayer):
    def forward(self, hidden_states, batch_mask=None):  # a name se_retrofit does not know for a padding mask
        return super().forward(hidden_states, batch_mask)


def test_without_the_mask_the_squeeze_sees_the_padding():
    """What the mask-aware squeeze prevents: where the tool cannot tell the argument is the padding
    mask, the squeeze averages over the padding, and padding moves the real tokens."""
    base, x, padded, mask = _encoder_of(_UnnamedMaskLayer)
    edited = se_retrofit.retrofit(base, example_input=x)
    assert {s.padding_mask for s in edited.se_retrofit.edits[-1][1]} == {None}
    edited = _gates_moved(edited.eval(), base)
    with torch.no_grad():
        gap = (edited(padded, mask)[:, :6] - edited(x, torch.ones(2, 6, dtype=torch.long))).abs().max()
    assert gap > 1e-2


@pytest.mark.parametrize("argument, mask, real", [
    ("attention_mask", torch.tensor([[1, 1, 0]]), [[True, True, False]]),
    ("attention_mask", torch.tensor([[[[0.0, 0.0, -3.4e38]] * 3]]), [[True, True, False]]),  # additive (N, 1, L, L)
    ("attention_mask", torch.tensor([[[[True, True, False]] * 3] * 2]), [[True, True, False]]),  # bool, 2 heads
    ("key_padding_mask", torch.tensor([[False, False, True]]), [[True, True, False]]),
    ("src_key_padding_mask", torch.tensor([[0.0, 0.0, float("-inf")]]), [[True, True, False]]),
])
def test_real_positions_from_every_mask_form(argument, mask, real):
    assert real_positions(mask, PADDING_ARGUMENTS[argument], 1, 3).tolist() == real


def test_a_mask_over_other_positions_is_not_used():
    # a cross-attention's mask covers the memory, not this sequence
    assert real_positions(torch.ones(1, 5), "allowed", 1, 3) is None
    x = torch.randn(1, 4, 3)
    assert padding_filled(x, torch.ones(1, 5), "allowed")[0] is x


def test_the_site_records_the_mask_argument_and_reads_back():
    site = Site("layers.0", 0, 1, "standard", 16, 1, 0, "se", channel_dim=-1, padding_mask="attention_mask")
    assert Site.from_dict(site.to_dict()) == site
    with pytest.raises(se_retrofit.RetrofitError, match="padding mask argument"):
        Site.from_dict({**site.to_dict(), "padding_mask": "os.system"})


class _UntraceableLayer(_PreNormLayer):
    """The same layer with a forward torch.fx cannot rewrite (Whisper's ``if dtype == float16``): its
    sites are edited from outside, on the output of the branch's last module (``standard``), and the
    layer's call hands its mask to those gates."""

    def forward(self, hidden_states, attention_mask=None):
        if hidden_states.dtype == torch.float16:
            hidden_states = hidden_states.clamp(-6.0e4, 6.0e4)
        return super().forward(hidden_states, attention_mask)


def _padding_gap(model: nn.Module, x: torch.Tensor) -> float:
    padded, mask = _padded(x, 4)
    with torch.no_grad():
        alone = model(x, torch.ones(x.shape[:2], dtype=torch.long))
        return (model(padded, mask)[:, :x.shape[1]] - alone).abs().max().item()


def test_an_edit_from_outside_the_forward_squeezes_over_the_real_positions(tmp_path):
    base, x, padded, mask = _encoder_of(_UntraceableLayer)
    edited = se_retrofit.retrofit(base, example_input=x)
    sites = edited.se_retrofit.edits[-1][1]
    assert [(s.edit, s.block, s.padding_mask, s.mask_from) for s in sites[:2]] == [
        ("wrap", "layers.0.attn", "attention_mask", "layers.0"), ("wrap", "layers.0.fc2", "attention_mask", "layers.0")]
    assert len(sites) == 4
    for training in (True, False):
        torch.manual_seed(1)
        expected = base.train(training)(padded, mask)
        torch.manual_seed(1)
        assert torch.equal(edited.train(training)(padded, mask), expected), training
    edited = _gates_moved(edited.eval(), base)
    with torch.no_grad():
        assert not torch.allclose(edited(x), base(x), atol=1e-3)
    assert _padding_gap(edited, x) < 1e-5
    se_retrofit.save(edited, tmp_path / "m")
    for copy in (se_retrofit.load(tmp_path / "m", base), pickle.loads(pickle.dumps(edited))):
        assert _padding_gap(copy, x) < 1e-5
        with torch.no_grad():
            assert torch.equal(copy(padded, mask), edited(padded, mask))


def test_wav2vec2_given_its_padding_mask_keeps_every_block_and_its_real_frames():
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Wav2Vec2Config(
        hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, conv_dim=(16, 16),
        conv_stride=(5, 2), conv_kernel=(10, 3), num_conv_pos_embeddings=16, num_conv_pos_embedding_groups=2,
        feat_extract_norm="layer", do_stable_layer_norm=True, mask_time_prob=0.0, layerdrop=0.0)
    base = as_if_pretrained(transformers.Wav2Vec2Model(config)).eval()
    audio = torch.randn(2, 800)
    mask = torch.ones(2, 800, dtype=torch.long)
    mask[1, 600:] = 0
    given = {"input_values": audio, "attention_mask": mask}
    assert len(se_retrofit.find_blocks(base, given)) == len(se_retrofit.find_blocks(base, audio)) == 5
    edited = se_retrofit.retrofit(base, example_input=given)  # not refused as token ids
    sites = edited.se_retrofit.edits[-1][1]
    assert len(sites) == 5 and {s.padding_mask for s in sites} == {"attention_mask"}
    assert [(s.block, s.edit, s.mask_from) for s in sites if s.edit == "wrap"] == [
        ("encoder.pos_conv_embed", "wrap", "encoder")]  # x + pos_conv(x), after x[~mask] = 0 in place
    for training in (True, False):
        torch.manual_seed(1)
        expected = base.train(training)(**given).last_hidden_state
        torch.manual_seed(1)
        assert torch.equal(edited.train(training)(**given).last_hidden_state, expected), training
    edited = _gates_moved(edited.eval(), base)
    longer = {"input_values": torch.cat([audio, torch.randn(2, 200) * 5], 1),
              "attention_mask": torch.cat([mask, torch.zeros(2, 200, dtype=torch.long)], 1)}
    with torch.no_grad():
        short, long = edited(**given).last_hidden_state, edited(**longer).last_hidden_state
        assert not torch.allclose(short, base(**given).last_hidden_state, atol=1e-3)
    assert (short[:, :40] - long[:, :40]).abs().max() < 1e-5  # the real frames of both samples
