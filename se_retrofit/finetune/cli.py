"""``se-retrofit finetune RECIPE --data DIR [options]``: fine-tune a recipe on an ImageFolder dataset.

Examples:
    se-retrofit finetune recipes/resnet50-se-standard.yaml --data ./flowers
    se-retrofit finetune recipes/resnet50-se-standard.yaml --data ./flowers --resume
    torchrun --nproc_per_node=4 -m se_retrofit finetune recipes/resnet50-eca.yaml --data ./flowers
    se-retrofit finetune recipes/fasterrcnn-resnet50-fpn-se.yaml --export-only --out ./detector-se
    se-retrofit finetune my-recipe.yaml --data ./flowers --import my_attention   # your registered type
"""
from __future__ import annotations

import argparse
import re
import sys
from typing import Sequence

from rich.console import Console

from .._shell import Parser, path_argument, run_command
from ..config import import_attention_module
from .distributed import main_process_from_env
from .recipe import LIMITS, load_recipe
from .trainer import Options, plan_run, run


def _int_in(low: int, high: int):
    def parse(text: str) -> int:
        if not re.fullmatch(r"\s*\d{1,12}\s*", text) or not low <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a whole number from {low} to {high}, got {text[:40]!r}")
        return int(text)
    return parse


def _limited(key: str):
    return _int_in(*LIMITS[key])


def _epochs(text: str) -> list[int]:
    parts = [p.strip() for p in text.split(",")]
    low, high = LIMITS["epochs"]
    if not all(re.fullmatch(r"\d{1,12}", p) and low <= int(p) <= high for p in parts):
        raise argparse.ArgumentTypeError(f"must be a total such as 10, or one count per phase such as 2,8; "
                                         f"got {text!r}")
    return [int(p) for p in parts]


def _positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = -1.0
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive number, got {text!r}")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(
        prog="se-retrofit finetune",
        description="Fine-tune a retrofitted model from a YAML recipe on an ImageFolder dataset: DIR/train and "
                    "DIR/val, or one DIR of class folders split per class (a fixed hash of each path picks "
                    "val_fraction of every class). Phase 1 trains the new attention modules and the head, "
                    "phase 2 the whole network at a lower rate. Under torchrun it runs DistributedDataParallel.")
    parser.add_argument("recipe", type=path_argument, help="recipe file (see recipes/)")
    parser.add_argument("--data", type=path_argument, help="ImageFolder directory (required unless --export-only)")
    parser.add_argument("--out", type=path_argument, help="output directory (default runs/RECIPE_NAME)")
    parser.add_argument("--resume", action="store_true",
                        help="continue the run in --out after its last finished epoch (same recipe and overrides)")
    parser.add_argument("--overwrite", action="store_true", help="start again where --out already holds a run")
    parser.add_argument("--epochs", type=_epochs,
                        help="total epochs shared out in proportion to the recipe's phases, or one per phase (2,8)")
    parser.add_argument("--batch-size", type=_limited("batch_size"), help="batch size per process")
    parser.add_argument("--lr", type=_positive_float,
                        help="the first phase's learning rate; later phases keep their ratio to it")
    parser.add_argument("--weights", help="pretrained (random with a warning when offline), none, or PATH "
                                          "of a state dict of the library's model (.safetensors)")
    parser.add_argument("--allow-pickle", action="store_true", help="allow a pickled .pth/.pt weights file")
    parser.add_argument("--num-classes", type=_limited("num_classes"), help="outputs of the head (default: class folders)")
    parser.add_argument("--workers", type=_limited("workers"), help="data loading processes per training process")
    parser.add_argument("--device", default="auto", help="auto (GPU when there is one), cpu, cuda or cuda:N")
    parser.add_argument("--image-size", type=_limited("image_size"), help="train and evaluate at this size (default: "
                                                                     "the recipe's, else the model's)")
    parser.add_argument("--seed", type=_limited("seed"), help="random seed (default: the recipe's)")
    parser.add_argument("--stop-after-epoch", type=_limited("epochs"), metavar="K",
                        help="stop after epoch K as if interrupted (the run continues with --resume)")
    parser.add_argument("--export-only", action="store_true",
                        help="retrofit the recipe's model and save it to OUT/model; no data, no training")
    parser.add_argument("--dry-run", action="store_true",
                        help="check the recipe, data and output directory and print the plan; write nothing")
    parser.add_argument("--no-progress", action="store_true", help="no progress bars (per-epoch lines only)")
    parser.add_argument("--import", dest="imports", action="append", default=[], metavar="MODULE",
                        help="import MODULE before reading the recipe: it registers your own attention type "
                             "(the recipe's retrofit.attention_module names it; nothing is imported unless "
                             "you pass it here); repeatable")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run ``se-retrofit finetune``; returns the exit code (2 for a user error, one line on stderr)."""
    argv = list(sys.argv[1:] if argv is None else argv)
    return run_command("se-retrofit", lambda: _run(build_parser().parse_args(argv)),
                       interrupted="interrupted; finished epochs are in the run's checkpoint.pt (continue with "
                                   "--resume)", speak=main_process_from_env())  # under torchrun rank 0 speaks


def _run(args: argparse.Namespace) -> int:
    for module in args.imports:
        import_attention_module(module)
    recipe = load_recipe(args.recipe).with_overrides(
        epochs=args.epochs, lr=args.lr, batch_size=args.batch_size, image_size=args.image_size, seed=args.seed,
        workers=args.workers, weights=args.weights)
    options = dict(resume=args.resume, overwrite=args.overwrite, num_classes=args.num_classes, device=args.device,
                   allow_pickle=args.allow_pickle, stop_after_epoch=args.stop_after_epoch,
                   export_only=args.export_only, progress=not args.no_progress)
    if args.dry_run:
        return _dry_run(recipe, args, options)
    run(recipe, args.data, out=args.out, **options)
    return 0


def _dry_run(recipe, args: argparse.Namespace, options: dict) -> int:
    plan = plan_run(recipe, Options(data=args.data, out=args.out, **options))
    out = Console(soft_wrap=True, highlight=False)
    out.print(f"recipe {recipe.name}: {plan.ref}, {recipe.retrofit.attention} at {recipe.retrofit.position}"
              + (f", r={recipe.retrofit.reduction}" if recipe.retrofit.reduction else "")
              + (f", stages {recipe.retrofit.stages}" if recipe.retrofit.stages else ""), markup=False)
    if plan.splits is not None:
        out.print(f"data: {plan.splits.describe()}; {plan.num_classes} outputs", markup=False)
    for phase in recipe.phases:
        out.print(f"phase {phase.name}: {phase.trainable}, {phase.epochs} epoch{'s' * (phase.epochs != 1)}, "
                  f"lr {phase.lr:g}, attention ×{phase.new_lr_scale:g}", markup=False)
    start = f", resuming after epoch {plan.checkpoint['epoch']}" if plan.checkpoint else ""
    out.print(f"output: {plan.out}{start}; dry run: nothing built or written", markup=False)
    return 0
