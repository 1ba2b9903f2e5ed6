"""Edited architectures by name in timm: register_timm_model, then timm.create_model with pretrained files,
checkpoint_path, num_classes, features_only, and timm-style train/validate scripts run from a launcher."""
from __future__ import annotations

import subprocess
import sys

import pytest
import timm
import torch
from safetensors.torch import save_file

import se_retrofit
from se_retrofit.timm_models import register_timm_model, unregister_timm_model

from helpers import as_if_pretrained, make_model, outputs, same_threads_env, small_input, trained_attention

PROBE = small_input(1, 64)


@pytest.fixture(scope="module")
def resnet18_se():
    register_timm_model("resnet18_se", "resnet18", example_input=PROBE)
    yield "resnet18_se"
    unregister_timm_model("resnet18_se")


@pytest.fixture(scope="module")
def edited_file(resnet18_se, tmp_path_factory):
    """The state dict of a 'fine-tuned' resnet18_se (trained-looking backbone, moved attention)."""
    torch.manual_seed(0)
    model = trained_attention(as_if_pretrained(timm.create_model(resnet18_se))).eval()
    path = tmp_path_factory.mktemp("weights") / "resnet18_se.safetensors"
    save_file(model.state_dict(), str(path))
    return model, path


def test_the_name_builds_the_base_with_attention_and_its_own_pretrained_cfg(resnet18_se):
    model = timm.create_model(resnet18_se)
    record = se_retrofit.record_of(model)
    assert type(model) is timm.models.ResNet and len(record.sites) == 8
    assert record.base["name"] == "resnet18" and record.base["source"] == "timm"
    assert "layer4.1.se.fc1.weight" in model.state_dict()
    cfg, base_cfg = model.pretrained_cfg, timm.create_model("resnet18").pretrained_cfg
    assert cfg["architecture"] == resnet18_se and base_cfg["architecture"] == "resnet18"
    assert {k: v for k, v in cfg.items() if k not in ("architecture", "tag")} == \
        {k: v for k, v in base_cfg.items() if k not in ("architecture", "tag")}
    assert resnet18_se in timm.list_models("resnet18_se*") and timm.is_model(resnet18_se)
    assert timm.data.resolve_data_config({}, model=model)["input_size"] == (3, 224, 224)


def test_pretrained_file_of_the_edited_model_loads_exactly(edited_file, resnet18_se):
    source, path = edited_file
    loaded = timm.create_model(resnet18_se, pretrained=True, pretrained_cfg_overlay=dict(file=str(path)))
    x = small_input(2, 64)
    assert all(torch.equal(v, source.state_dict()[k]) for k, v in loaded.state_dict().items())
    for training in (False, True):
        assert torch.equal(outputs(loaded, x, training), outputs(source, x, training))
    print("pretrained_cfg_overlay file: outputs equal (eval, train)")


def test_checkpoint_path_loads_exactly(edited_file, resnet18_se):
    source, path = edited_file
    loaded = timm.create_model(resnet18_se, checkpoint_path=str(path))
    x = small_input(2, 64)
    assert torch.equal(outputs(loaded, x), outputs(source, x))
    print("checkpoint_path: outputs equal")


def test_a_checkpoint_of_the_base_starts_the_attention_at_identity(resnet18_se, tmp_path):
    base = make_model("timm", "resnet18").eval()  # stands in for the base's own pretrained weights
    save_file(base.state_dict(), str(tmp_path / "resnet18.safetensors"))
    loaded = timm.create_model(resnet18_se, pretrained=True,
                               pretrained_cfg_overlay=dict(file=str(tmp_path / "resnet18.safetensors")))
    x = small_input(2, 64)
    for training in (False, True):
        assert torch.equal(outputs(loaded, x, training), outputs(base, x, training))
    state, attention = loaded.state_dict(), se_retrofit.attention_state_dict(loaded)
    assert len(attention) == 32 and state.keys() - attention.keys() == base.state_dict().keys()
    assert all(torch.equal(v, state[k]) for k, v in base.state_dict().items())  # the base's weights, unchanged


def test_a_file_missing_some_attention_weights_is_refused_by_timm(edited_file, resnet18_se, tmp_path):
    source, _ = edited_file
    state = dict(source.state_dict())
    del state["layer4.1.se.fc2.bias"]
    save_file(state, str(tmp_path / "partial.safetensors"))
    with pytest.raises(RuntimeError, match="Missing key.*layer4.1.se.fc2.bias"):
        timm.create_model(resnet18_se, pretrained=True, pretrained_cfg_overlay=dict(file=str(tmp_path / "partial.safetensors")))


def test_num_classes_reset_classifier_and_features_only(edited_file, resnet18_se):
    source, path = edited_file
    overlay = dict(file=str(path))
    x = small_input(2, 64)
    ten = timm.create_model(resnet18_se, pretrained=True, num_classes=10, pretrained_cfg_overlay=overlay).eval()
    assert ten(x).shape == (2, 10) and ten.pretrained_cfg["architecture"] == resnet18_se
    with torch.no_grad():
        assert torch.equal(ten.forward_features(x), source.forward_features(x))  # backbone and attention loaded
    ten.reset_classifier(5)
    assert ten(x).shape == (2, 5)
    features = timm.create_model(resnet18_se, pretrained=True, features_only=True, pretrained_cfg_overlay=overlay).eval()
    with torch.no_grad():
        maps = features(x)
        assert features.feature_info.channels() == [64, 64, 128, 256, 512]
        assert torch.equal(maps[-1], source.forward_features(x))
    print("features_only:", [tuple(m.shape) for m in maps])


def test_registering_from_a_saved_directory_uses_its_weights(tmp_path):
    model = trained_attention(se_retrofit.retrofit(make_model("timm", "resnet18", num_classes=10), position="post",
                                                   reduction=8, example_input=PROBE)).eval()
    saved = se_retrofit.save(model, tmp_path / "r18-post")
    register_timm_model("resnet18_post_saved", saved)
    try:
        loaded = timm.create_model("resnet18_post_saved", pretrained=True)
        x = small_input(2, 64)
        assert loaded.num_classes == 10 and se_retrofit.record_of(loaded).config.position == "post"
        assert torch.equal(outputs(loaded, x), outputs(model, x))
    finally:
        unregister_timm_model("resnet18_post_saved")
    assert not timm.is_model("resnet18_post_saved")


@pytest.mark.parametrize("name,base,options,message", [
    ("resnet18", "resnet18", {}, "'resnet18' is already a timm model; choose a new name such as resnet18_se"),
    ("r18.se", "resnet18", {}, "a timm model name is made of letters, digits and _, not 'r18.se'"),
    ("r18_se", "resnet_eighteen", {}, "unknown timm model 'resnet_eighteen'"),
    ("r18_se", "resnet18", {"config": se_retrofit.RetrofitConfig(), "reduction": 8}, "either config= or retrofit"),
    ("r18_se", "resnet18", {"position": "sideways"}, "unknown position 'sideways'"),
])
def test_bad_registrations_are_refused(name, base, options, message):
    with pytest.raises(se_retrofit.RetrofitError, match=message.replace("(", r"\(").replace(")", r"\)")):
        register_timm_model(name, base, example_input=PROBE, **options)
    assert not timm.is_model("r18_se") and not timm.is_model("r18.se")


LAUNCHER = '''\
import runpy
import sys

import se_retrofit

se_retrofit.register_timm_model("resnet18_se", "resnet18", reduction=16)

script, sys.argv = sys.argv[1], sys.argv[1:]
runpy.run_path(script, run_name="__main__")
'''

FAKE_TRAIN = '''\
"""Stands in for timm's train.py: the model comes from timm.create_model(args.model, ...)."""
import argparse
import timm
import torch
from safetensors.torch import save_file

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--pretrained-path")
parser.add_argument("--num-classes", type=int)
parser.add_argument("--output")
args = parser.parse_args()
model = timm.create_model(args.model, pretrained=bool(args.pretrained_path), num_classes=args.num_classes,
                          pretrained_cfg_overlay=dict(file=args.pretrained_path) if args.pretrained_path else None)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
torch.manual_seed(0)
x, y = torch.randn(4, 3, 64, 64), torch.randint(0, args.num_classes, (4,))
torch.nn.functional.cross_entropy(model(x), y).backward()
optimizer.step()
save_file(model.state_dict(), args.output)
print("trained", type(model).__name__, model.pretrained_cfg["architecture"])
'''

FAKE_VALIDATE = '''\
"""Stands in for timm's validate.py: timm.create_model(args.model, checkpoint_path=...)."""
import argparse
import timm
import torch

parser = argparse.ArgumentParser()
parser.add_argument("--model")
parser.add_argument("--checkpoint")
parser.add_argument("--num-classes", type=int)
parser.add_argument("--output")
args = parser.parse_args()
model = timm.create_model(args.model, num_classes=args.num_classes, checkpoint_path=args.checkpoint).eval()
with torch.no_grad():
    torch.save(model(torch.load(args.output + ".x")), args.output)
print("validated", args.model)
'''


@pytest.mark.slow
def test_launcher_runs_timm_style_train_and_validate_scripts_by_name(edited_file, resnet18_se, tmp_path):
    _, pretrained = edited_file
    for name, text in (("launch.py", LAUNCHER), ("train.py", FAKE_TRAIN), ("validate.py", FAKE_VALIDATE)):
        (tmp_path / name).write_text(text)

    def launch(*args):
        done = subprocess.run([sys.executable, "launch.py", *args], capture_output=True, text=True, timeout=300,
                              cwd=tmp_path, env=same_threads_env())
        assert done.returncode == 0, done.stderr
        return done.stdout.strip()

    assert launch("train.py", "--model", "resnet18_se", "--pretrained-path", str(pretrained), "--num-classes", "10",
                  "--output", "tuned.safetensors") == "trained ResNet resnet18_se"
    x = small_input(2, 64)
    torch.save(x, tmp_path / "y.pt.x")
    assert launch("validate.py", "--model", "resnet18_se", "--checkpoint", "tuned.safetensors", "--num-classes", "10",
                  "--output", "y.pt") == "validated resnet18_se"
    here = timm.create_model(resnet18_se, num_classes=10, checkpoint_path=str(tmp_path / "tuned.safetensors"))
    assert torch.equal(torch.load(tmp_path / "y.pt"), outputs(here, x))
    assert not torch.equal(here.state_dict()["layer4.1.se.fc1.weight"],
                           edited_file[0].state_dict()["layer4.1.se.fc1.weight"])  # the step trained the attention
    missing = subprocess.run([sys.executable, "validate.py", "--model", "resnet18_se"], capture_output=True,
                             text=True, timeout=300, cwd=tmp_path)
    assert missing.returncode == 1 and "Unknown model (resnet18_se)" in missing.stderr  # without the launcher


@pytest.mark.parametrize("base,feature_kwargs", [("efficientnet_b0", {}), ("convnext_atto", {}),
                                                 ("convnext_atto", {"feature_cls": "getter"})])
@pytest.mark.slow
def test_features_only_of_architectures_with_their_own_feature_settings(base, feature_kwargs):
    """timm builds features_only for these with per-architecture settings; the registered name wraps the
    edited model with FeatureGetterNet (forward_intermediates) instead. With ``feature_cls`` given, timm
    builds the wrapper, for every feature level of the base (its default 0-4 would be out of range on
    ConvNeXt's four)."""
    name = f"{base}_se_features"
    register_timm_model(name, base, example_input=PROBE)
    try:
        torch.manual_seed(0)
        full = trained_attention(timm.create_model(name)).eval()
        features = timm.create_model(name, features_only=True, **feature_kwargs).eval()
        loaded = features.model.load_state_dict(full.state_dict(), strict=False)  # the pruned head's keys are extra
        assert not loaded.missing_keys and loaded.unexpected_keys
        x = small_input(1, 64)
        with torch.no_grad():
            maps = features(x)
            expected = full.forward_intermediates(x, indices=len(full.feature_info), intermediates_only=True)
        assert len(maps) == len(full.feature_info) and all(torch.equal(a, b) for a, b in zip(maps, expected))
        assert features.feature_info.channels() == [m.shape[1] for m in maps]
        print(f"{base} features_only:", [tuple(m.shape) for m in maps])
    finally:
        unregister_timm_model(name)
