"""Output comparison: every tensor of a nested output counts."""
import numpy as np
import pytest
import torch

from se_retrofit.outputs import OutputMismatchError, output_difference, output_tensors


def test_a_difference_in_a_later_output_is_seen():
    a = [{"boxes": torch.zeros(3, 4), "scores": torch.ones(3)}]
    b = [{"boxes": torch.zeros(3, 4), "scores": torch.tensor([1.0, 1.0, 0.5])}]
    assert output_difference(a, b) == (0.5, 0.5)
    assert output_difference(a, a) == (0.0, 0.0)


def test_array_outputs_compare_with_tensors():
    assert output_difference([torch.ones(2)], [np.ones(2, dtype=np.float32)]) == (0.0, 0.0)
    assert len(output_tensors((torch.ones(1), "label", np.zeros(2)))) == 2


@pytest.mark.parametrize("other", [[torch.zeros(3)], [torch.zeros(2), torch.zeros(2)]])
def test_structure_or_shape_mismatch_is_an_error(other):
    with pytest.raises(OutputMismatchError, match="outputs of shapes"):
        output_difference([torch.zeros(2)], other)
