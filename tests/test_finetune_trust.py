"""``se-retrofit finetune`` keeps its promises under hostile input: one run per output directory,
``--overwrite`` removes only what the tool wrote, a damaged checkpoint or an out-of-range number is one
line with exit code 2, and ``--weights none`` reads no weights from anywhere."""
from __future__ import annotations

import copy
import errno
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from se_retrofit.finetune import outdir
from se_retrofit.finetune.checkpoint import CHECKPOINT_FILE, restoring
from se_retrofit.finetune.cli import main
from se_retrofit.finetune.recipe import load_recipe
from se_retrofit.finetune.trainer import Options, build_model, plan_run, start_phase
from se_retrofit.finetune import distributed
from se_retrofit.errors import RetrofitError

ROOT = Path(__file__).resolve().parents[1]
RECIPE = """name: tiny
model: resnet18
weights: none
retrofit: {attention: se, position: standard}
data: {image_size: 32, val_fraction: 0.25}
train: {batch_size: 4, workers: 0, amp: false, channels_last: false}
phases:
  - {name: new-modules, trainable: new, epochs: 1, lr: 0.01}
  - {name: full, trainable: all, epochs: 1, lr: 0.001}
"""


def make_images(root: Path, per_class: int = 4) -> Path:
    for index, name in enumerate(("cat", "dog")):
        (root / name).mkdir(parents=True)
        for i in range(per_class):
            Image.new("RGB", (32, 32), (60 * i, 100 * index, 200)).save(root / name / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def workspace(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("trust")
    (root / "r.yaml").write_text(RECIPE)
    make_images(root / "data")
    return root


@pytest.fixture(scope="module")
def stopped_run(workspace) -> Path:
    """A run stopped after epoch 1 of 2: a valid checkpoint to damage."""
    out = workspace / "stopped"
    assert main([str(workspace / "r.yaml"), "--data", str(workspace / "data"), "--out",
                 str(out), "--stop-after-epoch", "1", "--no-progress", "--device", "cpu"]) == 0
    return out


def run_cli(capsys, *args) -> tuple[int, list[str]]:
    code = main([str(a) for a in args])
    err = capsys.readouterr().err
    assert "Traceback" not in err and "internal error" not in err, err
    return code, [line for line in err.splitlines() if line.strip()]


def env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(ROOT), "CUDA_VISIBLE_DEVICES": "", "OMP_NUM_THREADS": "1",
            "SE_RETROFIT_DEBUG": ""}


# --- item 4: one run per output directory ------------------------------------------------------------

@pytest.mark.slow
def test_two_concurrent_runs_on_one_out_one_is_refused_before_it_builds(workspace):
    out = workspace / "shared"
    command = [sys.executable, "-m", "se_retrofit", "finetune", str(workspace / "r.yaml"), "--data",
               str(workspace / "data"), "--out", str(out), "--no-progress", "--device", "cpu", "--epochs", "1,1"]
    runs = [subprocess.Popen(command, env=env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
            for _ in range(2)]
    results = [(p.wait(timeout=600), p.communicate()[1]) for p in runs]
    print(results)
    assert sorted(code for code, _ in results) == [0, 2]
    refused = [err for code, err in results if code == 2][0].strip().splitlines()
    assert len(refused) == 1 and ("in use by another" in refused[0] or "already holds a run" in refused[0])
    assert sorted(p.name for p in out.iterdir()) == [outdir.MANIFEST_FILE, CHECKPOINT_FILE, "curves.png",
                                                     "metrics.csv", "model", "recipe.yaml"]


def test_a_held_directory_is_refused_with_the_holders_pid_and_a_dead_holder_is_stale(tmp_path):
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / outdir.LOCK_FILE).write_text(f"{holder.pid}\n")
        with pytest.raises(outdir.OutDirError, match=rf"in use by another se-retrofit finetune run \(PID {holder.pid}\)"):
            with outdir.hold(tmp_path):
                pass
    finally:
        holder.kill()
        holder.wait()
    with outdir.hold(tmp_path):  # its process is gone: the lock is stale and taken over
        assert (tmp_path / outdir.LOCK_FILE).read_text().strip() == str(os.getpid())
    assert not (tmp_path / outdir.LOCK_FILE).exists()


# --- item 5: --overwrite removes only what the tool wrote --------------------------------------------

@pytest.mark.parametrize("intruder", ["model/src/train.py", "metrics.csv", "recipe.yaml", "model-link"])
def test_overwrite_refuses_files_the_tool_did_not_write(workspace, tmp_path, capsys, intruder):
    out = tmp_path / "out"
    out.mkdir()
    if intruder == "model-link":
        (tmp_path / "elsewhere").mkdir()
        (out / "model").symlink_to(tmp_path / "elsewhere")
        kept = out / "model"
    else:
        kept = out / intruder
        kept.parent.mkdir(parents=True, exist_ok=True)
        kept.write_text("user's file")
    before = sorted(str(p) for p in out.rglob("*"))
    exports = [["--export-only"]] if intruder.startswith("model") else []  # an export writes only OUT/model
    for extra in [[]] + exports:
        code, lines = run_cli(capsys, workspace / "r.yaml", "--data", workspace / "data", "--out", out,
                              "--overwrite", "--device", "cpu", "--no-progress", *extra)
        assert code == 2 and len(lines) == 1 and "not written by se-retrofit finetune" in lines[0], lines
    assert sorted(str(p) for p in out.rglob("*")) == before and os.path.lexists(kept)


@pytest.mark.slow
def test_overwrite_replaces_the_tools_own_run(stopped_run, tmp_path, capsys, workspace):
    out = tmp_path / "again"
    shutil.copytree(stopped_run, out)
    code, lines = run_cli(capsys, workspace / "r.yaml", "--data", workspace / "data", "--out", out, "--overwrite",
                          "--epochs", "1,1", "--device", "cpu", "--no-progress")
    assert code == 0 and (out / "model" / "retrofit_config.json").is_file()


@pytest.mark.slow
def test_a_run_killed_before_its_first_checkpoint_can_be_retried(workspace, tmp_path, capsys):
    out = tmp_path / "killed"
    out.mkdir()
    (out / "recipe.yaml").write_text(RECIPE)
    outdir.record(out, ["recipe.yaml", CHECKPOINT_FILE, "metrics.csv", "curves.png", "model"])
    (out / outdir.LOCK_FILE).write_text("999999\n")  # its PID is dead
    code, lines = run_cli(capsys, workspace / "r.yaml", "--data", workspace / "data", "--out", out,
                          "--epochs", "1,1", "--device", "cpu", "--no-progress")
    assert code == 0 and (out / CHECKPOINT_FILE).is_file() and not (out / outdir.LOCK_FILE).exists()


# --- finetune --resume with a damaged checkpoint -----------------------------------------------------

def _damage(state: dict, how: str) -> None:
    if how == "no fingerprint":
        del state["fingerprint"]
    elif how == "run []":
        state["run"] = []
    elif how == "fc.weight shape":
        state["model"]["fc.weight"] = torch.zeros(3, 7)
    elif how == "epoch -5":
        state["epoch"] = -5
    elif how == "garbage rng":
        state["rng"] = [{"python": "abc", "torch": torch.zeros(3)}]
    elif how == "metrics abc":
        state["metrics"] = "abc"
    elif how == "optimizer []":
        state["optimizer"]["param_groups"] = []
    elif how == "a string":
        state.clear()
        state["format"] = "x"


@pytest.mark.parametrize("how", ["no fingerprint", "run []", "fc.weight shape", "epoch -5", "garbage rng",
                                 "metrics abc", "optimizer []", "a string"])
@pytest.mark.slow
def test_a_damaged_checkpoint_is_one_line_exit_2(stopped_run, tmp_path, capsys, workspace, how):
    out = tmp_path / "damaged"
    shutil.copytree(stopped_run, out)
    state = torch.load(out / CHECKPOINT_FILE, weights_only=True)
    _damage(state, how)
    torch.save(state, out / CHECKPOINT_FILE)
    before = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    code, lines = run_cli(capsys, workspace / "r.yaml", "--data", workspace / "data", "--out", out, "--resume",
                          "--device", "cpu", "--no-progress")
    print(lines)
    assert code == 2 and len(lines) == 1 and CHECKPOINT_FILE in lines[0]
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == before  # nothing touched


# --- numbers and names where they enter --------------------------------------------------------------

@pytest.mark.parametrize("option, value", [("--batch-size", "100000000000000000000"), ("--batch-size", "1e20"),
                                           ("--seed", "100000000000000000000"), ("--seed", "1e20"),
                                           ("--num-classes", "100000000000000000000"), ("--epochs", "10000000000"),
                                           ("--image-size", "99999999"), ("--workers", "100000"),
                                           ("--out", "a\x00b"), ("--out", "x" * 300), ("--data", "")])
def test_out_of_range_numbers_and_bad_paths_are_one_line(workspace, tmp_path, capsys, option, value):
    os.chdir(tmp_path)
    code, lines = run_cli(capsys, workspace / "r.yaml", "--data", workspace / "data", option, value,
                          "--device", "cpu", "--no-progress")
    print(lines)
    assert code == 2 and len(lines) == 1
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("change", ['name: "' + "n" * 300 + '"', 'name: "a\\0b"', "name: [a]",
                                    "name: tiny\nname: other", "train: {batch_size: 100000000000000000000}",
                                    "model_kwargs: {bogus_option: 1}"])
def test_bad_recipe_values_are_one_line(workspace, tmp_path, capsys, change):
    key = change.split(":")[0]
    text = "\n".join(line for line in RECIPE.splitlines() if not line.startswith(key + ":")) + "\n" + change + "\n"
    (tmp_path / "r.yaml").write_text(text)
    code, lines = run_cli(capsys, tmp_path / "r.yaml", "--export-only", "--out", tmp_path / "out")
    print(lines)
    assert code == 2 and len(lines) == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["r.yaml"]
    if "bogus" in change:
        assert "'bogus_option'" in lines[0] and "num_classes" in lines[0]
    if "other" in change:
        assert "duplicate key 'name'" in lines[0] and "line" in lines[0]


@pytest.mark.parametrize("rank, world", [("abc", None), ("1", None), ("1", "2x")])
def test_bad_torchrun_variables_are_one_line(workspace, tmp_path, capsys, monkeypatch, rank, world):
    monkeypatch.setenv("RANK", rank)
    if world is not None:
        monkeypatch.setenv("WORLD_SIZE", world)
    code, lines = run_cli(capsys, workspace / "r.yaml", "--data", workspace / "data", "--out", tmp_path / "o")
    assert code == 2 and len(lines) == 1 and ("RANK" in lines[0] or "WORLD_SIZE" in lines[0]), lines


@pytest.mark.parametrize("number", [errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES])
@pytest.mark.slow
def test_a_full_disk_is_one_line_and_leaves_nothing(workspace, tmp_path, capsys, monkeypatch, number):
    import se_retrofit.finetune.checkpoint as checkpoint

    def full(*args, **kwargs):
        raise OSError(number, os.strerror(number), str(tmp_path / "out" / CHECKPOINT_FILE))

    monkeypatch.setattr(checkpoint.torch, "save", full)
    code, lines = run_cli(capsys, workspace / "r.yaml", "--data", workspace / "data", "--out", tmp_path / "out",
                          "--device", "cpu", "--no-progress")
    assert code == 2 and len(lines) == 1 and os.strerror(number).lower() in lines[0].lower(), lines
    assert CHECKPOINT_FILE in lines[0] and not (tmp_path / "out").exists()


@pytest.mark.slow
def test_a_decompression_bomb_is_an_error_naming_the_file(workspace, tmp_path, capsys):
    data = tmp_path / "data"
    shutil.copytree(workspace / "data", data)
    for name in ("cat", "dog"):  # every image a bomb, so one is read whatever the split
        for image in (data / name).iterdir():
            Image.new("1", (20000, 20000)).save(image)
    code, lines = run_cli(capsys, workspace / "r.yaml", "--data", data, "--out", tmp_path / "out", "--device", "cpu",
                          "--no-progress")
    assert code == 2 and len(lines) == 1 and "too large to decode safely" in lines[0] and ".png" in lines[0]
    assert not (tmp_path / "out").exists()


# --- the fuzz test: a mutated checkpoint resumes cleanly or is a one-line RetrofitError --------------

def _resume(out: Path, recipe, options, model, context) -> None:
    """What a resume does with the checkpoint: plan (read and check), load the weights, the optimiser and
    schedule of its phase, and the random states."""
    plan = plan_run(recipe, options)
    state = plan.checkpoint
    with restoring(out, "model weights"):
        model.load_state_dict(state["model"])
    _, optimizer, scheduler = start_phase(model, state["phase"], recipe, 2, context)
    with restoring(out, "optimiser and schedule"):
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
    from se_retrofit.finetune.checkpoint import set_rng_state

    with restoring(out, "random states"):
        set_rng_state(state["rng"][0])


@pytest.mark.slow
def test_fuzz_mutated_checkpoints_resume_or_fail_in_one_line(stopped_run, workspace, tmp_path):
    hypothesis = pytest.importorskip("hypothesis")
    from hypothesis import HealthCheck, given, settings, strategies as st

    recipe = load_recipe(workspace / "r.yaml")
    options = Options(data=workspace / "data", out=tmp_path / "fuzz", resume=True, device="cpu")
    shutil.copytree(stopped_run, options.out)
    original = torch.load(stopped_run / CHECKPOINT_FILE, weights_only=True)
    plan = plan_run(recipe, Options(data=workspace / "data", out=stopped_run, resume=True))
    _, model, *_ = build_model(plan, options, weights="none")
    context = distributed.Context.from_env({}, device="cpu")
    outcomes = {"resumed": 0, "RetrofitError": 0}
    values = st.one_of(st.none(), st.booleans(), st.integers(-2 ** 70, 2 ** 70), st.floats(), st.text(max_size=5),
                       st.lists(st.integers(), max_size=3), st.dictionaries(st.text(max_size=3), st.integers(),
                                                                           max_size=2),
                       st.builds(lambda shape, dtype: torch.zeros(shape, dtype=dtype),
                                 st.lists(st.integers(0, 3), max_size=3),
                                 st.sampled_from([torch.float32, torch.int64, torch.uint8, torch.bool])))

    def paths(state, prefix=()):
        yield prefix
        if isinstance(state, dict):
            for key in list(state)[:40]:
                yield from paths(state[key], prefix + (key,))
        elif isinstance(state, (list, tuple)) and not isinstance(state, torch.Tensor):
            for index in range(min(len(state), 3)):
                yield from paths(state[index], prefix + (index,))

    all_paths = [p for p in paths(original) if p]

    @settings(max_examples=int(os.environ.get("FUZZ_EXAMPLES", "200")), deadline=None, database=None,
              suppress_health_check=list(HealthCheck))
    @given(st.lists(st.tuples(st.sampled_from(all_paths), st.sampled_from(["set", "delete", "reshape"]), values),
                    min_size=1, max_size=3))
    def check(mutations):
        state = copy.deepcopy(original)
        for path, action, value in mutations:
            parent = state
            try:
                for key in path[:-1]:
                    parent = parent[key]
                target = parent[path[-1]]
            except (KeyError, IndexError, TypeError):
                continue
            if isinstance(parent, tuple):
                continue
            if action == "delete" and isinstance(parent, dict):
                del parent[path[-1]]
            elif action == "reshape" and isinstance(target, torch.Tensor) and target.numel():
                parent[path[-1]] = target.flatten()[:-1].to(torch.float64)
            else:
                parent[path[-1]] = value
        torch.save(state, options.out / CHECKPOINT_FILE)
        try:
            _resume(options.out, recipe, options, model, context)
            outcomes["resumed"] += 1
        except RetrofitError as error:
            assert len(str(error).strip().splitlines()) == 1, str(error)
            outcomes["RetrofitError"] += 1

    check()
    print(outcomes)
    assert outcomes["RetrofitError"] > 0 and sum(outcomes.values()) >= 50


# --- item 9: --weights none reads no weights from anywhere ---------------------------------------------

@pytest.mark.parametrize("name", ["torchvision:fasterrcnn_resnet50_fpn", "torchvision:resnet18", "resnet18"])
def test_weights_none_downloads_nothing_for_any_builder_keyword(monkeypatch, name):
    import urllib.request

    import torch.hub

    from se_retrofit.hub import create, resolve

    def offline(*args, **kwargs):
        raise AssertionError(f"a download was attempted: {args[:1]}")

    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", offline)
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    model, origin = create(resolve(name), "none")
    assert origin == "random initialisation (weights: none)" and sum(p.numel() for p in model.parameters()) > 0


def test_a_model_option_that_would_download_is_refused():
    from se_retrofit.hub import WeightsError, create, resolve

    with pytest.raises(WeightsError, match="'weights_backbone' would make the library load weights itself"):
        create(resolve("torchvision:fasterrcnn_resnet50_fpn"), "none", weights_backbone="DEFAULT")
