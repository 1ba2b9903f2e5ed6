"""se-retrofit finetune: learning on a synthetic ImageFolder, outputs, resume, two processes, errors.

The data is made here: 3 classes of 32x32 noise images, each class with one colour channel raised
a little (chance is 1/3). The model is recipes/resnet18-se-quick.yaml with random weights.
"""
from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

import se_retrofit
from se_retrofit import finetune
from se_retrofit.finetune.cli import main
from se_retrofit.finetune.plot import COLUMNS, PNG_SIGNATURE
from se_retrofit.finetune.distributed import Context
from se_retrofit.finetune.trainer import build_model, start_phase

ROOT = Path(__file__).resolve().parents[1]
QUICK = ROOT / "recipes" / "resnet18-se-quick.yaml"
FAST = ["--weights", "none", "--image-size", "32", "--workers", "0", "--no-progress"]
EPOCHS = [1, 2]  # new-modules, full


def make_images(root: Path, per_class: int = 24, size: int = 32, signal: int = 40) -> Path:
    """red / green / blue folders of noise images, the class's channel raised by ``signal``."""
    rng = np.random.default_rng(0)
    for index, name in enumerate(("red", "green", "blue")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            image = rng.uniform(0, 200, (size, size, 3))
            image[..., index] += signal
            Image.fromarray(image.clip(0, 255).astype(np.uint8)).save(root / name / f"{i:03d}.png")
    return root


@pytest.fixture(scope="module")
def images(tmp_path_factory) -> Path:
    return make_images(tmp_path_factory.mktemp("images"))


@pytest.fixture(scope="module")
def trained(images, tmp_path_factory):
    out = tmp_path_factory.mktemp("run") / "quick"
    return finetune.run(QUICK, images, out=out, epochs=EPOCHS, weights="none", image_size=32, workers=0,
                        progress=False)


def cli(capsys, *args) -> tuple[int, str, str]:
    code = main([str(a) for a in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def read_rows(path: Path) -> list[dict]:
    with open(path, newline="") as file:
        return list(csv.DictReader(file))


@pytest.mark.slow
def test_loss_falls_and_accuracy_rises_above_chance(trained):
    rows = trained.metrics
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert [r["phase"] for r in rows] == ["new-modules", "full", "full"]
    assert rows[-1]["train_loss"] < 0.6 * rows[0]["train_loss"]
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    assert rows[0]["train_acc"] < 0.6  # it starts near chance ...
    assert rows[-1]["val_acc"] >= 0.7 and rows[-1]["train_acc"] >= 0.7  # ... and learns (chance: 1/3)


def test_run_writes_checkpoint_csv_plot_and_recipe(trained):
    out = trained.out
    assert sorted(p.name for p in out.iterdir()) == [".se-retrofit-manifest.json", "checkpoint.pt", "curves.png",
                                                     "metrics.csv", "model", "recipe.yaml"]  # no temporary files,
    # no lock left
    rows = read_rows(out / "metrics.csv")
    assert tuple(rows[0]) == COLUMNS and [int(r["epoch"]) for r in rows] == [1, 2, 3]
    png = (out / "curves.png").read_bytes()
    assert png.startswith(PNG_SIGNATURE)
    from matplotlib.image import imread

    assert imread(out / "curves.png").shape[:2] == (400, 1000)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert (state["epoch"], state["phase"], len(state["metrics"])) == (3, 1, 3)
    assert state["run"]["classes"] == ["blue", "green", "red"] and state["run"]["world_size"] == 1
    assert finetune.load_recipe(out / "recipe.yaml").phases[1].epochs == 2


def test_final_save_loads_with_the_trained_outputs(trained):
    loaded = se_retrofit.load(trained.final).eval()
    model = trained.model.eval()
    own = {k: v for k, v in model.state_dict().items()}
    assert all(torch.equal(own[k], v) for k, v in loaded.state_dict().items())
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(loaded(x), model(x.contiguous(memory_format=torch.channels_last)),
                                   rtol=1e-5, atol=1e-5)
    assert se_retrofit.record_of(loaded).base["create_kwargs"] == {"num_classes": 3}


def test_phase_one_trains_the_new_modules_and_the_head_then_all(images, tmp_path):
    recipe = finetune.load_recipe(QUICK).with_overrides(epochs=[1, 1], weights="none", image_size=32, workers=0)
    plan = finetune.plan_run(recipe, finetune.Options(data=images, out=tmp_path / "unused"))
    _, model, *_ = build_model(plan, finetune.Options())
    context = Context.from_env({}, "cpu")
    _, optimizer, _ = start_phase(model, 0, recipe, steps_per_epoch=4, context=context)
    trainable = {name for name, p in model.named_parameters() if p.requires_grad}
    assert trainable == {n for n, _ in model.named_parameters() if ".se." in n or n.startswith("fc.")}
    assert {g["name"]: g["lr"] for g in optimizer.param_groups} == {  # the head is named as such (issue 21)
        "head": 0.05, "head_no_decay": 0.05, "attention": 0.05, "attention_no_decay": 0.05}
    _, optimizer, _ = start_phase(model, 1, recipe, steps_per_epoch=4, context=context)
    assert all(p.requires_grad for p in model.parameters())
    assert {g["name"]: g["lr"] for g in optimizer.param_groups}["attention"] == pytest.approx(0.1)
    assert not (tmp_path / "unused").exists()


@pytest.mark.slow
def test_resume_continues_after_the_last_finished_epoch(trained, images, tmp_path, capsys):
    out = tmp_path / "resumed"
    args = [QUICK, "--data", images, "--out", out, "--epochs", "1,2", *FAST]
    code, first, err = cli(capsys, *args, "--stop-after-epoch", "2")  # as if killed during epoch 3
    assert code == 0, err
    assert "epoch  2/3" in first and "epoch  3/3" not in first and not (out / "model").exists()
    (out / ".checkpoint.pt.abc.tmp").write_bytes(b"torn write of a killed run")
    code, second, err = cli(capsys, *args, "--resume")
    assert code == 0, err
    assert "resuming after epoch 2" in second  # in the middle of phase 2: optimiser and scheduler states
    printed = [line.split()[1] for line in second.splitlines() if line.startswith("epoch ")]
    assert printed == ["3/3"]
    epochs = [int(r["epoch"]) for r in read_rows(out / "metrics.csv")]
    assert epochs == [1, 2, 3]  # no duplicates, none missing
    # the same run uninterrupted gives the same numbers: states (optimizer, scheduler, RNG) came back
    for row, reference in zip(read_rows(out / "metrics.csv"), trained.metrics):
        assert float(row["train_loss"]) == pytest.approx(reference["train_loss"], rel=1e-3)
        assert float(row["val_acc"]) == pytest.approx(reference["val_acc"], abs=1e-6)
    assert se_retrofit.load(out / "model") is not None


@pytest.mark.slow
def test_resume_after_a_real_kill(images, tmp_path):
    """SIGKILL the run once its first checkpoint is on disk; --resume carries on from that epoch."""
    import signal
    import time

    out = tmp_path / "killed"
    command = [sys.executable, "-m", "se_retrofit", "finetune", str(QUICK), "--data", str(images), "--out",
               str(out), "--epochs", "1,15", *FAST]
    process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, cwd=tmp_path,
                               env={**os.environ, "OMP_NUM_THREADS": "1"})
    deadline = time.monotonic() + 120
    while not (out / "checkpoint.pt").exists() and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.02)
    process.send_signal(signal.SIGKILL)
    process.wait()
    assert process.returncode == -signal.SIGKILL, "the run ended before it could be killed"
    assert not (out / "model").exists()
    saved = torch.load(out / "checkpoint.pt", weights_only=True)["epoch"]
    assert 1 <= saved < 16
    result = subprocess.run(command + ["--resume"], capture_output=True, text=True, cwd=tmp_path, timeout=300,
                            env={**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"})
    assert result.returncode == 0, result.stderr[-2000:]
    assert f"resuming after epoch {saved}" in result.stdout
    printed = [line.split()[1] for line in result.stdout.splitlines() if line.startswith("epoch ")]
    assert printed[0] == f"{saved + 1}/16" and printed[-1] == "16/16"
    assert [int(r["epoch"]) for r in read_rows(out / "metrics.csv")] == list(range(1, 17))
    assert se_retrofit.load(out / "model") is not None


def test_resume_refuses_a_checkpoint_of_another_recipe(trained, images, capsys):
    before = {p.name: p.stat().st_mtime_ns for p in trained.out.iterdir()}
    code, _, err = cli(capsys, QUICK, "--data", images, "--out", trained.out, "--epochs", "1,3", *FAST, "--resume")
    assert code == 2
    assert err.startswith("se-retrofit: error: checkpoint") and "belongs to another recipe" in err
    assert "phases[1].epochs (2 vs 3)" in err and len(err.strip().splitlines()) == 1
    assert {p.name: p.stat().st_mtime_ns for p in trained.out.iterdir()} == before


@pytest.mark.parametrize("model", ["resnet18", "torchvision:resnet18"])
@pytest.mark.slow
def test_export_only_writes_a_loadable_retrofitted_model(model, tmp_path, capsys):
    recipe = _write(tmp_path / "r.yaml", QUICK.read_text().replace("model: resnet18", f"model: {model}"))
    code, out, err = cli(capsys, recipe, "--export-only", "--out", tmp_path / "x", "--weights", "none",
                         "--image-size", "32", "--num-classes", "5")
    assert code == 0, err
    assert "identity check: max |Δ| = 0" in out
    loaded = se_retrofit.load(tmp_path / "x" / "model").eval()
    assert len(se_retrofit.record_of(loaded).sites) == 8
    assert loaded(torch.randn(1, 3, 32, 32)).shape == (1, 5)


@pytest.mark.slow
def test_two_processes_with_gloo(images, tmp_path):
    out = tmp_path / "ddp"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "se_retrofit", "finetune", str(QUICK), "--data", str(images), "--out", str(out),
               "--epochs", "1,1", *FAST]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "COLUMNS": "160"}
    result = subprocess.run(command, capture_output=True, text=True, timeout=300, env=env, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert sum("2 processes" in line for line in lines) == 1  # only rank 0 prints
    assert [line.split()[1] for line in lines if line.startswith("epoch ")] == ["1/2", "2/2"]
    assert sorted(p.name for p in out.iterdir()) == [".se-retrofit-manifest.json", "checkpoint.pt", "curves.png",
                                                     "metrics.csv", "model", "recipe.yaml"]  # no lock left behind
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert state["run"]["world_size"] == 2 and len(state["rng"]) == 2 and state["epoch"] == 2
    assert [int(r["epoch"]) for r in read_rows(out / "metrics.csv")] == [1, 2]
    se_retrofit.load(out / "model")


# --- errors: one line, exit code 2, nothing written ---------------------------------------------

def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


BAD_RECIPES = {
    "unknown key": ("name: x\nmodel: resnet18\nretrofit: {}\nphases: [{name: a, epochs: 1, lrr: 0.1}]\n",
                    "unknown key 'phases[0].lrr'; did you mean 'lr'?"),
    "bad value": ("name: x\nmodel: resnet18\nretrofit: {}\nphases: [{name: a, epochs: two, lr: 0.1}]\n",
                  "phases[0].epochs must be a whole number from 1 to 100000, got 'two'"),
    "missing key": ("name: x\nmodel: resnet18\nretrofit: {}\n", "missing key 'phases'"),
    "r alias": ("name: x\nmodel: resnet18\nretrofit: {r: 8}\nphases: [{name: a, epochs: 1, lr: 0.1}]\n",
                "unknown key 'retrofit.r'; did you mean 'reduction'?"),
    "bad position": ("name: x\nmodel: resnet18\nretrofit: {position: middle}\n"
                     "phases: [{name: a, epochs: 1, lr: 0.1}]\n", "retrofit: unknown position 'middle'"),
    "unknown model": ("name: x\nmodel: resnet19\nretrofit: {}\nphases: [{name: a, epochs: 1, lr: 0.1}]\n",
                      "model: unknown model 'resnet19'"),
    "not yaml": ("name: x\nmodel: [resnet18\n", "not valid YAML at line 3"),
    "not a mapping": ("- just\n- a list\n", "the recipe must be a mapping"),
    "checkpoint_path": ("name: x\nmodel: resnet18\nretrofit: {}\nmodel_kwargs: {checkpoint_path: w.pth}\n"
                        "phases: [{name: a, epochs: 1, lr: 0.1}]\n",
                        "model_kwargs.checkpoint_path would make the library load weights itself"),
}


@pytest.mark.parametrize("case", sorted(BAD_RECIPES))
def test_bad_recipe_is_one_line_naming_the_key(case, images, tmp_path, capsys):
    text, expected = BAD_RECIPES[case]
    recipe = _write(tmp_path / "bad.yaml", text)
    code, out, err = cli(capsys, recipe, "--data", images, "--out", tmp_path / "out", *FAST)
    assert code == 2 and out == ""
    assert err.startswith(f"se-retrofit: error: {recipe}: ") and expected in err, err
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def _empty_class(root: Path) -> Path:
    make_images(root, per_class=2)
    (root / "purple").mkdir()
    return root


def _no_classes(root: Path) -> Path:
    root.mkdir()
    (root / "loose.png").write_bytes(b"")
    return root


def _train_only(root: Path) -> Path:
    make_images(root / "train", per_class=2)
    return root


def _one_class(root: Path) -> Path:
    make_images(root, per_class=2)
    for name in ("green", "blue"):
        for file in (root / name).iterdir():
            file.unlink()
        (root / name).rmdir()
    return root


BAD_DATA = {
    "missing": (lambda root: root, "data directory {root} does not exist"),
    "empty class folder": (_empty_class, "class folder {root}/purple holds no images"),
    "no class folders": (_no_classes, "{root} has no class folders"),
    "train without val": (_train_only, "{root}/train exists but {root}/val does not"),
    "one class": (_one_class, "{root} has one class folder (red); classification needs at least two"),
}


@pytest.mark.parametrize("case", sorted(BAD_DATA))
def test_bad_data_is_one_line(case, tmp_path, capsys):
    make, expected = BAD_DATA[case]
    root = make(tmp_path / "data")
    code, out, err = cli(capsys, QUICK, "--data", root, "--out", tmp_path / "out", *FAST)
    assert code == 2 and err.startswith(f"se-retrofit: error: {expected.format(root=root)}"), err
    assert len(err.strip().splitlines()) == 1 and out == ""
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("args, expected", [
    ([], "--data DIR is required"),
    (["--epochs", "0"], "argument --epochs: must be a total such as 10"),
    (["--epochs", "1,1,1"], "--epochs takes one total or one number per phase (2)"),
    (["--resume"], "nothing to resume"),
    (["--stop-after-epoch", "9"], "--stop-after-epoch must be between 1 and 6"),
    (["--num-classes", "2"], "--num-classes 2 is fewer than the 3 class folders"),
    (["--weights", "nowhere.safetensors"], "weights file nowhere.safetensors does not exist"),
    (["--device", "cuda:0"] if not torch.cuda.is_available() else ["--device", "tpu"], "device"),
    (["--lr", "fast"], "argument --lr: must be a positive number, got 'fast'"),
])
def test_bad_options_are_one_line(args, expected, images, tmp_path, capsys):
    data = [] if not args else ["--data", images]
    code, _, err = cli(capsys, QUICK, *data, "--out", tmp_path / "out", *FAST, *args)  # the last --weights wins
    assert code == 2 and expected in err, err
    assert err.startswith("se-retrofit: error: ") and len(err.strip().splitlines()) == 1
    assert not (tmp_path / "out").exists()


def test_an_existing_run_is_not_overwritten_without_asking(trained, images, capsys):
    code, _, err = cli(capsys, QUICK, "--data", images, "--out", trained.out, *FAST)
    assert code == 2 and "already holds a run" in err and "--resume" in err


def test_single_folder_split_is_deterministic_and_stratified(images):
    a = finetune.find_splits(images, val_fraction=0.2)
    b = finetune.find_splits(images, val_fraction=0.2)
    assert a == b and a.layout == "split"
    assert [sum(1 for _, c in a.val if c == k) for k in range(3)] == [5, 5, 5]
    assert not {p for p, _ in a.train} & {p for p, _ in a.val}


def test_validation_images_are_decoded_once_when_they_fit(images, monkeypatch):
    import timm
    from se_retrofit.finetune import data
    from se_retrofit.finetune.recipe import DataSpec

    splits = finetune.find_splits(images, val_fraction=0.2)
    transforms = data.build_transforms(data.data_config(timm.create_model("resnet18"), 32), DataSpec(image_size=32))
    reads = []
    monkeypatch.setattr(data.ImageList, "_read", lambda self, i, read=data.ImageList._read: reads.append(i)
                        or read(self, i))
    _, val = data.build_loaders(splits, transforms, batch_size=4, workers=0, seed=0, image_bytes=4 * 3 * 32 * 32)
    first, second = [torch.cat([x for x, _ in val]) for _ in range(2)]
    assert torch.equal(first, second) and sorted(reads) == list(range(len(splits.val)))  # read once each
    reads.clear()
    _, val = data.build_loaders(splits, transforms, batch_size=4, workers=0, seed=0,
                                image_bytes=data.VAL_CACHE_BYTES)  # too large to keep: read every epoch
    assert torch.equal(torch.cat([x for x, _ in val]), first) and torch.equal(torch.cat([x for x, _ in val]), first)
    assert len(reads) == 2 * len(splits.val)


@pytest.mark.slow
@pytest.mark.parametrize("first_drawing", [1e6, 0.0])
def test_curves_are_drawn_after_the_last_epoch_and_earlier_only_within_their_share(images, tmp_path, monkeypatch,
                                                                                    first_drawing):
    from se_retrofit.finetune import trainer

    drawn, draw = [], trainer.plot_curves  # the number of epochs in the CSV at each drawing
    monkeypatch.setattr(trainer, "DRAWING_SECONDS", first_drawing)  # what the first drawing is taken to cost
    monkeypatch.setattr(trainer, "plot_curves", lambda csv, *a, **k: drawn.append(len(read_rows(csv)))
                        or draw(csv, *a, **k))
    finetune.run(QUICK, images, out=tmp_path / "run", epochs=[1, 2], weights="none", image_size=32, workers=0,
                 progress=False)
    assert drawn[-1] == 3 and (tmp_path / "run" / "curves.png").stat().st_size > 0  # always after the last
    if first_drawing:
        assert drawn == [3]  # a drawing expected to cost more than 5% of the run so far is not made
    else:
        assert drawn[0] == 1  # expected to cost nothing: made after epoch 1 (then the last one's time decides)


def test_train_and_val_folders_are_used_as_given(tmp_path):
    make_images(tmp_path / "train", per_class=3)
    make_images(tmp_path / "val", per_class=1)
    splits = finetune.find_splits(tmp_path)
    assert splits.layout == "train/val" and (len(splits.train), len(splits.val)) == (9, 3)


@pytest.mark.parametrize("workers", [0, 1])
@pytest.mark.slow
def test_a_corrupt_image_is_one_line_and_leaves_nothing(workers, tmp_path, capsys):
    data = make_images(tmp_path / "data", per_class=4)
    broken = data / "red" / "001.png"
    broken.write_bytes(b"\x89PNG\r\n\x1a\n not an image")
    out = tmp_path / "runs" / "quick"
    args = [QUICK, "--data", data, "--out", out, "--epochs", "1,1", "--batch-size", "4", "--device", "cpu",
            "--weights", "none", "--image-size", "32", "--workers", workers, "--no-progress"]
    code, stdout, err = cli(capsys, *args)
    print(err)
    assert code == 2
    # UnidentifiedImageError from PIL; where a library imported earlier in the process patched PIL.Image.open
    # (ultralytics, by tests/test_zoo*.py), what its patch raised, named as such
    assert err.startswith(f"se-retrofit: error: cannot read image {broken}: UnidentifiedImageError: ") or \
        err.startswith(f"se-retrofit: error: cannot read image {broken}: PIL.Image.open (patched by ")
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # no recipe.yaml, not even runs/
    broken.unlink()
    code, stdout, err = cli(capsys, *args)  # the retry is not refused
    assert code == 0, err
    assert sorted(p.name for p in out.iterdir()) == [".se-retrofit-manifest.json", "checkpoint.pt", "curves.png",
                                                     "metrics.csv", "model", "recipe.yaml"]


def test_checkpoint_path_in_model_kwargs_never_reaches_torch_load(tmp_path, monkeypatch):
    torch.save(timm_state(), tmp_path / "w.pth")
    text = QUICK.read_text() + "model_kwargs: {checkpoint_path: %s}\n" % (tmp_path / "w.pth")
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load was called"))
    with pytest.raises(finetune.RecipeError, match="model_kwargs.checkpoint_path would make the library load"):
        finetune.run(finetune.Recipe.from_yaml(text), tmp_path, out=tmp_path / "run", export_only=True)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["w.pth"]


def test_weights_file_through_the_reader_is_recorded(tmp_path, capsys):
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in timm_state().items()}, str(tmp_path / "w.safetensors"))
    out = tmp_path / "run"
    code, stdout, err = cli(capsys, QUICK, "--export-only", "--out", out, "--weights", tmp_path / "w.safetensors",
                            "--image-size", "32")
    assert code == 0, err
    config = se_retrofit.io.read_config(out / "model")
    assert config["base"]["weights"] == f"file {tmp_path / 'w.safetensors'}"


def timm_state():
    import timm

    return timm.create_model("resnet18").state_dict()


class _Double(torch.nn.Module):
    """An attention type whose init_identity doubles its input."""

    def __init__(self, channels, **_):
        super().__init__()
        self.weight = torch.nn.Parameter(torch.full((1,), 2.0))

    def init_identity(self):
        torch.nn.init.constant_(self.weight, 2.0)

    def forward(self, x):
        return x * self.weight


def test_export_only_refuses_a_model_that_is_not_the_identity(tmp_path, capsys):
    from se_retrofit.attention import register_attention, unregister_attention

    text = QUICK.read_text().replace("attention: se", "attention: double_ft").replace("  reduction: 16           # r\n", "")
    register_attention("double_ft")(_Double)
    try:
        recipe = _write(tmp_path / "r.yaml", text)
        code, out, err = cli(capsys, recipe, "--export-only", "--out", tmp_path / "run", "--weights", "none",
                             "--image-size", "32")
    finally:
        unregister_attention("double_ft")
    print(err)
    assert code == 2 and err.startswith("se-retrofit: error: identity check failed: max |Δ| = ")
    assert "on trained-like statistics on a copy (the weights are random)" in err and "nothing was written" in err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]


@pytest.mark.parametrize("total, warmup", [(10, 0), (37, 5), (8, 3)])
def test_schedule_is_timms_cosine_after_the_warm_up(total, warmup):
    """warmup_cosine against timm's CosineLRScheduler (t_initial = steps after the warm-up, warmup_prefix):
    the same rate at every step after the warm-up; inside it, timm starts every group at warmup_lr_init
    (here 0) and reaches the base at step w, warmup_cosine starts at base/w and reaches it at w-1."""
    from timm.scheduler import CosineLRScheduler
    from se_retrofit.finetune.trainer import warmup_cosine

    base = 0.05
    optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=base)
    timm_schedule = CosineLRScheduler(optimizer, t_initial=total - warmup, lr_min=0.0, warmup_t=warmup,
                                      warmup_lr_init=0.0, warmup_prefix=True, t_in_epochs=False)
    ours = warmup_cosine(total, warmup)
    timm_rates = [timm_schedule._get_lr(step)[0] for step in range(total)]
    assert [base * ours(step) for step in range(warmup, total)] == pytest.approx(timm_rates[warmup:], rel=1e-12,
                                                                                  abs=1e-15)
    assert [base * ours(step) for step in range(warmup)] == pytest.approx(
        [base * (step + 1) / warmup for step in range(warmup)])
    assert timm_rates[:warmup] == pytest.approx([base * step / warmup for step in range(warmup)])

