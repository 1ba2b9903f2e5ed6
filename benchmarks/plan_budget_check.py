"""Budgets on real models: every budget met when it can be, and predicted costs equal to the edited model's.

For each model (timm, random weights: costs do not depend on them) at its own input size and each
budget, :func:`se_retrofit.budget.choose` picks a plan; the model is then edited by it and the
edited model's parameters and FLOPs are counted (``FlopCounterMode`` on a real forward) and set
against the prediction and against each budget, and its outputs against the unedited model's
(``torch.equal``, eval). Latency budgets are measured by the planner and checked again here by a
fresh measurement. Writes ``benchmarks/results/plan_budget_check.md`` and ``.json``.

    python benchmarks/plan_budget_check.py                   # 4 models × 5 budgets, a few minutes
    python benchmarks/plan_budget_check.py --latency         # also latency=+5% (slower)
"""
from __future__ import annotations

import argparse
import json
import time
import warnings
from pathlib import Path

import timm
import torch

import se_retrofit
from se_retrofit.budget import ImpossibleBudgetError, choose
from se_retrofit.cost import count_flops, count_params
from se_retrofit.measure import latency_ratio

RESULTS = Path(__file__).resolve().parent / "results"
MODELS = ("resnet50", "convnext_tiny", "efficientnet_b0", "vit_small_patch16_224")
BUDGETS = (["params=+1%"], ["params=+2%"], ["flops=+0.01%"], ["params=+2%", "flops=+0.005%"], ["params=+0.001%"])


def check(name: str, budget: list[str], repeats: int) -> dict:
    torch.manual_seed(0)
    model = timm.create_model(name).eval()
    x = torch.randn(1, *model.pretrained_cfg["input_size"])
    started = time.perf_counter()
    try:
        choice = choose(model, se_retrofit.RetrofitConfig(), budget, x, repeats=repeats)
    except ImpossibleBudgetError as error:
        return {"model": name, "budget": budget, "possible": False, "message": str(error),
                "seconds": round(time.perf_counter() - started, 1)}
    seconds = time.perf_counter() - started
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited = se_retrofit.retrofit_with(model, choice.config, example_input=x)
    params = count_params(edited) - count_params(model)
    flops = count_flops(edited, x) - count_flops(model, x)
    base_params, base_flops = count_params(model), count_flops(model, x)
    holds = {}
    for b in choice.budgets:
        if b.kind == "params":
            holds[b.text] = params <= b.allowed(base_params)
        elif b.kind == "flops":
            holds[b.text] = flops <= b.allowed(base_flops)
        else:
            again = latency_ratio(model, edited, x, repeats)["ratio_min"]
            holds[b.text] = again - 1 <= b.allowed(1.0)
            holds["latency remeasured ×"] = round(again, 4)
    with torch.no_grad():
        identity = bool(torch.equal(edited(x), model(x)))
    return {"model": name, "budget": budget, "possible": True, "units": len(choice.units),
            "of": len(choice.units) + len(choice.left_out), "r": choice.config.reduction,
            "first": choice.units[0], "last": choice.units[-1],
            "predicted_params": choice.cost.params, "measured_params": params,
            "predicted_flops": choice.cost.flops, "measured_flops": flops,
            "params_pct": 100 * params / base_params, "flops_pct": 100 * flops / base_flops,
            "latency_ratio_planner": choice.latency and choice.latency["ratio_min"],
            "exact": params == choice.cost.params and flops == choice.cost.flops,
            "holds": holds, "identity_eval": identity, "seconds": round(seconds, 1)}


def table(rows: list[dict]) -> str:
    lines = ["| model | budget | chosen | r | params added (counted) | FLOPs added (counted) | predicted = counted "
             "| every budget holds | identity | s |", "|---|---|---|---:|---:|---:|---|---|---|---:|"]
    for r in rows:
        if not r["possible"]:
            lines.append(f"| {r['model']} | {' '.join(r['budget'])} | impossible: {r['message']} | | | | | | | "
                         f"{r['seconds']} |")
            continue
        lat = f", latency ×{r['latency_ratio_planner']:.3f} (planner)" if r["latency_ratio_planner"] else ""
        lines.append(f"| {r['model']} | {' '.join(r['budget'])} | {r['units']}/{r['of']} units "
                     f"({r['first']} … {r['last']}) | {r['r']} | {r['measured_params']:,} (+{r['params_pct']:.3f}%) "
                     f"| {r['measured_flops']:,} (+{r['flops_pct']:.4f}%){lat} | {r['exact']} "
                     f"| {all(v for k, v in r['holds'].items() if not k.startswith('latency remeasured'))} "
                     f"{r['holds']} | {r['identity_eval']} | {r['seconds']} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS))
    parser.add_argument("--latency", action="store_true", help="add latency=+5%% budgets (measured)")
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--budgets", help="budget sets instead of the default ones: 'params=+2%%;latency=+5%%,params=+3%%'")
    parser.add_argument("--stem", default=None, help="results file name (default plan_budget_check)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    budgets = list(BUDGETS) + ([["latency=+5%"], ["latency=+5%", "params=+2%"]] if args.latency else [])
    if args.budgets:
        budgets = [part.split(",") for part in args.budgets.split(";")]
    rows = []
    for name in args.models.split(","):
        for budget in budgets:
            rows.append(check(name, budget, args.repeats))
            print(json.dumps(rows[-1]), flush=True)
    stem = args.stem or "plan_budget_check" + ("_latency" if args.latency else "")
    (RESULTS / f"{stem}.json").write_text(json.dumps(rows, indent=2))
    (RESULTS / f"{stem}.md").write_text(f"# Budgets on real models ({', '.join(args.models.split(','))})\n\n"
                                         f"{table(rows)}\n")
    print(table(rows))


if __name__ == "__main__":
    main()
