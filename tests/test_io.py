"""Save and load: files written, read back, strict, atomic."""
import json

import pytest
import timm
import torch
from safetensors.torch import load_file

import se_retrofit
from se_retrofit import io as se_io
from se_retrofit.hub import WeightsError

from helpers import make_model, small_input


@pytest.fixture(scope="module")
def edited():
    model = se_retrofit.retrofit(make_model("timm", "resnet18"), position="post", stages=[3, 4], reduction=8)
    with torch.no_grad():
        model.layer3[0].se.fc2.bias.fill_(0.5)  # as if fine-tuned: no longer the identity
    return model.eval()


def test_round_trip_recreates_the_base(tmp_path, edited):
    path = se_retrofit.save(edited, tmp_path / "out")
    assert sorted(p.name for p in path.iterdir()) == [
        "attention.safetensors", "model.safetensors", "probe.safetensors", "retrofit_config.json"]
    again = se_retrofit.load(path).eval()
    assert type(again) is type(edited)
    x = small_input(1)
    with torch.no_grad():
        assert torch.equal(again(x), edited(x))


def test_config_records_everything(tmp_path, edited):
    config = json.loads((se_retrofit.save(edited, tmp_path / "out") / "retrofit_config.json").read_text())
    assert config["config"] == {"attention": "se", "position": "post", "reduction": 8, "divisor": None,
                                "stages": [3, 4], "blocks": None, "every": None, "exclude": None, "init": "identity",
                                "options": {}, "kinds": None, "max_attention_mib": 64.0, "attention_module": None}
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


@pytest.mark.slow
def test_loading_onto_a_mismatched_base_names_the_keys(tmp_path, edited):
    path = se_retrofit.save(edited, tmp_path / "out")
    with pytest.raises(se_io.VerificationError, match=r"not the saved model: layer1\.2: saved no module, rebuilt "
                                                      r"BasicBlock\(\).*base_model passed is not built like"):
        se_retrofit.load(path, base_model=timm.create_model("resnet34"))
    with pytest.raises(WeightsError, match=r"do not match the model: missing 96 \(layer1\.2\.bn1\.bias"):
        se_retrofit.load(path, base_model=timm.create_model("resnet34"), verify=False)
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
    monkeypatch.setattr(se_io, "_write", lambda *a: (_ for _ in ()).throw(OSError(28, "No space left on device")))
    with pytest.raises(se_io.SaveError, match="No space left on device"):
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


def test_round_trip_of_a_module_with_two_blocks(tmp_path):
    """A transformer block adds twice (attention, then MLP): its units are ``blocks.0`` and
    ``blocks.0@1``, and the second name must read back (the schema once took it for a damaged path)."""
    base = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2)
    x = torch.randn(1, 3, 32, 32)
    model = se_retrofit.retrofit(base, example_input=x).eval()
    assert [s.unit for s in model.se_retrofit.edits[-1][1]] == ["blocks.0", "blocks.0@1", "blocks.1", "blocks.1@1"]
    again = se_retrofit.load(se_retrofit.save(model, tmp_path / "out"), base).eval()
    with torch.no_grad():
        assert torch.equal(again(x), model(x))


@pytest.mark.parametrize("attention,position", [("cbam", "standard"), ("bam", "stage"), ("eca", "inner"),
                                                ("se", "pre")])
@pytest.mark.slow
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


# --- what save refuses, and what it leaves behind ------------------------------------------------------

def test_overwrite_refuses_a_plain_file(tmp_path, edited):
    notes = tmp_path / "notes.txt"
    notes.write_text("mine")
    with pytest.raises(se_io.SaveError, match="is a file, not a saved model directory; refusing to replace it"):
        se_retrofit.save(edited, notes, overwrite=True)
    assert notes.read_text() == "mine" and sorted(p.name for p in tmp_path.iterdir()) == ["notes.txt"]


def test_overwrite_refuses_a_directory_that_is_not_a_saved_model(tmp_path, edited):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "cat.jpg").write_bytes(b"jpeg")
    with pytest.raises(se_io.SaveError, match="not a saved se_retrofit model"):
        se_retrofit.save(edited, tmp_path / "photos", overwrite=True)
    assert [p.name for p in (tmp_path / "photos").iterdir()] == ["cat.jpg"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["photos"]


def test_the_current_directory_is_refused(tmp_path, edited, monkeypatch):
    (tmp_path / "retrofit_config.json").write_text("{}")  # even one that looks like a saved model
    monkeypatch.chdir(tmp_path)
    for target in (".", str(tmp_path), str(tmp_path.parent)):
        with pytest.raises(se_io.SaveError, match="current directory"):
            se_retrofit.save(edited, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["retrofit_config.json"]  # no hidden .old left


def test_a_target_appearing_during_the_save_is_never_replaced(tmp_path, edited, monkeypatch):
    target = tmp_path / "out"
    real = se_io._write

    def another_run_finishes_first(*args):
        real(*args)
        target.mkdir()
        (target / "retrofit_config.json").write_text("the other run's")

    monkeypatch.setattr(se_io, "_write", another_run_finishes_first)
    with pytest.raises(se_io.SaveError, match="appeared while this model was being saved"):
        se_retrofit.save(edited, target)
    assert (target / "retrofit_config.json").read_text() == "the other run's"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # no staging left


def test_an_empty_directory_appearing_is_not_replaced_either(tmp_path, edited, monkeypatch):
    target = tmp_path / "out"
    real = se_io._write
    monkeypatch.setattr(se_io, "_write", lambda *args: (real(*args), target.mkdir()))
    with pytest.raises(se_io.SaveError, match="appeared"):
        se_retrofit.save(edited, target)
    assert list(target.iterdir()) == []


def test_two_saves_at_once_one_wins_the_other_refuses(tmp_path, edited):
    import threading

    target, outcomes, barrier = tmp_path / "out", [], threading.Barrier(2)
    real = se_io._replace_dir

    def synchronised(staging, path, overwrite=True):
        barrier.wait(timeout=60)  # both have written everything; both rename now
        return real(staging, path, overwrite)

    def save():
        try:
            se_retrofit.save(edited, target)
            outcomes.append("saved")
        except se_io.SaveError as error:
            outcomes.append(str(error))

    se_io._replace_dir, restore = synchronised, real
    try:
        threads = [threading.Thread(target=save) for _ in range(2)]
        [t.start() for t in threads]
        [t.join(120) for t in threads]
    finally:
        se_io._replace_dir = restore
    print(outcomes)
    assert sorted(outcomes)[1] == "saved" and "appeared while this model was being saved" in sorted(outcomes)[0]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]
    assert se_retrofit.load(target) is not None


def test_parent_directories_made_for_a_failed_save_are_removed(tmp_path, edited, monkeypatch):
    monkeypatch.setattr(se_io, "_write", lambda *a: (_ for _ in ()).throw(OSError(5, "Input/output error")))
    with pytest.raises(se_io.SaveError, match="Input/output error"):
        se_retrofit.save(edited, tmp_path / "a" / "b" / "out")
    assert list(tmp_path.iterdir()) == []


def test_save_under_a_file_is_refused(tmp_path, edited):
    (tmp_path / "afile").write_text("x")
    with pytest.raises(se_io.SaveError, match="is a file, not a directory"):
        se_retrofit.save(edited, tmp_path / "afile" / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


KILLED_MID_SAVE = """
import os, signal, sys, timm, se_retrofit
from se_retrofit import io
model = se_retrofit.retrofit(timm.create_model("resnet18"))
real = io._write
def write_then_die(*args):
    real(*args)
    print(args[-1], flush=True)
    os.kill(os.getpid(), signal.SIGKILL)  # killed mid-save: no finally runs
io._write = write_then_die
se_retrofit.save(model, sys.argv[1])
"""


@pytest.mark.slow
def test_staging_left_by_a_killed_save_is_removed_by_the_next_save(tmp_path, edited):
    import os
    import subprocess
    import sys

    result = subprocess.run([sys.executable, "-c", KILLED_MID_SAVE, str(tmp_path / "out")], capture_output=True,
                            text=True, timeout=300, env={**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)})
    assert result.returncode == -9, result.stderr
    left = [p.name for p in tmp_path.iterdir()]
    assert len(left) == 1 and left[0].startswith(".out.se-retrofit-") and left[0].endswith(".partial")
    alive = tmp_path / f".other.se-retrofit-{os.getppid()}-abc.partial"  # a running process's: kept
    alive.mkdir()
    se_retrofit.save(edited, tmp_path / "other")
    print(left, "->", sorted(p.name for p in tmp_path.iterdir()))
    assert sorted(p.name for p in tmp_path.iterdir()) == [alive.name, "other"]


def test_a_previous_save_moved_aside_by_a_killed_overwrite_is_put_back(tmp_path, edited):
    import subprocess
    import sys

    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    pid = int(dead.stdout)  # a process that has exited
    aside = tmp_path / f".out.se-retrofit-{pid}-x1y2.old"
    se_retrofit.save(edited, aside / "previous")  # killed between moving the old save aside and the new in
    se_retrofit.save(edited, tmp_path / "other")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["other", "out"]
    assert (tmp_path / "out" / "retrofit_config.json").is_file()


def test_a_long_valid_name_saves_and_overwrites(tmp_path, edited):
    """A 250-byte name is valid on Linux: the staging directory's own name must not push it past 255."""
    target = tmp_path / ("m" * 250)
    se_retrofit.save(edited, target)
    se_retrofit.save(edited, target, overwrite=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]
    x = small_input()
    assert torch.equal(se_retrofit.load(target).eval()(x), edited.eval()(x))


def test_a_killed_overwrite_of_a_long_name_puts_the_previous_save_back(tmp_path, edited):
    target = tmp_path / ("m" * 250)
    se_retrofit.save(edited, target)
    old = tmp_path / (se_io._staging_prefix(target).replace(str(se_io.os.getpid()), "999999999") + "x.old")
    old.mkdir()
    (old / "place").write_text(target.name)
    target.rename(old / "previous")
    se_io.remove_stale_staging(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == [target.name]


@pytest.mark.parametrize("kind", ["loop", "dangling"])
def test_a_symbolic_link_is_named_for_what_it_is(tmp_path, edited, kind):
    link = tmp_path / "link"
    link.symlink_to(link if kind == "loop" else tmp_path / "gone")
    expected = "symbolic link in a loop" if kind == "loop" else "symbolic link to .*, which does not exist"
    with pytest.raises(se_retrofit.RetrofitError, match=expected):
        se_retrofit.save(edited, link, overwrite=True)
    assert link.is_symlink()
