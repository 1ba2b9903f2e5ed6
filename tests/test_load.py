"""Loading a saved model runs no code named by its files, and rebuilds exactly what was saved."""
from __future__ import annotations

import json
import sys

import pytest
import timm
import torch

import se_retrofit
from se_retrofit.attention import unregister_attention
from se_retrofit.io import CONFIG_FILE

from helpers import run, small_input, user_attention_source

EVIL = '''
import pathlib
pathlib.Path(__file__).with_name("IMPORTED").write_text("this module ran")
'''

USER_TYPE = user_attention_source("load_test_scale", marker=True)


@pytest.fixture
def saved(tmp_path):
    model = se_retrofit.retrofit(timm.create_model("resnet18"), example_input=small_input())
    return se_retrofit.save(model, tmp_path / "saved"), model


@pytest.fixture
def importable(tmp_path, monkeypatch):
    """A directory on sys.path, as a model directory someone sent you would be after `cd` into it."""
    monkeypatch.syspath_prepend(str(tmp_path))
    yield tmp_path
    for name in ("evil_attention", "user_attention_for_load"):
        sys.modules.pop(name, None)


def _edit_config(directory, **changes):
    file = directory / CONFIG_FILE
    config = json.loads(file.read_text())
    for key, value in changes.items():
        section, _, field = key.partition("__")
        config[section][field] = value
    file.write_text(json.dumps(config))


def test_a_builtin_type_never_imports_the_module_a_config_names(saved, importable):
    directory, model = saved
    (importable / "evil_attention.py").write_text(EVIL)
    _edit_config(directory, config__attention_module="evil_attention")
    again = se_retrofit.load(directory, trust_code=True).eval()
    assert not (importable / "IMPORTED").exists()
    x = small_input()
    assert torch.equal(again(x), run(model, x, False))


def test_a_user_type_is_imported_only_when_trusted(saved, importable):
    directory, _ = saved
    (importable / "user_attention_for_load.py").write_text(USER_TYPE)
    _edit_config(directory, config__attention="load_test_scale", config__attention_module="user_attention_for_load")
    with pytest.raises(se_retrofit.RetrofitError, match=r"registered by module 'user_attention_for_load', which "
                                                          r"is not imported.*trust_code=True.*--import"):
        se_retrofit.load(directory)
    assert not (importable / "IMPORTED").exists()
    try:
        with pytest.raises(se_retrofit.RetrofitError, match="does not match the model"):  # gates of se, not scale
            se_retrofit.load(directory, trust_code=True)
        assert (importable / "IMPORTED").read_text() == "this module ran"
    finally:
        unregister_attention("load_test_scale")


@pytest.mark.parametrize("key,value", [("checkpoint_path", "/tmp/x.pth"), ("pretrained", True),
                                       ("pretrained_cfg_overlay", {"file": "/tmp/x.pth"}),
                                       ("num_classes", {"nested": "object"})])
@pytest.mark.slow
def test_constructor_keywords_that_load_files_are_refused(saved, key, value):
    directory, _ = saved
    _edit_config(directory, base__name="resnet18", base__source="timm", base__create_kwargs={key: value})
    with pytest.raises(se_retrofit.RetrofitError, match=f"base.create_kwargs.{key} in the config is refused"):
        se_retrofit.load(directory)


def test_plain_constructor_keywords_still_load(tmp_path):
    model = se_retrofit.retrofit(timm.create_model("resnet18", num_classes=7), example_input=small_input())
    again = se_retrofit.load(se_retrofit.save(model, tmp_path / "seven"))
    assert again.num_classes == 7 and again.fc.out_features == 7


@pytest.mark.slow
def test_a_half_precision_model_loads_in_its_own_dtype(tmp_path):
    base = timm.create_model("resnet18").eval().to(torch.bfloat16)
    model = se_retrofit.retrofit(base, example_input=small_input().to(torch.bfloat16))
    again = se_retrofit.load(se_retrofit.save(model, tmp_path / "bf16")).eval()
    assert {p.dtype for p in again.parameters()} == {torch.bfloat16}
    x = small_input().to(torch.bfloat16)
    assert torch.equal(again(x), model.eval()(x))
