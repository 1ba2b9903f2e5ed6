"""The command line's cost options: ``--budget`` and ``--measure``, and the cost lines of its report.

``se-retrofit MODEL --dry-run`` (and ``--json``) shows what the plan costs before the edit: the
parameters and FLOPs each site adds (:mod:`se_retrofit.cost`); ``--measure`` adds the edited
model's latency and peak memory against the unedited one on this machine (:mod:`se_retrofit.measure`);
``--budget`` (repeatable) lets a budget choose the sites and r (:mod:`se_retrofit.budget`).

Example:
    se-retrofit resnet50 --weights none --dry-run --budget params=+2% --budget flops=+0.5%
    se-retrofit resnet50 --weights none --dry-run --measure --json
"""
from __future__ import annotations

import argparse
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from .budget import Choice, choose, parse_budgets
from .config import RetrofitConfig
from .cost import PlanCost, flops_text, predict
from .planning import Plan


@dataclass
class Costs:
    """What the cost options found: the config and plan to edit by (a budget's choice, or as given),
    the predicted cost, the choice, and the measurements."""

    config: RetrofitConfig
    plan: Plan
    cost: PlanCost
    choice: Choice | None = None
    measured: dict[str, Any] | None = None
    notes: list[str] = field(default_factory=list)

    def report(self, report: dict[str, Any]) -> dict[str, Any]:
        """``report`` (the command line's) with the costs added: FLOPs per site and in total, the
        budget's choice, the measurements."""
        flops = {s.module: s.flops for s in self.cost.sites}
        for row in report.get("sites", []):
            if row.get("module") in flops:
                row["flops"] = flops[row["module"]]
        report.update(flops_before=self.cost.base_flops, flops_planned=self.cost.flops,
                      flops_added_pct=self.cost.flops_pct,
                      flops_counted="FlopCounterMode at the probe input: convolutions and matrix products, "
                                    "2 per multiply-add")
        if self.choice is not None:
            report["budget"] = self.choice.to_dict()
        if self.measured is not None:
            report["measured"] = self.measured
        return report

    def lines(self) -> list[str]:
        """The cost in words, for the report on the terminal."""
        c = self.cost
        out = [f"FLOPs: {c.base_flops:,} → {c.base_flops + c.flops:,} (+{flops_text(c.flops)}, +{c.flops_pct:.3f}%), "
               "counted at the probe input (convolutions and matrix products)"]
        stages = sorted({s.stage for s in c.sites})
        if len(stages) > 1:
            out.append("  per stage: " + "; ".join(
                f"{st}: {_sites(sum(s.stage == st for s in c.sites))}, +{sum(s.params for s in c.sites if s.stage == st):,}"
                f" params, +{flops_text(sum(s.flops for s in c.sites if s.stage == st))}" for st in stages))
        if self.choice is not None:
            out += self.choice.lines()
        if self.measured is not None:
            out += measured_lines(self.measured)
        return out + self.notes


def _sites(n: int) -> str:
    return f"{n} site" + ("" if n == 1 else "s")


def measured_lines(measured: dict[str, Any]) -> list[str]:
    out = [f"measured on this machine ({measured['device']}, {measured['threads']} thread(s), "
           f"{measured['repeats']} interleaved rounds):"]
    for what in ("inference", "training"):
        m = measured.get(what)
        if m is None:
            continue
        if "error" in m:
            out.append(f"  {what}: not measured ({m['error']})")
            continue
        low, high = m["ratio_spread"]
        text = (f"  {what}: latency {m['base_ms_min']:.2f} → {m['edited_ms_min']:.2f} ms (min, ×{m['ratio_min']:.3f}; "
                f"median ×{m['ratio_median']:.3f}; per-round ratios ×{low:.3f}–×{high:.3f})")
        if "base_peak_mib" in m:
            text += f"; peak memory {m['base_peak_mib']:.2f} → {m['edited_peak_mib']:.2f} MiB (×{m['peak_ratio']:.3f})"
        out.append(text)
    return out


def apply(args: argparse.Namespace, model: nn.Module, config: RetrofitConfig, analysis, site_plan: Plan,
          example_input: Any) -> Costs:
    """The config and plan to edit by (the budget's choice where ``--budget`` is given), their
    predicted cost, and (``--measure``) the measurements; ``model`` is not changed."""
    budgets = parse_budgets(getattr(args, "budget", None))
    choice = None
    if budgets:
        choice = choose(model, config, budgets, example_input, analysis=analysis, repeats=args.repeats)
        config, site_plan = choice.config, choice.plan
    cost = choice.cost if choice is not None else predict(model, config, analysis, site_plan, example_input)
    costs = Costs(config, site_plan, cost, choice)
    if getattr(args, "measure", False):
        import warnings

        from .core import edit_with_plan
        from .measure import measure

        copy = site_plan.copy()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            edited = edit_with_plan(model, config, analysis, copy)
        costs.measured = measure(model, edited, example_input, repeats=args.repeats)
    return costs
