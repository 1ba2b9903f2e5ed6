"""Command line: ``se-retrofit MODEL [options]``.

Examples:
    se-retrofit resnet50 --position post --r 16
    se-retrofit torchvision:resnet50 --stages 3,4 --weights none --dry-run
    se-retrofit resnet50 --weights ./resnet50.safetensors --out ./resnet50-se --json
    se-retrofit finetune recipes/resnet50-se-standard.yaml --data ./my_images
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
import warnings
from pathlib import Path
from typing import Any, Sequence

import torch
from rich.console import Console
from rich.table import Table
from torch import nn

from ._version import __version__
from ._shell import Parser, UsageError, path_argument, run_command
from .analysis import UNIT_KINDS, default_example_input, never_run_text
from .attention import create_attention, list_attentions
from .config import POSITION_HELP, POSITIONS, RetrofitConfig, import_attention_module
from .errors import RetrofitError
from .core import RECORD_ATTR, StackedAttentionWarning, edit_with_plan, one_thread, plan
from .export import FORMATS as EXPORT_FORMATS, save_and_export, timm_usage
from .hub import OfflineWarning, check_weights_path, create, resolve
from .identity_check import check_identity
from .io import SaveError, check_target
from .planning import Plan
from .tracing import graph_cache

#: a probe input and the activations of one forward need about this many times the input's bytes
ACTIVATION_FACTOR = 32


class IdentityCheckError(RetrofitError):
    """The edited model does not compute what the original computes, and that was not asked for."""


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in UNIT_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown unit kind {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(UNIT_KINDS)}")
    return kinds


_KIND_WORDS = {"residual": "blocks", "join": "joins", "chain": "chain layers"}


def _units_text(units) -> str:
    """``blocks found: 16 (stages 1,2,3,4)`` / ``joins found: 11 (stages 1,2,3)``."""
    if not units:
        return "units found: 0"
    kinds = sorted({u.kind for u in units}, key=UNIT_KINDS.index)
    counts = ", ".join(f"{_KIND_WORDS[k]} found: {sum(u.kind == k for u in units)}" for k in kinds)
    return f"{counts} (stages {_stage_text(sorted({u.stage for u in units}))})"


def _positive_int(high: int):
    """A parser of a whole number from 1 to ``high`` (every option has a ceiling: a typo such as 1e20
    must not reach a constructor)."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d{1,12}", text.strip()) or not 1 <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a positive integer up to {high}, got {text[:40]!r}")
        return int(text)
    return parse


def _stage_list(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",") if p.strip()]
    if not parts or not all(re.fullmatch(r"\d{1,4}", p) and 1 <= int(p) <= 1000 for p in
                                    parts):
        raise argparse.ArgumentTypeError(f"must be comma-separated stage numbers such as 3,4, got {text!r}")
    return sorted({int(p) for p in parts})


def _patterns(text: str) -> list[str]:
    patterns = [p.strip() for p in text.split(",") if p.strip()]
    if not patterns:
        raise argparse.ArgumentTypeError(f"must be comma-separated glob patterns such as 'layer3.*', got {text!r}")
    return patterns


def _size(text: str) -> tuple[int, ...]:
    parts = text.split(",")
    if not all(re.fullmatch(r"\d{1,9}", p.strip()) and int(p) > 0 for p in parts):
        raise argparse.ArgumentTypeError(f"must be C,H,W (or C,L / C,D,H,W) such as 3,224,224, got {text!r}")
    return tuple(int(p) for p in parts)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="se-retrofit",
        description="Retrofit Squeeze-and-Excitation attention into a pretrained timm or torchvision "
                    "network, starting at exact identity, and save it for fine-tuning.")
    parser.add_argument("model", nargs="?", help="timm name (resnet50) or torchvision name (torchvision:resnet50)")
    parser.add_argument("--source", choices=("timm", "torchvision"), help="library to take MODEL from")
    parser.add_argument("--attention", default="se",
                        help="attention type: se, cbam, bam, eca, nonlocal, danet, pam, cam, gc, timm:NAME (timm's, "
                             "e.g. timm:gca) or one you registered (see --list-attentions)")
    parser.add_argument("--position", choices=POSITIONS,
                        help="; ".join(f"{k}: {v}" for k, v in POSITION_HELP.items())
                        + " (default: the attention's own: standard, stage for bam)")
    parser.add_argument("--r", type=_positive_int(4096), help="reduction ratio r (default: the type's, 16)")
    parser.add_argument("--divisor", type=_positive_int(4096),
                        help="round hidden widths to a multiple of this (default: timm's; 1: exact C/r)")
    parser.add_argument("--squeeze", choices=("avg", "max", "avg+max"), help="se: how channels are pooled")
    parser.add_argument("--gate", choices=("sigmoid", "hard_sigmoid", "tanh"), help="se, cbam, eca: the gate")
    parser.add_argument("--act", help="se, cbam, bam: hidden activation by timm name (relu, silu, gelu, …)")
    parser.add_argument("--kernel-size", type=_positive_int(255), help="cbam: spatial kernel (7); eca: 1-D kernel (adaptive)")
    parser.add_argument("--dilation", type=_positive_int(64), help="bam: dilation of the spatial convs (4)")
    parser.add_argument("--mode", choices=("embedded_gaussian", "dot", "gaussian"),
                        help="nonlocal: pairwise function (embedded_gaussian)")
    parser.add_argument("--sub-sample", action=argparse.BooleanOptionalAction,
                        help="nonlocal: max-pool phi and g, a quarter of the pairs (default: on)")
    parser.add_argument("--fusion", choices=("add", "mul"), help="gc: add the context (add) or gate with it (mul)")
    parser.add_argument("--kinds", type=_kinds,
                        help="kinds of unit to edit, comma-separated: residual (blocks with a residual addition), "
                             "join (branches concatenated: Inception, DenseNet, ShuffleNet), chain (conv → "
                             "activation layers: VGG, MobileNetV1); default: the first of these the model has")
    parser.add_argument("--every", type=_positive_int(10000),
                        help="every N-th selected block of each stage, from its first (default: every block)")
    parser.add_argument("--stages", type=_stage_list, help="stages to edit, e.g. 3,4 (default: all)")
    parser.add_argument("--blocks", type=_patterns, help="glob patterns of blocks to edit, e.g. 'layer3.*,layer4.0'")
    parser.add_argument("--exclude", type=_patterns, help="glob patterns of blocks to leave alone")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE first (it registers your own attention type); repeatable")
    parser.add_argument("--init", choices=("identity", "random"), default="identity",
                        help="identity: the edited model computes what the original does (default)")
    parser.add_argument("--weights", default="pretrained",
                        help="pretrained (library weights; random with a warning when offline), none, "
                             "or PATH to a state dict (.safetensors; .pth/.pt with --allow-pickle)")
    parser.add_argument("--allow-pickle", action="store_true",
                        help="allow a pickled .pth/.pt weights file (read with weights_only=True); "
                             ".safetensors never needs it")
    parser.add_argument("--input-size", type=_size, help="probe input size C,H,W (default: the model's own)")
    parser.add_argument("--out", type=path_argument, help="output directory (default ./MODEL-ATTENTION-POSITION-rR)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--format", choices=tuple(EXPORT_FORMATS), default="safetensors",
                        help="also write the model in this format inside the output directory, checked against "
                             "the edited model: timm (NAME.safetensors for timm's native model, e.g. seresnet50), "
                             "torchscript (model.torchscript.pt), export (model.pt2), onnx (model.onnx); "
                             "default safetensors: the directory alone")
    parser.add_argument("--dynamic-spatial", action="store_true",
                        help="with --format export or onnx: let the file take any height and width, checked at "
                             "the probe size and 32 pixels larger")
    parser.add_argument("--allow-nonidentity", action="store_true",
                        help="save even when the identity check finds the edited model computes something else "
                             "(by default that is an error and nothing is written)")
    parser.add_argument("--dry-run", action="store_true", help="show the plan, write nothing")
    parser.add_argument("--json", action="store_true", help="print a machine-readable report on stdout")
    parser.add_argument("--list-attentions", action="store_true", help="list the attention types and exit")
    parser.add_argument("--version", action="version", version=f"se-retrofit {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = 0  # se-retrofit [--import M ...] finetune RECIPE --data DIR: the imports go to finetune
    while lead < len(argv) and (argv[lead] == "--import" and lead + 2 < len(argv)
                                or argv[lead].startswith("--import=")):
        lead += 1 if "=" in argv[lead] else 2
    if argv[lead:lead + 1] == ["finetune"]:
        from .finetune.cli import main as finetune_main

        return finetune_main(argv[lead + 1:] + argv[:lead])
    out = Console(soft_wrap=True)
    err = Console(stderr=True, soft_wrap=True)
    return run_command("se-retrofit", lambda: _run(build_parser().parse_args(argv), out, err))


def _run(args: argparse.Namespace, out: Console, err: Console) -> int:
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
    out_dir = args.out or Path(f"{ref.name.replace('/', '_')}-{config.attention}-{config.position}"
                               + (f"-r{config.reduction}" if config.reduction else ""))
    if not args.dry_run:
        if os.path.lexists(out_dir) and not args.overwrite:
            raise SaveError(f"output directory {out_dir} already exists; pass --overwrite or choose --out")
        check_target(out_dir, args.overwrite)
    if args.weights not in ("pretrained", "none"):
        check_weights_path(args.weights, allow_pickle=args.allow_pickle)
    if args.input_size is not None:
        _check_input_memory(args.input_size)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model, origin = create(ref, args.weights, allow_pickle=args.allow_pickle)
    _report_warnings(caught, err)
    model.eval()
    example = _example(model, args.input_size)
    with graph_cache(), one_thread():  # planning and editing trace each block structure once
        analysis, site_plan = plan(model, config, example)
        report = _report(ref, origin, config, analysis, site_plan, model)
        if not args.dry_run:
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                edited = edit_with_plan(model, config, analysis, site_plan)
            _report_warnings(caught, err)
            report = _report(ref, origin, config, analysis, site_plan, model)  # sites found not editable: skipped
    if not args.dry_run:
        getattr(edited, RECORD_ATTR).base.update(name=ref.name, source=ref.source, weights=origin)
        check = check_identity(model, edited, example, random_weights=origin.startswith("random"))
        _enforce_identity(check, config, args.allow_nonidentity, err)
        report.update(_identity_report(check), params_after=_count(edited))
        report["params_added_pct"] = 100.0 * (report["params_after"] / report["params_before"] - 1)
        saved, exported = save_and_export(edited, out_dir, args.format, example, overwrite=args.overwrite,
                                          dynamic_spatial=args.dynamic_spatial)
        report.update(output_dir=str(saved), export=exported.to_dict() if exported else None)
    if args.json:
        print(json.dumps(report, indent=2))
    else:
        _print_report(report, out)
    return 0


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
    return {
        "model": str(ref), "weights": origin, **config.to_dict(),
        "blocks_found": len(analysis.blocks), "stages_found": analysis.stages,
        "units_found": {kind: analysis.count(kind) for kind in UNIT_KINDS if analysis.count(kind)},
        "units_edited": _units_text(analysis.units_of(config.kinds)),
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
        where = [row["unit"]] if residual else [row["unit"], row["module"]]
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
    batch = {True: " (any batch size)", False: " (fixed batch size)"}.get(export["dynamic_batch"], "")
    out.print(f"exported to {export['path']}{batch}", highlight=False, markup=False)
    if export["timm_model"]:
        out.print(f"load without se_retrofit: {timm_usage(export['timm_model'], export['path'], export['timm_kwargs'])}",
                  highlight=False, markup=False)


def _stage_text(stages: list[int]) -> str:
    return ",".join(map(str, stages)) or "-"


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
