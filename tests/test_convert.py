"""Folding the identity gate and exporting to timm's native SE networks."""
import pytest
import timm
import torch

import se_retrofit
from se_retrofit.convert import ConversionError, fold_gate_scale, timm_create_kwargs, to_timm_native

from helpers import make_model, small_input

PROBE = small_input(1, 32)  # probe input for retrofit(): the models' own 224 px is slow on 2 CPU cores


def trained_se(model):
    """Move the attention weights off their identity start, as fine-tuning would (test_export uses it too)."""
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if ".se." in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.mark.parametrize("name,native", [("resnet50", "seresnet50"), ("resnet18", "seresnet18"),
                                         ("resnext50_32x4d", "seresnext50_32x4d")])
@pytest.mark.slow
def test_native_checkpoint_loads_strictly_and_matches(name, native):
    edited = trained_se(se_retrofit.retrofit(make_model("timm", name), example_input=PROBE)).eval()
    native_name, state = to_timm_native(edited)
    assert native_name == native
    model = timm.create_model(native_name).eval()
    assert str(model.load_state_dict(state, strict=True)) == "<All keys matched successfully>"
    x = small_input(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), edited(x))


def test_native_checkpoint_keeps_a_non_default_head():
    edited = trained_se(se_retrofit.retrofit(make_model("timm", "resnet18", num_classes=10),
                                              example_input=PROBE)).eval()
    before = {k: v.clone() for k, v in edited.state_dict().items()}
    name, state = to_timm_native(edited)
    assert timm_create_kwargs(edited) == {"num_classes": 10} and state["fc.weight"].shape == (10, 512)
    model = timm.create_model(name, **timm_create_kwargs(edited)).eval()
    assert str(model.load_state_dict(state, strict=True)) == "<All keys matched successfully>"
    x = small_input(2, 32)
    with torch.no_grad():
        assert torch.equal(model(x), edited(x))
    assert all(torch.equal(edited.state_dict()[k], v) for k, v in before.items())  # folded in a copy


def test_fold_is_exact_and_leaves_the_original_alone():
    edited = trained_se(se_retrofit.retrofit(make_model("timm", "resnet18"), example_input=PROBE)).eval()
    folded = fold_gate_scale(edited)
    assert edited.layer1[0].se.gate.scale == 2.0 and folded.layer1[0].se.gate.scale == 1.0
    x = small_input(1)
    with torch.no_grad():
        assert torch.equal(folded(x), edited(x))


@pytest.mark.parametrize("kwargs,message", [
    ({"position": "post"}, "only SE or ECA at the standard position in every block"),
    ({"stages": [4]}, "a subset of blocks"),
    ({"attention": "cbam"}, "only SE or ECA"),
    ({"gate": "hard_sigmoid"}, "native se models use the default options"),
])
def test_no_native_equivalent_is_refused(kwargs, message):
    edited = se_retrofit.retrofit(timm.create_model("resnet18"), example_input=PROBE, **kwargs)
    with pytest.raises(ConversionError, match=message):
        to_timm_native(edited)


def test_model_without_native_se_twin_is_refused():
    edited = se_retrofit.retrofit(timm.create_model("convnext_tiny"), example_input=PROBE)
    with pytest.raises(ConversionError, match="no native se model for 'convnext_tiny'"):
        to_timm_native(edited)


def test_unedited_model_is_refused():
    with pytest.raises(ValueError, match="not edited by se_retrofit"):
        to_timm_native(timm.create_model("resnet18"))


def test_eca_on_resnet50d_exports_to_ecaresnet50d():
    edited = trained_se(se_retrofit.retrofit(make_model("timm", "resnet50d"), attention="eca", example_input=PROBE)).eval()
    name, state = to_timm_native(edited)
    model = timm.create_model(name).eval()
    assert name == "ecaresnet50d" and str(model.load_state_dict(state, strict=True)) == \
        "<All keys matched successfully>"
    x = small_input(2, 64)
    with torch.no_grad():
        assert torch.equal(model(x), edited(x))


def test_eca_on_plain_resnet50_names_the_closest_native_model():
    edited = se_retrofit.retrofit(timm.create_model("resnet50"), attention="eca", example_input=PROBE)
    with pytest.raises(ConversionError, match=r"no native eca model for 'resnet50'; closest: ecaresnet50d.*"
                                              r"retrofit its base, e\.g\. resnet50d"):
        to_timm_native(edited)


def test_folded_gates_survive_save_and_load(tmp_path):
    edited = trained_se(se_retrofit.retrofit(make_model("timm", "resnet18"), example_input=PROBE)).eval()
    folded = fold_gate_scale(edited)
    again = se_retrofit.load(se_retrofit.save(folded, tmp_path / "folded")).eval()
    assert again.layer1[0].se.gate.scale == 1.0
    x = small_input(1)
    with torch.no_grad():
        assert torch.equal(again(x), edited(x))
