"""Every bad input ends cleanly: exit code 2, one line on stderr, nothing left behind.

Runs each case through the real entry point (``python -m se_retrofit``, a subprocess) in a fresh
temporary directory and checks:

* the exit code is the expected one (2 for a user error);
* stderr is exactly one line, with no ``Traceback`` and no ``internal error``;
* the directory holds exactly what it held before the run (same names, same file sizes and times).

Writes a markdown table (input, exit code, message, verdict) to ``benchmarks/results/bad_inputs.md``
and exits 1 if any case fails. Cases marked *pending* belong to another branch (attention options);
they are run and shown but do not fail the script.

    PYTHONPATH=$PWD python benchmarks/bad_inputs.py            # all cases, two at a time
    PYTHONPATH=$PWD python benchmarks/bad_inputs.py --only weights --jobs 1
"""
from __future__ import annotations

import argparse
import concurrent.futures
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results" / "bad_inputs.md"
FAST = ("--weights", "none", "--input-size", "3,64,64")  # random weights, a small probe: seconds per case
TIMEOUT = 300

Setup = Callable[[Path], None]


@dataclass(frozen=True)
class Case:
    """One bad input: command-line arguments (after ``python -m se_retrofit``) and files it needs."""

    name: str
    args: tuple[str, ...]
    setup: Setup | None = None
    expect: int = 2
    contains: str = ""  # the one line must contain this
    pending: str = ""  # fixed on another branch: shown, not counted
    fast: bool = True  # part of the pytest subset
    runs: int = 1  # started at the same moment (the concurrent-save case)
    env: tuple[tuple[str, str], ...] = ()  # extra environment variables
    leaves: tuple[str, ...] = ()  # concurrent runs: what the one that succeeds writes (default: a main save)


@dataclass
class Outcome:
    case: Case
    codes: list[int]
    lines: list[str]
    problems: list[str] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return not self.problems


# --- files the cases need ---------------------------------------------------------------------------

def _torch():
    import torch

    return torch


def _state_dict(name: str):
    import timm

    return timm.create_model(name).state_dict()


def write_file(name: str, content: bytes = b"") -> Setup:
    return lambda tmp: (tmp / name).write_bytes(content)


def make_dirs(*names: str) -> Setup:
    return lambda tmp: [(tmp / n).mkdir(parents=True) for n in names]


def both(*setups: Setup) -> Setup:
    return lambda tmp: [s(tmp) for s in setups]


def other_models_weights(tmp: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.contiguous() for k, v in _state_dict("resnet34").items()}, str(tmp / "resnet34.safetensors"))


def pickled_weights(tmp: Path) -> None:
    _torch().save(_state_dict("resnet18"), tmp / "resnet18.pth")


class Payload:
    """Not a state dict: unpickling it would call os.system."""

    def __reduce__(self):
        return (os.system, ("touch PWNED",))


def pickled_code(tmp: Path) -> None:
    import pickle

    (tmp / "evil.pth").write_bytes(pickle.dumps({"fc.weight": Payload()}))


def saved_model(tmp: Path) -> None:
    import timm
    import se_retrofit

    se_retrofit.save(se_retrofit.retrofit(timm.create_model("resnet18")), tmp / "saved")


def read_only_dir(tmp: Path) -> None:
    """A directory nothing can be created in, even by root (chattr +i), else by mode 0555."""
    locked = tmp / "locked"
    locked.mkdir()
    locked.chmod(0o555)
    if os.geteuid() == 0:
        subprocess.run(["chattr", "+i", str(locked)], check=False, capture_output=True)
    try:
        (locked / ".probe").mkdir()
    except OSError:
        return
    (locked / ".probe").rmdir()
    raise RuntimeError("cannot make a read-only directory here (no chattr, running as root)")


def unlock(tmp: Path) -> None:
    locked = tmp / "locked"
    if locked.exists():
        if os.geteuid() == 0:
            subprocess.run(["chattr", "-i", str(locked)], check=False, capture_output=True)
        locked.chmod(0o755)


NON_IDENTITY = '''"""An attention type whose init_identity doubles its input: not an identity."""
import torch
from torch import nn
from se_retrofit import register_attention


@register_attention("double")
class Double(nn.Module):
    def __init__(self, channels, **_):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(1))

    def forward(self, x):
        return x * self.weight

    def init_identity(self):
        with torch.no_grad():
            self.weight.fill_(2.0)
'''



def recipe(text: str, name: str = "r.yaml") -> Setup:
    return write_file(name, text.encode())


RECIPE = """name: tiny
model: resnet18
weights: none
retrofit: {attention: se, position: standard}
data: {image_size: 32}
train: {batch_size: 4, workers: 0, amp: false, channels_last: false}
phases:
  - {name: new-modules, trainable: new, epochs: 1, lr: 0.01}
"""


def images(tmp: Path, corrupt: bool = False) -> None:
    from PIL import Image

    for c in ("cat", "dog"):
        (tmp / "data" / c).mkdir(parents=True)
        for i in range(4):
            Image.new("RGB", (40, 40), (60 * i, 20, 200)).save(tmp / "data" / c / f"{i}.png")
    if corrupt:
        (tmp / "data" / "cat" / "0.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not an image")


_STOPPED: dict[str, bytes] = {}
_STOPPED_LOCK = __import__("threading").Lock()


def stopped_run(tmp: Path) -> None:
    """``run/``: a finetune run stopped after epoch 1 of 2 (made once, copied into each case)."""
    with _STOPPED_LOCK:
        if "dir" not in _STOPPED:
            home = Path(tempfile.mkdtemp(prefix="se-bad-stopped-"))
            recipe(RECIPE2)(home)
            images(home)
            subprocess.run([sys.executable, "-m", "se_retrofit", "finetune", "r.yaml", "--data", "data", "--out",
                            "run", "--stop-after-epoch", "1", "--no-progress", "--device", "cpu"], cwd=home,
                           env=environment(), check=True, capture_output=True, timeout=TIMEOUT)
            _STOPPED["dir"] = str(home)
    shutil.copytree(_STOPPED["dir"], tmp, dirs_exist_ok=True)


def damaged_checkpoint(change: Callable[[dict], None]) -> Setup:
    def setup(tmp: Path) -> None:
        torch = _torch()
        stopped_run(tmp)
        state = torch.load(tmp / "run" / "checkpoint.pt", weights_only=True)
        change(state)
        torch.save(state, tmp / "run" / "checkpoint.pt")
    return setup


def bomb_images(tmp: Path) -> None:
    from PIL import Image

    images(tmp)
    for image in sorted((tmp / "data").rglob("*.png")):
        Image.new("1", (20000, 20000)).save(image)


def fifo(name: str) -> Setup:
    return lambda tmp: os.mkfifo(tmp / name)


RECIPE2 = RECIPE + "  - {name: full, trainable: all, epochs: 1, lr: 0.001}\n"
RUN_FILES = ("run", "run/.se-retrofit-manifest.json", "run/checkpoint.pt", "run/curves.png", "run/metrics.csv",
             "run/model", "run/recipe.yaml")
FT = ("finetune", "r.yaml", "--data", "data", "--no-progress", "--device", "cpu")
FTR = FT + ("--out", "run", "--resume")


# --- the cases --------------------------------------------------------------------------------------

def cases() -> list[Case]:
    r18 = ("resnet18",) + FAST
    return [
        # model and source
        Case("unknown model", ("resnt18",) + FAST, contains="did you mean"),
        Case("unknown library prefix", ("keras:resnet18",) + FAST, contains="unknown model"),
        Case("prefix contradicts --source", ("torchvision:resnet18", "--source", "timm") + FAST,
             contains="contradicts"),
        Case("--source not a library", ("resnet18", "--source", "keras") + FAST, contains="invalid choice"),
        Case("no model given", ("--weights", "none"), contains="required: model"),
        Case("option typo (--postion)", r18 + ("--postion", "post"), contains="unrecognized arguments"),
        # attention options
        Case("unknown attention", r18 + ("--attention", "sse", "--dry-run"), contains="sse"),
        Case("--r 0", r18 + ("--r", "0"), contains="positive integer"),
        Case("--r -4", r18 + ("--r", "-4"), contains="--r"),
        Case("--r abc", r18 + ("--r", "abc"), contains="positive integer"),
        Case("--divisor 0", r18 + ("--divisor", "0"), contains="positive integer"),
        Case("--dilation 0 (bam)", r18 + ("--attention", "bam", "--dilation", "0"), contains="positive integer"),
        Case("--gate bogus", r18 + ("--gate", "bogus"), contains="invalid choice"),
        Case("--squeeze median", r18 + ("--squeeze", "median"), contains="invalid choice"),
        Case("--init zeros", r18 + ("--init", "zeros"), contains="invalid choice"),
        Case("--kernel-size 4 (eca)", r18 + ("--attention", "eca", "--kernel-size", "4", "--dry-run"),
             contains="kernel"),
        Case("--kernel-size 4 (cbam)", r18 + ("--attention", "cbam", "--kernel-size", "4", "--dry-run"),
             contains="kernel"),
        Case("--act bogus", r18 + ("--act", "bogus", "--dry-run"), contains="bogus"),
        Case("--squeeze for eca (option of another type)", r18 + ("--attention", "eca", "--squeeze", "max",
                                                                   "--dry-run"), contains="squeeze"),
        # where to edit
        Case("--position sideways", r18 + ("--position", "sideways"), contains="invalid choice"),
        Case("--position stage on a one-resolution model (ViT)",
             ("vit_tiny_patch16_224", "--weights", "none", "--position", "stage", "--dry-run"),
             contains="between stages", fast=False),
        Case("--stages 9 (out of range)", r18 + ("--stages", "9", "--dry-run"), contains="out of range"),
        Case("--stages 0", r18 + ("--stages", "0"), contains="stage numbers"),
        Case("--stages a,b", r18 + ("--stages", "a,b"), contains="stage numbers"),
        Case("--blocks matching nothing", r18 + ("--blocks", "layer9.*", "--dry-run"), contains="matches no"),
        Case("--blocks ','", r18 + ("--blocks", ","), contains="glob patterns"),
        Case("--exclude '*' (nothing left)", r18 + ("--exclude", "*"), contains="leave none of the 8"),
        Case("--stages 1 --exclude 'layer1.*'", r18 + ("--stages", "1", "--exclude", "layer1.*"),
             contains="leave none"),
        # probe input
        Case("--input-size 3,100000,100000 (out of memory)", ("resnet18", "--weights", "none", "--input-size",
                                                              "3,100000,100000"), contains="GiB"),
        Case("--input-size 3x224x224 (syntax)", ("resnet18", "--weights", "none", "--input-size", "3x224x224"),
             contains="C,H,W"),
        Case("--input-size 3,0,64", ("resnet18", "--weights", "none", "--input-size", "3,0,64"),
             contains="C,H,W"),
        Case("--input-size 1,64,64 (wrong channels)", ("resnet18", "--weights", "none", "--input-size", "1,64,64",
                                                       "--dry-run"), contains="channels"),
        # weights
        Case("missing weights file", ("resnet18", "--weights", "missing.safetensors", "--input-size", "3,64,64"),
             contains="does not exist"),
        Case("a directory as --weights", ("resnet18", "--weights", "wdir", "--input-size", "3,64,64"),
             setup=make_dirs("wdir"), contains="is a directory"),
        Case("a saved model directory as --weights", ("resnet18", "--weights", "saved", "--input-size", "3,64,64"),
             setup=saved_model, contains="se_retrofit.load"),
        Case("weights of another model (resnet34 into resnet18)",
             ("resnet18", "--weights", "resnet34.safetensors", "--input-size", "3,64,64"),
             setup=other_models_weights, contains="do not match"),
        Case("corrupt .safetensors", ("resnet18", "--weights", "bad.safetensors", "--input-size", "3,64,64"),
             setup=write_file("bad.safetensors", b"\x00\x01garbage" * 50), contains="cannot read"),
        Case("empty .safetensors", ("resnet18", "--weights", "empty.safetensors", "--input-size", "3,64,64"),
             setup=write_file("empty.safetensors"), contains="cannot read"),
        Case("pickled .pth without --allow-pickle", ("resnet18", "--weights", "resnet18.pth", "--input-size",
                                                     "3,64,64"), setup=pickled_weights, contains="--allow-pickle"),
        Case("pickle with code, even with --allow-pickle", ("resnet18", "--weights", "evil.pth", "--allow-pickle",
                                                            "--input-size", "3,64,64"),
             setup=pickled_code, contains="cannot read"),
        # output directory
        Case("--out existing, no --overwrite", r18 + ("--out", "taken"), setup=make_dirs("taken/x"),
             contains="already exists"),
        Case("--out under a read-only directory", r18 + ("--out", "locked/out"), setup=read_only_dir,
             contains="locked"),
        Case("--out under a file", r18 + ("--out", "afile/out"), setup=write_file("afile", b"keep me"),
             contains="is a file"),
        Case("--out . --overwrite", r18 + ("--out", ".", "--overwrite"), contains="current directory"),
        Case("--overwrite of a plain file", r18 + ("--out", "notes.txt", "--overwrite"),
             setup=write_file("notes.txt", b"my notes"), contains="is a file"),
        Case("--overwrite of a directory that is not a saved model", r18 + ("--out", "photos", "--overwrite"),
             setup=both(make_dirs("photos"), write_file("photos/cat.jpg", b"jpeg")), contains="not a saved"),
        Case("two runs saving to one --out at once", r18 + ("--out", "same"), runs=2, fast=False),
        # import and registered types
        Case("--import a missing module", r18 + ("--import", "no_such_module_xyz"), contains="no_such_module_xyz"),
        Case("registered type whose init_identity is not an identity", r18 + ("--import", "double_attention",
                                                                              "--attention", "double"),
             setup=write_file("double_attention.py", NON_IDENTITY.encode()), contains="identity check failed"),
        Case("timm attention that replaces a conv (timm:sk)", r18 + ("--attention", "timm:sk", "--dry-run"),
             contains="sk"),
        Case("--every 0", r18 + ("--every", "0", "--dry-run"), contains="positive integer"),
        Case("--mode bogus (nonlocal)", r18 + ("--attention", "nonlocal", "--mode", "bogus", "--dry-run"),
             contains="bogus"),
        Case("--fusion for se (option of another type)", r18 + ("--fusion", "mul", "--dry-run"), contains="fusion"),
        # export formats
        Case("--format onnx2 (unknown)", r18 + ("--format", "onnx2"), contains="invalid choice"),
        Case("--format timm for cbam (no timm equivalent)", r18 + ("--attention", "cbam", "--format", "timm"),
             contains="timm native"),
        Case("--format timm for post position", r18 + ("--position", "post", "--format", "timm"),
             contains="timm native"),
        # finetune
        Case("finetune: missing recipe", ("finetune", "nowhere.yaml", "--data", "."), contains="does not exist"),
        Case("finetune: recipe is a directory", ("finetune", "rdir", "--data", "."), setup=make_dirs("rdir"),
             contains="is a directory"),
        Case("finetune: recipe not YAML", ("finetune", "r.yaml", "--dry-run", "--data", "."),
             setup=recipe("name: x\nmodel: [resnet18\n"), contains="not valid YAML"),
        Case("finetune: recipe key typo (learning_rate)", ("finetune", "r.yaml", "--dry-run", "--data", "."),
             setup=recipe(RECIPE.replace("lr: 0.01", "learning_rate: 0.01")), contains="did you mean 'lr'"),
        Case("finetune: recipe with an unknown model", ("finetune", "r.yaml", "--dry-run", "--data", "."),
             setup=recipe(RECIPE.replace("model: resnet18", "model: resnet1800")), contains="unknown model"),
        Case("finetune: model_kwargs.checkpoint_path (a pickle past the reader)",
             ("finetune", "r.yaml", "--export-only", "--out", "run"),
             setup=both(pickled_weights, recipe(RECIPE + "model_kwargs: {checkpoint_path: resnet18.pth}\n")),
             contains="checkpoint_path"),
        Case("finetune: --epochs 0", ("finetune", "r.yaml", "--epochs", "0", "--data", "data"),
             setup=recipe(RECIPE), contains="--epochs"),
        Case("finetune: no --data", ("finetune", "r.yaml"), setup=recipe(RECIPE), contains="--data"),
        Case("finetune: --data missing", ("finetune", "r.yaml", "--data", "nowhere"), setup=recipe(RECIPE),
             contains="does not exist"),
        Case("finetune: --data empty", ("finetune", "r.yaml", "--data", "empty"),
             setup=both(recipe(RECIPE), make_dirs("empty")), contains="no class folders"),
        Case("finetune: --data with one class", ("finetune", "r.yaml", "--data", "data"),
             setup=both(recipe(RECIPE), lambda tmp: images(tmp), lambda tmp: shutil.rmtree(tmp / "data" / "dog")),
             contains="at least two"),
        Case("finetune: corrupt image in --data", ("finetune", "r.yaml", "--data", "data", "--out", "run",
                                                    "--no-progress", "--device", "cpu"),
             setup=both(recipe(RECIPE), lambda tmp: images(tmp, corrupt=True)), contains="cannot read image",
             fast=False),
        Case("finetune: --device cuda:7 on this machine", ("finetune", "r.yaml", "--data", "data", "--device",
                                                            "cuda:7", "--out", "run"),
             setup=both(recipe(RECIPE), lambda tmp: images(tmp)), contains="cuda"),
        # issue 18: one run per --out, --overwrite removes only what the tool wrote
        Case("finetune: two runs on one --out at once", FT + ("--out", "run"), setup=both(recipe(RECIPE), images),
             runs=2, fast=False, leaves=RUN_FILES),
        Case("finetune: --overwrite of a user's model/src/train.py", FT + ("--out", "run", "--overwrite"),
             setup=both(recipe(RECIPE), images, make_dirs("run/model/src"), write_file("run/model/src/train.py",
                                                                                        b"print(1)")),
             contains="not written by se-retrofit"),
        Case("finetune: --overwrite of a user's metrics.csv", FT + ("--out", "run", "--overwrite"),
             setup=both(recipe(RECIPE), images, make_dirs("run"), write_file("run/metrics.csv", b"a,b")),
             contains="not written by se-retrofit"),
        Case("finetune: --overwrite with OUT/model a symlink", FT + ("--out", "run", "--overwrite"),
             setup=both(recipe(RECIPE), images, make_dirs("run", "elsewhere"),
                        lambda tmp: (tmp / "run" / "model").symlink_to(tmp / "elsewhere")),
             contains="not written by se-retrofit"),
        # issue 18: a damaged checkpoint
        *[Case(f"finetune --resume: checkpoint with {label}", FTR, setup=damaged_checkpoint(change),
               contains="checkpoint", fast=False)
          for label, change in (("no fingerprint", lambda s: s.pop("fingerprint")),
                                ("run: []", lambda s: s.update(run=[])),
                                ("a wrong fc.weight shape", lambda s: s["model"].update({"fc.weight": _torch().zeros(3, 7)})),
                                ("epoch: -5", lambda s: s.update(epoch=-5)),
                                ("garbage rng", lambda s: s.update(rng=[{"python": "x", "torch": 5}])),
                                ("metrics: 'abc'", lambda s: s.update(metrics="abc")))],
        # issue 18: numbers where they enter, names, the environment
        Case("finetune: --batch-size 1e20", FT + ("--batch-size", "100000000000000000000"),
             setup=both(recipe(RECIPE), images), contains="--batch-size"),
        Case("finetune: --seed 1e20", FT + ("--seed", "100000000000000000000"), setup=both(recipe(RECIPE), images),
             contains="--seed"),
        Case("finetune: --num-classes 1e20", FT + ("--num-classes", "100000000000000000000"),
             setup=both(recipe(RECIPE), images), contains="--num-classes"),
        Case("--dilation 99999999999999999999 (bam)", r18 + ("--attention", "bam", "--dilation",
                                                             "99999999999999999999"), contains="--dilation"),
        Case("--divisor 1e20", r18 + ("--divisor", "100000000000000000000"), contains="--divisor"),
        Case("finetune: a 300-character --out", FT + ("--out", "o" * 300), setup=both(recipe(RECIPE), images),
             contains="name too long"),
        Case("finetune: a 300-character recipe name", ("finetune", "r.yaml", "--export-only"),
             setup=recipe(RECIPE.replace("name: tiny", "name: " + "n" * 300)), contains="name"),
        Case("finetune: a NUL in the recipe name", ("finetune", "r.yaml", "--export-only"),
             setup=recipe(RECIPE.replace("name: tiny", 'name: "a\\0b"')), contains="NUL"),
        Case("finetune: an empty --out", FT + ("--out", ""), setup=both(recipe(RECIPE), images), contains="--out"),
        Case("finetune: an unknown model_kwargs key", ("finetune", "r.yaml", "--export-only", "--out", "run"),
             setup=recipe(RECIPE + "model_kwargs: {bogus_option: 1}\n"), contains="bogus_option"),
        Case("finetune: a duplicate key in the recipe", ("finetune", "r.yaml", "--dry-run", "--data", "data"),
             setup=both(recipe(RECIPE + "name: other\n"), images), contains="duplicate key"),
        Case("finetune: a decompression-bomb PNG", FT + ("--out", "run"), setup=both(recipe(RECIPE), bomb_images),
             contains="too large to decode", fast=False),
        Case("finetune: RANK=abc", FT + ("--out", "run"), setup=both(recipe(RECIPE), images),
             env=(("RANK", "abc"),), contains="RANK"),
        Case("finetune: RANK=1 and a user error", ("finetune", "nowhere.yaml", "--data", "."), env=(("RANK", "1"),),
             contains="does not exist"),
        # issue 18: what a weights path really is
        Case("--weights /dev/zero", ("resnet18", "--weights", "/dev/zero", "--input-size", "3,64,64"),
             contains="character device"),
        Case("--weights a FIFO", ("resnet18", "--weights", "pipe.safetensors", "--input-size", "3,64,64"),
             setup=fifo("pipe.safetensors"), contains="FIFO"),
        Case("--weights ''", ("resnet18", "--weights", "", "--input-size", "3,64,64"), contains="empty"),
    ]


# --- running and checking ---------------------------------------------------------------------------

def snapshot(directory: Path) -> dict[str, tuple]:
    """Every path under ``directory`` (hidden ones too) with its kind, size and modification time."""
    out = {}
    for path in sorted(directory.rglob("*")):
        info = path.lstat()
        kind = "dir" if path.is_dir() and not path.is_symlink() else "file"
        out[str(path.relative_to(directory))] = (kind, info.st_size if kind == "file" else 0,
                                                 info.st_mtime_ns if kind == "file" else 0)
    return out


def environment() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
            "HF_HUB_OFFLINE": "1", "COLUMNS": "200", "CUDA_VISIBLE_DEVICES": "", "SE_RETROFIT_DEBUG": ""}


def run_case(case: Case) -> Outcome:
    tmp = Path(tempfile.mkdtemp(prefix="se-bad-"))
    began = time.perf_counter()
    try:
        if case.setup:
            case.setup(tmp)
        before = snapshot(tmp)
        command = [sys.executable, "-m", "se_retrofit", *case.args]
        processes = [subprocess.Popen(command, cwd=tmp, env={**environment(), **dict(case.env)}, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True) for _ in range(case.runs)]
        results = [(p.wait(timeout=TIMEOUT), *p.communicate()) for p in processes]
        after = snapshot(tmp)
        outcome = Outcome(case, [code for code, _, _ in results],
                          [line for _, _, err in results for line in err.splitlines() if line.strip()],
                          seconds=time.perf_counter() - began)
        if case.runs > 1:
            _check_concurrent(outcome, results, before, after)
        else:
            _check_one(outcome, results[0], before, after)
        return outcome
    finally:
        unlock(tmp)
        shutil.rmtree(tmp, ignore_errors=True)


def _check_one(outcome: Outcome, result: tuple, before: dict, after: dict) -> None:
    case, (code, _, err) = outcome.case, result
    problems = outcome.problems
    if code != case.expect:
        problems.append(f"exit code {code}, expected {case.expect}")
    lines = [line for line in err.splitlines() if line.strip()]
    if len(lines) != 1:
        problems.append(f"{len(lines)} lines on stderr")
    for bad in ("Traceback", "internal error"):
        if bad in err:
            problems.append(f"'{bad}' on stderr")
    if case.contains and case.contains not in err:
        problems.append(f"message lacks {case.contains!r}")
    _check_files(problems, before, after)


def _check_concurrent(outcome: Outcome, results: list[tuple], before: dict, after: dict) -> None:
    """Two runs to one --out: exactly one saves (exit 0), the other refuses in one line (exit 2), and
    the directory holds the one save and nothing else."""
    codes = sorted(code for code, _, _ in results)
    if codes != [0, 2]:
        outcome.problems.append(f"exit codes {codes}, expected one 0 and one 2")
    refused = [err for code, _, err in results if code == 2]
    if refused:
        lines = [line for line in refused[0].splitlines() if line.strip()]
        if len(lines) != 1 or "Traceback" in refused[0] or "internal error" in refused[0]:
            outcome.problems.append(f"the refused run printed {len(lines)} lines: {refused[0][:200]!r}")
        outcome.lines = lines
    new = sorted(set(after) - set(before))
    expected = list(outcome.case.leaves) or ["same", "same/attention.safetensors", "same/model.safetensors",
                                             "same/retrofit_config.json"]
    stray = [p for p in new if p.endswith(".lock") or p.endswith(".tmp") or ".partial" in p]
    if (not outcome.case.leaves and new != expected or outcome.case.leaves and not set(expected) <= set(new)
            or stray):
        outcome.problems.append(f"left {new}, expected the one save {expected}")


def _check_files(problems: list[str], before: dict, after: dict) -> None:
    added = sorted(set(after) - set(before))
    removed = sorted(set(before) - set(after))
    changed = sorted(k for k in set(before) & set(after) if before[k] != after[k])
    for label, paths in (("left", added), ("removed", removed), ("changed", changed)):
        if paths:
            problems.append(f"{label} {', '.join(paths[:4])}")


def markdown(outcomes: list[Outcome]) -> str:
    failed = [o for o in outcomes if not o.ok and not o.case.pending]
    pending = [o for o in outcomes if not o.ok and o.case.pending]
    lines = ["# Bad inputs", "",
             f"Generated by `PYTHONPATH=$PWD python benchmarks/bad_inputs.py`: {len(outcomes)} inputs, each run "
             "through `python -m se_retrofit` in a fresh temporary directory. A row passes when the exit code is the "
             "expected one, stderr is exactly one line without `Traceback` or `internal error`, and the directory "
             "holds exactly what it held before (the concurrent row: exactly the one save).", "",
             f"**{len(outcomes) - len(failed) - len(pending)} pass, {len(failed)} fail, {len(pending)} pending "
             "(fixed on another branch)**", "",
             "| # | input | command (after `se-retrofit`) | exit | message (stderr) | verdict |",
             "|---|---|---|---|---|---|"]
    for i, o in enumerate(outcomes, 1):
        verdict = "pass" if o.ok else ("pending: " if o.case.pending else "FAIL: ") + "; ".join(o.problems)
        if o.ok and o.case.pending:
            verdict = "pass"
        codes = ", ".join(map(str, o.codes))
        message = " / ".join(o.lines)
        lines.append(f"| {i} | {_cell(o.case.name)} | `{_cell(' '.join(o.case.args))}` | {codes} | "
                     f"{_cell(message)} | {_cell(verdict)} |")
    return "\n".join(lines) + "\n"


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def select(all_cases: list[Case], only: str | None, fast: bool) -> list[Case]:
    chosen = [c for c in all_cases if (not only or only.lower() in c.name.lower()) and (c.fast or not fast)]
    return chosen


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=2, help="cases run at once (default 2)")
    parser.add_argument("--only", help="run the cases whose name contains this")
    parser.add_argument("--fast", action="store_true", help="the pytest subset (no training, no ViT)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="markdown table to write")
    args = parser.parse_args(argv)
    chosen = select(cases(), args.only, args.fast)
    with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        outcomes = list(pool.map(run_case, chosen))
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(markdown(outcomes))
    failed = [o for o in outcomes if not o.ok and not o.case.pending]
    for o in outcomes:
        state = "ok  " if o.ok else ("PEND" if o.case.pending else "FAIL")
        print(f"{state} {o.seconds:5.1f}s {o.case.name}: {o.codes} {' / '.join(o.lines)[:150]}"
              + ("" if o.ok else f"  <- {'; '.join(o.problems)}"))
    print(f"{len(outcomes)} cases, {len(failed)} failed; table in {args.out}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
