"""Cost of a plan before the edit: the parameters and FLOPs each site adds, counted exactly.

The caller's model is never edited: a copy of it on the ``meta`` device (shapes, no memory, no
arithmetic) is edited by the plan, and ``torch.utils.flop_counter.FlopCounterMode`` counts one
forward of it on the example input, per module. A site's FLOPs are those counted inside its new
module; its parameters, those of its new module. FLOPs are counted as papers (and
``benchmarks/attention_figures.py``) count them: convolutions and matrix products, 2 per
multiply-add; element-wise operations, pooling and norms are not counted. A model whose forward
cannot run on ``meta`` (it reads values) is counted on a real copy instead.

The edited model's own counts (:func:`count_params`, :func:`count_flops`) equal the base model's
plus the sum over its sites: the tests check it on several models.

Example:
    >>> import timm, se_retrofit
    >>> from se_retrofit.cost import predict
    >>> model = timm.create_model("resnet18")
    >>> analysis, plan = se_retrofit.plan(model, stages=[4])
    >>> cost = predict(model, se_retrofit.RetrofitConfig(stages=[4]), analysis, plan)
    >>> [site.params for site in cost.sites]
    [33312, 33312]
    >>> cost.params == sum(p.numel() for p in se_retrofit.retrofit(model, stages=[4]).parameters()) - cost.base_params
    True
"""
from __future__ import annotations

import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn
from torch.utils._pytree import tree_map
from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

from .analysis import Analysis, default_example_input
from .config import RetrofitConfig
from .copying import deepcopy_module
from .planning import Plan

__all__ = ["PlanCost", "SiteCost", "count_flops", "count_params", "predict", "base_counts"]


@dataclass(frozen=True)
class SiteCost:
    """What one site adds: its unit, where its module goes, the stage, parameters and FLOPs."""

    unit: str
    module: str
    stage: int
    params: int
    flops: int


@dataclass
class PlanCost:
    """The cost of a plan against the unedited model: per site and total (added), and the base."""

    base_params: int
    base_flops: int
    sites: list[SiteCost] = field(default_factory=list)

    @property
    def params(self) -> int:
        return sum(s.params for s in self.sites)

    @property
    def flops(self) -> int:
        return sum(s.flops for s in self.sites)

    @property
    def params_pct(self) -> float:
        return 100.0 * self.params / self.base_params if self.base_params else 0.0

    @property
    def flops_pct(self) -> float:
        return 100.0 * self.flops / self.base_flops if self.base_flops else 0.0

    def only(self, units: set[str]) -> "PlanCost":
        """The cost of the sites of ``units`` alone (costs add: a site's cost does not depend on the others)."""
        return PlanCost(self.base_params, self.base_flops, [s for s in self.sites if s.unit in units])

    def to_dict(self) -> dict[str, Any]:
        return {"base_params": self.base_params, "base_flops": self.base_flops, "params_added": self.params,
                "params_added_pct": self.params_pct, "flops_added": self.flops, "flops_added_pct": self.flops_pct,
                "sites": [asdict(s) for s in self.sites]}

    def text(self) -> str:
        """``+2,514,944 params (+9.84%), +5.03 MFLOPs (+0.06%)``."""
        return (f"+{self.params:,} params (+{self.params_pct:.2f}%), "
                f"+{flops_text(self.flops)} (+{self.flops_pct:.3f}%)")


def flops_text(flops: int) -> str:
    for unit, size in (("GFLOPs", 1e9), ("MFLOPs", 1e6), ("kFLOPs", 1e3)):
        if abs(flops) >= size:
            return f"{flops / size:,.2f} {unit}"
    return f"{flops} FLOPs"


def count_params(model: nn.Module) -> int:
    """Parameters of ``model`` (each shared parameter once)."""
    return sum(p.numel() for p in model.parameters())


def count_flops(model: nn.Module, example_input: Any) -> int:
    """FLOPs of one forward of ``model`` on ``example_input`` (convolutions and matrix products)."""
    return _count(model, example_input).get_total_flops()


def _cpu_attention_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_flop_count(query, key, value)


#: FlopCounterMode counts scaled_dot_product_attention's CUDA kernels and, on ``meta``, the matrix
#: products it decomposes into, but not its CPU kernel: counted here the same way, so that a model
#: counts the same on the CPU as on ``meta`` (a ViT's attention is 8% of its FLOPs)
_EXTRA_FLOPS = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: _cpu_attention_flops}


def _count(model: nn.Module, example_input: Any) -> FlopCounterMode:
    counter = FlopCounterMode(display=False, custom_mapping=_EXTRA_FLOPS)
    with counter, torch.no_grad():
        _call(model, example_input)
    return counter


def _call(model: nn.Module, example_input: Any) -> Any:
    if isinstance(example_input, dict):
        return model(**example_input)
    if isinstance(example_input, (tuple, list)):
        return model(*example_input)
    return model(example_input)


def _on_meta(example_input: Any) -> Any:
    return tree_map(lambda t: t.to("meta") if isinstance(t, torch.Tensor) else t, example_input)


def base_counts(model: nn.Module, example_input: Any = None) -> tuple[int, int]:
    """(parameters, FLOPs) of the unedited ``model``, counted on a meta copy where it runs there."""
    example_input = default_example_input(model) if example_input is None else example_input
    try:
        copy = deepcopy_module(model).to("meta")
        flops = count_flops(copy, _on_meta(example_input))
    except (RuntimeError, NotImplementedError, TypeError, ValueError):  # reads values: count for real
        flops = count_flops(deepcopy_module(model), example_input)  # a forward in train mode moves norms
    return count_params(model), flops


def predict(model: nn.Module, config: RetrofitConfig, analysis: Analysis, site_plan: Plan,
            example_input: Any = None, *, base: tuple[int, int] | None = None) -> PlanCost:
    """The parameters and FLOPs each site of ``site_plan`` adds to ``model``, before any edit.

    ``model`` is left as it is: a copy is edited (on the meta device where the model runs there).
    ``base`` is :func:`base_counts` of the model, when known already.
    """
    from .core import edit_with_plan  # core imports this module's users; import at call time

    example_input = default_example_input(model) if example_input is None else example_input
    base_params, base_flops = base or base_counts(model, example_input)
    plan_copy = site_plan.copy()
    if not site_plan.sites:
        return PlanCost(base_params, base_flops)
    with warnings.catch_warnings():  # the real edit warns (stacked attention, …); a count does not
        warnings.simplefilter("ignore")
        try:
            edited = edit_with_plan(deepcopy_module(model).to("meta"), config, analysis, plan_copy, inplace=True)
            edited.to("meta")  # a module built on the default device joins the others
            counter = _count(edited, _on_meta(example_input))
        except (RuntimeError, NotImplementedError, TypeError, ValueError):
            plan_copy = site_plan.copy()
            edited = edit_with_plan(model, config, analysis, plan_copy)
            counter = _count(edited, example_input)
    per_module = counter.get_flop_counts()
    root = type(edited).__name__
    costs = []
    for site in plan_copy.sites:
        module = edited.get_submodule(site.module_path)
        flops = sum(per_module.get(f"{root}.{site.module_path}", {}).values())
        costs.append(SiteCost(site.unit or site.block, site.module_path, site.stage, count_params(module), int(flops)))
    return PlanCost(base_params, base_flops, costs)
