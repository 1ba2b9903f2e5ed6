"""Plan an edit by its cost: a budget in parameters, FLOPs or measured latency picks the sites and r.

The space is the user's own selection (attention type, position, ``stages``/``blocks``/``every``/
``exclude``) and, for a type with a reduction ratio and no ``reduction`` given, r from
:data:`REDUCTIONS`. The rule (:data:`RULE`):

1. as many units (blocks, joins or layers; a unit gets one site, or one per branch) as fit, at any r;
2. for that many, the smallest r (the widest hidden layer) at which they still fit;
3. when not all fit, the latest stages' units: from the last unit back, each is taken where the
   rest can still be made up from the units before it.

Parameters and FLOPs are predicted exactly, without editing the caller's model
(:mod:`se_retrofit.cost`); a site's cost does not depend on the others, so a plan's cost is the sum
of its sites'. Latency is never modelled: each candidate the search needs is edited (on a copy) and
timed against the unedited model on this machine (:mod:`se_retrofit.measure`), and the choice says
so. Every budget given must hold. A budget no plan meets raises :class:`ImpossibleBudgetError`
(exit code 2 at the command line) with the cheapest plan's cost.

Example:
    >>> import timm, se_retrofit
    >>> from se_retrofit.budget import choose
    >>> model = timm.create_model("resnet18")
    >>> choice = choose(model, se_retrofit.RetrofitConfig(), "params=+1%")
    >>> len(choice.plan.sites), choice.config.reduction, choice.fits
    (8, 16, True)
"""
from __future__ import annotations

import glob
import re
from dataclasses import dataclass, field, replace
from typing import Any, Iterable, Sequence

from torch import nn

from .analysis import Analysis, analyze, default_example_input
from .attention import get_attention
from .config import RetrofitConfig
from .cost import PlanCost, base_counts, predict
from .errors import RetrofitError
from .planning import Plan, plan_sites
from .tracing import graph_cache

__all__ = ["Budget", "BudgetError", "Choice", "ImpossibleBudgetError", "REDUCTIONS", "RULE", "choose",
           "parse_budget", "parse_budgets", "select"]

#: the reduction ratios a budget chooses from, for a type that has one and no ``reduction`` given
REDUCTIONS = (4, 8, 16, 32)
KINDS = ("params", "flops", "latency")
RULE = ("as many units as fit (at any r); the smallest r (widest hidden layer) at which that many fit; "
        "when not all fit, the latest stages' units (from the last unit back, each taken where the rest "
        "still fit)")
_SUFFIX = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12}


class BudgetError(RetrofitError):
    """A budget that cannot be read (``params=+2%``, ``flops=+0.5%``, ``latency=+5%``, ``params=+1.5M``)."""


class ImpossibleBudgetError(RetrofitError):
    """No plan in the space meets every budget; the message gives the cheapest plan's cost."""


@dataclass(frozen=True)
class Budget:
    """At most ``limit`` more of ``kind``: a percentage of the unedited model's (``percent``), or a
    count (parameters, FLOPs). Latency budgets are percentages of the measured latency.

    Example:
        >>> parse_budget("params=+2%")
        Budget(kind='params', limit=2.0, percent=True)
        >>> parse_budget("flops=+1.5M").allowed(base=4e9)
        1500000.0
    """

    kind: str
    limit: float
    percent: bool

    @property
    def text(self) -> str:
        return f"{self.kind}=+{self.limit:g}{'%' if self.percent else ''}"

    def allowed(self, base: float) -> float:
        """What may be added to ``base``: a count (params, FLOPs) or, for latency, a ratio's excess."""
        if self.kind == "latency":
            return self.limit / 100
        return self.limit / 100 * base if self.percent else self.limit

    def holds(self, cost: PlanCost, latency: dict[str, Any] | None = None) -> bool:
        if self.kind == "params":
            return cost.params <= self.allowed(cost.base_params)
        if self.kind == "flops":
            return cost.flops <= self.allowed(cost.base_flops)
        return latency is not None and latency["ratio_min"] - 1 <= self.allowed(1.0)


def parse_budget(text: Any) -> Budget:
    """``params=+2%``, ``flops=+0.5%``, ``latency=+5%``, ``params=+500k``, ``flops=+1.2G`` (the ``+`` is optional)."""
    if isinstance(text, Budget):
        return text
    match = re.fullmatch(r"\s*(\w+)\s*[=:]\s*\+?\s*(\d+(?:\.\d*)?|\.\d+)\s*([kKmMgGtT]?)\s*(%?)\s*", str(text))
    kind = match and match.group(1).lower()
    if not match or kind not in KINDS:
        raise BudgetError(f"cannot read budget {str(text)[:60]!r}: write KIND=+LIMIT with KIND one of "
                          f"{', '.join(KINDS)}, e.g. params=+2%, flops=+0.5%, latency=+5%, params=+500k")
    number, suffix, percent = float(match.group(2)), match.group(3).lower(), bool(match.group(4))
    if percent and suffix:
        raise BudgetError(f"budget {text!r}: a percentage takes no k/M/G suffix")
    if kind == "latency" and not percent:
        raise BudgetError(f"budget {text!r}: a latency budget is a percentage of the measured latency, "
                          "e.g. latency=+5%")
    if number * _SUFFIX[suffix] > 1e15 or (percent and number > 1e6):
        raise BudgetError(f"budget {text!r} is out of range")
    return Budget(kind, number * _SUFFIX[suffix], percent)


def parse_budgets(value: Any) -> tuple[Budget, ...]:
    """Budgets from one text, a list of them, or a mapping ``{"params": "+2%"}``; one per kind."""
    if value is None:
        return ()
    if isinstance(value, (str, Budget)):
        value = [value]
    elif isinstance(value, dict):
        value = [f"{k}={v}" for k, v in value.items()]
    elif not isinstance(value, (list, tuple)):
        raise BudgetError(f"a budget is a text such as 'params=+2%' or a list of them, not {type(value).__name__}")
    budgets = tuple(parse_budget(v) for v in value)
    kinds = [b.kind for b in budgets]
    repeated = sorted({k for k in kinds if kinds.count(k) > 1})
    if repeated:
        raise BudgetError(f"budget for {', '.join(repeated)} given twice; give each kind once")
    return budgets


@dataclass
class Choice:
    """What a budget chose: the config and plan to edit by, their cost, and what was left out."""

    config: RetrofitConfig
    plan: Plan
    cost: PlanCost
    budgets: tuple[Budget, ...]
    units: list[str]
    left_out: list[str]
    reductions: tuple[int | None, ...]
    latency: dict[str, Any] | None = None
    measured: int = 0
    rule: str = RULE
    notes: list[str] = field(default_factory=list)

    @property
    def fits(self) -> bool:
        return all(b.holds(self.cost, self.latency) for b in self.budgets)

    def checks(self) -> list[dict[str, Any]]:
        """One row per budget: its text, the plan's value, whether it holds, and how it was found."""
        rows = []
        for b in self.budgets:
            if b.kind == "latency":
                ratio = self.latency["ratio_min"] if self.latency else None
                value = "not measured" if ratio is None else f"×{ratio:.3f} (+{100 * (ratio - 1):.2f}%)"
                how = (f"measured: ratio of minima over {self.latency['repeats']} interleaved rounds, "
                       f"{self.latency['threads']} thread(s), this machine") if self.latency else "measured"
            else:
                added = self.cost.params if b.kind == "params" else self.cost.flops
                pct = self.cost.params_pct if b.kind == "params" else self.cost.flops_pct
                value, how = f"+{added:,} (+{pct:.3f}%)", "counted"
            rows.append({"budget": b.text, "value": value, "holds": b.holds(self.cost, self.latency), "how": how})
        return rows

    def to_dict(self) -> dict[str, Any]:
        return {"budgets": [b.text for b in self.budgets], "rule": self.rule, "fits": self.fits,
                "reduction": self.config.reduction, "reductions_considered": list(self.reductions),
                "units_chosen": self.units, "left_out": self.left_out, "sites": len(self.plan.sites),
                "config": self.config.to_dict(), "cost": self.cost.to_dict(), "latency": self.latency,
                "candidates_measured": self.measured, "checks": self.checks(), "notes": self.notes}

    def lines(self) -> list[str]:
        """The choice in words, for the command line."""
        r = f", r={self.config.reduction}" if self.config.reduction else ""
        total = len(self.units) + len(self.left_out)
        out = [f"budget {' '.join(b.text for b in self.budgets)}: chose {len(self.units)} of {total} units"
               f" ({_span(self.units)}){r}",
               f"rule: {self.rule}" + (f"; r from {', '.join(map(str, self.reductions))}"
                                       if len(self.reductions) > 1 else "")]
        for row in self.checks():
            out.append(f"  {row['budget']:<18} {row['value']:<28} {'holds' if row['holds'] else 'EXCEEDED'}"
                       f"  ({row['how']})")
        if self.left_out:
            out.append(f"left out: {len(self.left_out)} units ({_span(self.left_out)})")
        larger = [r for r in self.reductions if r is not None and self.config.reduction is not None
                  and r < self.config.reduction]
        if larger:
            out.append(f"left out: r={', '.join(map(str, larger))} (over budget with these sites)")
        out += self.notes
        return out


def _span(names: Sequence[str]) -> str:
    if not names:
        return "none"
    return ", ".join(names) if len(names) <= 3 else f"{names[0]} … {names[-1]}"


def select(unit_costs: dict[Any, list[tuple[int, int]]], budgets: Iterable[Budget], base_params: int,
           base_flops: int, *, size: int | None = None) -> tuple[tuple[int, ...], Any] | None:
    """:data:`RULE` on counted costs alone (parameters and FLOPs; a latency budget is left to the
    caller): ``unit_costs`` maps each r to the (params, flops) of every unit in model order. Returns
    the indices of the units chosen (ascending) and r, or None where no plan fits. ``size`` asks for
    exactly that many units instead of as many as fit. Pure.

    Example:
        >>> costs = {8: [(10, 0), (10, 0), (10, 0)], 16: [(5, 0), (5, 0), (5, 0)]}  # (params, FLOPs)
        >>> select(costs, [parse_budget("params=+30")], 1000, 1000)  # all three, even at r=8
        ((0, 1, 2), 8)
        >>> select(costs, [parse_budget("params=+20")], 1000, 1000)  # all three at r=16 only
        ((0, 1, 2), 16)
        >>> select(costs, [parse_budget("params=+12")], 1000, 1000)  # two fit: the later ones
        ((1, 2), 16)
    """
    limits = _limits(budgets, base_params, base_flops)
    reductions = sorted(unit_costs, key=_r_key)
    count = len(next(iter(unit_costs.values()))) if unit_costs else 0
    sizes = [size] if size is not None else range(count, 0, -1)
    for k in sizes:  # 1. as many units as fit (at any r)
        for r in reductions:  # 3. the smallest r at which they fit
            if _completable(unit_costs[r], k, *limits):
                return _latest(unit_costs[r], k, *limits), r  # 2. the latest units among those that fit
    return None


def _limits(budgets: Iterable[Budget], base_params: int, base_flops: int) -> tuple[float, float]:
    params = flops = float("inf")
    for b in budgets:
        if b.kind == "params":
            params = min(params, b.allowed(base_params))
        elif b.kind == "flops":
            flops = min(flops, b.allowed(base_flops))
    return params, flops


def _completable(pool: Sequence[tuple[int, int]], m: int, params: float, flops: float) -> bool:
    """Whether ``m`` units of ``pool`` fit in ``params`` and ``flops``: the ``m`` cheapest by parameters,
    by FLOPs, or by both weighed against their limits (exact with one budget; with both, a fit is
    only ever claimed where one of these sets fits)."""
    if m <= 0:
        return params >= 0 and flops >= 0
    if m > len(pool):
        return False
    scale_p = params if 0 < params < float("inf") else 1.0
    scale_f = flops if 0 < flops < float("inf") else 1.0
    for key in (lambda c: c[0], lambda c: c[1], lambda c: c[0] / scale_p + c[1] / scale_f):
        cheapest = sorted(pool, key=key)[:m]
        if sum(c[0] for c in cheapest) <= params and sum(c[1] for c in cheapest) <= flops:
            return True
    return False


def _latest(costs: Sequence[tuple[int, int]], k: int, params: float, flops: float) -> tuple[int, ...]:
    """``k`` units that fit, the latest possible: from the last unit back, each one is taken where the
    rest can still be made up from the units before it."""
    chosen: list[int] = []
    for i in range(len(costs) - 1, -1, -1):
        if len(chosen) == k:
            break
        left_p, left_f = params - costs[i][0], flops - costs[i][1]
        if _completable(costs[:i], k - len(chosen) - 1, left_p, left_f):
            chosen.append(i)
            params, flops = left_p, left_f
    return tuple(sorted(chosen))


def _r_key(r: Any) -> float:
    return float("inf") if r is None else float(r)


def choose(model: nn.Module, config: RetrofitConfig | None, budget: Any, example_input: Any = None, *,
           analysis: Analysis | None = None, reductions: Sequence[int] = REDUCTIONS, repeats: int = 10) -> Choice:
    """The plan :data:`RULE` picks for ``budget`` (see :func:`parse_budgets`) within ``config``'s
    selection; ``model`` is not changed. An :class:`ImpossibleBudgetError` where none fits."""
    config = config or RetrofitConfig()
    budgets = parse_budgets(budget)
    if not budgets:
        raise BudgetError("no budget given; give one such as params=+2%")
    example_input = default_example_input(model) if example_input is None else example_input
    has_r = "reduction" in get_attention(config.attention).options
    options: tuple[int | None, ...] = (config.reduction,) if config.reduction is not None or not has_r \
        else tuple(sorted(set(reductions)))
    with graph_cache():
        analysis = analysis or analyze(model, example_input)
        base = base_counts(model, example_input)
        plans = {r: plan_sites(model, analysis, replace(config, reduction=r)) for r in options}
        costs = {r: predict(model, replace(config, reduction=r), analysis, plans[r], example_input, base=base)
                 for r in options}
        units = _units(costs[options[0]])
        per_unit = {r: [_unit_cost(costs[r], u) for u in units] for r in options}
        search = _Search(model, config, analysis, plans, costs, units, example_input, repeats)
        picked = _pick(per_unit, budgets, base, search)
        if picked is None:
            r = options[-1]
            cheapest = ((min(range(len(units)), key=lambda i: (per_unit[r][i], -i)),), r)
            cost, latency = search.cost(*cheapest), search.latency(*cheapest) if search.wants_latency(budgets) else None
            head = units[cheapest[0][0]] + (f", r={r}" if r else "")
            measured = f", latency ×{latency['ratio_min']:.3f} (measured)" if latency else ""
            raise ImpossibleBudgetError(
                f"no plan meets {' and '.join(b.text for b in budgets)}: the cheapest plan, 1 site ({head}), adds "
                f"{cost.text()}{measured}; raise the budget, or choose a cheaper attention type or position")
        return search.choice(*picked, budgets, options)


def _units(cost: PlanCost) -> list[str]:
    """Unit names in model order, sorted by stage (stable): the last ones are the latest stages'."""
    seen: dict[str, int] = {}
    for site in cost.sites:
        seen.setdefault(site.unit, site.stage)
    return sorted(seen, key=lambda u: seen[u])


def _unit_cost(cost: PlanCost, unit: str) -> tuple[int, int]:
    sites = [s for s in cost.sites if s.unit == unit]
    return sum(s.params for s in sites), sum(s.flops for s in sites)


def _pick(per_unit: dict[Any, list[tuple[int, int]]], budgets: tuple[Budget, ...], base: tuple[int, int],
          search: "_Search") -> tuple[tuple[int, ...], Any] | None:
    static = select(per_unit, budgets, *base)
    if static is None or not search.wants_latency(budgets):
        return static
    reductions = sorted(per_unit, key=_r_key)
    latency = next(b for b in budgets if b.kind == "latency")

    def candidate(k: int, r: Any) -> tuple[tuple[int, ...], Any] | None:
        picked = select({r: per_unit[r]}, budgets, *base, size=k)
        return picked if picked is not None else None

    def fits(picked) -> bool:
        return picked is not None and latency.holds(search.cost(*picked), search.latency(*picked))

    def cheapest(k: int):  # the largest r at which k units meet the counted budgets
        for r in reversed(reductions):
            picked = candidate(k, r)
            if picked is not None:
                return picked
        return None

    low, high = 0, len(static[0])  # the most units whose cheapest plan meets the latency budget, by bisection
    while low < high:
        middle = (low + high + 1) // 2
        if fits(cheapest(middle)):
            low = middle
        else:
            high = middle - 1
    if low == 0:
        return None
    for r in reductions:  # then the smallest r that fits, counted and measured
        picked = candidate(low, r)
        if fits(picked):
            return picked
    return None


class _Search:
    """Costs of candidates (indices of units, r): counted from the per-site costs; latency measured once each."""

    def __init__(self, model, config, analysis, plans, costs, units, example_input, repeats):
        self.model, self.config, self.analysis, self.plans, self.costs = model, config, analysis, plans, costs
        self.units, self.example_input, self.repeats = units, example_input, repeats
        self.measured: dict[tuple[tuple[int, ...], Any], dict[str, Any]] = {}

    @staticmethod
    def wants_latency(budgets: Sequence[Budget]) -> bool:
        return any(b.kind == "latency" for b in budgets)

    def chosen(self, indices: tuple[int, ...]) -> list[str]:
        return [self.units[i] for i in indices]

    def cost(self, indices: tuple[int, ...], r: Any) -> PlanCost:
        return self.costs[r].only(set(self.chosen(indices)))

    def plan(self, indices: tuple[int, ...], r: Any) -> tuple[RetrofitConfig, Plan, list[str]]:
        """The config and plan of the candidate: by ``blocks`` naming its units where that re-plans to
        the same sites (a config a user can read and repeat), else the plan's sites themselves."""
        chosen = set(self.chosen(indices))
        full = self.plans[r]
        config = replace(self.config, reduction=r)
        subset = Plan(sites=[s for s in full.sites if (s.unit or s.block) in chosen], skipped=dict(full.skipped),
                      stacked=[u for u in full.stacked if u in chosen])
        if len(indices) == len(self.units):
            return config, subset, []
        named = replace(config, blocks=[glob.escape(u) for u in self.chosen(indices)], stages=None, every=None,
                        exclude=None)
        try:
            again = plan_sites(self.model, self.analysis, named)
        except RetrofitError:
            again = None
        if again is not None and [_place(s) for s in again.sites] == [_place(s) for s in subset.sites]:
            return named, again, []  # the same places (a module may be named se where the full plan said se1)
        return config, subset, ["note: the chosen units are not a --blocks selection of their own; the saved "
                                "record lists the sites edited"]

    def latency(self, indices: tuple[int, ...], r: Any) -> dict[str, Any]:
        if (indices, r) not in self.measured:
            import torch

            from .core import edit_with_plan
            from .measure import latency_ratio

            config, plan, _ = self.plan(indices, r)
            edited = edit_with_plan(self.model, config, self.analysis, plan)
            timing = latency_ratio(self.model, edited, self.example_input, self.repeats)
            self.measured[(indices, r)] = {**timing, "repeats": self.repeats, "threads": torch.get_num_threads()}
        return self.measured[(indices, r)]

    def choice(self, indices: tuple[int, ...], r: Any, budgets: tuple[Budget, ...], options: tuple) -> Choice:
        config, plan, notes = self.plan(indices, r)
        latency = self.latency(indices, r) if self.wants_latency(budgets) else None
        left = [u for i, u in enumerate(self.units) if i not in set(indices)]
        cost = self.cost(indices, r)
        if [s.module for s in cost.sites] != [s.module_path for s in plan.sites]:  # named anew: count it so
            cost = predict(self.model, config, self.analysis, plan, self.example_input,
                           base=(cost.base_params, cost.base_flops))
        return Choice(config, plan, cost, budgets, self.chosen(indices), left, options,
                      latency, len(self.measured), notes=notes)


def _place(site) -> tuple:
    """Where a site edits, whatever its new module is called."""
    return replace(site, module_name="", attention_bytes=None)
