"""A saved model proves itself on load: the module tree and the probe outputs must be the saved ones.

Each test loads without the in-memory model (what a fresh process has: the directory alone).
"""
from __future__ import annotations

import json
import warnings

import pytest
import timm
import torch
from torch import nn

import se_retrofit
from se_retrofit import io as se_io
from se_retrofit.hub import ModelRef, create

from helpers import make_model, run, small_input

X = small_input(1)


def _edited(model: nn.Module) -> nn.Module:
    return se_retrofit.retrofit(model, example_input=X)


def _config(directory):
    return json.loads((directory / se_io.CONFIG_FILE).read_text())


def _write_config(directory, config):
    (directory / se_io.CONFIG_FILE).write_text(json.dumps(config))


def _gelu_stem(model: nn.Module) -> nn.Module:
    model.act1 = nn.GELU()  # a layer replaced after the model was built
    return model


#: models a rebuild from the recorded name cannot reproduce, and the first path the refusal names
NOT_REBUILT = {
    "act_layer": (lambda: timm.create_model("resnet18", act_layer="gelu"), "act1: saved GELU"),
    "output_stride": (lambda: timm.create_model("resnet18", output_stride=8), "layer3.0.conv1: saved Conv2d"),
    "act1_replaced": (lambda: _gelu_stem(timm.create_model("resnet18")), "act1: saved GELU"),
}


@pytest.mark.parametrize("case", sorted(NOT_REBUILT))
@pytest.mark.slow
def test_a_model_the_config_cannot_rebuild_is_refused_with_its_paths(tmp_path, case):
    build, first = NOT_REBUILT[case]
    edited = _edited(build())
    directory = se_retrofit.save(edited, tmp_path / "m")
    with pytest.raises(se_io.VerificationError, match=rf"not the saved model: {first}.*rebuilt .*pass base_model="):
        se_retrofit.load(directory)
    loose = se_retrofit.load(directory, verify=False)  # the opt-out loads what the config rebuilds
    assert not torch.equal(run(loose, X, False), run(edited, X, False))
    given = se_retrofit.load(directory, base_model=build())  # the model built as it was: loads, verified
    assert torch.equal(run(given, X, False), run(edited, X, False))


def _reset_max(model: nn.Module) -> nn.Module:
    model.reset_classifier(10, global_pool="max")
    return model


@pytest.mark.parametrize("build", [lambda: timm.create_model("resnet18", global_pool="max"),
                                   lambda: _reset_max(timm.create_model("resnet18"))],
                         ids=["global_pool_max", "reset_classifier_max"])
@pytest.mark.slow
def test_the_head_as_saved_is_rebuilt_and_its_loss_is_refused(tmp_path, build):
    edited = _edited(build())
    directory = se_retrofit.save(edited, tmp_path / "m")
    again = se_retrofit.load(directory)
    for training in (False, True):
        assert torch.equal(run(again, X, training), run(edited, X, training))
    config = _config(directory)
    assert config["base"]["global_pool"] == "max"
    del config["base"]["global_pool"]  # as if the head had not been recorded
    _write_config(directory, config)
    with pytest.raises(se_io.VerificationError, match=r"global_pool: saved SelectAdaptivePool2d\(.*pool_type=max.*"
                                                      r"rebuilt SelectAdaptivePool2d\(.*pool_type=avg"):
        se_retrofit.load(directory)


def test_weights_that_do_not_compute_the_saved_outputs_are_refused_with_max_delta(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = se_retrofit.save(_edited(timm.create_model("resnet18")), tmp_path / "m")
    state = load_file(str(directory / se_io.MODEL_FILE))
    state["fc.bias"] = state["fc.bias"] + 0.5
    save_file(state, str(directory / se_io.MODEL_FILE))
    with pytest.raises(se_io.VerificationError, match=r"differ by max \|Δ\| 0\.5 \(largest saved value"):
        se_retrofit.load(directory)
    assert se_retrofit.load(directory, verify=False) is not None


@pytest.mark.slow
def test_the_good_path_is_the_identity_in_train_and_eval(tmp_path):
    edited = _edited(timm.create_model("resnet18")).train()
    with torch.no_grad():
        edited.layer3[0].se.fc2.bias.fill_(0.25)  # as if fine-tuned
    directory = se_retrofit.save(edited, tmp_path / "m")
    assert edited.training and all(m.training for m in edited.modules())  # the probe restored the flags
    again = se_retrofit.load(directory)
    for training in (False, True):
        assert torch.equal(run(again, X, training), run(edited, X, training))
    verify = _config(directory)["verify"]
    assert verify["probe"]["outputs"] == 1 and len(verify["module_tree"]["sha256"]) == 64
    assert ["layer1.0.se", "SqueezeExcite"] == verify["module_tree"]["modules"][
        [row[0] for row in verify["module_tree"]["modules"]].index("layer1.0.se")][:2]


@pytest.mark.parametrize("weights", ["full", "attention"])
@pytest.mark.slow
def test_an_edited_base_model_is_refused_not_edited_twice(tmp_path, weights):
    edited = _edited(timm.create_model("resnet18"))
    directory = se_retrofit.save(edited, tmp_path / "m")
    with pytest.raises(se_io.SaveError, match=r"base_model was edited by se_retrofit already \(attention at "
                                              r"layer1\.0\.se.*a second time"):
        se_retrofit.load(directory, base_model=edited, weights=weights)
    stripped = se_retrofit.load(directory)
    del stripped.__dict__["se_retrofit"]  # the record gone: its attention modules still tell
    with pytest.raises(se_io.SaveError, match="a second time"):
        se_retrofit.load(directory, base_model=stripped, weights=weights)


@pytest.mark.slow
def test_an_adapter_load_checks_the_tree_and_the_probe_only_on_the_saved_base_weights(tmp_path):
    base = make_model("timm", "resnet18")  # block outputs not zero, so the attention shows in the output
    edited = _edited(base)
    with torch.no_grad():
        edited.layer4[1].se.fc2.bias.fill_(0.5)
    directory = se_retrofit.save(edited, tmp_path / "m")
    same = se_retrofit.load(directory, base_model=base, weights="attention")  # the saved base weights: probed
    assert torch.equal(run(same, X, False), run(edited, X, False))
    other = se_retrofit.load(directory, base_model=timm.create_model("resnet18"), weights="attention")
    assert torch.equal(other.layer4[1].se.fc2.bias, edited.layer4[1].se.fc2.bias)  # other weights: the adapter use
    with pytest.raises(se_io.VerificationError, match="global_pool: saved"):
        se_retrofit.load(directory, base_model=timm.create_model("resnet18", global_pool="max"), weights="attention")
    from safetensors.torch import load_file, save_file

    attention = load_file(str(directory / se_io.ATTENTION_FILE))
    attention["layer4.1.se.fc2.bias"] += 1.0
    save_file(attention, str(directory / se_io.ATTENTION_FILE))
    with pytest.raises(se_io.VerificationError, match=r"max \|Δ\|"):
        se_retrofit.load(directory, base_model=base, weights="attention")


@pytest.mark.slow
def test_a_peft_model_is_refused_and_its_merge_loads(tmp_path):
    peft = pytest.importorskip("peft")
    edited = _edited(timm.create_model("resnet18"))
    wrapped = peft.get_peft_model(edited, peft.LoraConfig(target_modules=["fc"], r=4))
    with pytest.raises(se_io.SaveError, match=r"PEFT adapter layers \(1 modules, first: base_model\.model\.fc\).*"
                                              r"merge_and_unload"):
        se_retrofit.save(wrapped, tmp_path / "peft")
    assert not (tmp_path / "peft").exists()
    merged = wrapped.merge_and_unload()
    again = se_retrofit.load(se_retrofit.save(merged, tmp_path / "merged"))
    assert torch.equal(run(again, X, False), run(merged, X, False))


def test_a_wrapper_with_weights_of_its_own_is_refused(tmp_path):
    wrapper = nn.Sequential(_edited(timm.create_model("resnet18")), nn.Linear(1000, 3))
    with pytest.raises(se_io.SaveError, match=r"holds the edited model at '0' plus weights of its own \(1\.bias"):
        se_retrofit.save(wrapper, tmp_path / "w")
    assert not (tmp_path / "w").exists()


def test_a_classifier_reset_after_retrofit_is_what_is_saved(tmp_path):
    edited = _edited(timm.create_model("resnet18"))
    edited.reset_classifier(5)
    directory = se_retrofit.save(edited, tmp_path / "m")
    assert _config(directory)["base"]["create_kwargs"]["num_classes"] == 5
    assert "pretrained_tag" not in _config(directory)["base"]  # random weights carry no tag
    again = se_retrofit.load(directory)
    assert again.fc.out_features == 5 and torch.equal(run(again, X, False), run(edited, X, False))


def test_constructor_keywords_of_hub_create_are_recorded_and_rebuilt(tmp_path):
    base, _ = create(ModelRef("resnet18", "timm"), weights="none", act_layer="gelu", num_classes=3)
    edited = _edited(base)
    directory = se_retrofit.save(edited, tmp_path / "m")
    assert _config(directory)["base"]["create_kwargs"] == {"act_layer": "gelu", "num_classes": 3}
    assert torch.equal(run(se_retrofit.load(directory), X, False), run(edited, X, False))


def test_a_meta_device_model_is_refused_and_nothing_is_written(tmp_path):
    with torch.device("meta"):
        model = timm.create_model("resnet18")
    edited = se_retrofit.retrofit(model, example_input=X.to("meta"))
    with pytest.raises(se_io.SaveError, match=r"on the meta device \(first: conv1\.weight\)"):
        se_retrofit.save(edited, tmp_path / "meta")
    assert list(tmp_path.iterdir()) == []


def test_a_format_1_directory_loads_with_a_warning_that_it_is_unverified(tmp_path):
    edited = _edited(timm.create_model("resnet18"))
    directory = se_retrofit.save(edited, tmp_path / "m")
    config = _config(directory)
    config["format"] = se_io.UNVERIFIED_FORMAT
    del config["verify"], config["files"]["probe"]
    _write_config(directory, config)
    (directory / se_io.PROBE_FILE).unlink()
    with pytest.warns(se_io.UnverifiedLoadWarning, match="nothing proves it is the model that was saved"):
        again = se_retrofit.load(directory)
    assert torch.equal(run(again, X, False), run(edited, X, False))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        se_retrofit.load(se_retrofit.save(edited, tmp_path / "new"))  # the current format: no warning


def test_a_transformers_base_is_verified_too(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.ResNetConfig(hidden_sizes=[8, 16], depths=[1, 1], embedding_size=8)
    edited = _edited(transformers.ResNetModel(config))
    directory = se_retrofit.save(edited, tmp_path / "hf")
    again = se_retrofit.load(directory)
    assert torch.equal(run(again, X, False).pooler_output, run(edited, X, False).pooler_output)
    saved = _config(directory)
    saved["base"]["config"]["hidden_act"] = "gelu"
    _write_config(directory, saved)
    with pytest.raises(se_io.VerificationError, match=r"embedder\.embedder\.activation: saved ReLU"):
        se_retrofit.load(directory)


@pytest.mark.slow
def test_a_plain_wrapper_is_unwrapped(tmp_path):
    edited = _edited(timm.create_model("resnet18"))
    directory = se_retrofit.save(torch.compile(edited), tmp_path / "m")  # compiled lazily: nothing runs here
    assert torch.equal(run(se_retrofit.load(directory), X, False), run(edited, X, False))


@pytest.mark.parametrize("tamper", ["verify_list", "rows_not_strings", "outputs_text", "probe_file_gone",
                                    "probe_output_gone"])
@pytest.mark.slow
def test_a_tampered_proof_is_a_retrofit_error(tmp_path, tamper):
    from safetensors.torch import load_file, save_file

    directory = se_retrofit.save(_edited(timm.create_model("resnet18")), tmp_path / "m")
    config = _config(directory)
    if tamper == "verify_list":
        config["verify"] = []
    elif tamper == "rows_not_strings":
        config["verify"]["module_tree"]["modules"][0] = [1, 2, 3]
    elif tamper == "outputs_text":
        config["verify"]["probe"]["outputs"] = "1"
    elif tamper == "probe_file_gone":
        (directory / se_io.PROBE_FILE).unlink()
    else:
        tensors = load_file(str(directory / se_io.PROBE_FILE))
        del tensors["output.0"]
        save_file(tensors, str(directory / se_io.PROBE_FILE))
    _write_config(directory, config)
    with pytest.raises(se_retrofit.RetrofitError, match="verify"):
        se_retrofit.load(directory)


def test_a_rate_whose_name_holds_a_loading_word_is_rebuilt(tmp_path):
    """drop_path_rate holds "path" but a number names nothing to read: a model hub.create built with it
    saves and loads back from its name, verified; checkpoint_path / pretrained_backbone stay refused."""
    from se_retrofit.hub import ModelRef, create
    from se_retrofit.saved_format import _loads

    base, _ = create(ModelRef("resnet18", "timm"), "none", drop_path_rate=0.1, global_pool="max", num_classes=7)
    edited = se_retrofit.retrofit(base)
    again = se_retrofit.load(se_retrofit.save(edited, tmp_path / "m"))
    x = torch.randn(1, 3, 64, 64)
    assert torch.equal(again.eval()(x), edited.eval()(x))
    assert again.layer2[0].drop_path.drop_prob == edited.layer2[0].drop_path.drop_prob > 0
    assert _loads("checkpoint_path", "a.pth") and _loads("pretrained_backbone", 1) and _loads("model_file", "x")
    assert not _loads("weights_backbone", None) and not _loads("drop_path_rate", 0.1)
