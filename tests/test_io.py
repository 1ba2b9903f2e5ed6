"""Save and load: files written, read back, strict, atomic."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import se_retrofit
from se_retrofit import io as se_io
from se_retrofit.hub import WeightsError

from conftest import make_model, small_input


@pytest.fixture(scope="module")
def edited():
    model = se_retrofit.retrofit(make_model("timm", "resnet18"), position="post", stages=[3, 4], reduction=8)
    with torch.no_grad():
        model.layer3[0].se.fc2.bias.fill_(0.5)  # as if fine-tuned: no longer the identity
    return model.eval()


def test_round_trip_recreates_the_base(tmp_path, edited):
    path = se_retrofit.save(edited, tmp_path / "out")
    assert sorted(p.name for p in path.iterdir()) == [
        "attention.safetensors", "model.safetensors", "retrofit_config.json"]
    again = se_retrofit.load(path).eval()
    assert type(again) is type(edited)
    x = small_input(1)
    with torch.no_grad():
        assert torch.equal(again(x), edited(x))


def test_config_records_everything(tmp_path, edited):
    config = json.loads((se_retrofit.save(edited, tmp_path / "out") / "retrofit_config.json").read_text())
    assert config["config"] == {"attention": "se", "position": "post", "reduction": 8, "divisor": None,
                                "stages": [3, 4], "blocks": None, "every": None, "exclude": None, "init": "identity",
                                "options": {}, "max_attention_mib": 64.0, "attention_module": None}
    assert config["gates"]["layer3.0.se"] == {"gate": {"scale": 2.0, "offset": 0.0}}
    assert [s["block"] for s in config["sites"]] == ["layer3.0", "layer3.1", "layer4.0", "layer4.1"]
    assert config["base"]["name"] == "resnet18" and config["base"]["source"] == "timm"
    assert config["base"]["weights"]
    assert set(config["versions"]) == {"se_retrofit", "torch", "torchvision", "timm"}


def test_attention_file_holds_only_the_new_weights(tmp_path, edited):
    path = se_retrofit.save(edited, tmp_path / "out")
    keys = set(load_file(str(path / "attention.safetensors")))
    assert keys == {f"layer{s}.{b}.se.{fc}.{p}" for s in (3, 4) for b in (0, 1) for fc in ("fc1", "fc2")
                    for p in ("weight", "bias")}


def test_attention_only_load_onto_a_given_base(tmp_path, edited):
    path = se_retrofit.save(edited, tmp_path / "out")
    base = make_model("timm", "resnet18")
    snapshot = {k: v.clone() for k, v in base.state_dict().items()}
    model = se_retrofit.load(path, base_model=base, weights="attention")
    assert torch.equal(model.layer3[0].se.fc2.bias, edited.layer3[0].se.fc2.bias)
    assert all(torch.equal(snapshot[k], v) for k, v in base.state_dict().items())  # base untouched
    assert "layer3.0.se.fc1.weight" not in base.state_dict()


def test_loading_onto_a_mismatched_base_names_the_keys(tmp_path, edited):
    path = se_retrofit.save(edited, tmp_path / "out")
    with pytest.raises(WeightsError, match=r"do not match the model: missing 96 \(layer1\.2\.bn1\.bias"):
        se_retrofit.load(path, base_model=timm.create_model("resnet34"))
    with pytest.raises(ValueError, match="the model has no module 'layer3.0'"):
        se_retrofit.load(path, base_model=timm.create_model("vgg11"))


def test_existing_directory_is_not_overwritten_by_default(tmp_path, edited):
    target = tmp_path / "out"
    target.mkdir()
    with pytest.raises(ValueError, match="already exists"):
        se_retrofit.save(edited, target)
    se_retrofit.save(edited, target, overwrite=True)
    assert (target / "retrofit_config.json").is_file()


def test_interrupted_save_leaves_nothing_that_looks_complete(tmp_path, edited, monkeypatch):
    calls = []

    def failing_save_file(tensors, filename, metadata=None):
        calls.append(filename)
        if len(calls) == 2:
            raise KeyboardInterrupt  # the user pressed ^C half-way
        return real(tensors, filename, metadata=metadata)

    real = se_io.save_file
    monkeypatch.setattr(se_io, "save_file", failing_save_file)
    with pytest.raises(KeyboardInterrupt):
        se_retrofit.save(edited, tmp_path / "out")
    assert list(tmp_path.iterdir()) == []


def test_interrupted_overwrite_keeps_the_previous_save(tmp_path, edited, monkeypatch):
    target = se_retrofit.save(edited, tmp_path / "out")
    before = (target / "model.safetensors").read_bytes()
    monkeypatch.setattr(se_io, "_write", lambda *a: (_ for _ in ()).throw(OSError("disk full")))
    with pytest.raises(OSError, match="disk full"):
        se_retrofit.save(edited, target, overwrite=True)
    assert (target / "model.safetensors").read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]


def test_not_a_saved_directory(tmp_path):
    with pytest.raises(WeightsError, match="retrofit_config.json is missing"):
        se_retrofit.load(tmp_path)


def test_saving_an_unedited_model_is_refused(tmp_path):
    with pytest.raises(ValueError, match="not edited by se_retrofit"):
        se_retrofit.save(timm.create_model("resnet18"), tmp_path / "x")


def test_round_trip_of_a_model_with_its_own_head(tmp_path):
    model = se_retrofit.retrofit(make_model("timm", "resnet18", num_classes=10)).eval()
    again = se_retrofit.load(se_retrofit.save(model, tmp_path / "out")).eval()
    x = small_input(1)
    with torch.no_grad():
        assert again(x).shape == (1, 10) and torch.equal(again(x), model(x))


@pytest.mark.parametrize("attention,position", [("cbam", "standard"), ("bam", "stage"), ("eca", "inner"),
                                                ("se", "pre")])
def test_round_trip_for_every_type(tmp_path, attention, position):
    options = {"gate": "tanh"} if attention == "se" else {}
    model = se_retrofit.retrofit(make_model("timm", "resnet18"), attention=attention, position=position,
                                 **options)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if any(name.startswith(s.module_path + ".") for s in model.se_retrofit.sites):
                param.add_(0.01)
    model.eval()
    again = se_retrofit.load(se_retrofit.save(model, tmp_path / "out")).eval()
    x = small_input(1)
    with torch.no_grad():
        assert torch.equal(again(x), model(x))
    assert again.se_retrofit.config == model.se_retrofit.config
