"""Export formats, each checked against the edited model; torch.compile, channels_last, fresh-process reload."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import onnxruntime
import pytest
import timm
import torch
from safetensors import safe_open

import se_retrofit
from se_retrofit.cli import main
from se_retrofit.export import FORMATS, ExportCheckError, ExportError, ExportFormat, export, save_and_export

from helpers import make_model, same_threads_env, small_input
from test_convert import trained_se

SMALL = small_input(1, 32)  # probe input for retrofit(): the models' own 224 px would be slow on CPU
NAMES = {"safetensors": "saved", "timm": "seresnet18.safetensors", "torchscript": "model.torchscript.pt",
         "export": "model.pt2", "onnx": "model.onnx"}


@pytest.fixture(scope="module")
def edited():
    return trained_se(se_retrofit.retrofit(make_model("timm", "resnet18"), example_input=SMALL))


def _reference(model, x):
    training = model.training
    with torch.no_grad():
        out = model.eval()(x)
    model.train(training)
    return out


def _snapshot(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _read_back(fmt: str, path: Path):
    """Load the written file the way a user of that format would, independently of export()."""
    if fmt == "safetensors":
        return se_retrofit.load(path).eval()
    if fmt == "timm":
        return timm.create_model("seresnet18", pretrained=True, pretrained_cfg_overlay=dict(file=str(path))).eval()
    if fmt == "torchscript":
        with pytest.warns(FutureWarning, match="deprecated"):
            return torch.jit.load(str(path))
    if fmt == "export":
        return torch.export.load(str(path)).module()
    session = onnxruntime.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return lambda x: torch.from_numpy(session.run(None, {session.get_inputs()[0].name: x.numpy()})[0])


@pytest.mark.parametrize("fmt", list(FORMATS))
@pytest.mark.slow
def test_every_format_reproduces_the_model_and_leaves_it_alone(edited, tmp_path, fmt):
    edited.train()
    x = small_input(1, 32)
    before = _snapshot(edited)
    result = export(edited, tmp_path / NAMES[fmt], fmt, x)
    state, flags = _snapshot(edited)
    assert flags == before[1] and all(torch.equal(state[k], v) for k, v in before[0].items())
    assert [p.name for p in tmp_path.iterdir()] == [NAMES[fmt]]  # no staging directory left
    tolerance = 1e-4 if fmt == "onnx" else 0.0
    assert result.format == fmt and result.path == tmp_path / NAMES[fmt] and result.max_abs_diff <= tolerance
    loaded = _read_back(fmt, result.path)
    with torch.no_grad():
        for batch in (x, small_input(3, 32)):  # batch 3: export/onnx have a dynamic batch size
            diff = (loaded(batch) - _reference(edited, batch)).abs().max().item()
            assert diff <= tolerance, (fmt, batch.shape, diff)
    assert result.dynamic_batch is (True if fmt in ("export", "onnx") else None)


@pytest.mark.slow
def test_timm_export_loads_in_a_process_without_se_retrofit(edited, tmp_path):
    x = small_input(2, 32)
    result = export(edited, tmp_path / "seresnet18.safetensors", "timm", x)
    torch.save(x, tmp_path / "x.pt")
    script = (
        "import sys, timm, torch\n"
        "from safetensors import safe_open\n"
        "path = sys.argv[1]\n"
        "name = safe_open(path, 'pt').metadata()['timm_model']\n"
        "model = timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path)).eval()\n"
        "with torch.no_grad():\n"
        "    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])\n"
        "print(name, 'se_retrofit' in sys.modules)\n")
    done = subprocess.run([sys.executable, "-c", script, str(result.path), str(tmp_path / "x.pt"),
                           str(tmp_path / "y.pt")], capture_output=True, text=True, timeout=120, cwd=tmp_path, env=same_threads_env())
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["seresnet18", "False"]
    assert torch.equal(torch.load(tmp_path / "y.pt"), _reference(edited, x))


def test_timm_export_records_a_non_default_head(tmp_path):
    model = trained_se(se_retrofit.retrofit(make_model("timm", "resnet18", num_classes=10), example_input=SMALL))
    result = export(model, tmp_path / "m.safetensors", "timm", small_input(1, 32))
    assert result.timm_kwargs == {"num_classes": 10} and result.max_abs_diff == 0.0
    metadata = safe_open(str(result.path), "pt").metadata()
    assert metadata["timm_model"] == "seresnet18" and json.loads(metadata["timm_kwargs"]) == {"num_classes": 10}
    assert "num_classes=10, pretrained_cfg_overlay=dict(file='m.safetensors', num_classes=10)" in metadata["usage"]


@pytest.mark.parametrize("kwargs,message", [
    ({"position": "post"}, "format 'timm' needs an exact timm native model: only SE or ECA at the standard"),
    ({"attention": "cbam"}, "only SE or ECA"),
])
def test_timm_export_without_a_native_twin_is_refused_and_writes_nothing(tmp_path, kwargs, message):
    model = se_retrofit.retrofit(timm.create_model("test_resnet"), example_input=SMALL, **kwargs)
    with pytest.raises(ExportError, match=message) as caught:
        export(model, tmp_path / "out.safetensors", "timm", small_input(1, 32))
    assert isinstance(caught.value, ValueError) and "\n" not in str(caught.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_existing_output_is_refused_unless_overwrite(edited, tmp_path):
    target = tmp_path / "model.pt2"
    target.write_bytes(b"old")
    with pytest.raises(ExportError, match="already exists; choose another path or pass overwrite=True"):
        export(edited, target, "export", small_input(1, 32))
    assert target.read_bytes() == b"old"
    export(edited, target, "export", small_input(1, 32), overwrite=True)
    assert torch.export.load(str(target)) is not None and [p.name for p in tmp_path.iterdir()] == ["model.pt2"]


def test_unknown_format_names_the_known_ones(edited, tmp_path):
    with pytest.raises(ExportError, match="unknown export format 'tflite'; choose one of safetensors, timm, "
                                          "torchscript, export, onnx"):
        export(edited, tmp_path / "m", "tflite")


def test_timm_file_must_end_with_safetensors(edited, tmp_path):
    with pytest.raises(ExportError, match="format 'timm' writes a .safetensors file .*name it like "
                                          "seresnet18.safetensors, not seresnet18.pth"):
        export(edited, tmp_path / "seresnet18.pth", "timm")
    assert list(tmp_path.iterdir()) == []


def test_a_failed_check_or_write_leaves_nothing(edited, tmp_path, monkeypatch):
    wrong = ExportFormat("wrong outputs", lambda m: "m.pt", FORMATS["torchscript"].write,
                         lambda path, x, facts: torch.zeros(x.shape[0], 1000))
    broken = ExportFormat("writer fails half-way", lambda m: "m.pt", _half_write, FORMATS["torchscript"].run)
    monkeypatch.setitem(FORMATS, "wrong", wrong)
    monkeypatch.setitem(FORMATS, "broken", broken)
    with pytest.raises(ExportCheckError, match=r"does not reproduce the model: max \|Δ\| = .*nothing was written"):
        export(edited, tmp_path / "m.pt", "wrong", small_input(1, 32))
    with pytest.raises(OSError, match="disk full"):
        export(edited, tmp_path / "m.pt", "broken", small_input(1, 32))
    assert list(tmp_path.iterdir()) == []


def _half_write(model, path, example, dynamic):
    path.write_bytes(b"partial")
    raise OSError("disk full")


def test_save_and_export_is_all_or_nothing(edited, tmp_path):
    out, result = save_and_export(edited, tmp_path / "r18", "torchscript", small_input(1, 32))
    assert sorted(p.name for p in out.iterdir()) == ["attention.safetensors", "model.safetensors",
                                                     "model.torchscript.pt", "probe.safetensors",
                                                     "retrofit_config.json"]
    assert result.path == out / "model.torchscript.pt" and result.max_abs_diff == 0.0
    post = se_retrofit.retrofit(timm.create_model("test_resnet"), position="post", example_input=SMALL)
    with pytest.raises(ExportError, match="needs an exact timm native model"):
        save_and_export(post, tmp_path / "post", "timm", small_input(1, 32))
    assert [p.name for p in tmp_path.iterdir()] == ["r18"]


# --- the edited model with torch.compile and channels_last ------------------------------------------

@pytest.mark.slow
def test_torch_compile_gives_the_same_outputs():
    model = trained_se(se_retrofit.retrofit(make_model("timm", "test_resnet"), example_input=SMALL)).eval()
    x = small_input(2, 32)
    compiled = torch.compile(model, fullgraph=True)  # the generated block forwards trace without graph breaks
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x), rtol=1e-5, atol=1e-5)


def test_channels_last_gives_the_same_outputs():
    base = make_model("timm", "test_resnet").eval()
    x = small_input(2, 32)
    model = trained_se(se_retrofit.retrofit(base, example_input=SMALL)).eval()
    with torch.no_grad():
        expected = model(x)
        last = model.to(memory_format=torch.channels_last)
        torch.testing.assert_close(last(x.to(memory_format=torch.channels_last)), expected, rtol=1e-5, atol=1e-5)
        # retrofitting a model that is already channels_last keeps the identity
        base_last = base.to(memory_format=torch.channels_last)
        again = se_retrofit.retrofit(base_last, example_input=SMALL).eval()
        x_last = x.to(memory_format=torch.channels_last)
        assert torch.equal(again(x_last), base_last(x_last))


# --- reload in a fresh process ---------------------------------------------------------------------

@pytest.mark.slow
def test_reload_in_a_fresh_process_needs_only_load(edited, tmp_path):
    x = small_input(2, 32)
    saved = se_retrofit.save(edited, tmp_path / "saved")
    torch.save(x, tmp_path / "x.pt")
    script = ("import sys, torch, se_retrofit\n"
              "model = se_retrofit.load(sys.argv[1]).eval()\n"
              "with torch.no_grad():\n"
              "    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])\n")
    done = subprocess.run([sys.executable, "-c", script, str(saved), str(tmp_path / "x.pt"), str(tmp_path / "y.pt")],
                          capture_output=True, text=True, timeout=120, cwd=tmp_path, env=same_threads_env())
    assert done.returncode == 0, done.stderr
    assert torch.equal(torch.load(tmp_path / "y.pt"), _reference(edited, x))


# --- command line ----------------------------------------------------------------------------------

def cli(capsys, *args):
    code = main(list(args))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.slow
def test_cli_timm_format(capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--format", "timm", "--out", "X",
                         "--input-size", "3,32,32")
    assert code == 0, err
    assert "export check (timm): max |Δ| = 0" in out and "exported to X/seresnet18.safetensors" in out
    assert ("load without se_retrofit: timm.create_model('seresnet18', pretrained=True, "
            "pretrained_cfg_overlay=dict(file='X/seresnet18.safetensors'))") in out
    assert sorted(p.name for p in (tmp_path / "X").iterdir()) == [
        "attention.safetensors", "model.safetensors", "probe.safetensors", "retrofit_config.json",
        "seresnet18.safetensors"]
    assert [p.name for p in tmp_path.iterdir()] == ["X"]


@pytest.mark.slow
def test_cli_onnx_format_json(capsys, tmp_path):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--format", "onnx", "--out", str(tmp_path / "o"),
                         "--input-size", "3,32,32", "--json")
    assert code == 0, err
    exported = json.loads(out)["export"]
    assert exported["format"] == "onnx" and exported["path"] == str(tmp_path / "o" / "model.onnx")
    assert exported["max_abs_diff"] < 1e-4 and exported["dynamic_batch"] is True


def test_cli_default_format_reports_no_export(capsys, tmp_path):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--out", str(tmp_path / "o"),
                         "--input-size", "3,32,32", "--json")
    assert code == 0, err
    assert json.loads(out)["export"] is None


@pytest.mark.parametrize("args,message", [
    (["--position", "post", "--format", "timm"], "format 'timm' needs an exact timm native model: only SE or ECA "
                                                 "at the standard position in every block"),
    (["--format", "tflite"], "argument --format: invalid choice: 'tflite'"),
])
def test_cli_export_errors_are_one_line_and_write_nothing(capsys, tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--input-size", "3,32,32", "--out", "X", *args)
    assert code == 2 and out == ""
    assert err.count("\n") == 1 and err.startswith("se-retrofit: error: ") and message in err, err
    assert list(tmp_path.iterdir()) == []


# --- dynamic spatial size (detection and segmentation backbones run at many sizes) -------------------

def _run_file(fmt: str, path: Path, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return _read_back(fmt, path)(x)


@pytest.mark.parametrize("fmt", ["export", "onnx"])
@pytest.mark.slow
def test_dynamic_spatial_file_runs_at_every_size(edited, tmp_path, fmt):
    result = export(edited, tmp_path / NAMES[fmt], fmt, small_input(1, 64), dynamic_spatial=True)
    assert result.dynamic_spatial is True and result.dynamic_batch is True
    assert result.checked_sizes == [(64, 64), (96, 96)]
    tolerance = 1e-4 if fmt == "onnx" else 0.0
    assert result.max_abs_diff <= tolerance
    sizes = [(1, 64, 64), (3, 96, 96), (2, 80, 112), (1, 224, 224)]  # non-square and unseen sizes too
    for batch, height, width in sizes:
        x = torch.randn(batch, 3, height, width, generator=torch.Generator().manual_seed(height))
        diff = (_run_file(fmt, result.path, x) - _reference(edited, x)).abs().max().item()
        print(f"{fmt} dynamic spatial: {batch}x3x{height}x{width} max |Δ| = {diff:.3g}")
        assert diff <= tolerance, (fmt, x.shape, diff)
    assert json.loads(json.dumps(result.to_dict()))["checked_sizes"] == [[64, 64], [96, 96]]


@pytest.mark.slow
def test_without_dynamic_spatial_the_file_keeps_the_example_size(edited, tmp_path):
    result = export(edited, tmp_path / "model.pt2", "export", small_input(1, 64))
    assert result.dynamic_spatial is None and result.checked_sizes is None
    program = torch.export.load(str(result.path)).module()
    with pytest.raises(Exception, match="96|64"):
        program(small_input(1, 96))


@pytest.mark.slow
def test_fixed_size_vit_is_refused_and_dynamic_img_size_vit_is_exported(tmp_path):
    torch.manual_seed(0)
    fixed = timm.create_model("vit_tiny_patch16_224", img_size=64).eval()
    with pytest.raises(ExportError, match=r"cannot be exported with a dynamic spatial size: it does not run at "
                                          r"96×96 \(AssertionError: Input height \(96\) doesn't match model"):
        export(fixed, tmp_path / "vit.pt2", "export", small_input(1, 64), dynamic_spatial=True)
    assert list(tmp_path.iterdir()) == []
    free = timm.create_model("vit_tiny_patch16_224", img_size=64, dynamic_img_size=True).eval()
    result = export(free, tmp_path / "vit.pt2", "export", small_input(1, 64), dynamic_spatial=True)
    assert result.dynamic_spatial is True and result.max_abs_diff == 0.0
    x = torch.randn(2, 3, 128, 80)
    with torch.no_grad():
        assert torch.equal(torch.export.load(str(result.path)).module()(x), free(x))


@pytest.mark.parametrize("fmt", ["safetensors", "timm", "torchscript"])
def test_dynamic_spatial_is_refused_for_formats_that_keep_no_graph(edited, tmp_path, fmt):
    with pytest.raises(ExportError, match=f"a dynamic spatial size applies to the formats that trace a graph "
                                          f"\\(export, onnx\\), not '{fmt}'"):
        export(edited, tmp_path / NAMES[fmt], fmt, small_input(1, 64), dynamic_spatial=True)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.slow
def test_cli_dynamic_spatial(capsys, tmp_path, monkeypatch):
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--format", "onnx", "--dynamic-spatial",
                         "--out", str(tmp_path / "o"), "--input-size", "3,64,64", "--json")
    assert code == 0, err
    exported = json.loads(out)["export"]
    assert exported["dynamic_spatial"] is True and exported["checked_sizes"] == [[64, 64], [96, 96]]
    assert exported["max_abs_diff"] < 1e-4
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(capsys, "resnet18", "--weights", "none", "--dynamic-spatial", "--out", "X",
                         "--input-size", "3,64,64")
    assert code == 2 and out == "" and err.count("\n") == 1, err
    assert "a dynamic spatial size applies to the formats that trace a graph (export, onnx), not 'safetensors'" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["o"]


@pytest.mark.slow
def test_an_edited_vit_scripts_with_the_same_output_in_train_and_eval():
    """The dispatcher between a block's traced variants (ViT's Block takes attn_mask=None) is compiled for
    torch.jit.script as code of its own; the block itself keeps its Python forward."""
    import timm

    torch.jit._recursive.concrete_type_store.type_store.clear()
    torch.manual_seed(0)
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8).eval()
    edited = se_retrofit.retrofit(base, example_input=torch.randn(1, 3, 32, 32))
    with torch.no_grad():
        for p in se_retrofit.attention_parameters(edited):
            p.add_(0.05)
    scripted = torch.jit.script(edited)
    x = torch.randn(2, 3, 32, 32)
    for training in (False, True):
        scripted.train(training), edited.train(training)
        torch.manual_seed(0)
        expected = edited(x)
        torch.manual_seed(0)
        assert torch.equal(scripted(x), expected)
    mask = torch.zeros(17, 17)
    block = edited.blocks[0].eval()
    tokens = torch.randn(2, 17, 192)
    assert torch.equal(torch.jit.script(block)(tokens, mask), block(tokens, mask))
    assert type(edited.blocks[0]).forward.__name__ == "forward" and se_retrofit.edited.is_edited(edited.blocks[0])
    torch.jit._recursive.concrete_type_store.type_store.clear()
