"""Command line: ``se-retrofit MODEL [options]`` (and ``se-retrofit finetune ...``).

This module builds the parser and dispatches; it imports neither torch nor timm, so ``--help`` and
``--version`` answer at once. What a run does is in :mod:`se_retrofit.cli_run`.

Examples:
    se-retrofit resnet50 --position post --r 16
    se-retrofit torchvision:resnet50 --stages 3,4 --weights none --dry-run
    se-retrofit resnet50 --weights ./resnet50.safetensors --out ./resnet50-se --json
    se-retrofit finetune recipes/resnet50-se-standard.yaml --data ./my_images
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from ._version import __version__
from ._shell import Parser, path_argument, positive_int, run_command
from . import cost_args

# The parser is built without torch or timm (``--help`` and ``--version`` answer at once): the names
# below are the registries' built-in ones, and tests/test_cli.py checks they still match them
# (se_retrofit.analysis.UNIT_KINDS, se_retrofit.positions.POSITION_HELP, se_retrofit.export.FORMATS).
UNIT_KINDS = ("residual", "join", "chain")
POSITION_HELP = {
    "standard": "on the residual branch, after its last layer, before the addition (SE paper default); "
                "on each new branch of a join, before the concatenation; after a chain layer's activation (SE-VGG)",
    "pre": "at the input of the residual branch; the shortcut still sees the raw input",
    "post": "after the addition and the block's final activation (after the join, or after a chain layer's "
            "activation)",
    "identity": "on the shortcut, in parallel to the residual branch",
    "inner": "inside the branch, right after its spatial conv and that conv's norm (the paper's SE_3x3)",
    "stage": "once per stage transition, after the last block of every stage but the last (BAM)",
}
POSITIONS = tuple(POSITION_HELP)
EXPORT_FORMATS = ("safetensors", "timm", "torchscript", "export", "onnx")

#: the commands ``se-retrofit --help`` lists (``finetune`` and ``plan`` have their own ``--help``)
COMMANDS = {
    "MODEL": "retrofit attention into MODEL at exact identity and save it (the options below)",
    "finetune": "fine-tune a recipe on an ImageFolder dataset (se-retrofit finetune --help)",
    "plan": "cost of candidate plans (r × stages) and budgets",
}
EXAMPLES = (
    "se-retrofit resnet50 --position post --r 16",
    "se-retrofit torchvision:resnet50 --stages 3,4 --weights none --dry-run",
    "se-retrofit finetune recipes/resnet18-se-quick.yaml --data ./my_images",
)


def _epilog() -> str:
    width = max(map(len, COMMANDS))
    commands = "\n".join(f"  {name:{width}s}  {text}" for name, text in COMMANDS.items())
    examples = "\n".join(f"  {line}" for line in EXAMPLES)
    return f"commands:\n{commands}\n\nexamples:\n{examples}"


#: a probe input and the activations of one forward need about this many times the input's bytes
ACTIVATION_FACTOR = 32


def _kinds(text: str) -> list[str]:
    kinds = [k.strip() for k in text.split(",") if k.strip()]
    unknown = [k for k in kinds if k not in UNIT_KINDS]
    if unknown or not kinds:
        raise argparse.ArgumentTypeError(f"unknown unit kind {', '.join(unknown) or repr(text)}; choose from "
                                         f"{', '.join(UNIT_KINDS)}")
    return kinds


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
        prog="se-retrofit", usage="se-retrofit MODEL [options] | se-retrofit {finetune,plan} ... (see below)",
        formatter_class=argparse.RawDescriptionHelpFormatter, epilog=_epilog(),
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
    parser.add_argument("--r", type=positive_int(4096), help="reduction ratio r (default: the type's, 16)")
    parser.add_argument("--divisor", type=positive_int(4096),
                        help="round hidden widths to a multiple of this (default: timm's; 1: exact C/r)")
    parser.add_argument("--squeeze", choices=("avg", "max", "avg+max"), help="se: how channels are pooled")
    parser.add_argument("--gate", choices=("sigmoid", "hard_sigmoid", "tanh"), help="se, cbam, eca: the gate")
    parser.add_argument("--act", help="se, cbam, bam: hidden activation by timm name (relu, silu, gelu, …)")
    parser.add_argument("--kernel-size", type=positive_int(255), help="cbam: spatial kernel (7); eca: 1-D kernel (adaptive)")
    parser.add_argument("--dilation", type=positive_int(64), help="bam: dilation of the spatial convs (4)")
    parser.add_argument("--mode", choices=("embedded_gaussian", "dot", "gaussian"),
                        help="nonlocal: pairwise function (embedded_gaussian)")
    parser.add_argument("--sub-sample", action=argparse.BooleanOptionalAction,
                        help="nonlocal: max-pool phi and g, a quarter of the pairs (default: on)")
    parser.add_argument("--fusion", choices=("add", "mul"), help="gc: add the context (add) or gate with it (mul)")
    parser.add_argument("--kinds", type=_kinds,
                        help="kinds of unit to edit, comma-separated: residual (blocks with a residual addition), "
                             "join (branches concatenated: Inception, DenseNet, ShuffleNet), chain (conv → "
                             "activation layers: VGG, MobileNetV1); default: the first of these the model has")
    parser.add_argument("--every", type=positive_int(10000),
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
    parser.add_argument("--out", type=path_argument, help="output directory (default ./MODEL-ATTENTION-POSITION-rR, followed by the selection: "
                             "-stages3-4, -blocks…, -every2)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
    parser.add_argument("--format", choices=EXPORT_FORMATS, default="safetensors",
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
    cost_args.add_arguments(parser)  # --budget, --measure, --repeats
    parser.add_argument("--dry-run", action="store_true", help="show the plan, write nothing")
    parser.add_argument("--json", action="store_true", help="print a machine-readable report on stdout")
    parser.add_argument("--list-attentions", action="store_true", help="list the attention types and exit")
    parser.add_argument("--version", action="version", version=f"se-retrofit {__version__}")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """``se-retrofit``: parse the arguments (no torch yet), then run the command they name."""
    argv = list(sys.argv[1:] if argv is None else argv)
    lead = 0  # se-retrofit [--import M ...] finetune|plan ...: the imports go to the subcommand
    while lead < len(argv) and (argv[lead] == "--import" and lead + 2 < len(argv)
                                or argv[lead].startswith("--import=")):
        lead += 1 if "=" in argv[lead] else 2
    if argv[lead:lead + 1] == ["finetune"]:  # se-retrofit finetune RECIPE --data DIR
        from .finetune.cli import main as finetune_main

        return finetune_main(argv[lead + 1:] + argv[:lead])
    if argv[lead:lead + 1] == ["plan"]:  # se-retrofit plan MODEL --sweep r=4,8,16,32 stages=4/3,4
        from .plan_cli import main as plan_main

        return plan_main(argv[lead + 1:] + argv[:lead])
    return run_command("se-retrofit", lambda: _run(build_parser().parse_args(argv)))


def _run(args: argparse.Namespace) -> int:
    from .cli_run import run  # torch, timm and the package: after the arguments parse

    return run(args)


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
