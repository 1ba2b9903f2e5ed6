"""Base models by name, weights from files, and the offline path."""
import time
import warnings

import pytest
import timm
import torch
from safetensors.torch import save_file

from se_retrofit import hub
from se_retrofit.hub import ModelRef, OfflineWarning, UnknownModelError, WeightsError


def test_names_resolve_to_their_library():
    assert hub.resolve("resnet50") == ModelRef("resnet50", "timm")
    assert hub.resolve("torchvision:resnet50") == ModelRef("resnet50", "torchvision")
    assert hub.resolve("mobilenet_v3_large") == ModelRef("mobilenet_v3_large", "torchvision")
    assert hub.resolve("resnet50", source="torchvision").source == "torchvision"


def test_unknown_names_get_suggestions():
    with pytest.raises(UnknownModelError, match=r"unknown model 'resnet5O'.*did you mean resnet50"):
        hub.resolve("resnet5O")
    with pytest.raises(UnknownModelError, match="unknown model 'zzzz'"):
        hub.resolve("zzzz")


def test_unreachable_host_is_noticed_quickly():
    start = time.perf_counter()
    assert hub.reachable("weights.example.invalid", seconds=2.0) is False
    assert time.perf_counter() - start < 3.0


def test_offline_pretrained_falls_back_with_one_warning(monkeypatch):
    monkeypatch.setattr(hub, "reachable", lambda host, **_: False)
    monkeypatch.setattr(hub, "_cached_weights", lambda ref: None)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, origin = hub.create(ModelRef("resnet18", "timm"), "pretrained")
    offline = [w for w in caught if issubclass(w.category, OfflineWarning)]
    assert len(offline) == 1 and "RANDOM weights" in str(offline[0].message)
    assert origin.startswith("random initialisation") and isinstance(model, torch.nn.Module)


@pytest.mark.parametrize("suffix", [".safetensors", ".pth"])
def test_local_weights_file_is_loaded(tmp_path, suffix):
    source = timm.create_model("resnet18")
    path = tmp_path / f"weights{suffix}"
    state = {k: v.contiguous() for k, v in source.state_dict().items()}
    save_file(state, str(path)) if suffix == ".safetensors" else torch.save({"state_dict": state}, path)
    model, origin = hub.create(ModelRef("resnet18", "timm"), str(path), allow_pickle=suffix == ".pth")
    assert origin == f"file {path}"
    assert all(torch.equal(v, model.state_dict()[k]) for k, v in state.items())


def test_mismatched_weights_name_the_keys(tmp_path):
    path = tmp_path / "r18.safetensors"
    save_file({k: v.contiguous() for k, v in timm.create_model("resnet18").state_dict().items()}, str(path))
    with pytest.raises(WeightsError, match=r"missing \d+ \(layer1\.0\.bn3.*unexpected|missing \d+ \(.*wrong shape"):
        hub.create(ModelRef("resnet50", "timm"), str(path))


def test_unreadable_weights_file(tmp_path):
    path = tmp_path / "broken.safetensors"
    path.write_bytes(b"not a safetensors file")
    with pytest.raises(WeightsError, match="cannot read weights file"):
        hub.create(ModelRef("resnet18", "timm"), str(path))


def test_pickled_objects_are_refused(tmp_path):
    import argparse  # any class outside torch's weights_only allow-list stands for a payload

    path = tmp_path / "evil.pth"
    torch.save({"state_dict": {"x": argparse.Namespace(a=1)}}, path)
    with pytest.raises(WeightsError, match="cannot read weights file"):
        hub.read_state_dict(path, allow_pickle=True)


def test_pickled_files_need_explicit_permission(tmp_path):
    path = tmp_path / "weights.pth"
    torch.save({k: v for k, v in timm.create_model("resnet18").state_dict().items()}, path)
    with pytest.raises(WeightsError, match=r"is not \.safetensors; pickled torch files are read only when you allow"):
        hub.create(ModelRef("resnet18", "timm"), str(path))
    model, _ = hub.create(ModelRef("resnet18", "timm"), str(path), allow_pickle=True)
    assert isinstance(model, torch.nn.Module)


# --- every weight goes through read_state_dict -------------------------------------------------------

@pytest.mark.parametrize("kwargs", [{"checkpoint_path": "x.pth"}, {"pretrained_cfg_overlay": {"file": "x.pth"}},
                                    {"pretrained": True}, {"cache_dir": "/tmp"}])
def test_library_weight_loading_options_are_refused(kwargs, monkeypatch):
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(WeightsError, match=f"model option '{next(iter(kwargs))}' would make the library load "
                                           "weights itself; give the file as the weights instead"):
        hub.create(ModelRef("resnet18", "timm"), "none", **kwargs)


def test_torchvision_weights_option_is_refused():
    with pytest.raises(WeightsError, match="model option 'weights_backbone'"):
        hub.create(ModelRef("fasterrcnn_resnet50_fpn", "torchvision"), "none", weights_backbone="DEFAULT")


def test_a_directory_as_weights_says_so(tmp_path):
    (tmp_path / "resnet18.safetensors").write_bytes(b"")
    with pytest.raises(WeightsError, match=f"weights path {tmp_path} is a directory; pass the weights file inside "
                                           f"it such as {tmp_path / 'resnet18.safetensors'}"):
        hub.create(ModelRef("resnet18", "timm"), str(tmp_path))
    (tmp_path / "retrofit_config.json").write_text("{}")
    with pytest.raises(WeightsError, match="holding a saved se_retrofit model; it is loaded with se_retrofit.load"):
        hub.read_state_dict(tmp_path)


def test_options_that_turn_loading_off_are_allowed():
    model, origin = hub.create(ModelRef("resnet18", "timm"), "none", checkpoint_path=None, cache_dir=None)
    assert origin == "random initialisation (weights: none)"
    assert hub.loading_kwargs({"weights_backbone": None, "pretrained_backbone": False}) == []
    assert hub.loading_kwargs({"weights_backbone": "DEFAULT", "pretrained": False}) == ["pretrained",
                                                                                        "weights_backbone"]
