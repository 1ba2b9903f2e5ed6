"""Shape-only forwards: a conv on the meta copy gives the shape torch gives, and refuses what torch refuses."""
import pytest
import torch
from torch import nn

import se_retrofit


CONVS = [nn.Conv2d(3, 8, 3), nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.Conv2d(3, 8, (3, 5), stride=(2, 3), dilation=(2, 1)),
         nn.Conv2d(3, 8, 5, padding="same", dilation=2), nn.Conv2d(3, 6, 4, padding="valid", groups=3),
         nn.Conv2d(3, 8, 3, padding=2, padding_mode="reflect"), nn.Conv1d(3, 8, 7, stride=3, padding=2),
         nn.Conv3d(3, 8, (1, 3, 3), stride=(1, 2, 2), padding=(0, 1, 1))]


@pytest.mark.parametrize("conv", CONVS, ids=[repr(c) for c in CONVS])
@pytest.mark.parametrize("batched", [True, False])
def test_a_conv_recorded_on_meta_tensors_has_the_shape_torch_gives(conv, batched):
    from se_retrofit.probing import _record_on_meta_tensors

    size = {nn.Conv1d: (3, 37), nn.Conv2d: (3, 29, 31), nn.Conv3d: (3, 5, 17, 19)}[type(conv)]
    x = torch.randn(size if not batched else (2, *size))
    recording = _record_on_meta_tensors(nn.Sequential(conv), x)
    assert [op.shape for op in recording.ops if op.kind == "conv"] == [tuple(conv(x).shape)]


@pytest.mark.parametrize("shape", [(1, 5, 32, 32), (1, 3, 2, 2), (3, 32)])
def test_an_input_a_conv_refuses_is_refused_on_meta_tensors_too(shape):
    with pytest.raises(ValueError, match="example_input"):
        se_retrofit.find_blocks(nn.Sequential(nn.Conv2d(3, 8, 3), nn.Conv2d(8, 8, 1)), torch.randn(shape))
