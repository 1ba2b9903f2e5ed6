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

FULL = {"repeats": 15, "build_repeats": 5, "warmup": 3}
QUICK = {"repeats": 3, "build_repeats": 2, "warmup": 1}


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
    over them, instead of letting it fall on whichever task happened to run last.
    """
    for _ in range(warmup):
        for fn in tasks.values():
            fn()
    samples: dict[str, list[float]] = {name: [] for name in tasks}
    for _ in range(repeats):
        for name, fn in tasks.items():
            samples[name].append(time_call(fn))
    return samples


def medians(samples: dict[str, list[float]]) -> dict[str, float]:
    """Median of each task's samples."""
    return {name: statistics.median(values) for name, values in samples.items()}


def bench_build(repeats: int) -> dict[str, Any]:
    """Time ``timm.create_model("resnet50")`` and ``se_retrofit.retrofit`` of such a model."""
    base = timm.create_model("resnet50")
    tasks = {
        "create_model": lambda: timm.create_model("resnet50"),
        "retrofit": lambda: se_retrofit.retrofit(base, position=POSITION, reduction=REDUCTION),
    }
    samples = round_robin(tasks, repeats=repeats, warmup=1)
    med = medians(samples)
    return {"samples_s": samples, "median_s": med, "ratio": med["retrofit"] / med["create_model"]}


def build_models() -> dict[str, torch.nn.Module]:
    """The three models of the latency benchmark, in eval mode."""
    models = {
        "retrofit": se_retrofit.retrofit(timm.create_model("resnet50"), position=POSITION, reduction=REDUCTION),
        "seresnet50": timm.create_model("seresnet50"),
        "resnet50": timm.create_model("resnet50"),
    }
    return {name: model.eval() for name, model in models.items()}


def bench_latency(repeats: int, warmup: int) -> dict[str, Any]:
    """Median forward latency of each model on one fixed batch, under ``torch.inference_mode()``."""
    models = build_models()
    x = torch.randn(BATCH_SHAPE)
    tasks = {name: (lambda m=model: m(x)) for name, model in models.items()}
    with torch.inference_mode():
        samples = round_robin(tasks, repeats=repeats, warmup=warmup)
    med = medians(samples)
    ratios = {
        "retrofit/seresnet50": med["retrofit"] / med["seresnet50"],
        "retrofit/resnet50": med["retrofit"] / med["resnet50"],
    }
    return {"samples_s": samples, "median_s": med, "ratios": ratios,
            "goal": GOAL, "goal_met": ratios["retrofit/seresnet50"] <= GOAL}


def cpu_snapshot() -> tuple[float, float, float] | None:
    """(CPU seconds used on the whole machine, by this process, wall clock) now; None off Linux."""
    try:
        jiffies = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    except (OSError, ValueError):
        return None
    idle = jiffies[3] + (jiffies[4] if len(jiffies) > 4 else 0)  # idle + iowait
    own = os.times()
    return (sum(jiffies) - idle) / os.sysconf("SC_CLK_TCK"), own.user + own.system, time.perf_counter()


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
    """Print the two result tables and the goal verdict."""
    build, latency, cfg = results["build"], results["latency"], results["config"]

    table = Table(title=f"resnet50: retrofit vs. create_model, median of {cfg['build_repeats']}")
    table.add_column("step")
    table.add_column("median (s)", justify="right")
    table.add_column("/ create_model", justify="right")
    for name, value in build["median_s"].items():
        table.add_row(name, f"{value:.4f}", f"{value / build['median_s']['create_model']:.2f}x")
    console.print(table)

    table = Table(title=f"CPU latency, input {'x'.join(map(str, cfg['batch_shape']))}, "
                        f"median of {cfg['repeats']} ({cfg['warmup']} warm-up rounds)")
    table.add_column("model")
    table.add_column("median (ms)", justify="right")
    table.add_column("min (ms)", justify="right")
    table.add_column("max (ms)", justify="right")
    table.add_column("/ seresnet50", justify="right")
    table.add_column("/ resnet50", justify="right")
    med = latency["median_s"]
    for name, value in med.items():
        samples = latency["samples_s"][name]
        table.add_row(name, f"{value * 1e3:.1f}", f"{min(samples) * 1e3:.1f}", f"{max(samples) * 1e3:.1f}",
                      f"{value / med['seresnet50']:.3f}", f"{value / med['resnet50']:.3f}")
    console.print(table)

    ratio = latency["ratios"]["retrofit/seresnet50"]
    if latency["goal_met"]:
        console.print(f"[bold green]GOAL MET[/]: latency retrofit/seresnet50 = {ratio:.3f} <= {GOAL:.2f}")
    else:
        console.print(f"[bold red]GOAL NOT MET[/]: latency retrofit/seresnet50 = {ratio:.3f} > {GOAL:.2f}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """Command-line options; ``--quick`` lowers every count not given explicitly."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, help=f"timed latency rounds (default {FULL['repeats']})")
    parser.add_argument("--build-repeats", type=int,
                        help=f"timed create_model/retrofit rounds (default {FULL['build_repeats']})")
    parser.add_argument("--warmup", type=int, help=f"latency warm-up rounds (default {FULL['warmup']})")
    parser.add_argument("--quick", action="store_true", help="few repeats, for a smoke run")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--json", type=Path, metavar="PATH", help="also write the figures as JSON to PATH")
    args = parser.parse_args(argv)
    defaults = QUICK if args.quick else FULL
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def main(argv: list[str] | None = None) -> int:
    """Run both benchmarks, print the tables, optionally write JSON. Always returns 0."""
    args = parse_args(argv)
    console = Console()
    seed_everything(args.seed)
    env = environment()
    console.print(f"torch {env['torch']}, timm {env['timm']}, se_retrofit {env['se_retrofit']}; "
                  f"torch.get_num_threads() = {env['torch_num_threads']}")
    snapshot = cpu_snapshot()
    time.sleep(1.0)
    load = {"before_start": other_cpu_share(snapshot)}
    report_load(console, "before start", load["before_start"])

    snapshot, start = cpu_snapshot(), time.perf_counter()
    with console.status("timing create_model and retrofit..."):
        build = bench_build(args.build_repeats)
    with console.status("timing inference latency..."):
        latency = bench_latency(args.repeats, args.warmup)
    load["during_run"] = other_cpu_share(snapshot)
    results = {
        "config": {"repeats": args.repeats, "build_repeats": args.build_repeats, "warmup": args.warmup,
                   "quick": args.quick, "seed": args.seed, "batch_shape": list(BATCH_SHAPE),
                   "position": POSITION, "reduction": REDUCTION},
        "environment": env,
        "other_cpu_share": load,
        "build": build,
        "latency": latency,
        "wall_s": time.perf_counter() - start,
    }

    render(console, results)
    report_load(console, "during the run", load["during_run"])
    console.print(f"benchmark wall time: {results['wall_s']:.1f} s")
    if args.json:
        args.json.parent.mkdir(parents=True, exist_ok=True)
        args.json.write_text(json.dumps(results, indent=2) + "\n")
        console.print(f"figures written to {args.json}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
