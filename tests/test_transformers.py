"""Hugging Face transformers bases: se_retrofit.save/load rebuild them on their own (class + config, no
code named by the file is imported), the base-in-transformers + attention-adapter path, and what the
unsupported save_pretrained/from_pretrained path of an edited model does."""
from __future__ import annotations

import copy
import json
import subprocess
import sys

import pytest
import torch
import transformers
from transformers import (AutoModelForImageClassification, ConvNextConfig, ConvNextModel, ResNetConfig,
                          ResNetForImageClassification)

import se_retrofit
from se_retrofit.hf import SavePretrainedWarning
from se_retrofit.outputs import output_tensors

import helpers
from helpers import as_if_pretrained, same_threads_env, small_input, trained_attention

PROBE = small_input(1, 32)


def small_resnet() -> ResNetForImageClassification:
    torch.manual_seed(0)
    config = ResNetConfig(embedding_size=16, hidden_sizes=[16, 32], depths=[2, 1], layer_type="basic", num_labels=3)
    return as_if_pretrained(ResNetForImageClassification(config)).eval()


def small_convnext() -> ConvNextModel:
    torch.manual_seed(0)
    model = as_if_pretrained(ConvNextModel(ConvNextConfig(hidden_sizes=[16, 32], depths=[1, 1], num_stages=2)))
    with torch.no_grad():  # layer scales start at 1e-6: every branch would output ~0
        for name, param in model.named_parameters():
            if name.endswith("layer_scale_parameter"):
                param.copy_(torch.rand(param.shape) + 0.5)
    return model.eval()


def outputs(model, x, training=False):
    return output_tensors(helpers.outputs(model, x, training))


def same(a, b) -> bool:
    return len(a) == len(b) and all(torch.equal(x, y) for x, y in zip(a, b))


@pytest.mark.parametrize("build,blocks", [(small_resnet, 3), (small_convnext, 2)])
@pytest.mark.slow
def test_save_and_load_rebuild_the_transformers_base_in_a_fresh_process(tmp_path, build, blocks):
    base = build()
    edited = trained_attention(se_retrofit.retrofit(base, example_input=PROBE))
    assert len(se_retrofit.record_of(edited).sites) == blocks
    x = small_input(2, 32)
    assert not same(outputs(edited, x), outputs(base, x))  # the attention really changes the outputs
    saved = se_retrofit.save(edited, tmp_path / "saved")
    recorded = json.loads((saved / "retrofit_config.json").read_text())["base"]
    assert recorded["source"] == "transformers" and recorded["name"] == type(base).__name__
    assert recorded["config"] == json.loads(base.config.to_json_string(use_diff=False))
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch, se_retrofit\n"
              "from se_retrofit.outputs import output_tensors\n"
              "model = se_retrofit.load(sys.argv[1])\n"
              "x = torch.load(sys.argv[2])\n"
              "with torch.no_grad():\n"
              "    torch.save([output_tensors(model.train(mode)(x)) for mode in (False, True)], sys.argv[3])\n"
              "print(type(model).__module__, type(model).__name__)\n")
    done = subprocess.run([sys.executable, "-c", script, str(saved), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=180, cwd=tmp_path, env=same_threads_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split()[-1] == type(base).__name__
    in_eval, in_train = torch.load(tmp_path / "y.pt")
    assert same(in_eval, outputs(edited, x)) and same(in_train, outputs(edited, x, training=True))
    print(f"{type(base).__name__}: {blocks} blocks, fresh-process load equals the edited model (eval and train)")


def test_base_in_transformers_format_plus_attention_adapter_round_trips(tmp_path):
    base = small_resnet()
    base.save_pretrained(tmp_path / "base")
    edited = trained_attention(se_retrofit.retrofit(base, example_input=PROBE))  # backbone frozen: only attention moved
    se_retrofit.save(edited, tmp_path / "edited")
    again = se_retrofit.load(tmp_path / "edited", weights="attention",
                             base_model=AutoModelForImageClassification.from_pretrained(tmp_path / "base"))
    x = small_input(2, 32)
    assert type(again) is ResNetForImageClassification
    assert same(outputs(again, x), outputs(edited, x)) and same(outputs(again, x, True), outputs(edited, x, True))


def test_from_pretrained_of_an_edited_models_save_pretrained_drops_the_attention(tmp_path, caplog, capfd):
    """The unsupported path, documented: transformers builds the plain class, reports the attention
    weights as UNEXPECTED and computes the unedited base."""
    base = small_resnet()
    edited = trained_attention(se_retrofit.retrofit(base, example_input=PROBE))
    with pytest.warns(SavePretrainedWarning, match=r"from_pretrained loads into the plain ResNetForImageClassification "
                                                   r"WITHOUT the attention .* se_retrofit.save\(model, dir\)"):
        edited.save_pretrained(tmp_path / "hf")
    assert sorted(p.name for p in (tmp_path / "hf").iterdir()) == ["config.json", "model.safetensors"]
    caplog.clear()
    capfd.readouterr()
    reloaded = AutoModelForImageClassification.from_pretrained(tmp_path / "hf")
    report = caplog.text + capfd.readouterr().err  # a logging record (5.x) or stderr (4.x keeps its own handler)
    x = small_input(2, 32)
    assert not any(".se." in key for key in reloaded.state_dict())
    assert same(outputs(reloaded, x), outputs(base, x)) and not same(outputs(reloaded, x), outputs(edited, x))
    # transformers 5 prints a load report (UNEXPECTED), 4.x a warning (weights ... were not used)
    assert ("UNEXPECTED" in report or "were not used" in report) and ".se.fc1.weight" in report, report
    # the supported path from the same edited model keeps the attention
    se_retrofit.save(edited, tmp_path / "se")
    assert same(outputs(se_retrofit.load(tmp_path / "se"), x), outputs(edited, x))


@pytest.fixture()
def planted_module(tmp_path, monkeypatch):
    """A module on sys.path that leaves a file behind if anything imports it."""
    marker = tmp_path / "imported"
    (tmp_path / "planted_evil.py").write_text(f"open({str(marker)!r}, 'w').write('ran')\n"
                                              "import torch\nclass Model(torch.nn.Module):\n    pass\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    yield marker
    sys.modules.pop("planted_evil", None)


@pytest.mark.parametrize("name", ["planted_evil", "planted_evil.Model", "os.system", "AutoModel", "ResNetConfig",
                                  "PreTrainedModel", "logging", "__class__", "", None, 42])
@pytest.mark.slow
def test_load_imports_nothing_named_by_the_file(tmp_path, planted_module, name):
    edited = se_retrofit.retrofit(small_resnet(), example_input=PROBE)
    saved = se_retrofit.save(edited, tmp_path / "saved")
    config = json.loads((saved / "retrofit_config.json").read_text())
    config["base"]["name"] = name
    (saved / "retrofit_config.json").write_text(json.dumps(config))
    with pytest.raises(se_retrofit.RetrofitError, match="pass base_model=") as caught:
        se_retrofit.load(saved)
    assert "\n" not in str(caught.value)
    assert not planted_module.exists() and "planted_evil" not in sys.modules
    loaded = se_retrofit.load(saved, base_model=small_resnet())  # the way out the message names
    assert same(outputs(loaded, PROBE), outputs(edited, PROBE))


def test_a_remote_code_or_user_subclass_is_not_recorded_as_rebuildable(tmp_path):
    class MyResNet(ResNetForImageClassification):
        pass

    torch.manual_seed(0)
    model = as_if_pretrained(MyResNet(small_resnet().config)).eval()
    edited = se_retrofit.retrofit(model, example_input=PROBE)
    assert "source" not in se_retrofit.record_of(edited).base
    saved = se_retrofit.save(edited, tmp_path / "saved")
    with pytest.raises(se_retrofit.RetrofitError, match="pass base_model="):
        se_retrofit.load(saved)



def test_save_pretrained_of_a_copy_saves_the_copy_and_the_base_saves_without_warning(tmp_path, recwarn):
    base = small_resnet()
    edited = se_retrofit.retrofit(base, example_input=PROBE)
    copied = trained_attention(copy.deepcopy(edited))
    with pytest.warns(SavePretrainedWarning):
        copied.save_pretrained(tmp_path / "copy")
    from safetensors.torch import load_file

    written = load_file(str(tmp_path / "copy" / "model.safetensors"))
    assert torch.equal(written["resnet.encoder.stages.1.layers.0.se.fc1.weight"],
                       copied.state_dict()["resnet.encoder.stages.1.layers.0.se.fc1.weight"])
    assert not torch.equal(written["resnet.encoder.stages.1.layers.0.se.fc1.weight"],
                           edited.state_dict()["resnet.encoder.stages.1.layers.0.se.fc1.weight"])
    base.save_pretrained(tmp_path / "base")  # the caller's model is not touched by retrofit()
    assert not any(isinstance(w.message, SavePretrainedWarning) for w in recwarn.list)
    loaded = se_retrofit.load(se_retrofit.save(copied, tmp_path / "se"))
    with pytest.warns(SavePretrainedWarning):  # a loaded edited model warns too
        loaded.save_pretrained(tmp_path / "loaded")
