"""``se-retrofit plan MODEL --sweep r=4,8,16,32 stages=4/3,4/2-4/1-4``: the cost of candidate plans.

One row per (r, stage set): the sites, the parameters and FLOPs added (counted exactly, before any
edit, from one meta-device edit per r: :mod:`se_retrofit.cost`) and, with ``--measure``, the latency
measured against the unedited model (:mod:`se_retrofit.measure`). The Pareto front is marked: a
plan is on it where no other plan edits as many sites (the coverage bought) for no more parameters,
FLOPs and (where measured) latency (the price), better in one. What r does to accuracy is not
known here: at a given coverage the largest r is the cheapest, so the front runs through it; a
smaller r (a wider hidden layer) is a choice the table prices. ``--json`` prints the rows;
``--png FILE`` plots them with matplotlib (optional: without it the table still comes, with a note).

Example:
    se-retrofit plan resnet50 --sweep r=4,8,16,32 stages=4/3,4/2,3,4/1,2,3,4 --png plan.png
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch

from ._shell import Parser, UsageError, path_argument, positive_int, run_command
from .analysis import analyze, default_example_input
from .attention import get_attention
from .config import POSITIONS, RetrofitConfig, import_attention_module
from .cost import PlanCost, base_counts, flops_text, predict
from .planning import plan_sites
from .tracing import graph_cache

DEFAULT_R = (4, 8, 16, 32)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="se-retrofit plan",
                    description="The cost of candidate plans (r × stage sets): sites, parameters and FLOPs "
                                "added, measured latency on request, the Pareto front marked.")
    parser.add_argument("model", help="timm name (resnet50) or torchvision name (torchvision:resnet50)")
    parser.add_argument("--sweep", nargs="+", default=[], metavar="KEY=VALUES",
                        help="r=4,8,16,32 (default, for types with a reduction) and stages=4/3,4/2-4/1-4 "
                             "(stage sets separated by '/'; 'all'; default: the last stage, the last two, …)")
    parser.add_argument("--source", choices=("timm", "torchvision"), help="library to take MODEL from")
    parser.add_argument("--attention", default="se", help="attention type (se, cbam, gc, eca, …)")
    parser.add_argument("--position", choices=POSITIONS, help="where in each block (default: the type's own)")
    parser.add_argument("--divisor", type=positive_int(4096), help="round hidden widths to a multiple of this")
    parser.add_argument("--every", type=positive_int(10000), help="every N-th selected block of each stage")
    parser.add_argument("--blocks", type=lambda t: [p for p in t.split(",") if p], help="glob patterns of blocks")
    parser.add_argument("--exclude", type=lambda t: [p for p in t.split(",") if p], help="blocks to leave alone")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers your own attention type)")
    parser.add_argument("--weights", default="none",
                        help="none (default: costs do not depend on the weights), pretrained, or PATH")
    parser.add_argument("--input-size", type=_size, help="probe input size C,H,W (default: the model's own)")
    parser.add_argument("--measure", action="store_true", help="also measure each plan's latency (slower)")
    parser.add_argument("--repeats", type=positive_int(10000), default=10,
                        help="--measure: interleaved rounds per plan (10)")
    parser.add_argument("--json", action="store_true", help="print the rows as JSON")
    parser.add_argument("--png", type=path_argument, metavar="FILE", help="plot the plans (needs matplotlib)")
    return parser


def _size(text: str) -> tuple[int, ...]:
    if not re.fullmatch(r"\d{1,6}(,\d{1,6}){1,3}", text.strip()):
        raise argparse.ArgumentTypeError(f"must be C,H,W such as 3,224,224, got {text!r}")
    return tuple(int(p) for p in text.split(","))


def parse_sweep(items: Sequence[str]) -> dict[str, Any]:
    """``["r=4,8", "stages=4/3,4/2-4/all"]`` → ``{"r": [4, 8], "stages": [[4], [3, 4], [2, 3, 4], None]}``.

    Example:
        >>> parse_sweep(["r=4,8", "stages=4/3-4/all"])
        {'r': [4, 8], 'stages': [[4], [3, 4], None]}
    """
    sweep: dict[str, Any] = {}
    for item in items:
        key, _, value = item.partition("=")
        key = key.strip().lower()
        if key in ("r", "reduction"):
            if not re.fullmatch(r"\s*\d{1,4}(\s*,\s*\d{1,4})*\s*", value) or any(int(v) < 1 for v in value.split(",")):
                raise UsageError(f"--sweep {item!r}: r takes positive whole numbers such as r=4,8,16,32")
            sweep["r"] = sorted({int(v) for v in value.split(",")})
        elif key == "stages":
            sets = []
            for part in re.split(r"[/;]", value):
                part = part.strip()
                if part == "all":
                    sets.append(None)
                    continue
                stages: set[int] = set()
                for piece in filter(None, (p.strip() for p in part.split(","))):
                    match = re.fullmatch(r"(\d{1,4})(?:-(\d{1,4}))?", piece)
                    if not match or int(match.group(1)) < 1:
                        raise UsageError(f"--sweep {item!r}: stage sets are like 4/3,4/2-4/all")
                    stages.update(range(int(match.group(1)), int(match.group(2) or match.group(1)) + 1))
                if not stages:
                    raise UsageError(f"--sweep {item!r}: an empty stage set; write e.g. stages=4/3,4/2-4")
                sets.append(sorted(stages))
            sweep["stages"] = sets
        else:
            raise UsageError(f"--sweep {item!r}: sweep over r=… or stages=…")
    return sweep


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("se-retrofit plan", lambda: _run(build_parser().parse_args(argv)))


def _run(args: argparse.Namespace) -> int:
    from rich.console import Console

    from .hub import create, resolve

    for module in args.imports:
        import_attention_module(module)
    sweep = parse_sweep(args.sweep)
    started = time.perf_counter()
    ref = resolve(args.model, args.source)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, origin = create(ref, args.weights)
    model.eval()
    example = default_example_input(model) if args.input_size is None else \
        torch.randn(1, *args.input_size, generator=torch.Generator().manual_seed(0))
    rows = sweep_plans(model, args, sweep, example)
    pareto(rows)
    result = {"model": str(ref), "weights": origin, "attention": args.attention,
              "input": list(example.shape) if isinstance(example, torch.Tensor) else None,
              "seconds": round(time.perf_counter() - started, 2), "rows": rows}
    note = None
    if args.png:
        note = plot(rows, args.png, f"{ref} · {args.attention}")
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        print_table(result, Console(soft_wrap=True))
    if note:
        Console(stderr=True, soft_wrap=True).print(note, markup=False, highlight=False)
    return 0


def sweep_plans(model, args: argparse.Namespace, sweep: dict[str, Any], example) -> list[dict[str, Any]]:
    """One row per (r, stage set); one meta-device edit per r gives every set's cost."""
    from .core import edit_with_plan, one_thread
    from .measure import latency_ratio

    has_r = "reduction" in get_attention(args.attention).options
    reductions: list[int | None] = sweep.get("r", list(DEFAULT_R)) if has_r else [None]
    if not has_r and "r" in sweep:
        raise UsageError(f"--sweep r=…: attention type {args.attention!r} has no reduction ratio")
    rows = []
    with graph_cache(), one_thread():
        analysis = analyze(model, example)
        units = analysis.units_of(None)
        stages_found = sorted({u.stage for u in units})
        sets = sweep.get("stages") or [stages_found[i:] for i in range(len(stages_found) - 1, -1, -1)]
        wanted = None if any(s is None for s in sets) else sorted({st for s in sets for st in s})
        base = base_counts(model, example)
        for r in reductions:
            config = RetrofitConfig(attention=args.attention, position=args.position, reduction=r,
                                    divisor=args.divisor, stages=wanted, blocks=args.blocks, exclude=args.exclude,
                                    every=args.every)
            full = plan_sites(model, analysis, config)
            cost = predict(model, config, analysis, full, example, base=base)
            for stages in sets:
                chosen = [s for s in cost.sites if stages is None or s.stage in stages]
                part = PlanCost(cost.base_params, cost.base_flops, chosen)
                row = {"r": r, "stages": stages or "all", "sites": len(chosen), "params_added": part.params,
                       "params_added_pct": part.params_pct, "flops_added": part.flops,
                       "flops_added_pct": part.flops_pct, "base_params": part.base_params,
                       "base_flops": part.base_flops}
                if args.measure and chosen:
                    modules = {s.module for s in chosen}
                    sub = type(full)(sites=[s for s in full.sites if s.module_path in modules])
                    with warnings.catch_warnings():
                        warnings.simplefilter("ignore")
                        edited = edit_with_plan(model, config, analysis, sub)
                    timing = latency_ratio(model, edited, example, args.repeats)
                    row.update(latency_ratio_min=timing["ratio_min"], latency_ratio_median=timing["ratio_median"],
                               latency_spread=timing["ratio_spread"], base_ms_min=timing["base_ms_min"],
                               edited_ms_min=timing["edited_ms_min"])
                rows.append(row)
    return rows


def _dominates(a: dict[str, Any], b: dict[str, Any]) -> bool:
    better = [a["sites"] - b["sites"], b["params_added"] - a["params_added"], b["flops_added"] - a["flops_added"]]
    if "latency_ratio_min" in a and "latency_ratio_min" in b:
        better.append(b["latency_ratio_min"] - a["latency_ratio_min"])
    return all(x >= 0 for x in better) and any(x > 0 for x in better)


def pareto(rows: list[dict[str, Any]]) -> None:
    """Mark ``rows[i]["pareto"]``: no other row edits as many sites for no more parameters, FLOPs
    and (where measured) latency, better in one.

    Example:
        >>> rows = [{"sites": 2, "params_added": 10, "flops_added": 5}, {"sites": 2, "params_added": 8, "flops_added": 5},
        ...         {"sites": 3, "params_added": 12, "flops_added": 6}]
        >>> pareto(rows); [r["pareto"] for r in rows]
        [False, True, True]
    """
    for row in rows:
        row["pareto"] = bool(row["sites"]) and not any(_dominates(other, row) for other in rows if other is not row)


def _stages_text(stages: Any) -> str:
    return stages if isinstance(stages, str) else ",".join(map(str, stages))


def print_table(result: dict[str, Any], out) -> None:
    from rich.table import Table

    rows = result["rows"]
    measured = any("latency_ratio_min" in r for r in rows)
    table = Table(title=f"{result['model']} · {result['attention']} · candidate plans "
                        f"(input {'×'.join(map(str, result['input'] or []))})")
    for column in ("stages", "r", "sites", "params added", "FLOPs added") + (("latency (min, median)",) if measured
                                                                             else ()) + ("Pareto",):
        table.add_column(column, justify="left" if column == "stages" else "right")
    for r in rows:
        cells = [_stages_text(r["stages"]), str(r["r"] or "-"), str(r["sites"]),
                 f"{r['params_added']:,} (+{r['params_added_pct']:.2f}%)",
                 f"{flops_text(r['flops_added']).replace(' FLOPs', '').replace('FLOPs', '')} (+{r['flops_added_pct']:.3f}%)"]
        if measured:
            cells.append(f"×{r['latency_ratio_min']:.3f}, ×{r['latency_ratio_median']:.3f}"
                         if "latency_ratio_min" in r else "-")
        cells.append("*" if r["pareto"] else "")
        table.add_row(*cells)
    out.print(table)
    first = rows[0] if rows else None
    if first:
        out.print(f"base: {first['base_params']:,} params, {first['base_flops']:,} FLOPs; FLOPs counted "
                  "(convolutions and matrix products)" + ("; latency measured on this machine, 1 thread, "
                                                          "edited/unedited" if measured else "")
                  + f"; * Pareto front; {result['seconds']:.1f} s", markup=False, highlight=False)


def plot(rows: list[dict[str, Any]], path: Path, title: str) -> str | None:
    """Write the plans to ``path`` as a PNG; a note (not an error) where matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (f"note: matplotlib is not installed, so {path} was not written; pip install matplotlib "
                "(the table and --json need nothing)")
    measured = all("latency_ratio_min" in r for r in rows if r["sites"])
    x_key, x_label = (("latency_ratio_min", "latency, edited / unedited (min, measured)") if measured
                      else ("flops_added_pct", "FLOPs added (%)"))
    fig, ax = plt.subplots(figsize=(7, 4.5))
    reductions = sorted({r["r"] for r in rows}, key=lambda v: -1 if v is None else v)
    markers = "osD^v<>"
    for i, red in enumerate(reductions):
        group = [r for r in rows if r["r"] == red and r["sites"]]
        ax.scatter([r[x_key] for r in group], [r["params_added_pct"] for r in group], marker=markers[i % 7],
                   s=[20 + 6 * r["sites"] for r in group], label=f"r={red}" if red else "plans", alpha=0.8)
        for r in group:
            ax.annotate(_stages_text(r["stages"]), (r[x_key], r["params_added_pct"]), fontsize=7,
                        xytext=(4, 3), textcoords="offset points")
    front = sorted((r for r in rows if r["pareto"]), key=lambda r: r[x_key])
    ax.plot([r[x_key] for r in front], [r["params_added_pct"] for r in front], "k--", lw=1, label="Pareto front")
    ax.set_xlabel(x_label)
    ax.set_ylabel("parameters added (%)")
    ax.set_yscale("log")
    from matplotlib.ticker import FuncFormatter

    for axis in (ax.yaxis.set_major_formatter, ax.yaxis.set_minor_formatter):
        axis(FuncFormatter(lambda v, _: f"{v:g}"))
    ax.set_title(f"{title}: candidate plans (label: stages; size: sites)", fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return None
