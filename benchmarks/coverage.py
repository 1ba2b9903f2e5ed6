"""Coverage sweep: every timm and torchvision model, analysed and retrofitted, with the results in a CSV.

For each model (random weights) it records: residual blocks found, stages, status (``ok``,
``no-residual-blocks``, ``skipped: <reason>``, ``error: <reason>``), the identity max |Δ| (relative)
for SE at ``standard`` and at ``post``, parameters, and the time taken.

How it fits 2 cores and 24 GiB:
* models are built on the ``meta`` device first: no memory, no init time, and shapes still
  propagate, so the analysis (blocks, stages, layouts) runs on meta tensors for every model;
* models up to ``--max-params`` are then built for real, with cheap random weights, to measure the
  identity on the whole model, on the smallest input it accepts (64 px; timm's fixed-size
  transformers built for 64 px); bigger models are checked edited block by edited block;
* chunks of models run in worker processes (``--workers``, one chunk per process; a pool that reuses
  processes with max_tasks_per_child > 1 hangs on Python 3.11), so a crash or a
  leak ends one chunk, not the sweep; each model has a time limit (``--model-seconds``).

    python benchmarks/coverage.py                      # everything (writes benchmarks/results/coverage.csv)
    python benchmarks/coverage.py --limit 40 --sample  # a spread-out sample
    python benchmarks/coverage.py --models resnet50 torchvision:fasterrcnn_resnet50_fpn
"""
from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import copy
import csv
import dataclasses
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
          "identity_scope", "seconds"]
RESULTS = Path(__file__).resolve().parent / "results"


class ModelTimeout(Exception):
    pass


def all_models() -> list[tuple[str, str]]:
    import timm
    import torchvision

    return [("timm", n) for n in timm.list_models()] + [("torchvision", n) for n in torchvision.models.list_models()]


def _build(source: str, name: str, device: str, **kwargs):
    import timm
    import torch
    import torchvision

    with torch.device(device):
        if source == "timm":
            return timm.create_model(name, pretrained=False, **kwargs)
        builder = torchvision.models.get_model_builder(name)
        accepted = inspect.signature(builder).parameters
        kwargs.update({k: v for k, v in (("weights", None), ("weights_backbone", None), ("quantize", False))
                       if k in accepted})
        return builder(**kwargs)


@contextlib.contextmanager
def _parameters_on_meta():
    """Create parameters on the meta device (so initialisers cost nothing); buffers stay real."""
    import torch
    from torch import nn

    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        register(module, name, param)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register


def _materialise(source: str, name: str, **kwargs):
    """A CPU model with cheap random weights: built with meta parameters, then each filled with one
    ``uniform_`` of fan-in variance (norm scales 0.5-1.5, biases small), far cheaper than the
    libraries' initialisers. Falls back to a normal build where a constructor needs real parameters."""
    import torch

    try:
        with _parameters_on_meta():
            model = _build(source, name, "cpu", **kwargs)
        _fill_parameters(model, torch.Generator().manual_seed(0))
        if any(t.device.type == "meta" for t in model.state_dict().values()):
            raise RuntimeError("a buffer was derived from a parameter")
        return model
    except Exception:
        return _build(source, name, "cpu", **kwargs)


def _fill_parameters(model, generator) -> None:
    """Replace every parameter of ``model`` (meta or not) by a CPU one filled by :func:`_filled`."""
    for module in model.modules():
        for key, param in module._parameters.items():
            if param is not None:
                module._parameters[key] = _filled(key, param, generator)


def _filled(key: str, param, generator):
    import torch

    value = torch.empty(param.shape, dtype=param.dtype)
    if value.is_floating_point():
        if param.ndim >= 2:
            bound = math.sqrt(3.0 / max(1, param[0].numel()))
            value.uniform_(-bound, bound, generator=generator)
        elif key in ("weight", "gamma") or "scale" in key:
            value.uniform_(0.5, 1.5, generator=generator)
        else:
            value.uniform_(-0.1, 0.1, generator=generator)
    else:
        value.zero_()
    return torch.nn.Parameter(value, requires_grad=param.requires_grad)


def _inputs(source: str, name: str, model, device: str, side: int | None = None):
    """An input for this model: its native size, or images ``side`` pixels square where given."""
    import torch
    import torchvision

    family = torchvision.models.get_model_builder(name).__module__ if source == "torchvision" else "timm"
    if "optical_flow" in family:
        size = (1, 3, 128, 128)
        return (torch.randn(size, device=device), torch.randn(size, device=device))
    if "detection" in family:
        return ([torch.rand(3, 160 if side else 320, 160 if side else 320, device=device)],)
    if "video" in family:
        frames = 16 if "mvit" in family or "s3d" in family else 4
        side = 224 if "mvit" in family or "swin" in family or "s3d" in family else 64
        return torch.randn(1, 3, frames, side, side, device=device)
    cfg = getattr(model, "pretrained_cfg", None) or {}
    size = tuple(cfg.get("input_size") or (3, 224, 224))
    if side:
        size = (size[0], *(side for _ in size[1:]))
    if "inception" in family or "googlenet" in family:
        size = (3, 299, 299) if not side else (3, 96, 96)
    return torch.randn(1, *size, device=device)


def _identity(base, example, plans: dict, reference: list | None = None) -> dict[str, float]:
    """Max relative |Δ| between ``base`` and ``base`` edited at each plan's sites (eval mode).

    The base output is computed once; every position but the last edits a copy, the last edits
    ``base`` itself (one deep copy fewer, which matters for the big models)."""
    import torch

    from se_retrofit.outputs import output_tensors

    if reference is None:
        with torch.no_grad():
            reference = output_tensors(_call(base, example))
    last = len(plans) - 1
    return {position: _edited_difference(base if i == last else copy.deepcopy(base), plan.sites, position,
                                         lambda model: _call(model, example), reference)
            for i, (position, plan) in enumerate(plans.items())}


def _edited_difference(model, sites, position: str, run, reference: list) -> float:
    """Max relative |Δ| between ``reference`` and ``run(model)`` once ``model`` is edited at ``sites``
    (in place)."""
    import torch

    import se_retrofit
    from se_retrofit.outputs import OutputMismatchError, output_difference, output_tensors

    se_retrofit.surgery.apply_sites(model, sites, se_retrofit.RetrofitConfig(position=position))
    with torch.no_grad():
        outputs = output_tensors(run(model))
    try:
        return output_difference(reference, outputs)[1]
    except OutputMismatchError:
        return math.inf


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
            identity, out["identity_scope"] = _block_identity(source, name, model, plans)
        else:
            base, example, reference = _identity_model(source, name, model)
            identity, out["identity_scope"] = _identity(base, example, plans, reference), "model"
        out.update({f"identity_{position}": value for position, value in identity.items()})
        worst = max(out["identity_standard"], out["identity_post"])
        out["status"] = "ok" if worst <= 1e-5 else f"error: identity broken (max rel Δ {worst:.2g})"
        return out


def _analyse(source, name, se_retrofit):
    """Analyse on the meta device (free for any size); on the CPU where meta tensors do not run."""
    try:
        model = _meta_model(source, name)
        return model, se_retrofit.analyze(model, _inputs(source, name, model, "meta"))
    except Exception:
        model = _build(source, name, "cpu").eval()
        return model, se_retrofit.analyze(model, _inputs(source, name, model, "cpu"))


def _meta_model(source, name, **kwargs):
    """The model on the meta device; where the constructor itself computes with tensors (torchvision's
    RegNet widths), built on the CPU with meta parameters and then moved."""
    try:
        return _build(source, name, "meta", **kwargs).eval()
    except Exception:
        with _parameters_on_meta():
            return _build(source, name, "cpu", **kwargs).to("meta").eval()


def _identity_model(source, name, analysed):
    """A real model, the smallest input it accepts and its output there (see :func:`_small_inputs`);
    the native size where nothing smaller runs."""
    import torch

    from se_retrofit.outputs import output_tensors

    for meta, kwargs, side in _small_inputs(source, name, analysed):
        base = _materialise(source, name, **kwargs).eval()
        example = _inputs(source, name, base, "cpu", side)
        try:
            with torch.no_grad():
                return base, example, output_tensors(_call(base, example))
        except Exception:
            continue
    base = analysed if next(analysed.parameters()).device.type == "cpu" else _build(source, name, "cpu").eval()
    return base, _inputs(source, name, base, "cpu"), None


def _small_inputs(source, name, analysed):
    """(meta model, build kwargs, side) for each small input the model runs on the meta device, where a
    forward costs nothing: 64 px where the model takes any size, else built for 64 or 112 px
    (``img_size``: timm's fixed-size transformers)."""
    import torch

    if next(analysed.parameters()).device.type != "meta":
        return  # analysed on the CPU: meta tensors do not run this model
    candidates = [({}, 64), ({"img_size": 64}, 64), ({"img_size": 112}, 112)] if source == "timm" else [({}, 64)]
    for kwargs, side in candidates:
        try:
            meta = analysed if not kwargs else _meta_model(source, name, **kwargs)
            with torch.no_grad():
                _call(meta, _inputs(source, name, meta, "meta", side))
        except Exception:
            continue
        yield meta, kwargs, side


def _block_identity(source, name, analysed, plans) -> tuple[dict[str, float], str]:
    """For models too big to run whole here: edited blocks run alone, before and after the edit.

    A meta forward (at the smallest input the model takes) records the shapes each edited block
    receives inside the model; one block of each
    kind (class, input shapes, sites) is then built on the CPU with cheap random weights and run on
    random inputs of those shapes. The rest of the model is untouched by the edit, so identity of
    every kind of edited block is identity of the model."""
    import torch

    from se_retrofit.outputs import output_tensors

    meta, inputs = _block_inputs(source, name, analysed, {s.block for plan in plans.values() for s in plan.sites})
    kinds: dict[tuple, str] = {}
    for path, (args, kwargs) in inputs.items():
        key = (type(meta.get_submodule(path)).__name__, _shapes((args, kwargs)),
               tuple((p, tuple(_site_key(s) for s in plan.sites if s.block == path)) for p, plan in plans.items()))
        kinds.setdefault(key, path)
    worst = dict.fromkeys(plans, 0.0)
    for path in kinds.values():
        block = _materialised_block(meta.get_submodule(path))
        args, kwargs = _real(inputs[path])
        with torch.no_grad():
            reference = output_tensors(block(*args, **kwargs))
        for position, plan in plans.items():
            sites = [dataclasses.replace(s, block="") for s in plan.sites if s.block == path]
            difference = _edited_difference(copy.deepcopy(block), sites, position,
                                            lambda model: model(*args, **kwargs), reference)
            worst[position] = max(worst[position], difference)
    return worst, f"blocks: {len(kinds)} kinds of {len(inputs)} edited"


def _site_key(site) -> tuple:
    return site.position, site.channels, site.module_name, site.add_index, site.anchor


def _block_inputs(source, name, analysed, paths: set[str]) -> tuple[object, dict[str, tuple]]:
    """The model run and the (args, kwargs) each block in ``paths`` receives in its forward on the meta
    device, at the smallest input the model takes there (else at its native size)."""
    import torch

    meta, side = next(((m, side) for m, _, side in _small_inputs(source, name, analysed)), (analysed, None))
    seen: dict[str, tuple] = {}
    hooks = [meta.get_submodule(p).register_forward_pre_hook(
        lambda module, args, kwargs, path=p: seen.setdefault(path, (args, kwargs)) and None, with_kwargs=True)
        for p in sorted(paths)]
    try:
        with torch.no_grad():
            _call(meta, _inputs(source, name, meta, "meta", side))
    finally:
        for hook in hooks:
            hook.remove()
    return meta, seen


def _shapes(value):
    import torch

    if isinstance(value, torch.Tensor):
        return tuple(value.shape), str(value.dtype)
    if isinstance(value, dict):
        return tuple((k, _shapes(v)) for k, v in sorted(value.items()))
    if isinstance(value, (list, tuple)):
        return tuple(_shapes(v) for v in value)
    return repr(value)


def _real(value):
    """Random CPU tensors in place of the meta tensors of ``value`` (indices 0, masks all True)."""
    import torch

    if isinstance(value, torch.Tensor):
        if value.is_floating_point():
            return torch.randn(value.shape, dtype=value.dtype, generator=torch.Generator().manual_seed(0))
        return torch.ones(value.shape, dtype=value.dtype) if value.dtype == torch.bool else \
            torch.zeros(value.shape, dtype=value.dtype)
    if isinstance(value, dict):
        return {k: _real(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(_real(v) for v in value)
    return value


def _materialised_block(meta_block):
    """A CPU copy of a meta block with cheap random parameters and buffers (indices 0)."""
    import torch

    block = copy.deepcopy(meta_block).to_empty(device="cpu").eval()
    generator = torch.Generator().manual_seed(0)
    _fill_parameters(block, generator)
    for module in block.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None:
                if buffer.is_floating_point():
                    buffer.uniform_(0.5, 1.5, generator=generator)
                else:
                    buffer.zero_()
    return block


def _call(model, example):
    return model(*(example if isinstance(example, tuple) else (example,)))


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
    parser.add_argument("--chunk-size", type=int, default=40)
    parser.add_argument("--max-params", type=float, default=100.0,
                        help="millions; bigger models are checked block by block (see _block_identity)")
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
