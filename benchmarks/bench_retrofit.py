"""Benchmark the cost of retrofitting SE into timm ``resnet50``, on CPU.

Two measurements, both in one run and both on CPU:

1. **Retrofit time.** The wall time of ``se_retrofit.retrofit(model)`` (position "standard",
   reduction 16) on a random-weight ``timm.create_model("resnet50")``, compared with the wall
   time of ``timm.create_model("resnet50")`` itself, measured in the same run. ``retrofit``
   returns an edited copy, so its time includes copying the model. Reported: the median of each
   over ``--build-repeats`` repeats, and their ratio.

2. **Inference latency.** Forward time of a batch of 8 images of 3x224x224, in eval mode under
   ``torch.inference_mode()``, for

   - ``retrofit``: ``se_retrofit.retrofit(timm.create_model("resnet50"), position="standard",
     reduction=16)``,
   - ``seresnet50``: timm's native ``timm.create_model("seresnet50")``,
   - ``resnet50``: plain ``timm.create_model("resnet50")``.

   After warm-up runs, the models are timed round-robin (one run of each model per round), so
   that drift in the machine's speed affects all of them alike. Reported: the median of each,
   and the ratios retrofit / seresnet50 (goal: at most 1.03) and retrofit / resnet50.

The number of torch threads is left at its default and printed. Every random source is seeded.
A missed goal is reported, not treated as an error: the script exits 0 either way.

Run it on an otherwise idle machine. Other processes on the same cores make torch's worker
threads wait for one another, and forward passes then take up to ten times longer; the script
measures (Linux only) the CPU share other processes used before and during the run, prints it,
and warns when it exceeds 10%.

Run from the repository root (with the package installed, e.g. in ``.venv``)::

    python benchmarks/bench_retrofit.py                       # full run (~30 s on an idle 2-core CPU)
    python benchmarks/bench_retrofit.py --quick               # smoke run, fewer repeats
    python benchmarks/bench_retrofit.py --repeats 30 --json results.json
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import platform
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
from rich.console import Console
from rich.table import Table

import se_retrofit

GOAL = 1.03  # retrofit latency / seresnet50 latency must not exceed this
BATCH_SHAPE = (8, 3, 224, 224)
POSITION = "standard"
REDUCTION = 16

FULL = {"repeats": 15, "build_repeats": 5, "warmup": 3, "check_repeats": 2}
QUICK = {"repeats": 3, "build_repeats": 2, "warmup": 1, "check_repeats": 1}


def seed_everything(seed: int) -> None:
    """Seed Python's, NumPy's and torch's random number generators."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def time_call(fn: Callable[[], Any]) -> float:
    """Return the wall time, in seconds, of one call of ``fn`` (garbage collected beforehand)."""
    gc.collect()
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def round_robin(tasks: dict[str, Callable[[], Any]], repeats: int, warmup: int) -> dict[str, list[float]]:
    """Time every task ``repeats`` times, one call of each task per round, after ``warmup`` rounds.

    Interleaving the tasks spreads slow drift of the machine's speed (heat, other load) evenly
    over them, instead of letting it fall on whichever task happened to run last; the order
    rotates from round to round.
    """
    for _ in range(warmup):
        for fn in tasks.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in tasks}
    names = list(tasks)
    for round_ in range(repeats):
        for k in range(len(names)):  # each round starts with the next task: no task always runs first
            name = names[(round_ + k) % len(names)]
            samples[name].append(time_call(tasks[name]))
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """Median of each task's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}


MODELS = ("resnet18", "resnet50", "resnet152", "convnext_base", "efficientnet_b3", "regnety_032",
          "vit_base_patch16_224")


def worker() -> int:
    """Answer timing requests on stdin, one JSON line each: ``{"model": NAME, "task": TASK}`` with
    TASK ``create`` (``timm.create_model``), ``retrofit`` (of a model built once and kept) or
    ``check`` (the CLI's identity check of that edit); the reply is ``{"seconds": S}``.

    The benchmark runs one worker per version of the code (``--before PATH`` puts an older
    checkout first on the worker's ``sys.path``), so both versions are timed in one run, alternately.
    """
    import warnings

    from se_retrofit.analysis import default_example_input
    from se_retrofit.identity_check import check_identity

    warnings.simplefilter("ignore")
    torch.set_num_threads(int(os.environ.get("BENCH_THREADS", torch.get_num_threads())))
    bases: dict[str, torch.nn.Module] = {}
    edited: dict[str, torch.nn.Module] = {}
    print(json.dumps({"version": se_retrofit.__version__, "path": str(Path(se_retrofit.__file__).parent)}),
          flush=True)
    for line in sys.stdin:
        request = json.loads(line)
        name, task = request["model"], request["task"]
        seed_everything(0)
        if name not in bases:
            bases[name] = timm.create_model(name).eval()
        base = bases[name]
        if task == "create":
            seconds = time_call(lambda: timm.create_model(name))
        elif task == "retrofit":
            edited.pop(name, None)  # freed first, as create_model's result is: both allocate alike
            box = {}
            seconds = time_call(lambda: box.setdefault(
                "m", se_retrofit.retrofit(base, position=POSITION, reduction=REDUCTION)))
            edited[name] = box["m"]
        elif task == "check":
            model = edited.get(name) or se_retrofit.retrofit(base, position=POSITION, reduction=REDUCTION)
            example = default_example_input(base)
            box = {}
            seconds = time_call(lambda: box.setdefault("c", check_identity(base, model, example,
                                                                         random_weights=True)))
            if not box["c"].passed:
                raise SystemExit(f"{name}: identity check failed: {box['c']}")
        else:
            raise SystemExit(f"unknown task {task!r}")
        print(json.dumps({"seconds": seconds}), flush=True)
    return 0


class Worker:
    """A worker process (see :func:`worker`) importing se_retrofit from ``path`` (None: as this one does)."""

    def __init__(self, label: str, path: Path | None):
        env = dict(os.environ)
        if path is not None:
            env["PYTHONPATH"] = os.pathsep.join([str(path), env.get("PYTHONPATH", "")])
        self.label = label
        self.process = subprocess.Popen([sys.executable, __file__, "--worker"], stdin=subprocess.PIPE,
                                        stdout=subprocess.PIPE, text=True, env=env)
        self.info = json.loads(self.process.stdout.readline())

    def time(self, model: str, task: str) -> float:
        self.process.stdin.write(json.dumps({"model": model, "task": task}) + "\n")
        self.process.stdin.flush()
        line = self.process.stdout.readline()
        if not line:
            raise RuntimeError(f"the {self.label} worker stopped (model {model}, task {task})")
        return json.loads(line)["seconds"]

    def close(self) -> None:
        self.process.stdin.close()
        self.process.wait()


def bench_build(models: list[str], repeats: int, versions: dict[str, Path | None],
                check_repeats: int) -> dict[str, Any]:
    """Time ``create_model`` and ``retrofit`` of each model, for each version of the code.

    Rounds interleave everything: within a round each model is created and retrofitted once by
    each version's worker, alternately, so drift in the machine's load falls on all alike.
    Reported: min and median of each, and the ratio retrofit / create_model of the minima
    (the least disturbed runs) and of the medians. The identity check (the CLI runs it after
    the edit, on real numbers) is timed after, separately.
    """
    workers = {label: Worker(label, path) for label, path in versions.items()}
    try:
        samples = {label: {m: {"create": [], "retrofit": [], "check": []} for m in models} for label in workers}
        for model in models:  # warm-up: build each base model once, retrofit once
            for label, w in workers.items():
                w.time(model, "retrofit")
        for _ in range(repeats):
            for model in models:
                for label, w in workers.items():
                    for task in ("create", "retrofit"):
                        samples[label][model][task].append(w.time(model, task))
        for _ in range(check_repeats):
            for model in models:
                for label, w in workers.items():
                    samples[label][model]["check"].append(w.time(model, "check"))
        info = {label: w.info for label, w in workers.items()}
    finally:
        for w in workers.values():
            w.close()
    table = {}
    for label, per_model in samples.items():
        for model, tasks in per_model.items():
            row = {f"{task}_{stat}": fn(values) for task, values in tasks.items() if values
                   for stat, fn in (("min_s", min), ("median_s", statistics.median))}
            row["ratio_of_mins"] = row["retrofit_min_s"] / row["create_min_s"]
            row["ratio_of_medians"] = row["retrofit_median_s"] / row["create_median_s"]
            table.setdefault(label, {})[model] = row
    return {"samples_s": samples, "table": table, "versions": info}


def build_models() -> dict[str, torch.nn.Module]:
    """The three models of the latency benchmark, in eval mode."""
    models = {
        "retrofit": se_retrofit.retrofit(timm.create_model("resnet50"), position=POSITION, reduction=REDUCTION),
        "seresnet50": timm.create_model("seresnet50"),
        "resnet50": timm.create_model("resnet50"),
    }
    return {name: model.eval() for name, model in models.items()}


def bench_latency(repeats: int, warmup: int) -> dict[str, Any]:
    """Forward latency of each model on one fixed batch, under ``torch.inference_mode()``.

    Reported: min and median of each; the ratio retrofit / seresnet50 of the minima (the goal's
    figure) and of the medians, and the spread of the ratio over rounds (the models run one after
    another in each round, so each round gives one ratio: its min, median and max)."""
    models = build_models()
    x = torch.randn(BATCH_SHAPE)
    tasks = {name: (lambda m=model: m(x)) for name, model in models.items()}
    with torch.inference_mode():
        samples = round_robin(tasks, repeats=repeats, warmup=warmup)
    mins = {name: min(values) for name, values in samples.items()}
    med = medians(samples)
    per_round = [a / b for a, b in zip(samples["retrofit"], samples["seresnet50"])]
    ratios = {
        "retrofit/seresnet50": mins["retrofit"] / mins["seresnet50"],
        "retrofit/seresnet50_of_medians": med["retrofit"] / med["seresnet50"],
        "retrofit/seresnet50_per_round": {"min": min(per_round), "median": statistics.median(per_round),
                                          "max": max(per_round)},
        "retrofit/resnet50": mins["retrofit"] / mins["resnet50"],
    }
    return {"samples_s": samples, "min_s": mins, "median_s": med, "ratios": ratios,
            "goal": GOAL, "goal_met": ratios["retrofit/seresnet50"] <= GOAL}


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU seconds used on the whole machine, by this process and its finished workers, wall clock)
    now; None off Linux. The workers are waited for before the share is taken, so their CPU is ours."""
    try:
        jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
    own = os.times()
    ours = own.user + own.system + own.children_user + own.children_system
    return (sum(jiffies) - idle) / os.sysconf("SC_CLK_TCK"), ours, time.perf_counter()


def other_cpu_share(since: tuple[float, float, float] | None) -> float | None:
    """Share of the machine's CPU capacity that other processes used since the snapshot ``since``.

    Other load matters a great deal here: torch's worker threads contend with it for the cores,
    and a timed run can come out ten times slower.
    """
    now = cpu_snapshot()
    if since is None or now is None or now[2] <= since[2]:
        return None
    other = (now[0] - since[0]) - (now[1] - since[1])
    return max(0.0, other / ((now[2] - since[2]) * (os.cpu_count() or 1)))


def report_load(console: Console, label: str, share: float | None) -> None:
    """Print the other processes' CPU share, with a warning where it may inflate the timings."""
    if share is None:
        return
    console.print(f"CPU used by other processes {label}: {share:.0%}")
    if share > 0.1:
        console.print("[bold yellow]warning[/]: the machine was not idle; timings may be inflated")


def environment() -> dict[str, Any]:
    """Versions and settings that the figures depend on."""
    return {
        "python": platform.python_version(),
        "platform": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "torch": torch.__version__,
        "timm": timm.__version__,
        "se_retrofit": se_retrofit.__version__,
        "torch_num_threads": torch.get_num_threads(),
        "cpu_count": os.cpu_count(),
    }


def render(console: Console, results: dict[str, Any]) -> None:
    """Print the result tables and the goal verdicts."""
    build, latency, cfg = results["build"], results["latency"], results["config"]
    if build is None:
        if latency is not None:
            render_latency(console, latency, cfg)
        return
    labels = list(build["table"])
    table = Table(title=f"retrofit() / timm.create_model(), at each model's default input; min and median of "
                        f"{cfg['build_repeats']} interleaved rounds; identity check: min of {cfg['check_repeats']}")
    table.add_column("model")
    table.add_column("create_model min (s)", justify="right")
    for label in labels:
        table.add_column(f"{label}: retrofit min (s)", justify="right")
        table.add_column(f"{label}: ratio of mins (medians)", justify="right")
    table.add_column("identity check min (s)", justify="right")
    for model in cfg["models"]:
        rows = [build["table"][label][model] for label in labels]
        cells = [model, f"{rows[-1]['create_min_s']:.3f}"]
        for row in rows:
            cells += [f"{row['retrofit_min_s']:.3f}", f"{row['ratio_of_mins']:.2f}x ({row['ratio_of_medians']:.2f}x)"]
        cells.append(f"{rows[-1]['check_min_s']:.3f}" if "check_min_s" in rows[-1] else "-")
        table.add_row(*cells)
    console.print(table)
    worst = max(build["table"][labels[-1]].values(), key=lambda r: r["ratio_of_mins"])["ratio_of_mins"]
    verdict = "[bold green]GOAL MET[/]" if worst <= 1.0 else "[bold red]GOAL NOT MET[/]"
    console.print(f"{verdict}: worst retrofit/create_model ({labels[-1]}) = {worst:.2f}x (goal <= 1.0x)")
    if latency is not None:
        render_latency(console, latency, cfg)


def render_latency(console: Console, latency: dict[str, Any], cfg: dict[str, Any]) -> None:
    """The latency table and the 1.03 goal's verdict."""

    table = Table(title=f"CPU latency, input {'x'.join(map(str, cfg['batch_shape']))}, {latency['threads']} torch "
                        f"threads, {cfg['repeats']} rounds ({cfg['warmup']} warm-up rounds)")
    for column in ("model", "min (ms)", "median (ms)", "max (ms)", "min / seresnet50 min", "min / resnet50 min"):
        table.add_column(column, justify="left" if column == "model" else "right")
    mins = latency["min_s"]
    for name, value in mins.items():
        samples = latency["samples_s"][name]
        table.add_row(name, f"{value * 1e3:.1f}", f"{latency['median_s'][name] * 1e3:.1f}",
                      f"{max(samples) * 1e3:.1f}", f"{value / mins['seresnet50']:.3f}",
                      f"{value / mins['resnet50']:.3f}")
    console.print(table)
    ratios = latency["ratios"]
    spread = ratios["retrofit/seresnet50_per_round"]
    text = (f"latency retrofit/seresnet50 = {ratios['retrofit/seresnet50']:.3f} (ratio of mins; of medians "
            f"{ratios['retrofit/seresnet50_of_medians']:.3f}; per round min {spread['min']:.3f}, median "
            f"{spread['median']:.3f}, max {spread['max']:.3f})")
    if latency["goal_met"]:
        console.print(f"[bold green]GOAL MET[/]: {text} <= {GOAL:.2f}")
    else:
        console.print(f"[bold red]GOAL NOT MET[/]: {text} > {GOAL:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers every count not given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=list(MODELS), help="timm models of the build table")
    parser.add_argument("--before", type=Path, metavar="DIR",
                        help="also time the se_retrofit of DIR (a checkout of older code, e.g. made with "
                             "`git worktree add /tmp/before main`), interleaved with this one")
    parser.add_argument("--repeats", type=int, help=f"timed latency rounds (default {FULL['repeats']})")
    parser.add_argument("--build-repeats", type=int,
                        help=f"timed create_model/retrofit rounds (default {FULL['build_repeats']})")
    parser.add_argument("--check-repeats", type=int,
                        help=f"timed identity-check rounds (default {FULL['check_repeats']})")
    parser.add_argument("--warmup", type=int, help=f"latency warm-up rounds (default {FULL['warmup']})")
    parser.add_argument("--skip-latency", action="store_true", help="time the builds only")
    parser.add_argument("--skip-build", action="store_true", help="time the inference latency only")
    parser.add_argument("--threads", type=int,
                        help="torch threads for the latency part (default: torch's own; 1 is far less "
                             "sensitive to other load on a shared machine)")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run the benchmarks, print the tables, optionally write JSON. Always returns 0."""
    args = parse_args(argv)
    if args.worker:
        return worker()
    console = Console()
    seed_everything(args.seed)
    env = environment()
    console.print(f"torch {env['torch']}, timm {env['timm']}, se_retrofit {env['se_retrofit']}; "
                  f"torch.get_num_threads() = {env['torch_num_threads']}")
    snapshot = cpu_snapshot()
    time.sleep(1.0)
    load = {"before_start": other_cpu_share(snapshot)}
    report_load(console, "before start", load["before_start"])

    versions: dict[str, Path | None] = {}
    if args.before is not None:
        versions["before"] = args.before.resolve()
    versions["after" if args.before is not None else "this"] = None
    snapshot, start = cpu_snapshot(), time.perf_counter()
    build = latency = None
    if not args.skip_build:
        with console.status("timing create_model and retrofit..."):
            build = bench_build(args.models, args.build_repeats, versions, args.check_repeats)
        load["during_build"] = other_cpu_share(snapshot)
    if not args.skip_latency:
        if args.threads:
            torch.set_num_threads(args.threads)
        snapshot = cpu_snapshot()
        with console.status(f"timing inference latency on {torch.get_num_threads()} threads..."):
            latency = bench_latency(args.repeats, args.warmup)
            latency["threads"] = torch.get_num_threads()
        load["during_latency"] = other_cpu_share(snapshot)
    results = {
        "command": " ".join(["python", "benchmarks/bench_retrofit.py", *(argv if argv is not None else sys.argv[1:])]),
        "config": {"models": args.models, "repeats": args.repeats, "build_repeats": args.build_repeats,
                   "check_repeats": args.check_repeats, "warmup": args.warmup,
                   "quick": args.quick, "seed": args.seed, "batch_shape": list(BATCH_SHAPE),
                   "position": POSITION, "reduction": REDUCTION},
        "environment": env,
        "other_cpu_share": load,
        "build": build,
        "latency": latency,
        "wall_s": time.perf_counter() - start,
    }

    render(console, results)
    for label, share in load.items():
        report_load(console, label.replace("_", " "), share)
    console.print(f"benchmark wall time: {results['wall_s']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
