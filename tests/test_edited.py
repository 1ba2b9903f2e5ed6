"""Edited blocks survive copying and pickling: a fresh process computes exactly the edited model."""
from __future__ import annotations

import copy
import io
import json
import subprocess
import sys
import warnings

import pytest
import torch

import se_retrofit
from se_retrofit.edited import base_class, is_edited

from helpers import make_model, run, same_threads_env, small_input

#: (source, model, attention, position): every position, every built-in type, both libraries, tokens
CASES = [
    ("timm", "resnet18", "se", "standard"), ("timm", "resnet18", "se", "pre"), ("timm", "resnet18", "se", "post"),
    ("timm", "resnet18", "se", "identity"), ("timm", "resnet18", "se", "inner"), ("timm", "resnet18", "bam", "stage"),
    ("timm", "resnet18", "cbam", "standard"), ("timm", "resnet18", "eca", "post"),
    ("torchvision", "resnet18", "se", "standard"), ("torchvision", "resnet18", "se", "pre"),
    ("torchvision", "resnet18", "se", "post"), ("torchvision", "resnet18", "cbam", "identity"),
    ("torchvision", "resnet18", "eca", "inner"), ("torchvision", "resnet18", "bam", "stage"),
    ("timm", "convnext_atto", "se", "post"), ("timm", "vit_tiny_patch16_224", "se", "standard"),
]

LOAD_ALL = '''
import json, sys, torch
results = []
for path in sys.argv[1:]:
    case = torch.load(path, weights_only=False)
    model, x = case["model"], case["input"]
    row = []
    for training in (False, True):
        model.train(training)
        torch.manual_seed(7)
        with torch.no_grad():
            row.append(bool(torch.equal(model(x), case["expected"][training])))
    results.append(row)
print(json.dumps(results))
'''


def _edited(source, name, attention, position):
    base = make_model(source, name, **({"img_size": 64} if name.startswith("vit") else {}))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = se_retrofit.retrofit(base, attention=attention, position=position, example_input=small_input())
    _move_off_identity(model)
    return base, model


@torch.no_grad()
def _move_off_identity(model):
    generator = torch.Generator().manual_seed(3)
    for parameter in se_retrofit.attention_parameters(model):
        parameter.add_(torch.randn(parameter.shape, generator=generator) * 0.2)


@pytest.mark.slow
def test_a_fresh_process_computes_the_edited_model(tmp_path):
    """torch.save(model) of an edited model, loaded elsewhere, is the edited model in train and eval
    mode, and not the original (whose forward an instance-bound edit used to fall back to)."""
    files = []
    for i, case in enumerate(CASES):
        base, model = _edited(*case)
        x = small_input()
        expected = {training: run(copy.deepcopy(model), x, training) for training in (False, True)}
        assert not torch.equal(expected[False], run(base, x, False)), case  # the edit is visible
        path = tmp_path / f"case{i}.pt"
        torch.save({"model": model, "input": x, "expected": expected}, path)
        files.append(str(path))
    loaded = subprocess.run([sys.executable, "-c", LOAD_ALL, *files], capture_output=True, text=True,
                            env=same_threads_env())
    assert loaded.returncode == 0, loaded.stderr[-2000:]
    results = json.loads(loaded.stdout)
    assert {case: row for case, row in zip(CASES, results) if row != [True, True]} == {}


def test_edited_blocks_keep_their_class_and_copy_exactly():
    base, model = _edited("torchvision", "resnet18", "se", "post")
    block = model.layer1[0]
    assert is_edited(block) and not is_edited(base.layer1[0])
    assert isinstance(block, type(base.layer1[0])) and type(block).__name__ == "BasicBlock"
    assert base_class(block) is type(base.layer1[0]) and type(model) is type(base)
    assert "forward" not in vars(block)
    twin = copy.deepcopy(model)
    assert type(twin.layer1[0]) is type(block)  # one generated class per distinct edit
    x = small_input()
    assert torch.equal(run(twin, x, False), run(model, x, False))
    assert set(base.state_dict()) < set(model.state_dict())


def test_pickling_the_generated_class_itself_fails_loudly():
    _, model = _edited("timm", "resnet18", "se", "standard")
    with pytest.raises(Exception, match="edited by se_retrofit|attribute lookup"):
        io.BytesIO().write(__import__("pickle").dumps(type(model.layer1[0])))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64, torch.float16])
@pytest.mark.slow
def test_new_modules_take_the_blocks_dtype(dtype):
    base = make_model("timm", "resnet18").eval().to(dtype)
    x = small_input().to(dtype)
    model = se_retrofit.retrofit(base, position="post", example_input=x)
    assert {p.dtype for p in model.parameters()} == {dtype}
    if dtype is not torch.float16:  # half convolutions are not always available on CPU
        assert torch.equal(run(model, x, False), run(base, x, False))


def test_a_model_on_meta_stays_on_meta():
    base = make_model("timm", "resnet18").to("meta")
    model = se_retrofit.retrofit(base, position="standard", example_input=small_input().to("meta"))
    assert {p.device.type for p in model.parameters()} == {"meta"}
    assert model(small_input().to("meta")).shape == (2, 1000)


@pytest.mark.slow
def test_retrofitting_twice_is_recorded_and_replayed_by_load(tmp_path):
    base, first = _edited("timm", "resnet18", "se", "standard")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        second = se_retrofit.retrofit(first, attention="eca", position="post", example_input=small_input())
    _move_off_identity(second)
    record = se_retrofit.record_of(second)
    assert [c.attention for c, _ in record.edits] == ["se", "eca"] and len(record.all_sites) == 16
    again = se_retrofit.load(se_retrofit.save(second, tmp_path / "twice"))
    x = small_input()
    assert torch.equal(run(again, x, False), run(second, x, False))
    assert not torch.equal(run(again, x, False), run(first, x, False))
    with pytest.raises(se_retrofit.RetrofitError, match="retrofitted 2 times"):
        se_retrofit.to_timm_native(second)
