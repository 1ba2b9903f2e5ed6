"""Probing: a model that cannot run on the example input is told so, with what to pass."""
import pytest
import timm
import torch

import se_retrofit


def test_bad_example_input_is_a_clear_error():
    with pytest.raises(ValueError, match="example_input"):
        se_retrofit.find_blocks(timm.create_model("resnet18"), torch.randn(1, 5, 32, 32))
