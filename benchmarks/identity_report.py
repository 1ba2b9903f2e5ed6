"""Identity and learning report: the figures behind "exact identity at start" and "gradient from step one".

For each model (timm and torchvision, random weights made to look trained), attention type and
position (standard, pre, post, identity, inner, stage), it prints: sites edited, parameters added, max |Δ| between the original and the
edited model in eval mode and in train mode (same seed, stochastic depth on where the model has it),
and after how many optimiser steps every new parameter has had a non-zero gradient (without
stochastic depth, which drops whole branches and with them their gates' gradients).

    python benchmarks/identity_report.py            # SE on all models, all positions (about a minute)
    python benchmarks/identity_report.py --attention se cbam bam eca \
        --models resnet50 convnext_tiny efficientnet_b0 torchvision:resnet50
    python benchmarks/identity_report.py --models resnet50 torchvision:resnet50 --json out.json
"""
from __future__ import annotations

import argparse
import itertools
import json
import sys
import time
import warnings
from pathlib import Path

import torch
from rich.console import Console
from rich.table import Table

import se_retrofit

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from conftest import RESIDUAL_MODELS, make_model  # noqa: E402  (the tests' own model factory)

DROP_PATH = {"convnext_tiny", "efficientnet_b0", "mobilenetv2_100", "regnety_008", "resnet18", "resnet50",
             "resnext50_32x4d", "res2net50_26w_4s"}


def _base(source: str, name: str) -> torch.nn.Module:
    kwargs = {"drop_path_rate": 0.2} if source == "timm" and name in DROP_PATH else {}
    return make_model(source, name, **kwargs)


def _max_abs_diff(base, edited, x, training: bool) -> float:
    outputs = []
    for model in (base, edited):
        model.train(training)
        torch.manual_seed(0)
        with torch.no_grad():
            outputs.append(model(x))
    return (outputs[0] - outputs[1]).abs().max().item()


def _steps_until_all_learn(model, x, max_steps: int = 3) -> int | None:
    """Optimiser steps after which every new parameter has had a non-zero gradient (None: never)."""
    new = {n: p for n, p in model.named_parameters() if any(n.startswith(s.module_path + ".")
                                                            for s in model.se_retrofit.sites)}
    learned = set()
    optimiser = torch.optim.SGD(model.parameters(), lr=0.05)
    model.train()
    for step in range(1, max_steps + 1):
        optimiser.zero_grad()
        output = model(x)
        torch.nn.functional.cross_entropy(output, torch.arange(len(x)) % output.shape[-1]).backward()
        learned |= {n for n, p in new.items() if p.grad is not None and p.grad.abs().sum() > 0}
        optimiser.step()
        if len(learned) == len(new):
            return step
    return None


def _without_drop_path(source: str, name: str, attention: str, position: str, x: torch.Tensor) -> torch.nn.Module:
    """Stochastic depth drops whole branches at random, and a dropped branch's gate gets no gradient
    in that step: the learning check runs on the model as fine-tuned without it."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return se_retrofit.retrofit(make_model(source, name), attention=attention, position=position,
                                    example_input=x[:1])


def report(models: list[tuple[str, str]], attentions: list[str], size: int) -> list[dict]:
    rows = []
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(0))
    for (source, name), attention, position in itertools.product(models, attentions, se_retrofit.POSITIONS):
        rows.append(_row(source, name, attention, position, x))
    return rows


def _row(source: str, name: str, attention: str, position: str, x: torch.Tensor) -> dict:
    base = _base(source, name)
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        edited = se_retrofit.retrofit(base, attention=attention, position=position, example_input=x[:1])
    seconds = time.perf_counter() - start
    added = sum(p.numel() for p in edited.parameters()) - sum(p.numel() for p in base.parameters())
    return {
        "model": f"{source}:{name}", "attention": attention, "position": position,
        "sites": len(edited.se_retrofit.sites), "params_added": added,
        "eval_max_abs_diff": _max_abs_diff(base, edited, x, False),
        "train_max_abs_diff": _max_abs_diff(base, edited, x, True),
        "steps_until_all_new_params_learn": _steps_until_all_learn(
            _without_drop_path(source, name, attention, position, x), x),
        "retrofit_seconds": round(seconds, 3),
    }


def _print(rows: list[dict]) -> None:
    table = Table(title="identity at start and first gradients")
    for column in ("model", "attention", "position", "sites", "params added", "eval max|Δ|", "train max|Δ|",
                   "all learn by step", "retrofit s"):
        table.add_column(column, justify="left" if column in ("model", "attention", "position") else "right")
    for r in rows:
        table.add_row(r["model"], r["attention"], r["position"], str(r["sites"]), f"{r['params_added']:,}",
                      f"{r['eval_max_abs_diff']:.3g}", f"{r['train_max_abs_diff']:.3g}",
                      str(r["steps_until_all_new_params_learn"]), f"{r['retrofit_seconds']:.2f}")
    Console(width=140).print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="*", help="models as NAME (timm) or torchvision:NAME (default: all)")
    parser.add_argument("--attention", nargs="*", default=["se"], help="attention types (default: se)")
    parser.add_argument("--size", type=int, default=64, help="input size (default 64)")
    parser.add_argument("--json", type=Path, help="write the rows as JSON here")
    args = parser.parse_args()
    chosen = [(s, n) for s, n, _ in RESIDUAL_MODELS]
    if args.models:
        chosen = [tuple(m.split(":", 1)) if ":" in m else ("timm", m) for m in args.models]
    rows = report(chosen, args.attention, args.size)
    _print(rows)
    worst = max(max(r["eval_max_abs_diff"], r["train_max_abs_diff"]) for r in rows)
    never = [f"{r['model']}/{r['attention']}/{r['position']}" for r in rows if r["steps_until_all_new_params_learn"] is None]
    Console().print(f"worst max|Δ| over all rows: {worst:.3g}; rows where some new parameter had no "
                    f"gradient within 3 steps: {never or 'none'}")
    if args.json:
        args.json.write_text(json.dumps(rows, indent=2) + "\n")


if __name__ == "__main__":
    main()
