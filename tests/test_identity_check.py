"""The identity check is not vacuous: on a fresh model whose branches output ~0 it still sees a
module that is not an identity, and it leaves the models it checks untouched."""
import pytest
import timm
import torch
from torch import nn

import se_retrofit
from se_retrofit.attention import register_attention, unregister_attention
from se_retrofit.identity_check import OWN_WEIGHTS, TRAINED_LIKE, check_identity, trained_like


class Double(nn.Module):
    def __init__(self, channels, **_):
        super().__init__()
        self.weight = nn.Parameter(torch.full((1,), 2.0))

    def init_identity(self):
        nn.init.constant_(self.weight, 2.0)

    def forward(self, x):
        return x * self.weight


def _edited_with_double():
    register_attention("double_check_test")(Double)
    try:
        base = timm.create_model("resnet18").eval()
        return base, se_retrofit.retrofit(base, attention="double_check_test")
    finally:
        unregister_attention("double_check_test")


def test_fresh_branches_hide_a_non_identity_module_from_a_naive_check():
    base, edited = _edited_with_double()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    naive = check_identity(base, edited, x, random_weights=False)
    print("own weights:", naive)
    assert naive.statistics == OWN_WEIGHTS and naive.passed  # x2 on a branch that outputs 0: no change


def test_trained_like_statistics_detect_the_non_identity_module():
    base, edited = _edited_with_double()
    before = {k: v.clone() for k, v in edited.state_dict().items()}
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    check = check_identity(base, edited, x, random_weights=True)
    print("trained-like:", check)
    assert check.statistics == TRAINED_LIKE and not check.passed and check.max_rel_diff > 0.1
    assert all(torch.equal(before[k], v) for k, v in edited.state_dict().items())  # the user's model untouched
    assert float(edited.layer1[0].bn2.weight.detach().abs().max()) == 0.0


@pytest.mark.slow
def test_trained_like_check_passes_for_every_built_in_type():
    x = torch.randn(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    for attention in ("se", "cbam", "bam", "eca"):
        base = timm.create_model("resnet18").eval()
        check = check_identity(base, se_retrofit.retrofit(base, attention=attention), x, random_weights=True)
        assert check.passed and check.max_abs_diff == 0.0, (attention, check)


def test_trained_like_gives_shared_names_the_same_values_and_skips_the_attention():
    base = timm.create_model("resnet18")
    edited = se_retrofit.retrofit(base, attention="bam")
    paths = tuple(site.module_path for site in se_retrofit.record_of(edited).sites)
    attention_before = {k: v.clone() for k, v in se_retrofit.attention_state_dict(edited).items()}
    a, b = trained_like(base), trained_like(edited, skip=paths)
    shared = a.state_dict().keys() & b.state_dict().keys()
    assert shared and all(torch.equal(a.state_dict()[k], b.state_dict()[k]) for k in shared)
    assert all(torch.equal(attention_before[k], v) for k, v in se_retrofit.attention_state_dict(b).items())
    assert float(a.layer1[0].bn2.weight.detach().min()) >= 0.5
