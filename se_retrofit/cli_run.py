"""What ``se-retrofit MODEL [options]`` does once its arguments parse: validate the request, build
the model, analyse it, edit it, check identity, save and export it, and report.

Kept apart from :mod:`se_retrofit.cli` (the parser), which imports neither torch nor timm, so that
``--help`` and ``--version`` answer at once. Progress goes to stderr on a terminal only
(:mod:`se_retrofit.cli_progress`): piped output and ``--json`` stay as they were.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import warnings
from pathlib import Path
from typing import Any

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from . import cost_cli
from .analysis import UNIT_KINDS, default_example_input, never_run_text
from .attention import create_attention, list_attentions
from .cli_labels import sublayer_labels, units_text
from .cli_progress import Progress
from .config import RetrofitConfig, import_attention_module
from .core import RECORD_ATTR, StackedAttentionWarning, edit_with_plan, one_thread, plan
from .errors import RetrofitError
from .export import save_and_export, timm_usage
from .hub import OfflineWarning, check_weights_path, create, resolve
from .identity_check import check_identity
from .io import CONFIG_FILE, SaveError, check_target
from .planning import Plan
from .tracing import graph_cache
from ._shell import UsageError

#: a probe input and the activations of one forward need about this many times the input's bytes
ACTIVATION_FACTOR = 32

_KIND_WORDS = {"residual": "blocks", "join": "joins", "chain": "chain layers"}


class IdentityCheckError(RetrofitError):
    """The edited model does not compute what the original computes, and that was not asked for."""


def run(args: argparse.Namespace, out: Console | None = None, err: Console | None = None) -> int:
    """Run ``se-retrofit MODEL [options]`` for parsed ``args``; the report goes to ``out``."""
    out = out or Console(soft_wrap=True)
    err = err or Console(stderr=True, soft_wrap=True)
    for module in args.imports:
        import_attention_module(module)
    if args.list_attentions:
        for name, spec in list_attentions(include_timm=True).items():
            out.print(f"{name:12s} {spec.summary}", markup=False, highlight=False)
            out.print(f"{'':12s}   default position: {spec.default_position}"
                      + (", last block only" if spec.default_blocks == "last" else "")
                      + f"; options: {_option_text(spec.options)}", markup=False, highlight=False)
        return 0
    if not args.model:
        raise UsageError("the following arguments are required: model")
    options = {k: v for k, v in (("squeeze", args.squeeze), ("gate", args.gate), ("act", args.act),
                                 ("kernel_size", args.kernel_size), ("dilation", args.dilation),
                                 ("mode", args.mode), ("sub_sample", args.sub_sample), ("fusion", args.fusion))
               if v is not None}
    config = RetrofitConfig(attention=args.attention, position=args.position, reduction=args.r,
                            divisor=args.divisor, stages=args.stages, blocks=args.blocks, exclude=args.exclude,
                            every=args.every, init=args.init, options=options, kinds=args.kinds)
    ref = resolve(args.model, args.source)
    out_dir = args.out or default_out_dir(ref.name, config)
    # The request first (weights file, sizes; stages and --blocks once the model is analysed), then
    # the output directory: a bad request is reported as such even where an earlier run's directory exists.
    if args.weights not in ("pretrained", "none"):
        check_weights_path(args.weights, allow_pickle=args.allow_pickle)
    if args.input_size is not None:
        _check_input_memory(args.input_size)
    progress = Progress(err)
    with progress.stage(f"building {ref} (weights: {args.weights})"):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            model, origin = create(ref, args.weights, allow_pickle=args.allow_pickle)
    _report_warnings(caught, err)
    model.eval()
    example = _example(model, args.input_size)
    with graph_cache(), one_thread():  # planning and editing trace each block structure once
        with progress.stage(f"analysing {ref.name} at input {tuple(example.shape)}"):
            analysis, site_plan = plan(model, config, example)
        costs = cost_cli.apply(args, model, config, analysis, site_plan, example)  # --budget, --measure, FLOPs
        config, site_plan = costs.config, costs.plan
        report = _report(ref, origin, config, analysis, site_plan, model)
        if not args.dry_run:
            _check_out_dir(out_dir, args.overwrite, given=args.out is not None)
            with progress.stage(f"editing {len(site_plan.sites)} sites"):
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    edited = edit_with_plan(model, config, analysis, site_plan)
            _report_warnings(caught, err)
            report = _report(ref, origin, config, analysis, site_plan, model)  # sites found not editable: skipped
    if not args.dry_run:
        getattr(edited, RECORD_ATTR).base.update(name=ref.name, source=ref.source, weights=origin)
        with progress.stage("checking identity (train and eval mode)"):
            check = check_identity(model, edited, example, random_weights=origin.startswith("random"))
        _enforce_identity(check, config, args.allow_nonidentity, err)
        report.update(_identity_report(check), params_after=_count(edited))
        report["params_added_pct"] = 100.0 * (report["params_after"] / report["params_before"] - 1)
        what = "saving" if args.format == "safetensors" else f"saving, exporting ({args.format}) and checking the file"
        with progress.stage(f"{what} to {out_dir}"):
            saved, exported = save_and_export(edited, out_dir, args.format, example, overwrite=args.overwrite,
                                              dynamic_spatial=args.dynamic_spatial)
        report.update(output_dir=str(saved), export=exported.to_dict() if exported else None)
    progress.done()
    costs.report(report)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, out)
        for line in costs.lines():
            out.print(line, markup=False, highlight=False)
    return 0


def default_out_dir(name: str, config: RetrofitConfig) -> Path:
    """``./MODEL-ATTENTION-POSITION[-rR]`` followed by the selection, so different selections of one
    model do not collide: ``resnet50-se-standard-r16-stages3-4``, ``…-blocks-layer3.x``, ``…-every2``.

    Example:
        >>> from se_retrofit.config import RetrofitConfig
        >>> str(default_out_dir("resnet50", RetrofitConfig(stages=[3, 4], every=2)))
        'resnet50-se-standard-stages3-4-every2'
    """
    parts = [name.replace("/", "_"), config.attention, config.position]
    if config.reduction:
        parts.append(f"r{config.reduction}")
    if config.kinds:
        parts.append("kinds" + "+".join(config.kinds))
    if config.stages:
        parts.append("stages" + "-".join(map(str, config.stages)))
    if config.blocks:
        parts.append("blocks-" + _pattern_words(config.blocks))
    if config.exclude:
        parts.append("exclude-" + _pattern_words(config.exclude))
    if config.every:
        parts.append(f"every{config.every}")
    return Path("-".join(re.sub(r"[^A-Za-z0-9._+-]", "_", p) for p in parts))


def _pattern_words(patterns: list[str]) -> str:
    """Glob patterns as a file-name part: ``*`` → ``x``, ``?`` → ``q``, joined with ``+``; a long
    list is cut and ends in a short hash of the whole (names stay apart and short)."""
    import hashlib

    text = "+".join(patterns).replace("*", "x").replace("?", "q")
    if len(text) > 40:
        text = text[:32] + "." + hashlib.sha1("\0".join(patterns).encode()).hexdigest()[:7]
    return text


def _check_out_dir(out_dir: Path, overwrite: bool, given: bool) -> None:
    if os.path.lexists(out_dir) and not overwrite:
        held = _earlier_run(out_dir)
        by = f" (it holds an earlier run: {held})" if held else ""
        other = "choose --out" if given else "choose --out, or a different selection names its own directory"
        raise SaveError(f"output directory {out_dir} already exists{by}; pass --overwrite or {other}")
    check_target(out_dir, overwrite)


def _earlier_run(directory: Path) -> str | None:
    """What the retrofit saved in ``directory`` was (from its config file), or None."""
    try:
        data = json.loads((Path(directory) / CONFIG_FILE).read_text()[:1_000_000])
        config, base = data.get("config", {}), data.get("base", {})
        words = [str(base.get("name", "?")), f"{config.get('attention')} at {config.get('position')}"]
        words += [f"{key} {config[key]}" for key in ("reduction", "stages", "blocks", "exclude", "every", "kinds")
                  if config.get(key)]
        return ", ".join(words)
    except (OSError, ValueError, AttributeError, TypeError):
        return None


def _option_text(options: dict[str, Any]) -> str:
    if "*" in options:
        return "any keyword the class takes"
    shown = {k: getattr(v, "__name__", None) or repr(v) for k, v in options.items() if v is not None}
    return ", ".join(f"{k}={shown[k]}" if k in shown else k for k in options) or "none"


def _check_input_memory(size: tuple[int, ...]) -> None:
    """Refuse an ``--input-size`` whose probe forward cannot fit in memory, before allocating it."""
    needed = 4 * ACTIVATION_FACTOR
    for extent in size:
        needed *= extent
    available = _available_memory()
    if available is not None and needed > available:
        raise UsageError(f"--input-size {','.join(map(str, size))} needs about {needed / 2**30:,.0f} GiB for the "
                         f"probe input and its activations, and {available / 2**30:,.1f} GiB are available; "
                         "choose a smaller size such as 3,224,224")


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux's MemAvailable; else physical memory)."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        return None


def _enforce_identity(check, config: RetrofitConfig, allowed: bool, err: Console) -> None:
    """An identity init that does not give the original outputs is an error (nothing is saved)
    unless ``--allow-nonidentity``, then a warning. ``--init random`` is not meant to be identity."""
    if config.init != "identity" or check.passed:
        return
    message = (f"identity check failed: max |Δ| = {check.max_abs_diff:.3g} (relative {check.max_rel_diff:.3g}, "
               f"tolerance {check.tolerance:g}) on {check.statistics}: the edited model does not compute what the "
               f"original does ({config.attention!r} at {config.position!r} does not start at identity)")
    if not allowed:
        raise IdentityCheckError(f"{message}; nothing was written (pass --allow-nonidentity to save it anyway)")
    err.print(f"warning: {message}; saving anyway (--allow-nonidentity)", markup=False, highlight=False,
              style="yellow")


def _example(model: nn.Module, size: tuple[int, ...] | None) -> torch.Tensor:
    if size is None:
        return default_example_input(model)
    return torch.randn(1, *size, generator=torch.Generator().manual_seed(0))


def _report_warnings(caught: list, err: Console) -> None:
    for item in caught:
        if issubclass(item.category, (OfflineWarning, StackedAttentionWarning)):
            err.print(f"warning: {item.message}", markup=False, highlight=False, style="yellow")


def _count(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _site_rows(site_plan: Plan, config: RetrofitConfig) -> list[dict[str, Any]]:
    """One row per site, with the parameters its module adds: one module is built per distinct
    (channels, spatial dims), on the meta device (shapes, no memory, no init)."""
    sizes: dict[tuple[int, int], tuple[int | None, int]] = {}
    rows = []
    for site in site_plan.sites:
        key = (site.channels, site.spatial_dims)
        if key not in sizes:
            sizes[key] = _module_size(config, *key)
        reduced, params = sizes[key]
        rows.append({"block": site.block, "unit": site.unit or site.block, "kind": site.kind,
                     "module": site.module_path, "stage": site.stage,
                     "channels": site.channels, "reduced": reduced,
                     "params": params, "attention_map_bytes": site.attention_bytes})
    return rows


def _module_size(config: RetrofitConfig, channels: int, spatial_dims: int) -> tuple[int | None, int]:
    """(hidden width, parameter count) of the module ``config`` inserts at ``channels``."""
    def build() -> nn.Module:
        return create_attention(config.attention, channels, init=config.init, spatial_dims=spatial_dims,
                                **config.attention_options())
    try:
        with torch.device("meta"):
            module = build()
    except (RuntimeError, NotImplementedError):  # an init that needs values (a user's type): build it for real
        module = build()
    return _hidden_width(module, channels), _count(module)


def _hidden_width(module: nn.Module, channels: int) -> int | None:
    """Width of the first layer that reduces the channels (SE's fc1, CBAM's and BAM's MLPs); a layer
    down to one channel is an attention map (GCNet's, Non-local's pooling), not the reduction."""
    for layer in module.modules():
        if getattr(layer, "in_channels", None) == channels and 1 < layer.out_channels < channels:
            return layer.out_channels
    return None


def _report(ref, origin: str, config: RetrofitConfig, analysis, site_plan: Plan, model: nn.Module) -> dict:
    sites = _site_rows(site_plan, config)
    labels = sublayer_labels(model, analysis.units)
    for row in sites:
        if row["unit"] in labels:
            row["label"] = labels[row["unit"]]
    return {
        "model": str(ref), "weights": origin, **config.to_dict(),
        "blocks_found": len(analysis.blocks), "stages_found": analysis.stages,
        "units_found": {kind: analysis.count(kind) for kind in UNIT_KINDS if analysis.count(kind)},
        "units_edited": units_text(analysis.units_of(config.kinds)),
        "already_with_attention": site_plan.stacked, "skipped": site_plan.skipped,
        "never_run": analysis.never_run, "sites": sites, "params_before": _count(model),
        "params_planned": sum(s["params"] for s in sites), "dry_run": True,
    }


def _identity_report(check) -> dict[str, Any]:
    return {"dry_run": False, "identity_max_abs_diff": check.max_abs_diff,
            "identity_max_rel_diff": check.max_rel_diff, "identity_statistics": check.statistics,
            "identity_passed": check.passed}


def _print_report(report: dict, out: Console) -> None:
    out.print(f"[bold]{report['model']}[/]  weights: {report['weights']}", highlight=False)
    kinds = sorted({row["kind"] for row in report["sites"]}, key=UNIT_KINDS.index)
    on = "" if kinds == ["residual"] else " on " + " and ".join(_KIND_WORDS[k] for k in kinds)
    table = Table(title=f"{report['attention']} at '{report['position']}'"
                        + (f", r={report['reduction']}" if report["reduction"] else "") + on)
    maps = any(row.get("attention_map_bytes") for row in report["sites"])
    residual = all(row["kind"] == "residual" for row in report["sites"])
    first = ("block",) if residual else ("unit", "module")
    for column in first + ("stage", "channels", "reduced", "params added") + (("attention map",) if maps else ()):
        table.add_column(column, justify="left" if column in first else "right")
    for row in report["sites"]:
        unit = row.get("label", row["unit"])
        where = [unit] if residual else [unit, row["module"]]
        cells = [*where, str(row["stage"]), str(row["channels"]), str(row["reduced"] or "-"), f"{row['params']:,}"]
        if maps:
            size = row.get("attention_map_bytes")
            cells.append(f"{size / 2**20:,.2f} MiB" if size else "-")
        table.add_row(*cells)
    out.print(table)
    before = report["params_before"]
    out.print(f"{report['units_edited']}; edited: {len(report['sites'])}", highlight=False)
    if report["already_with_attention"]:
        out.print(f"[yellow]note:[/] {len(report['already_with_attention'])} blocks already have channel "
                  "attention; the new modules stack on top of it", highlight=False)
    for block, reason in report["skipped"].items():
        out.print(f"skipped {block}: {reason}", highlight=False, markup=False)
    if report["never_run"]:
        out.print(f"note: {never_run_text(report['never_run'])}", highlight=False, markup=False)
    if report["dry_run"]:
        out.print(f"parameters: {before:,} → {before + report['params_planned']:,} "
                  f"(+{100 * report['params_planned'] / before:.2f}%); dry run: nothing written", highlight=False)
        return
    out.print(f"parameters: {before:,} → {report['params_after']:,} (+{report['params_added_pct']:.2f}%)",
              highlight=False)
    out.print(f"identity check: max |Δ| = {report['identity_max_abs_diff']:.3g} "
              f"(relative {report['identity_max_rel_diff']:.3g}) on {report['identity_statistics']}",
              highlight=False)
    out.print(f"saved to {report['output_dir']}", highlight=False)
    if report["export"]:
        _print_export(report["export"], out)


def _print_export(export: dict, out: Console) -> None:
    out.print(f"export check ({export['format']}): max |Δ| = {export['max_abs_diff']:.3g}", highlight=False)
    batch = {True: " (any batch size", False: " (fixed batch size"}.get(export["dynamic_batch"], "")
    if batch and export.get("dynamic_spatial"):
        sizes = ", ".join("×".join(map(str, size)) for size in export.get("checked_sizes") or [])
        batch += f"; any height and width, checked at {sizes}" if sizes else "; any height and width"
    batch += ")" if batch else ""
    out.print(f"exported to {export['path']}{batch}", highlight=False, markup=False)
    if export["timm_model"]:
        out.print(f"load without se_retrofit: {timm_usage(export['timm_model'], export['path'], export['timm_kwargs'])}",
                  highlight=False, markup=False)
