"""Coverage sweep: every timm and torchvision model, analysed and retrofitted, with the results in a CSV.

For each model (random weights) it records: residual blocks found, stages, status (``ok``,
``no-residual-blocks``, ``skipped: <reason>``, ``error: <reason>``), the identity max |Δ| (relative)
for SE at ``standard`` and at ``post``, parameters, and the time taken.

How it fits 2 cores and 24 GiB:
* models are built on the ``meta`` device first: no memory, no init time, and shapes still
  propagate, so the analysis (blocks, stages, layouts) runs on meta tensors for every model;
* only models below ``--max-params`` are then built for real to measure the identity, on a small
  input where the model accepts one (64 px, else its native size);
* chunks of models run in worker processes (``--workers``, one chunk per process), so a crash or a
  leak ends one chunk, not the sweep; each model has a time limit (``--model-seconds``).

    python benchmarks/coverage.py                      # everything (writes benchmarks/results/coverage.csv)
    python benchmarks/coverage.py --limit 40 --sample  # a spread-out sample
    python benchmarks/coverage.py --models resnet50 torchvision:fasterrcnn_resnet50_fpn
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import copy
import csv
import inspect
import math
import multiprocessing
import signal
import sys
import time
import warnings
from collections import Counter, defaultdict
from pathlib import Path

FIELDS = ["source", "name", "status", "blocks", "stages", "params_m", "identity_standard", "identity_post",
          "seconds"]
RESULTS = Path(__file__).resolve().parent / "results"


class ModelTimeout(Exception):
    pass


def all_models() -> list[tuple[str, str]]:
    import timm
    import torchvision

    return [("timm", n) for n in timm.list_models()] + [("torchvision", n) for n in torchvision.models.list_models()]


def _build(source: str, name: str, device: str):
    import timm
    import torch
    import torchvision

    with torch.device(device):
        if source == "timm":
            return timm.create_model(name, pretrained=False)
        builder = torchvision.models.get_model_builder(name)
        accepted = inspect.signature(builder).parameters
        kwargs = {k: v for k, v in (("weights", None), ("weights_backbone", None), ("quantize", False))
                  if k in accepted}
        return builder(**kwargs)


def _inputs(source: str, name: str, model, device: str, small: bool):
    """(probe input, whether it is a list-of-images model) for this model."""
    import torch
    import torchvision

    family = torchvision.models.get_model_builder(name).__module__ if source == "torchvision" else "timm"
    if "optical_flow" in family:
        size = (1, 3, 128, 128)
        return (torch.randn(size, device=device), torch.randn(size, device=device))
    if "detection" in family:
        return ([torch.rand(3, 160 if small else 320, 160 if small else 320, device=device)],)
    if "video" in family:
        frames = 16 if "mvit" in family or "s3d" in family else 4
        side = 224 if "mvit" in family or "swin" in family or "s3d" in family else 64
        return torch.randn(1, 3, frames, side, side, device=device)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    if small and not cfg.get("fixed_input_size"):
        size = (size[0], *(64 for _ in size[1:]))
    if "inception" in family or "googlenet" in family:
        size = (3, 299, 299) if not small else (3, 96, 96)
    return torch.randn(1, *size, device=device)


def _flatten(value) -> list:
    import torch

    if isinstance(value, torch.Tensor):
        return [value.float()]
    if isinstance(value, dict):
        return [t for k in sorted(value) for t in _flatten(value[k])]
    if isinstance(value, (list, tuple)):
        return [t for v in value for t in _flatten(v)]
    return []


def _identity(base, example, plan, position: str) -> float:
    """Max |Δ| relative between the base and a copy edited at ``plan``'s sites (eval mode)."""
    import torch

    import se_retrofit

    config = se_retrofit.RetrofitConfig(position=position)
    edited = se_retrofit.core.apply_record(copy.deepcopy(base), se_retrofit.config.RetrofitRecord(config, plan.sites))
    args = example if isinstance(example, tuple) else (example,)
    with torch.no_grad():
        a, b = _flatten(base(*args)), _flatten(edited(*args))
    if len(a) != len(b):
        return math.inf
    worst = 0.0
    for x, y in zip(a, b):
        if x.shape != y.shape:
            return math.inf
        if x.numel():
            worst = max(worst, ((x - y).abs().max() / x.abs().max().clamp_min(1e-12)).item())
    return worst


def check(source: str, name: str, max_params: float, seconds: int) -> dict:
    """One row of the sweep for one model."""
    import torch

    import se_retrofit

    row = {"source": source, "name": name, "blocks": "", "stages": "", "params_m": "",
           "identity_standard": "", "identity_post": ""}
    start = time.perf_counter()
    signal.signal(signal.SIGALRM, _raise_timeout)
    signal.alarm(seconds)
    try:
        row.update(_check(source, name, max_params, torch, se_retrofit))
    except ModelTimeout:
        row["status"] = f"error: timeout after {seconds} s"
    except Exception as error:  # the sweep records every failure as data
        row["status"] = f"error: {type(error).__name__}: {_first_line(error)}"
    finally:
        signal.alarm(0)
    row["seconds"] = round(time.perf_counter() - start, 2)
    return row


def _check(source, name, max_params, torch, se_retrofit) -> dict:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, analysis = _analyse(source, name, se_retrofit)
        params = sum(p.numel() for p in model.parameters()) / 1e6
        out = {"params_m": round(params, 1), "blocks": len(analysis.blocks), "stages": len(analysis.stages)}
        if not analysis.blocks:
            return {**out, "status": "no-residual-blocks"}
        plans = {position: se_retrofit.planning.plan_sites(model, analysis, se_retrofit.RetrofitConfig(
            position=position)) for position in ("standard", "post")}
        if not plans["standard"].sites:
            return {**out, "status": f"skipped: {next(iter(plans['standard'].skipped.values()))}"}
        if params > max_params:
            return {**out, "status": "ok", "identity_standard": "not measured (size)"}
        base = model if next(model.parameters()).device.type == "cpu" else _build(source, name, "cpu").eval()
        example = _small_example(source, name, base)
        for position, plan in plans.items():
            out[f"identity_{position}"] = _identity(base, example, plan, position)
        worst = max(out["identity_standard"], out["identity_post"])
        out["status"] = "ok" if worst <= 1e-5 else f"error: identity broken (max rel Δ {worst:.2g})"
        return out


def _analyse(source, name, se_retrofit):
    """Analyse on the meta device (free for any size); on the CPU where meta tensors do not run."""
    try:
        model = _build(source, name, "meta").eval()
        return model, se_retrofit.analyze(model, _inputs(source, name, model, "meta", small=False))
    except Exception:
        model = _build(source, name, "cpu").eval()
        return model, se_retrofit.analyze(model, _inputs(source, name, model, "cpu", small=False))


def _small_example(source, name, base):
    """A small input the real model accepts (falls back to its native size)."""
    import torch

    for small in (True, False):
        example = _inputs(source, name, base, "cpu", small)
        try:
            with torch.no_grad():
                base(*(example if isinstance(example, tuple) else (example,)))
            return example
        except Exception:
            continue
    return _inputs(source, name, base, "cpu", False)


def _raise_timeout(signum, frame):
    raise ModelTimeout


def _first_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return (text[0] if text else "")[:160]


def run_chunk(chunk: list[tuple[str, str]], max_params: float, seconds: int) -> list[dict]:
    import torch

    torch.set_num_threads(1)
    return [check(source, name, max_params, seconds) for source, name in chunk]


def sweep(models: list[tuple[str, str]], workers: int, chunk_size: int, max_params: float,
          seconds: int) -> list[dict]:
    chunks = [models[i:i + chunk_size] for i in range(0, len(models), chunk_size)]
    rows: list[dict] = []
    context = multiprocessing.get_context("spawn")
    with cf.ProcessPoolExecutor(max_workers=workers, mp_context=context, max_tasks_per_child=1) as pool:
        futures = {pool.submit(run_chunk, chunk, max_params, seconds): chunk for chunk in chunks}
        for done, future in enumerate(cf.as_completed(futures), 1):
            chunk = futures[future]
            try:
                rows.extend(future.result())
            except Exception as error:  # the worker died: every model of the chunk is an error
                rows.extend({"source": s, "name": n, "status": f"error: worker died ({type(error).__name__})",
                             "seconds": ""} for s, n in chunk)
            print(f"\r{done}/{len(chunks)} chunks", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    order = {m: i for i, m in enumerate(models)}
    return sorted(rows, key=lambda r: order[(r["source"], r["name"])])


def write_csv(rows: list[dict], path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=FIELDS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: row.get(k, "") for k in FIELDS})


def summarise(rows: list[dict], wall: float) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(width=150)
    kinds = ["ok", "no-residual-blocks", "skipped", "error"]
    table = Table(title=f"coverage: {len(rows)} models in {wall / 60:.1f} min")
    table.add_column("source")
    for kind in kinds:
        table.add_column(kind, justify="right")
    for source in ("timm", "torchvision"):
        counts = Counter(r["status"].split(":")[0] for r in rows if r["source"] == source)
        table.add_row(source, *(str(counts.get(k, 0)) for k in kinds))
    console.print(table)
    slow = sorted((r for r in rows if r.get("seconds") != ""), key=lambda r: -float(r["seconds"]))[:10]
    console.print("slowest: " + ", ".join(f"{r['name']} {r['seconds']}s" for r in slow))
    groups: dict[str, list[str]] = defaultdict(list)
    for r in rows:
        if r["status"].startswith(("error", "skipped")):
            groups[r["status"][:110]].append(r["name"])
    for cause, names in sorted(groups.items(), key=lambda kv: -len(kv[1])):
        console.print(f"[{len(names)}] {cause}: {', '.join(names[:8])}{' …' if len(names) > 8 else ''}",
                      markup=False, highlight=False)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="NAME (timm) or torchvision:NAME; default: all")
    parser.add_argument("--limit", type=int, help="only this many models")
    parser.add_argument("--sample", action="store_true", help="with --limit: spread the sample over the list")
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--chunk-size", type=int, default=20)
    parser.add_argument("--max-params", type=float, default=120.0, help="millions; bigger: analysis only")
    parser.add_argument("--model-seconds", type=int, default=120)
    parser.add_argument("--csv", type=Path, default=RESULTS / "coverage.csv")
    args = parser.parse_args()
    models = all_models()
    if args.models:
        models = [tuple(m.split(":", 1)) if ":" in m else ("timm", m) for m in args.models]
    if args.limit:
        step = max(1, len(models) // args.limit) if args.sample else 1
        models = models[::step][:args.limit]
    start = time.perf_counter()
    rows = sweep(models, args.workers, args.chunk_size, args.max_params, args.model_seconds)
    wall = time.perf_counter() - start
    write_csv(rows, args.csv)
    summarise(rows, wall)
    print(f"wrote {args.csv}")


if __name__ == "__main__":
    main()
