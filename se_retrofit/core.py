"""The public entry point: analyse, plan and edit in one call."""
from __future__ import annotations

import contextlib
import copy
import warnings
from typing import Any, Iterator, Mapping

import torch
from torch import nn
from torch.utils._pytree import tree_leaves

from . import hf
from .analysis import Analysis, analyze
from .config import RetrofitConfig, RetrofitRecord
from .copying import deepcopy_module
from .errors import RetrofitError
from .hub import BUILT_ATTR
from .masking import PADDING_ARGUMENTS
from .planning import NoResidualBlocksError, Plan, nothing_editable, plan_sites
from .surgery import apply_sites
from .tracing import graph_cache

RECORD_ATTR = "se_retrofit"


class LeftOutWarning(UserWarning):
    """Some units the selection chose could not be edited (see :func:`warn_left_out`)."""


class StackedAttentionWarning(UserWarning):
    """The blocks being edited already apply channel attention of their own."""


class TokenModelError(RetrofitError):
    """A model fed token ids: the squeeze would average over its padding tokens."""


def plan(model: nn.Module, config: RetrofitConfig | None = None, example_input: Any = None, *,
         budget: Any = None, **options) -> tuple[Analysis, Plan]:
    """Analyse ``model`` and plan the sites for ``config`` (or keyword options); changes nothing.

    With ``budget`` (``"params=+2%"``, ``["flops=+0.5%", "latency=+5%"]``; see :mod:`se_retrofit.budget`)
    the plan is the one the budget chooses within ``config``'s selection, and ``plan.choice`` says what
    was chosen (``choice.config``: the config to edit by), its cost against each budget and what was
    left out; a budget no plan meets raises :class:`se_retrofit.budget.ImpossibleBudgetError`.

    Example:
        >>> import timm, se_retrofit
        >>> analysis, plan = se_retrofit.plan(timm.create_model("resnet18"), stages=[4])
        >>> [site.block for site in plan.sites]
        ['layer4.0', 'layer4.1']
        >>> _, plan = se_retrofit.plan(timm.create_model("resnet18"), budget="params=+0.1%")
        >>> [site.block for site in plan.sites], plan.choice.config.reduction
        (['layer1.0', 'layer1.1', 'layer2.0', 'layer2.1', 'layer3.1'], 32)
    """
    config = config or RetrofitConfig(**options)
    refuse_scripted(model)
    analysis = analyze(model, example_input)
    if budget is not None:
        from .budget import choose

        choice = choose(model, config, budget, example_input, analysis=analysis)
        choice.plan.choice = choice
        return analysis, choice.plan
    return analysis, plan_sites(model, analysis, config)


def retrofit(model: nn.Module, *, attention: str = "se", position: str | None = None,
             reduction: int | None = None, stages: list[int] | None = None, blocks: list[str] | None = None,
             exclude: list[str] | None = None, init: str = "identity", divisor: int | None = None,
             every: int | None = None, kinds: list[str] | None = None, max_attention_mib: float = 64.0,
             example_input: Any = None, inplace: bool = False, allow_token_models: bool = False,
             budget: Any = None, **options) -> nn.Module:
    """Insert attention into every residual block of ``model`` (or the selected ones); into its joins of
    branches (Inception, DenseNet, ShuffleNet) or its conv chain layers (VGG, MobileNetV1) where it has no
    residual block.

    With ``init="identity"`` the returned model computes exactly what ``model`` computes, in
    train and eval mode, until fine-tuning moves the new parameters. The model keeps its class
    and attributes, its state-dict keys are unchanged, and new parameters appear under each block
    (``layer1.0.se.fc1.weight``). ``model`` itself is left untouched unless ``inplace=True``.

    Args:
        model: any timm or torchvision network (or your own ``nn.Module``).
        attention: registered attention type: ``se``, ``cbam``, ``bam``, ``eca``, ``nonlocal``,
            ``danet``, ``pam``, ``cam``, ``gc``, ``timm:NAME`` (timm's, e.g. ``timm:gca``) or your own.
        position: ``standard``, ``pre``, ``post``, ``identity`` (SE paper, Sec. 6.5), ``inner``
            (after the branch's spatial conv) or ``stage`` (once per stage transition); by default
            the attention type's own (``standard``; ``stage`` for BAM).
        reduction: the reduction ratio r (default: the type's, 16).
        stages: 1-based resolution stages to edit, e.g. ``[3, 4]``; all when None.
        blocks: glob patterns over block paths (``"layer3.*"``); all when None.
        exclude: glob patterns of blocks to leave alone.
        init: ``identity`` (outputs unchanged at start) or ``random`` (the paper's init).
        divisor: round hidden widths to a multiple of this (default: timm's, 8 for SE).
        every: only every k-th selected block of each stage, from its first (``stages=[2, 3],
            every=2``: the Non-local paper's 5 blocks on ResNet-50).
        kinds: the kinds of unit to edit: ``residual`` blocks, ``join`` (branches concatenated:
            Inception modules, dense layers, ShuffleNet units), ``chain`` (conv → activation layers of
            VGG, MobileNetV1); by default the first of these the model has.
        max_attention_mib: refuse a site whose attention map (Non-local, PAM) would be larger at batch 1.
        example_input: an input the model accepts, for probing shapes (default: its input size).
        inplace: edit ``model`` itself instead of a copy.
        allow_token_models: edit a model whose ``example_input`` holds integer tensors (token ids,
            ``input_ids``) all the same. Refused by default: the squeeze averages over every position,
            padding tokens included, and the tool cannot see the attention mask, so once fine-tuning
            moves the gates, padding changes the real tokens' outputs. Safe where batches are unpadded.
        budget: edit the plan a budget chooses within the selection above (``"params=+2%"``, or a
            list: ``["flops=+0.5%", "latency=+5%"]``; r from 4, 8, 16, 32 unless ``reduction`` is
            given): see :mod:`se_retrofit.budget`. The model's record holds the config chosen.
        **options: further options of the attention type, e.g. ``squeeze="max"``, ``gate="tanh"``,
            ``act="silu"`` (SE), ``kernel_size=7`` (CBAM, ECA), ``dilation=4`` (BAM).

    Example:
        >>> import timm, torch, se_retrofit
        >>> base = timm.create_model("resnet18").eval()
        >>> model = se_retrofit.retrofit(base, position="post", reduction=16)
        >>> x = torch.randn(1, 3, 64, 64)
        >>> bool(torch.equal(model(x), base(x)))
        True
        >>> "layer1.0.se.fc1.weight" in model.state_dict()
        True
    """
    config = RetrofitConfig(attention=attention, position=position, reduction=reduction,
                            stages=list(stages) if stages is not None else None,
                            blocks=_patterns(blocks), exclude=_patterns(exclude),
                            init=init, divisor=divisor, every=every, kinds=kinds, max_attention_mib=max_attention_mib,
                            options=options)
    return retrofit_with(model, config, example_input=example_input, inplace=inplace,
                         allow_token_models=allow_token_models, budget=budget)


def _patterns(value: Any) -> list[str] | None:
    """Glob patterns as a list: a single string is one pattern, not a list of its characters."""
    return None if value is None else [value] if isinstance(value, str) else list(value)


def retrofit_with(model: nn.Module, config: RetrofitConfig, *, example_input: Any = None,
                  inplace: bool = False, analysis: Analysis | None = None,
                  allow_token_models: bool = False, budget: Any = None) -> nn.Module:
    """:func:`retrofit` driven by a :class:`RetrofitConfig`; pass ``analysis`` (from :func:`plan`
    or :func:`se_retrofit.analyze` of this model) to skip analysing the model again; ``budget``
    as in :func:`retrofit`."""
    refuse_scripted(model)
    if not allow_token_models:
        refuse_token_input(example_input)
    with graph_cache(), one_thread():  # analysis and surgery trace each block structure once
        if analysis is None:
            analysis = analyze(model, example_input)
        if budget is not None:
            from .budget import choose

            choice = choose(model, config, budget, example_input, analysis=analysis)
            config, site_plan = choice.config, choice.plan
        else:
            site_plan = plan_sites(model, analysis, config)
        edited = edit_with_plan(model, config, analysis, site_plan, inplace=inplace)
    warn_left_out(site_plan)
    return edited


def warn_left_out(site_plan: Plan) -> None:
    """A :class:`LeftOutWarning` where units the selection chose were left unedited (their forward
    cannot be rewritten nor gated from outside): the edited model is not the one asked for in full.
    The command line prints the plan, with every reason, instead."""
    if not site_plan.skipped:
        return
    first, reason = next(iter(site_plan.skipped.items()))
    more = f" (and {len(site_plan.skipped) - 1} more)" if len(site_plan.skipped) > 1 else ""
    warnings.warn(f"{len(site_plan.skipped)} of the {len(site_plan.skipped) + len(_units(site_plan))} units "
                  f"selected were left unedited; {first}: {reason}{more}. se_retrofit.plan(model, ...) lists each "
                  "with its reason; pass exclude=[...] to leave them out knowingly", LeftOutWarning, stacklevel=4)


def _units(site_plan: Plan) -> set[str]:
    return {site.unit or site.block for site in site_plan.sites}


def edit_with_plan(model: nn.Module, config: RetrofitConfig, analysis: Analysis, site_plan: Plan, *,
                   inplace: bool = False) -> nn.Module:
    """:func:`retrofit_with` for a plan made already (:func:`plan` of this model and ``config``): the
    command line shows the plan, then edits by it without planning again."""
    if not site_plan.sites:
        raise NoResidualBlocksError(nothing_editable(analysis, site_plan))
    if site_plan.stacked:
        warnings.warn(f"{len(site_plan.stacked)} of the blocks edited already apply channel attention "
                      f"(first: {site_plan.stacked[0]}); {config.attention} will be stacked on top of it",
                      StackedAttentionWarning, stacklevel=4)
    target = model if inplace else deepcopy_module(model)
    # a block that turns out not to be editable is skipped with its reason, never an error
    site_plan.sites[:] = apply_sites(target, site_plan.sites, config, skipped=site_plan.skipped)
    site_plan.explain_skipped()
    if not site_plan.sites:
        raise NoResidualBlocksError(nothing_editable(analysis, site_plan))
    previous = getattr(model, RECORD_ATTR, None)
    record = previous.followed_by(config, site_plan.sites) if isinstance(previous, RetrofitRecord) \
        else RetrofitRecord(config, site_plan.sites, describe_base(model))
    setattr(target, RECORD_ATTR, record)
    hf.warn_on_save_pretrained(target)
    return target


class ScriptedModelError(RetrofitError):
    """The model (or a part of it) is TorchScript: compiled code, no Python forward to edit."""


def refuse_scripted(model: nn.Module) -> None:
    """A :class:`ScriptedModelError` for a ``torch.jit.script`` / ``torch.jit.trace`` model or one holding
    such a part: its forward is TorchScript, which the analysis cannot see into nor surgery rewrite."""
    if not isinstance(model, nn.Module):
        raise RetrofitError(f"retrofit() takes a torch.nn.Module, not {type(model).__name__}")
    scripted = next((path for path, module in model.named_modules() if isinstance(module, torch.jit.ScriptModule)), None)
    if scripted is not None:
        where = "the model is" if scripted == "" else f"its module {scripted!r} is"
        raise ScriptedModelError(f"{where} TorchScript (torch.jit.script or torch.jit.trace), whose compiled forward "
                                 "cannot be edited: retrofit the nn.Module before scripting it, then script the result")


def refuse_token_input(example_input: Any) -> None:
    """A :class:`TokenModelError` where ``example_input`` holds an integer tensor (token ids); a padding
    mask given by its name (``attention_mask`` beside audio or image features) is what the tool reads,
    not token ids.

    Example:
        >>> import torch
        >>> refuse_token_input(torch.randn(1, 3, 32, 32))  # images: nothing to say
        >>> refuse_token_input({"input_ids": torch.zeros(1, 8, dtype=torch.long)})
        Traceback (most recent call last):
        ...
        se_retrofit.core.TokenModelError: the example input holds an integer tensor ...
        >>> refuse_token_input({"input_values": torch.randn(1, 400), "attention_mask": torch.ones(1, 400, dtype=torch.long)})
    """
    if isinstance(example_input, Mapping):
        example_input = {k: v for k, v in example_input.items() if k not in PADDING_ARGUMENTS}
    integer = [leaf for leaf in tree_leaves(example_input) if isinstance(leaf, torch.Tensor)
               and not leaf.is_floating_point() and not leaf.is_complex() and leaf.dtype != torch.bool]
    if integer:
        raise TokenModelError(
            f"the example input holds an integer tensor of shape {tuple(integer[0].shape)} (token ids, or the "
            "lengths of padded sequences): attention squeezes over every position of a block's output, padding "
            "included, and se_retrofit cannot see which positions are padding, so once fine-tuning moves the "
            "gates, padding would change the real positions' outputs; pass allow_token_models=True to edit it "
            "anyway (safe where batches have no padding)")


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    """torch on one thread for the block. What an edit computes is small (new modules' init) or bound
    by memory (copying the parameters), and there torch's worker threads only wait for one another:
    ten times slower on a machine that other work keeps busy."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def describe_base(model: nn.Module) -> dict[str, Any]:
    """What can be told of a model handed to :func:`retrofit`: its timm architecture, its transformers
    class and config, or its class; and, for a model :func:`se_retrofit.hub.create` built, the name,
    constructor keywords and pretrained tag it was built with (the tag only where those weights
    really were loaded)."""
    cfg = getattr(model, "pretrained_cfg", None)
    cls = type(model)
    info: dict[str, Any] = {"class": f"{cls.__module__}.{cls.__qualname__}",
                            "weights": "as passed to se_retrofit.retrofit()"}
    if hf.is_transformers_model(model):
        return {**info, **hf.describe(model)}
    if isinstance(cfg, dict) and cfg.get("architecture"):
        info.update(name=cfg["architecture"], source="timm")
    built = model.__dict__.get(BUILT_ATTR)
    if isinstance(built, dict):
        info.update(name=built["name"], source=built["source"], create_kwargs=dict(built["create_kwargs"]))
        if built.get("pretrained_tag"):
            info["pretrained_tag"] = built["pretrained_tag"]
    return {**info, **head_of(model, info)}


def head_of(model: nn.Module, base: dict[str, Any]) -> dict[str, Any]:
    """The ``base`` entries that describe a timm model's head as it is now: ``num_classes`` among the
    constructor keywords, and ``global_pool`` (what ``reset_classifier(n, global_pool=...)`` changes)."""
    if base.get("source") != "timm" or isinstance(model.__dict__.get("num_classes"), bool) \
            or not isinstance(model.__dict__.get("num_classes"), int):
        return {}
    head = {"create_kwargs": {**base.get("create_kwargs", {}), "num_classes": model.num_classes}}
    pool = global_pool_of(model)
    if pool is not None:
        head["global_pool"] = pool
    return head


def global_pool_of(model: nn.Module) -> str | None:
    """A timm model's global pooling type (``avg``, ``max``, ``token``…), or None where it has none."""
    for owner in (model, model.__dict__.get("_modules", {}).get("head")):
        pool = getattr(owner, "global_pool", None) if owner is not None else None
        if isinstance(pool, str):
            return pool
        if isinstance(getattr(pool, "pool_type", None), str):
            return pool.pool_type
    return None


def base_at_save(model: nn.Module, record: "RetrofitRecord") -> dict[str, Any]:
    """``record.base`` brought up to date with ``model`` as it is now (a classifier reset since the
    edit: ``num_classes``, ``global_pool``); the record itself is left as it is."""
    base = copy.deepcopy(record.base)
    return {**base, **head_of(model, base)}


def apply_record(model: nn.Module, record: RetrofitRecord) -> nn.Module:
    """Re-apply every recorded edit, in order, to a fresh base model, in place (used by
    :func:`se_retrofit.load`)."""
    with graph_cache(), one_thread():
        for config, sites in record.edits:
            apply_sites(model, sites, config)
    setattr(model, RECORD_ATTR, record)
    hf.warn_on_save_pretrained(model)
    return model


def record_of(model: nn.Module) -> RetrofitRecord:
    """What :func:`retrofit` did to ``model``; a ValueError for a model it did not edit."""
    record = getattr(model, RECORD_ATTR, None)
    if not isinstance(record, RetrofitRecord):
        raise ValueError("this model was not edited by se_retrofit.retrofit(): nothing to save or convert")
    return record
