"""Transfer on real images through the product's own fine-tuning path: does a retrofit help?

Real data: scikit-learn's bundled digits (1,797 real 8x8 handwritten digits, shipped inside the
package: nothing is downloaded), written as PNG ImageFolders upsampled to 32 px.

* Source task: digits 0-4 (80% train, 20% val), a network trained from random weights by
  ``se-retrofit finetune`` (recipe ``transfer_recipes/source.yaml``, stopped after an epoch and
  continued with ``--resume``, so checkpoints and resume are exercised).
* Target tasks: digits 5-9 with few labels, a fixed validation set of 30 images per class and, per
  seed, a different draw of the labelled images: ``few`` (10 labels per class, clean) and ``shift``
  (20 labels per class, every image rotated by up to +-45 degrees and with Gaussian noise, sigma 0.2).
* Arms, same recipe, budget and seeds (``transfer_recipes/target.yaml``: the README's phase 1, new
  modules + head for 2 epochs, then phase 2, everything with attention at 10x for 4; the source
  model trains 6 epochs; ``--epochs 4,8 --source-epochs 8`` is the earlier budget, twice as long):
  ``plain`` (no attention: the registered no-op type of ``transfer_recipes/transfer_noop.py``),
  ``se-standard`` and ``se-post`` (the retrofit, r=16), ``eca``, ``se-random`` (timm's own randomly
  initialised SE, ``block_args=dict(attn_layer="se")``, with the source weights loaded non-strictly
  into it by this script and handed to the recipe as its weights file; on ConvNeXt, which takes no
  ``attn_layer``, se_retrofit's ``init: random`` SE at post), and with the backbone frozen for every epoch (phase 1
  only): ``head-only`` and ``se-post-frozen`` (attention-only training).
* Identity: source validation accuracy of the source model, and right after each edit (the
  retrofit at identity, the random-init SE loaded non-strictly), with max |logit difference|.

Every fine-tuning run is ``se-retrofit finetune RECIPE --data DIR ... --import transfer_noop`` (the
product's ``main``; the no-op type comes in by the command's own ``--import``, as a user's registered
type would). The runs are handed out seed by seed (longest first within a seed, so a partial run covers
every arm) to ``--jobs`` worker processes, one thread each, that run one command after another through
``transfer_recipes/finetune_many.py`` (no interpreter start and no torch/timm import per run); the two
source models train side by side. Writes ``OUT/transfer.json`` (every curve, each run's wall and CPU
time), ``OUT/transfer.md`` (the table, with wall time, CPU time and load average) and ``OUT/transfer.png``
(validation accuracy per epoch).

Time: the network's own forward and backward passes are most of it (resnet18 at 32 px, one thread:
~50-80 ms per training image at batch 8, ~7 ms per validation image), so the budget is set in epochs.
Measured alone at 1 thread (shared machine, CPU time in brackets): source models 265 s (175 s) for
resnet18 and 145 s (100 s) for convnext_atto; a target run 13-66 s (7-35 s). The full default run is
projected at about 23-26 min with ``--jobs 2`` on 2 idle cores (benchmarks/README.md).

    python benchmarks/transfer.py                      # full: resnet18 + convnext_atto, 2 targets x 7 arms,
                                                       # 5 seeds (140 runs); --work DIR reuses finished runs
    python benchmarks/transfer.py --report-only --work DIR   # the figures of the runs finished in DIR
    python benchmarks/transfer.py --quick              # CI: resnet18, one target, 3 arms, one seed, 2 epochs
    nice -n 10 python benchmarks/transfer.py --jobs 2 --out benchmarks/results > transfer.log 2>&1
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from queue import Empty, Queue
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import yaml

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
RECIPES = HERE / "transfer_recipes"
LAUNCHER = RECIPES / "finetune_many.py"  # se-retrofit's own main, one run after another in one process
IMPORT = ("--import", "transfer_noop")  # the registered no-op type of the plain and head-only arms
sys.path[:0] = [str(ROOT), str(RECIPES)]

NOOP = {"attention": "noop", "attention_module": "transfer_noop"}
EDITS = {  # arm -> retrofit section of the recipe (the edit applied to the source backbone)
    "plain": NOOP,
    "se-standard": {"attention": "se", "position": "standard", "reduction": 16},
    "se-post": {"attention": "se", "position": "post", "reduction": 16},
    "eca": {"attention": "eca", "position": "standard"},
    "se-random": None,  # per backbone: see random_arm
    "head-only": NOOP,
    "se-post-frozen": {"attention": "se", "position": "post", "reduction": 16},
}
FROZEN = ("head-only", "se-post-frozen")
TIMM_ATTN_LAYER = ("resnet18", "resnet34", "resnet26", "resnet50")  # timm ResNets take block_args attn_layer
SETTINGS = {"few": dict(labels=10, rotate=0.0, noise=0.0), "shift": dict(labels=20, rotate=45.0, noise=0.2)}
VAL_PER_CLASS = 30
SIZE = 32


# --- data: scikit-learn digits as PNG ImageFolders ------------------------------------------------

def digits() -> tuple[np.ndarray, np.ndarray]:
    """The 1,797 real 8x8 digits (values 0-16) and their labels, from scikit-learn's package files."""
    try:
        from sklearn.datasets import load_digits
    except ImportError:
        sys.exit("benchmarks/transfer.py needs scikit-learn (pip install '.[bench]' or pip install scikit-learn)")
    data = load_digits()
    return data.images, data.target


def to_image(image8: np.ndarray, rotate: float, noise: float, rng: np.random.Generator):
    """An 8x8 digit as a 32x32 greyscale PIL image, rotated by ``rotate`` degrees and noised."""
    from PIL import Image

    picture = Image.fromarray((image8 / 16.0 * 255).astype(np.uint8), "L").resize((SIZE, SIZE), Image.BILINEAR)
    if rotate:
        picture = picture.rotate(rotate, resample=Image.BILINEAR, fillcolor=0)
    if noise:
        pixels = np.asarray(picture, dtype=np.float64) / 255 + rng.normal(0, noise, (SIZE, SIZE))
        picture = Image.fromarray((np.clip(pixels, 0, 1) * 255).astype(np.uint8), "L")
    return picture


def write_folder(root: Path, images, labels, indices, transform: dict, rng_seed: int) -> None:
    """PNG files ROOT/LABEL/INDEX.png; each image's shift is drawn from its own index (so the same
    image looks the same in every folder it is written to)."""
    for i in indices:
        rng = np.random.default_rng([rng_seed, int(i)])
        angle = float(rng.uniform(-transform["rotate"], transform["rotate"])) if transform["rotate"] else 0.0
        folder = root / str(int(labels[i]))
        folder.mkdir(parents=True, exist_ok=True)
        to_image(images[i], angle, transform["noise"], rng).save(folder / f"{int(i):04d}.png")


def make_source(work: Path, per_class: int | None = None) -> Path:
    """Digits 0-4: 80% train, 20% val (a fixed permutation per class); ``per_class``: at most that
    many training images per class (the quick run's smaller source task)."""
    images, labels = digits()
    root = work / "data" / "source"
    rng = np.random.default_rng(0)
    for c in range(5):
        members = rng.permutation(np.flatnonzero(labels == c))
        cut = round(len(members) * 0.8)
        write_folder(root / "train", images, labels, members[:cut][:per_class], SETTINGS["few"], 0)
        write_folder(root / "val", images, labels, members[cut:], SETTINGS["few"], 0)
    return root


def make_target(work: Path, setting: str, seed: int) -> Path:
    """Digits 5-9: a fixed val set (50 per class), and ``labels`` per class drawn from the rest by ``seed``."""
    images, labels = digits()
    spec = SETTINGS[setting]
    root = work / "data" / f"{setting}-seed{seed}"
    if root.exists():
        return root
    split_rng, pick_rng = np.random.default_rng(1), np.random.default_rng(100 + seed)
    for c in range(5, 10):
        members = split_rng.permutation(np.flatnonzero(labels == c))
        val, pool = members[:VAL_PER_CLASS], members[VAL_PER_CLASS:]
        write_folder(root / "val", images, labels, val, spec, 7)
        write_folder(root / "train", images, labels, pick_rng.choice(pool, spec["labels"], replace=False), spec, 7)
    return root


# --- recipes and runs of the product's command ----------------------------------------------------

def recipe_for(template: str, name: str, **changes) -> dict:
    recipe = yaml.safe_load((RECIPES / template).read_text())
    recipe["name"] = name
    recipe.update(changes)
    return recipe


def frozen_phases(recipe: dict) -> list[dict]:
    """Phase 1 only, for the whole budget: the backbone stays frozen (attention modules + head train)."""
    first = dict(recipe["phases"][0])
    first["epochs"] = sum(p["epochs"] for p in recipe["phases"])
    return [first]


def write_recipe(recipe: dict, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def child_env() -> dict:
    return dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1",
                PYTHONPATH=os.pathsep.join([str(ROOT), str(RECIPES), os.environ.get("PYTHONPATH", "")]))


def finetune(recipe: Path, data: Path, out: Path, *args: str, log: Path) -> float:
    """``se-retrofit finetune`` in its own process (one thread); returns its wall time."""
    command = [sys.executable, "-m", "se_retrofit", "finetune", str(recipe), "--data", str(data), "--out", str(out),
               "--device", "cpu", "--no-progress", *IMPORT, *args]
    began = time.perf_counter()
    done = subprocess.run(command, env=child_env(), capture_output=True, text=True)
    with open(log, "a") as f:
        f.write(f"$ {' '.join(command)}\n{done.stdout}{done.stderr}(exit {done.returncode})\n")
    if done.returncode:
        raise RuntimeError(f"finetune failed (exit {done.returncode}): {' '.join(command)}\n{done.stderr[-2000:]}")
    return time.perf_counter() - began


def finished(out: Path, epochs: int) -> bool:
    """Whether ``out`` holds a finished run of ``epochs`` epochs (its final model saved)."""
    return ((out / "model" / "model.safetensors").is_file() and (out / "metrics.csv").is_file()
            and len(read_metrics(out)) == epochs)


def read_metrics(out: Path) -> list[dict]:
    import csv

    with open(out / "metrics.csv") as f:
        return [{k: (v if k == "phase" else float(v)) for k, v in row.items()} for row in csv.DictReader(f)]


# --- the source model and the backbone weights handed to the target runs --------------------------

def pretrain(backbone: str, work: Path, epochs: int, log: Path) -> Path:
    """Train the source model with the product's command, interrupted after epoch 1 and resumed
    (on the source images :func:`make_source` wrote)."""
    source = work / "data" / "source"
    recipe = write_recipe(recipe_for("source.yaml", f"source-{backbone}", model=backbone),
                          work / "recipes" / f"source-{backbone}.yaml")
    out = work / "runs" / backbone / "source"
    if finished(out, epochs):
        print(f"[{backbone}] source model: reused the finished run in {out}", flush=True)
        return out
    seconds = finetune(recipe, source, out, "--epochs", str(epochs), "--stop-after-epoch", "1", log=log)
    seconds += finetune(recipe, source, out, "--epochs", str(epochs), "--resume", log=log)
    print(f"[{backbone}] source model: {epochs} epochs (stopped after 1, resumed) in {seconds:.0f} s; "
          f"val acc per epoch {[round(r['val_acc'], 3) for r in read_metrics(out)]}", flush=True)
    return out


def source_state(run: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(run / "model" / "model.safetensors"))


def backbone_weights(backbone: str, run: Path, path: Path) -> Path:
    """The source model's weights without its head: a state dict of ``timm.create_model(backbone,
    num_classes=0)``, which the target recipes load strictly (then a fresh head for digits 5-9)."""
    import timm
    from safetensors.torch import save_file

    headless = timm.create_model(backbone, num_classes=0).state_dict()
    state = source_state(run)
    missing = sorted(set(headless) - set(state))
    if missing:
        raise RuntimeError(f"source model lacks backbone keys {missing[:5]}")
    save_file({k: state[k].contiguous() for k in headless}, str(path))
    return path


def timm_random_se(backbone: str, state: dict, seed: int, num_classes: int) -> torch.nn.Module:
    """timm's ResNet with its own randomly initialised SE in every block (``block_args=dict(attn_layer="se")``),
    the source weights loaded non-strictly: only the SE weights may be missing."""
    import timm

    torch.manual_seed(seed)
    model = timm.create_model(backbone, num_classes=num_classes, block_args=dict(attn_layer="se"))
    result = model.load_state_dict(state, strict=False)
    if result.unexpected_keys or any(".se." not in k for k in result.missing_keys):
        raise RuntimeError(f"non-strict load: unexpected {result.unexpected_keys[:3]}, missing "
                           f"{[k for k in result.missing_keys if '.se.' not in k][:3]}")
    return model


def random_arm(backbone: str, backbone_file: Path, seed: int, work: Path) -> dict:
    """The recipe changes of the ``se-random`` arm for ``backbone`` and ``seed``."""
    if backbone in TIMM_ATTN_LAYER:
        from safetensors.torch import load_file, save_file

        model = timm_random_se(backbone, load_file(str(backbone_file)), seed, num_classes=0)
        path = work / "weights" / f"{backbone}-timm-se-seed{seed}.safetensors"
        save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
        return {"weights": str(path), "model_kwargs": {"num_classes": 0, "block_args": {"attn_layer": "se"}},
                "retrofit": NOOP}
    return {"retrofit": {"attention": "se", "position": "post", "reduction": 16, "init": "random"}}


# --- identity: source accuracy before and right after each edit -----------------------------------

@torch.no_grad()
def evaluate(model: torch.nn.Module, loader) -> tuple[float, torch.Tensor]:
    model.eval()
    logits = torch.cat([model(images) for images, _ in loader])
    targets = torch.cat([t for _, t in loader])
    return (logits.argmax(1) == targets).double().mean().item(), logits


def source_loader(backbone: str, work: Path):
    """The source validation images through the product's own evaluation transform."""
    import timm
    from torch.utils.data import DataLoader
    from se_retrofit.finetune.data import ImageList, build_transforms, data_config, find_splits
    from se_retrofit.finetune.recipe import DataSpec

    splits = find_splits(work / "data" / "source")
    config = data_config(timm.create_model(backbone, num_classes=5), SIZE)
    return DataLoader(ImageList(splits.val, build_transforms(config, DataSpec(image_size=SIZE))[1]), batch_size=64)


def identity_rows(backbone: str, run: Path, work: Path, arms: list[str], seeds: list[int]) -> dict:
    """Per arm: source val accuracy before and right after the edit, and max |Δ logits| (per seed
    for the random-init arm)."""
    import timm
    import se_retrofit
    import transfer_noop  # noqa: F401  (registers the "noop" type of the plain and head-only arms)

    torch.manual_seed(0)
    state = source_state(run)
    source = timm.create_model(backbone, num_classes=5)
    source.load_state_dict(state, strict=True)
    loader = source_loader(backbone, work)
    before, reference = evaluate(source, loader)
    example = torch.zeros(1, 3, SIZE, SIZE)
    rows = {}
    for arm in arms:
        results = []
        for seed in (seeds if arm == "se-random" else seeds[:1]):
            if arm == "se-random" and backbone in TIMM_ATTN_LAYER:
                edited = timm_random_se(backbone, state, seed, num_classes=5)
            else:
                config = dict(random_arm(backbone, Path(), seed, work)["retrofit"] if arm == "se-random"
                              else EDITS[arm])
                config.pop("attention_module", None)
                torch.manual_seed(seed)
                edited = se_retrofit.retrofit(source, example_input=example, **config)
            after, logits = evaluate(edited, loader)
            results.append((after, (logits - reference).abs().max().item(),
                            sum(p.numel() for p in edited.parameters()) - sum(p.numel() for p in source.parameters())))
        rows[arm] = {"before": before, "after": [r[0] for r in results], "max_abs_diff": [r[1] for r in results],
                     "new_params": results[0][2]}
    return rows


# --- the whole benchmark --------------------------------------------------------------------------

@dataclass(frozen=True)
class Job:
    backbone: str
    setting: str
    seed: int
    arm: str


def target_recipe(job: Job, backbone_file: Path, work: Path, epochs: list[int]) -> Path:
    recipe = recipe_for("target.yaml", f"{job.backbone}-{job.setting}-{job.arm}-seed{job.seed}", model=job.backbone,
                        weights=str(backbone_file))
    for phase, count in zip(recipe["phases"], epochs):
        phase["epochs"] = count
    recipe["retrofit"] = EDITS[job.arm]
    if job.arm == "se-random":
        recipe.update(random_arm(job.backbone, backbone_file, job.seed, work))
    if job.arm in FROZEN:
        recipe["phases"] = frozen_phases(recipe)
    recipe["train"]["seed"] = job.seed
    return write_recipe(recipe, work / "recipes" / f"{recipe['name']}.yaml")


def prepare(job: Job, backbone_file: Path, work: Path, epochs: list[int]) -> list[str]:
    """The ``se-retrofit finetune`` arguments of one job (its data and recipe written)."""
    data = make_target(work, job.setting, job.seed)
    out = work / "runs" / job.backbone / job.setting / job.arm / f"seed{job.seed}"
    return ["finetune", str(target_recipe(job, backbone_file, work, epochs)), "--data", str(data), "--out", str(out),
            "--device", "cpu", "--no-progress", "--overwrite", *IMPORT]


def expected_epochs(argv: list[str]) -> int:
    return sum(p["epochs"] for p in yaml.safe_load(Path(argv[1]).read_text())["phases"])


def run_jobs(jobs: list[Job], argvs: list[list[str]], workers: int, log: Path, report_only: bool = False
             ) -> list[dict]:
    """The jobs in ``workers`` processes (one thread each), each taking the next job from one queue
    (seed by seed, the longest first within a seed) and running it through the product's ``main`` (LAUNCHER); returns one result per
    job (``report_only``: runs nothing, and returns the finished jobs only)."""
    todo = [i for i, argv in enumerate(argvs) if not finished(Path(argv[5]), expected_epochs(argv))]
    print(f"{len(jobs) - len(todo)} finished runs {'found' if report_only else 'reused'} in {log.parent}, "
          f"{len(todo)} {'unfinished (left out)' if report_only else 'to run'}", flush=True)
    if report_only:
        done = [i for i in range(len(jobs)) if i not in todo]
        jobs, argvs, todo = [jobs[i] for i in done], [argvs[i] for i in done], []
    queue = Queue()
    for i in sorted(todo, key=lambda i: (jobs[i].seed, -cost(jobs[i]))):  # seed by seed: a partial run covers every arm
        queue.put(i)
    seconds, cpu_times = [0.0] * len(jobs), [0.0] * len(jobs)  # wall and CPU time of each run done here

    def work(w: int) -> None:
        with open(log.with_name(f"worker-{w}.log"), "w") as out:
            process = subprocess.Popen([sys.executable, str(LAUNCHER)], env=child_env(), stdin=subprocess.PIPE,
                                       stdout=subprocess.PIPE, stderr=out, text=True)
            try:
                while True:
                    try:
                        i = queue.get_nowait()
                    except Empty:
                        break
                    process.stdin.write(json.dumps(argvs[i]) + "\n")
                    process.stdin.flush()
                    line = process.stdout.readline()
                    while line and not line.startswith("DONE "):
                        out.write(line)
                        line = process.stdout.readline()
                    if not line:
                        raise RuntimeError(f"worker {w} ended: see {out.name}")
                    out.write(line)
                    _, took, code, cpu = line.split()
                    if code != "0":
                        raise RuntimeError(f"finetune failed (exit {code}) for {jobs[i]}: see {out.name}")
                    seconds[i], cpu_times[i] = float(took), float(cpu)
                    final = read_metrics(Path(argvs[i][5]))[-1]["val_acc"]
                    print(f"[{jobs[i].backbone} {jobs[i].setting} seed {jobs[i].seed}] {jobs[i].arm:15s} "
                          f"val acc {final:.3f} ({seconds[i]:.0f} s, CPU {cpu_times[i]:.0f} s)", flush=True)
            finally:
                process.stdin.close()
                rest = process.stdout.read()
                out.write(rest)
                if process.wait():
                    raise RuntimeError(f"worker {w} failed: see {out.name}")

    if todo:
        with ThreadPoolExecutor(workers) as pool:
            list(pool.map(work, range(min(workers, len(todo)))))
    results = []
    for job, argv, took, cpu in zip(jobs, argvs, seconds, cpu_times):
        rows = read_metrics(Path(argv[5]))
        results.append({**job.__dict__, "seconds": took, "cpu_seconds": cpu, "final": rows[-1]["val_acc"],
                        "curve": [r["val_acc"] for r in rows], "train_loss": [r["train_loss"] for r in rows],
                        "phases": [r["phase"] for r in rows]})
    return results


def cost(job: Job) -> float:
    """A rough relative cost of a job (for handing out the longest first): training images, the
    backbone (ResNet-18 about twice ConvNeXt-atto here), a frozen backbone's cheaper backward."""
    return (SETTINGS[job.setting]["labels"] + VAL_PER_CLASS / 2) * (2 if "resnet" in job.backbone else 1) \
        * (0.7 if job.arm in FROZEN else 1)


def mean_std(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def paired(by_arm: dict, arm: str, reference: str) -> tuple[float, float, bool]:
    """Mean and std of ``arm`` minus ``reference`` over the seeds both ran, and whether the mean is
    more than 2 standard errors from 0."""
    seeds = sorted(set(by_arm.get(arm, {})) & set(by_arm.get(reference, {})))
    diffs = [by_arm[arm][k]["final"] - by_arm[reference][k]["final"] for k in seeds]
    if not diffs:
        return float("nan"), 0.0, False
    m, sd = mean_std(diffs)
    return m, sd, bool(len(diffs) > 1 and abs(m) > 2 * sd / len(diffs) ** 0.5)


def summarise(runs: list[dict], backbones, settings, arms) -> dict:
    """Per backbone, setting and arm: final accuracy mean ± std over seeds, and the difference from
    ``plain`` paired by seed (mean ± std, and whether it is more than 2 standard errors from 0); for
    attention-only training, also its difference from training the head only (both frozen)."""
    table = {}
    for b in backbones:
        for s in settings:
            by_arm = {a: {r["seed"]: r for r in runs if (r["backbone"], r["setting"], r["arm"]) == (b, s, a)}
                      for a in arms}
            for a in arms:
                finals = [r["final"] for r in by_arm[a].values()]
                if not finals:
                    continue
                m, sd = mean_std(finals)
                dm, dsd, measurable = paired(by_arm, a, "plain")
                table[f"{b}/{s}/{a}"] = {"mean": m, "std": sd, "n": len(finals), "diff_vs_plain": dm,
                                         "diff_std": dsd, "measurable": measurable}
                if a == "se-post-frozen" and by_arm.get("head-only"):
                    hm, hsd, hmeasurable = paired(by_arm, a, "head-only")
                    table[f"{b}/{s}/{a}"].update(diff_vs_head_only=hm, diff_vs_head_only_std=hsd,
                                                 vs_head_only_measurable=hmeasurable)
    return table


def reading(table: dict, backbones, settings, arms) -> list[str]:
    """Plain sentences: per setting, which arms differ measurably from plain fine-tuning (paired
    difference more than 2 standard errors from 0), and which do not."""
    lines = []
    for b in backbones:
        for s in settings:
            key = lambda a: f"{b}/{s}/{a}"
            compared = [a for a in arms if a != "plain" and key(a) in table and table[key(a)]["n"] > 1]
            if not compared:
                continue
            up = [a for a in compared if table[key(a)]["measurable"] and table[key(a)]["diff_vs_plain"] > 0]
            down = [a for a in compared if table[key(a)]["measurable"] and table[key(a)]["diff_vs_plain"] < 0]
            same = [a for a in compared if a not in up and a not in down]
            parts = []
            if up:
                parts.append("better than plain: " + ", ".join(f"{a} ({table[key(a)]['diff_vs_plain']:+.3f})" for a in up))
            if down:
                parts.append("worse than plain: " + ", ".join(f"{a} ({table[key(a)]['diff_vs_plain']:+.3f})" for a in down))
            if same:
                parts.append("no measurable difference from plain: " + ", ".join(same))
            frozen = table.get(key("se-post-frozen"), {})
            if "diff_vs_head_only" in frozen:
                parts.append(f"attention-only training (frozen backbone) vs the head alone: "
                             f"{frozen['diff_vs_head_only']:+.3f} ± {frozen['diff_vs_head_only_std']:.3f} "
                             f"({'measurable' if frozen['vs_head_only_measurable'] else 'not measurable'})")
            lines.append(f"{b}, {s}: " + "; ".join(parts) + ".")
    return lines


def write_markdown(path: Path, result: dict) -> None:
    backbones, settings, arms = result["backbones"], result["settings"], result["arms"]
    table, ident = result["table"], result["identity"]
    lines = [f"# Transfer on scikit-learn digits (command: `{result['command']}`)", "",
             f"Seeds {result['seeds']}; epochs per phase {result['epochs']} (frozen arms: phase 1 for all); "
             f"wall time {result['seconds'] / 60:.1f} min with {result['jobs']} parallel runs "
             f"(CPU time {result['cpu_seconds'] / 60:.1f} min; load average at the end "
             f"{', '.join(f'{x:.1f}' for x in result['load_average'])}).", "",
             "Final validation accuracy (mean ± std over seeds; Δ: difference from plain, paired by seed, "
             "mean ± std; * where it is more than 2 standard errors from 0). Source acc: the source model's "
             "validation accuracy on digits 0-4 before → right after the edit (max |Δ logits|).", ""]
    header = "| backbone | arm | new params | source acc before → after edit (max abs Δ) | " + \
             " | ".join(f"{s}: acc | {s}: Δ vs plain" for s in settings) + " |"
    lines += [header, "|" + " --- |" * (4 + 2 * len(settings))]
    for b in backbones:
        for a in arms:
            row = ident[b].get(a)
            edit = "–" if row is None else (
                f"{row['before']:.3f} → {statistics.fmean(row['after']):.3f}"
                + (f" (min {min(row['after']):.3f})" if len(row['after']) > 1 else "")
                + f" ({max(row['max_abs_diff']):.2g})")
            cells = []
            for s in settings:
                t = table.get(f"{b}/{s}/{a}")
                cells += ["–", "–"] if t is None else [
                    f"{t['mean']:.3f} ± {t['std']:.3f}",
                    "–" if a == "plain" else f"{t['diff_vs_plain']:+.3f} ± {t['diff_std']:.3f}{'*' * t['measurable']}"]
            lines.append(f"| {b} | {a} | {row['new_params'] if row else '–'} | {edit} | " + " | ".join(cells) + " |")
    lines += ["", "Reading:", ""] + [f"- {line}" for line in reading(table, backbones, settings, arms)]
    path.write_text("\n".join(lines) + "\n")


def plot(path: Path, result: dict) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    backbones, settings, arms, runs = result["backbones"], result["settings"], result["arms"], result["runs"]
    fig, axes = plt.subplots(len(backbones), len(settings), figsize=(5.5 * len(settings), 3.8 * len(backbones)),
                             squeeze=False)
    for i, b in enumerate(backbones):
        for j, s in enumerate(settings):
            ax = axes[i][j]
            if not any((r["backbone"], r["setting"]) == (b, s) for r in runs):
                ax.set_visible(False)  # a setting --reduce left out for this backbone
                continue
            for a in arms:
                curves = np.array([r["curve"] for r in runs if (r["backbone"], r["setting"], r["arm"]) == (b, s, a)])
                if not len(curves):
                    continue
                x = np.arange(1, curves.shape[1] + 1)
                m, sd = curves.mean(0), curves.std(0)
                color = f"C{list(EDITS).index(a)}"  # one colour per arm in every panel
                ax.plot(x, m, label=a, color=color, linestyle="--" if a in FROZEN else "-")
                ax.fill_between(x, m - sd, m + sd, color=color, alpha=0.12)
            ax.set_title(f"{b}, {s} ({SETTINGS[s]['labels']} labels/class"
                         + (", rotated + noise" if SETTINGS[s]["rotate"] else "") + ")", fontsize=9)
            ax.set_xlabel("epoch")
            ax.set_ylabel("val accuracy (mean ± std)")
            ax.grid(alpha=0.3)
    axes[0][0].legend(fontsize=7, loc="lower right")
    fig.suptitle(f"Transfer digits 0-4 → 5-9, {len(result['seeds'])} seeds", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def parse(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="CI: resnet18, few, plain/se-post/se-random, 1 seed, "
                                                             "2 target epochs, 3 source epochs on 60 images/class")
    parser.add_argument("--backbones", nargs="+", help="timm names (default resnet18 convnext_atto)")
    parser.add_argument("--settings", nargs="+", choices=sorted(SETTINGS))
    parser.add_argument("--arms", nargs="+", choices=list(EDITS))
    parser.add_argument("--seeds", type=int, help="number of seeds (default 5)")
    parser.add_argument("--epochs", help="target epochs per phase, e.g. 2,4 (default: the recipe's)")
    parser.add_argument("--source-epochs", type=int, help="source pretraining epochs (default 6)")
    parser.add_argument("--source-images", type=int, help="training images per source class (default: all, "
                                                           "about 145; --quick 60)")
    parser.add_argument("--reduce", action="append", default=[], metavar="BACKBONE:SETTINGS:ARMS",
                        help="run only these settings and arms on BACKBONE, e.g. convnext_atto:few:plain,se-post "
                             "(repeatable)")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: report the finished runs in --work (a partial run's figures)")
    parser.add_argument("--jobs", type=int, default=2, help="fine-tuning runs at a time (one thread each)")
    parser.add_argument("--out", type=Path, help="where the table, JSON and plot go (default: a temporary "
                                                 "directory with --quick, else benchmarks/results)")
    parser.add_argument("--work", type=Path, help="data and runs (default: a temporary directory, removed)")
    args = parser.parse_args(argv)
    quick = args.quick
    args.backbones = args.backbones or (["resnet18"] if quick else ["resnet18", "convnext_atto"])
    args.settings = args.settings or (["few"] if quick else list(SETTINGS))
    args.arms = args.arms or (["plain", "se-post", "se-random"] if quick else list(EDITS))
    if "plain" not in args.arms:
        args.arms.insert(0, "plain")
    args.seeds = args.seeds or (1 if quick else 5)
    args.epochs = [int(e) for e in args.epochs.split(",")] if args.epochs else ([1, 1] if quick else [2, 4])
    args.source_epochs = args.source_epochs or (3 if quick else 6)
    args.source_images = args.source_images or (60 if quick else None)
    args.reduced = {}
    for item in args.reduce:
        backbone, settings, arms = item.split(":")
        args.reduced[backbone] = (settings.split(","), ["plain"] + [a for a in arms.split(",") if a != "plain"])
    return args


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (user + system): the wall time the work
    would take on one idle core."""
    import resource

    return sum(resource.getrusage(who).ru_utime + resource.getrusage(who).ru_stime
               for who in (resource.RUSAGE_SELF, resource.RUSAGE_CHILDREN))


def main(argv=None) -> dict:
    args = parse(argv)
    began = time.perf_counter()
    work = args.work or Path(tempfile.mkdtemp(prefix="se-transfer-"))
    out = args.out or (work / "results" if args.quick else HERE / "results")
    for folder in (work / "weights", out):
        folder.mkdir(parents=True, exist_ok=True)
    log = work / "finetune.log"
    seeds = list(range(args.seeds))
    print(f"work {work}, log {log}", flush=True)
    result = {"command": "python benchmarks/transfer.py " + " ".join(argv if argv is not None else sys.argv[1:]),
              "backbones": args.backbones, "settings": args.settings, "arms": args.arms, "seeds": seeds,
              "epochs": args.epochs, "source_epochs": args.source_epochs, "jobs": args.jobs, "identity": {},
              "source_curves": {}, "runs": []}
    try:
        backbones = [b for b in args.backbones
                     if not args.report_only or finished(work / "runs" / b / "source", args.source_epochs)]
        for b in sorted(set(args.backbones) - set(backbones)):
            print(f"[{b}] no finished source run in {work}: left out of the report", flush=True)
        make_source(work, args.source_images)
        with ThreadPoolExecutor(max(1, min(args.jobs, len(backbones)))) as pool:  # the source models side by side
            sources = dict(zip(backbones, pool.map(
                lambda b: pretrain(b, work, args.source_epochs, log), backbones)))
        jobs, argvs = [], []
        for backbone, source in sources.items():
            result["source_curves"][backbone] = [r["val_acc"] for r in read_metrics(source)]
            result["identity"][backbone] = identity_rows(backbone, source, work, args.arms, seeds)
            for arm, row in result["identity"][backbone].items():
                print(f"[{backbone}] {arm:15s} source acc {row['before']:.4f} -> {row['after']} "
                      f"max |Δ| {max(row['max_abs_diff']):.3g}", flush=True)
            weights = backbone_weights(backbone, source, work / "weights" / f"{backbone}-backbone.safetensors")
            settings, arms = args.reduced.get(backbone, (args.settings, args.arms))
            for job in [Job(backbone, s, seed, a) for s in settings for seed in seeds for a in arms]:
                jobs.append(job)
                argvs.append(prepare(job, weights, work, args.epochs))
        result["runs"] = run_jobs(jobs, argvs, args.jobs, log, args.report_only)
        result["backbones"] = args.backbones = [b for b in args.backbones if b in result["identity"]]
        result["seconds"] = time.perf_counter() - began
        result["cpu_seconds"] = cpu_seconds()
        result["load_average"] = os.getloadavg()
        result["table"] = summarise(result["runs"], args.backbones, args.settings, args.arms)
        result["reading"] = reading(result["table"], args.backbones, args.settings, args.arms)
        (out / "transfer.json").write_text(json.dumps(result, indent=1))
        write_markdown(out / "transfer.md", result)
        plot(out / "transfer.png", result)
        print((out / "transfer.md").read_text(), flush=True)
        print(f"wrote {out / 'transfer.md'}, {out / 'transfer.json'}, {out / 'transfer.png'} "
              f"in {result['seconds'] / 60:.1f} min", flush=True)
    finally:
        if args.work is None:
            shutil.rmtree(work, ignore_errors=True)
    return result


if __name__ == "__main__":
    main()
