"""Fine-tune a retrofitted model on an ImageFolder dataset, phase by phase, from a recipe.

:func:`plan_run` checks everything that can be checked before any model is built or any file is
written (recipe task, data folders, classes, output directory, the checkpoint to resume); it is pure
apart from reading. :func:`run` then builds the model (library weights, head resized to the dataset's
classes, attention retrofitted from the recipe), trains each phase, and writes, on rank 0 only:

* ``OUT/recipe.yaml``: the recipe as run (overrides included);
* ``OUT/checkpoint.pt``: after every epoch, atomically (see :mod:`.checkpoint`);
* ``OUT/metrics.csv`` and ``OUT/curves.png``: one row per finished epoch, and their plot (redrawn
  after the last epoch, and after an earlier one only where the time spent drawing, that drawing
  included, stays within :data:`PLOT_SHARE` of the run so far; a drawing is expected to take as long
  as the last one, the first :data:`DRAWING_SECONDS`: about half a second, as long as a whole epoch
  of a small dataset, so a short run draws once, at its end);
* ``OUT/model/``: the final model in se_retrofit's saved format (:func:`se_retrofit.load` reads it).

Example:
    >>> from se_retrofit import finetune
    >>> result = finetune.run("recipes/resnet50-se-standard.yaml", "images/", out="runs/se",
    ...                       epochs=[1, 2], image_size=128)  # doctest: +SKIP
    >>> [round(row["val_acc"], 3) for row in result.metrics]  # doctest: +SKIP
    [0.412, 0.655, 0.703]
"""
from __future__ import annotations

import copy
import math
import os
import random
import shutil
import time
import warnings
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterator

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from ..errors import RetrofitError
from ..identity_check import check_identity
from ..core import RECORD_ATTR, record_of, retrofit_with
from ..hub import ModelRef, OfflineWarning, check_weights_path, create, resolve
from ..io import save
from ..tracing import training_mode
from ..training import freeze_backbone, head_module_names, param_groups, unfreeze
from . import distributed, outdir
from .checkpoint import CHECKPOINT_FILE, atomic_write, load_checkpoint, make_state, restoring, rng_state, \
    save_checkpoint, set_rng_state
from .data import (DataError, Splits, build_loaders, build_transforms, channels_last_input, data_config, find_splits,
                   worker_error_message)
from .plot import plot_curves, write_csv
from .recipe import Recipe, load_recipe
from .report import Reporter

RUN_FILES = ("recipe.yaml", CHECKPOINT_FILE, "metrics.csv", "curves.png", "model")
DETECTION_IMAGE_SIZE = 320
PLOT_SHARE = 0.05
DRAWING_SECONDS = 0.5  # what the first drawing of curves.png is taken to cost (later: the last one's time)


class FinetuneError(RetrofitError):
    """The fine-tuning job cannot run as asked (wrong task, output directory in use, …)."""


@dataclass(frozen=True)
class Options:
    """How to run a recipe (the command line's options beyond the recipe overrides)."""

    data: Path | None = None
    out: Path | None = None
    resume: bool = False
    overwrite: bool = False
    num_classes: int | None = None
    device: str = "auto"
    allow_pickle: bool = False
    stop_after_epoch: int | None = None
    export_only: bool = False
    progress: bool = True


@dataclass(frozen=True)
class Plan:
    """What the checks decided: the effective recipe, model, data, classes, output and start point."""

    recipe: Recipe
    ref: ModelRef
    out: Path
    splits: Splits | None
    num_classes: int | None
    checkpoint: dict[str, Any] | None = None

    @property
    def run_info(self) -> dict[str, Any]:
        return {"classes": self.splits.classes if self.splits else None, "num_classes": self.num_classes}

    @property
    def start_epoch(self) -> int:
        return self.checkpoint["epoch"] + 1 if self.checkpoint else 1


@dataclass
class Result:
    """A finished (or stopped) run: the trained model (in eval mode, on the run's device), one
    metrics row per epoch, the final saved directory (None when stopped early or not rank 0), and
    the files written."""

    model: nn.Module
    metrics: list[dict[str, Any]]
    out: Path
    final: Path | None
    stopped_after: int | None = None
    files: dict[str, Path] = field(default_factory=dict)


# --- analysis: everything checked before building or writing anything ----------------------------

def plan_run(recipe: Recipe, options: Options) -> Plan:
    """Check the job and decide its data, classes, output directory and starting epoch."""
    ref = resolve(recipe.model)
    if recipe.weights not in ("pretrained", "none"):
        check_weights_path(recipe.weights, allow_pickle=options.allow_pickle)
    out = Path(options.out) if options.out is not None else Path("runs") / recipe.name
    if options.export_only:
        return _plan_export(recipe, ref, out, options)
    if recipe.task != "classification":
        raise FinetuneError(
            f"recipe {recipe.name!r} is a {recipe.task} recipe ({recipe.model}): ImageFolder fine-tuning needs a "
            "classifier with a head to train. Export the retrofitted model with --export-only and train it in "
            "your detection code with the recipe's phases (se_retrofit.freeze_backbone, unfreeze, param_groups)")
    if options.data is None:
        raise FinetuneError("--data DIR is required to fine-tune (DIR/train and DIR/val, or DIR/CLASS/IMAGE)")
    splits = find_splits(options.data, val_fraction=recipe.data.val_fraction)
    num_classes = options.num_classes or len(splits.classes)
    if num_classes < len(splits.classes):
        raise FinetuneError(f"--num-classes {num_classes} is fewer than the {len(splits.classes)} class folders "
                            f"in {options.data}")
    if options.stop_after_epoch is not None and not 1 <= options.stop_after_epoch <= recipe.total_epochs:
        raise FinetuneError(f"--stop-after-epoch must be between 1 and {recipe.total_epochs}, "
                            f"got {options.stop_after_epoch}")
    plan = Plan(recipe, ref, out, splits, num_classes)
    if options.resume:
        return Plan(recipe, ref, out, splits, num_classes, load_checkpoint(out, recipe, plan.run_info))
    _check_out_free(out, options.overwrite)
    return plan


def _plan_export(recipe: Recipe, ref: ModelRef, out: Path, options: Options) -> Plan:
    if options.resume:
        raise FinetuneError("--resume and --export-only do not go together (an export does not train)")
    if recipe.task != "classification" and options.num_classes:
        raise FinetuneError(f"--num-classes applies to classification recipes; {recipe.name!r} is a "
                            f"{recipe.task} recipe (set model_kwargs in the recipe instead)")
    if os.path.lexists(out / "model"):
        if not options.overwrite:
            raise FinetuneError(f"{out / 'model'} already exists; pass --overwrite or choose another --out")
        outdir.check_replaceable(out, ["model"])
    return Plan(recipe, ref, out, None, options.num_classes)


def _check_out_free(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise FinetuneError(f"output path {out} exists and is not a directory")
    used = [name for name in RUN_FILES if os.path.lexists(out / name)]
    if used and not overwrite and not outdir.unfinished(out, RUN_FILES, CHECKPOINT_FILE):
        raise FinetuneError(f"{out} already holds a run ({', '.join(used)}); pass --resume to continue it, "
                            "--overwrite to start again, or choose another --out")
    if used:
        outdir.check_replaceable(out, used)


# --- building the model ---------------------------------------------------------------------------

def build_model(plan: Plan, options: Options, *, weights: str | None = None) -> tuple[nn.Module, nn.Module, str,
                                                                                      dict[str, Any], list[str]]:
    """The base model (weights loaded, head sized to the data), and its retrofitted copy.

    Returns ``(base, edited, origin, data_config, warnings)``: where the weights came from, the
    model's data config (timm's, with the recipe's image size) and warnings to show the user.
    """
    recipe = plan.recipe
    torch.manual_seed(recipe.train.seed)
    random.seed(recipe.train.seed)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        base, origin = create(plan.ref, weights or recipe.weights, allow_pickle=options.allow_pickle,
                              **recipe.model_kwargs)
    shown = [str(w.message) for w in caught if issubclass(w.category, OfflineWarning)]
    create_kwargs = dict(recipe.model_kwargs)
    if recipe.task == "classification":
        if plan.num_classes is not None:
            set_num_classes(base, plan.num_classes)
            create_kwargs["num_classes"] = plan.num_classes
        config = data_config(base, recipe.data.image_size)
        example = torch.randn(1, *config["input_size"], generator=torch.Generator().manual_seed(0))
    else:
        size = recipe.data.image_size or DETECTION_IMAGE_SIZE
        config = {"input_size": (3, size, size)}
        example = [torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))]
    base.eval()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        edited = retrofit_with(base, recipe.retrofit, example_input=example, budget=recipe.budget or None)
    shown += [str(w.message) for w in caught if not issubclass(w.category, DeprecationWarning)]
    getattr(edited, RECORD_ATTR).base.update(name=plan.ref.name, source=plan.ref.source, weights=origin,
                                             create_kwargs=create_kwargs)
    return base, edited, origin, config, shown


def set_num_classes(model: nn.Module, num_classes: int) -> None:
    """Give ``model`` a fresh classifier for ``num_classes`` (timm's ``reset_classifier``, else the
    last ``nn.Linear`` of its head), unless it already has that many outputs.

    Example:
        >>> import torchvision
        >>> model = torchvision.models.resnet18()
        >>> set_num_classes(model, 3)
        >>> model.fc
        Linear(in_features=512, out_features=3, bias=True)
    """
    heads = head_module_names(model)
    if not heads:
        raise FinetuneError(f"{type(model).__name__} has no classifier head that se-retrofit can find "
                            "(fc, classifier, head or timm's pretrained_cfg['classifier']); ImageFolder "
                            "fine-tuning needs a classifier")
    if getattr(model, "num_classes", None) == num_classes:
        return
    if hasattr(model, "reset_classifier"):
        model.reset_classifier(num_classes)
        return
    parent_path, linear = _last_linear(model, heads[-1])
    if linear.out_features == num_classes:
        return
    replacement = nn.Linear(linear.in_features, num_classes, bias=linear.bias is not None)
    parent_name, _, child = parent_path.rpartition(".")
    setattr(model.get_submodule(parent_name) if parent_name else model, child, replacement)


def _last_linear(model: nn.Module, head: str) -> tuple[str, nn.Linear]:
    found = [(f"{head}.{name}" if name else head, m) for name, m in model.get_submodule(head).named_modules()
             if isinstance(m, nn.Linear)]
    if not found:
        raise FinetuneError(f"the head {head} of {type(model).__name__} has no nn.Linear to resize; create the "
                            "model with the right number of classes yourself and use se_retrofit.retrofit")
    return found[-1]


# --- one phase ------------------------------------------------------------------------------------

def start_phase(model: nn.Module, index: int, recipe: Recipe, steps_per_epoch: int,
                context: distributed.Context) -> tuple[nn.Module, torch.optim.Optimizer, LambdaLR]:
    """Set what trains in phase ``index``, and build its optimiser, scheduler and DDP wrapper."""
    phase = recipe.phases[index]
    if phase.trainable == "new":
        freeze_backbone(model, train_head=True)
    else:
        unfreeze(model)
    weight_decay = recipe.train.weight_decay if phase.weight_decay is None else phase.weight_decay
    groups = param_groups(model, lr=phase.lr, new_lr_scale=phase.new_lr_scale, weight_decay=weight_decay,
                          head_lr_scale=phase.head_lr_scale)
    if recipe.train.optimizer == "sgd":
        optimizer = torch.optim.SGD(groups, momentum=recipe.train.momentum, nesterov=recipe.train.momentum > 0)
    else:
        optimizer = torch.optim.AdamW(groups)
    total = phase.epochs * steps_per_epoch
    scheduler = LambdaLR(optimizer, warmup_cosine(total, round(phase.warmup_epochs * steps_per_epoch)))
    return distributed.wrap(model, context), optimizer, scheduler


# Kept rather than timm's CosineLRScheduler (which gives the same cosine after the warm-up, tested): timm
# warms every group up from one absolute warmup_lr_init (0: a first step at rate 0) and keeps no step count
# in its state_dict, which resume restores; this warm-up starts each group at base/w and reaches it at w-1.
def warmup_cosine(total_steps: int, warmup_steps: int = 0) -> Callable[[int], float]:
    """Learning-rate factor per step: linear warm-up, then a cosine from 1 towards 0.

    Example:
        >>> f = warmup_cosine(10, 2)
        >>> [round(f(s), 3) for s in (0, 1, 2, 6, 9)]
        [0.5, 1.0, 1.0, 0.5, 0.038]
    """
    warmup_steps = min(warmup_steps, total_steps - 1)

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return 0.5 * (1.0 + math.cos(math.pi * min(progress, 1.0)))
    return factor


def train_epoch(model: nn.Module, loader, optimizer, scheduler, scaler, criterion: nn.Module,
                context: distributed.Context, *, channels_last: bool, advance: Callable[[float], None]
                ) -> tuple[float, float]:
    """One pass over ``loader``; returns (mean loss, accuracy) over all processes' images.
    Leaves ``model`` in the train/eval mode it came in."""
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)
    with training_mode(model, True):
        for images, targets in _batches(loader, context, channels_last):
            with _autocast(scaler is not None):
                logits = model(images)
                loss = criterion(logits, targets)
            optimizer.zero_grad(set_to_none=True)
            if scaler is not None:
                scaler.scale(loss).backward()
                scaler.step(optimizer)
                scaler.update()
            else:
                loss.backward()
                optimizer.step()
            scheduler.step()
            totals += _batch_totals(loss.detach(), logits.detach(), targets)
            advance(loss.item())
    return _means(distributed.sum_across(totals, context))


@torch.no_grad()
def evaluate(model: nn.Module, loader, criterion: nn.Module, context: distributed.Context, *,
             channels_last: bool, autocast: bool = False, advance: Callable[[float], None] = lambda loss: None
             ) -> tuple[float, float]:
    """(mean loss, accuracy) of ``model`` in eval mode over every process's shard of ``loader``;
    ``model``'s train/eval mode is restored."""
    totals = torch.zeros(3, dtype=torch.float64, device=context.device)
    with training_mode(model, False):
        for images, targets in _batches(loader, context, channels_last):
            with _autocast(autocast):
                logits = model(images)
                loss = criterion(logits, targets)
            totals += _batch_totals(loss, logits, targets)
            advance(loss.item())
    return _means(distributed.sum_across(totals, context))


def _batches(loader, context: distributed.Context, channels_last: bool) -> Iterator[tuple[torch.Tensor, ...]]:
    """The loader's (images, targets) on this process's device, images channels-last where asked."""
    try:
        for images, targets in loader:
            yield (channels_last_input(images.to(context.device, non_blocking=True), channels_last),
                   targets.to(context.device, non_blocking=True))
    except DataError as error:  # a broken image, raised in a worker: its own one-line message
        raise DataError(worker_error_message(error)) from None


def _autocast(enabled: bool):
    """float16 autocast on CUDA (used only where a GradScaler is), else nothing."""
    return torch.autocast("cuda", dtype=torch.float16) if enabled else nullcontext()


# Kept rather than timm.utils.accuracy and AverageMeter: those give per-batch percentages and a running mean
# of one process; DDP needs exact sums (loss, correct, count) that one all-reduce adds across processes.
def _batch_totals(loss: torch.Tensor, logits: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    n = targets.numel()
    correct = (logits.argmax(dim=1) == targets).sum()
    return torch.stack([loss.double() * n, correct.double(), torch.tensor(n, dtype=torch.float64,
                                                                           device=targets.device)])


def _means(totals: torch.Tensor) -> tuple[float, float]:
    loss_sum, correct, count = totals.tolist()
    return (loss_sum / count, correct / count) if count else (float("nan"), float("nan"))


def _last_lr(scheduler: LambdaLR, phase_lr: float) -> float:
    """The phase's base rate at the last step taken (attention groups ran at ``new_lr_scale`` times it)."""
    return phase_lr * scheduler.lr_lambdas[0](max(0, scheduler.last_epoch - 1))


# --- the whole run --------------------------------------------------------------------------------

def run(recipe: Recipe | str | Path, data: str | Path | None = None, *, out: str | Path | None = None,
        epochs: list[int] | int | None = None, lr: float | None = None, batch_size: int | None = None,
        image_size: int | None = None, seed: int | None = None, workers: int | None = None,
        weights: str | None = None, reporter: Reporter | None = None, **options) -> Result:
    """Fine-tune ``recipe`` (a :class:`Recipe` or a YAML path) on the ImageFolder at ``data``.

    Overrides (``epochs``, ``lr``, …) are :meth:`Recipe.with_overrides`'s; ``options`` are
    :class:`Options` fields (``resume``, ``overwrite``, ``num_classes``, ``device``,
    ``stop_after_epoch``, ``export_only``, ``progress``). Under torchrun every process calls this.
    """
    if not isinstance(recipe, Recipe):
        recipe = load_recipe(recipe)
    epochs = [epochs] if isinstance(epochs, int) else epochs
    recipe = recipe.with_overrides(epochs=epochs, lr=lr, batch_size=batch_size, image_size=image_size,
                                   seed=seed, workers=workers, weights=weights)
    opts = Options(data=Path(data) if data is not None else None, out=Path(out) if out is not None else None,
                   **options)
    context = distributed.Context.from_env(device=opts.device)
    plan = plan_run(recipe, opts)
    reporter = reporter or Reporter(enabled=context.is_main, progress=opts.progress)
    if not context.is_main:
        return _run_plan(plan, opts, context, reporter)
    existing = _nearest_existing(plan.out)
    try:
        with outdir.hold(plan.out):  # the whole run; a second run on this --out is refused here
            if not opts.resume and not opts.export_only:
                _check_out_free(plan.out, opts.overwrite)  # again, now that no other run can change it
            return _run_plan(plan, opts, context, reporter)
    except BaseException:
        if not any(os.path.lexists(plan.out / name) for name in RUN_FILES):
            (plan.out / outdir.MANIFEST_FILE).unlink(missing_ok=True)
        _remove_empty_parents(plan.out, existing)
        raise


def _run_plan(plan: Plan, opts: Options, context: distributed.Context, reporter: Reporter) -> Result:
    if opts.export_only:
        return export(plan, opts, reporter)
    distributed.start(context)
    try:
        result = _train(plan, opts, context, reporter)
    except BaseException:
        distributed.stop(context, wait=False)  # another process may never reach a barrier
        raise
    distributed.stop(context)
    return result


def export(plan: Plan, options: Options, reporter: Reporter) -> Result:
    """Retrofit the recipe's model and save it (no data, no training): for detection recipes, or to
    train in your own script."""
    base, model, origin, config, shown = build_model(plan, options)
    reporter.warnings(shown)
    prefix = "backbone." if plan.recipe.task == "detection" else ""  # a detector's backbone gives features
    example = torch.randn(1, *config["input_size"], generator=torch.Generator().manual_seed(0))
    paths = tuple(site.module_path.removeprefix(prefix) for site in record_of(model).sites)
    check = check_identity(base.get_submodule(prefix[:-1]), model.get_submodule(prefix[:-1]), example,
                           random_weights=origin.startswith("random"), attention_paths=paths)
    if plan.recipe.retrofit.init == "identity" and not check.passed:
        raise FinetuneError(f"identity check failed: max |Δ| = {check.max_abs_diff:.3g} (relative "
                            f"{check.max_rel_diff:.3g}) on {check.statistics}: {plan.recipe.retrofit.attention!r} at "
                            f"{plan.recipe.retrofit.position!r} does not start at identity; nothing was written")
    outdir.record(plan.out, ["model"])
    final = save(model, plan.out / "model", overwrite=options.overwrite)
    reporter.exported(plan, origin, model, check.max_abs_diff, final, statistics=check.statistics)
    return Result(model.eval(), [], plan.out, final, files={"model": final})


@dataclass
class _Session:
    """What the epochs share: the model on its device, loaders, loss, AMP scaler and output files."""

    model: nn.Module
    loaders: tuple
    criterion: nn.Module
    scaler: Any
    run_info: dict[str, Any]
    files: dict[str, Path]
    metrics: list[dict[str, Any]]
    began: float = field(default_factory=time.monotonic)
    plotting: float = 0.0  # seconds spent drawing curves.png
    drawing: float = field(default_factory=lambda: DRAWING_SECONDS)  # what the next drawing is expected to take


def _start_session(plan: Plan, options: Options, context: distributed.Context, reporter: Reporter) -> _Session:
    """Build (or restore) the model, the loaders and the scaler; prepare the output directory."""
    spec, resumed = plan.recipe.train, plan.checkpoint
    with distributed.main_first(context):  # one download into the weights cache, not one per process
        _, model, origin, config, shown = build_model(plan, options, weights="none" if resumed else None)
    if resumed:
        origin = resumed["run"]["weights"]
        getattr(model, RECORD_ATTR).base["weights"] = origin
        with restoring(plan.out, "model weights"):
            model.load_state_dict(resumed["model"])
    reporter.warnings(shown)
    model.to(context.device)
    if spec.channels_last:
        model.to(memory_format=torch.channels_last)
    loaders = build_loaders(plan.splits, build_transforms(config, plan.recipe.data), batch_size=spec.batch_size,
                            workers=spec.workers, seed=spec.seed, rank=context.rank,
                            world_size=context.world_size, pin_memory=context.device.type == "cuda",
                            image_bytes=4 * math.prod(config["input_size"]))
    scaler = torch.amp.GradScaler("cuda") if spec.amp and context.device.type == "cuda" else None
    if resumed and scaler is not None and resumed.get("scaler"):
        with restoring(plan.out, "gradient scaler"):
            scaler.load_state_dict(resumed["scaler"])
    run_info = {**plan.run_info, "weights": origin, "image_size": config["input_size"][-1],
                "world_size": context.world_size}
    files = _prepare_out(plan, options, context)
    _seed_process(spec.seed, context, resumed, plan.out)
    reporter.start(plan, origin, model, context, run_info)
    return _Session(model, loaders, nn.CrossEntropyLoss(label_smoothing=spec.label_smoothing), scaler, run_info,
                    files, list(resumed["metrics"]) if resumed else [])


def _train(plan: Plan, options: Options, context: distributed.Context, reporter: Reporter) -> Result:
    """:func:`_epochs`; a run that fails before its first checkpoint (nothing to resume) leaves no files:
    a ``recipe.yaml`` alone would make every retry refuse the directory."""
    try:
        return _epochs(plan, options, context, reporter)
    except BaseException:
        if context.is_main and plan.checkpoint is None and not (plan.out / CHECKPOINT_FILE).exists():
            _remove_run(plan.out)
        raise


def _nearest_existing(path: Path) -> Path:
    path = Path(path).absolute()
    while not path.exists() and path != path.parent:
        path = path.parent
    return path


def _remove_run(out: Path) -> None:
    """Remove the run files in ``out`` that its manifest names, and the manifest (the caller removes the
    directories the run created once the lock is gone)."""
    owned = outdir.read_manifest(out)
    for name in RUN_FILES + (outdir.MANIFEST_FILE,):
        path = out / name
        if name not in owned and name != outdir.MANIFEST_FILE:
            continue
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        elif path.exists() or path.is_symlink():
            path.unlink(missing_ok=True)


def _remove_empty_parents(out: Path, existing: Path) -> None:
    """Remove ``out`` and its parents down to ``existing`` where they are empty (a run created them)."""
    directory = out.absolute()
    while directory != existing and existing in directory.parents:
        try:
            directory.rmdir()
        except OSError:
            return
        directory = directory.parent


def _epochs(plan: Plan, options: Options, context: distributed.Context, reporter: Reporter) -> Result:
    """The epochs from the plan's start to the end (or ``stop_after_epoch``), then the final save."""
    recipe, resumed = plan.recipe, plan.checkpoint
    session = _start_session(plan, options, context, reporter)
    phase_of, current, stopped = recipe.epoch_phases(), None, None
    with reporter.live():
        for epoch in range(plan.start_epoch, recipe.total_epochs + 1):
            if phase_of[epoch - 1] != current:
                current, ddp = phase_of[epoch - 1], None  # the old DDP wrapper goes before the next is built
                ddp, optimizer, scheduler = start_phase(session.model, current, recipe, len(session.loaders[0]),
                                                        context)
                if resumed and resumed["phase"] == current and resumed["epoch"] == epoch - 1:  # mid-phase
                    with restoring(plan.out, "optimiser and schedule"):
                        optimizer.load_state_dict(resumed["optimizer"])
                        scheduler.load_state_dict(resumed["scheduler"])
            session.metrics.append(_epoch(epoch, ddp, optimizer, scheduler, session, context, plan, reporter))
            last = epoch == recipe.total_epochs or options.stop_after_epoch == epoch
            _write_epoch(plan, session, context, last, epoch=epoch, phase=current, optimizer=optimizer,
                         scheduler=scheduler)
            reporter.epoch_done(session.metrics[-1], recipe.total_epochs)
            if options.stop_after_epoch == epoch and epoch < recipe.total_epochs:
                stopped = epoch
                break
    session.model.eval()
    final = None
    if stopped is None and context.is_main:
        final = session.files["model"] = _save_final(session.model, plan.out / "model")
    reporter.finished(plan, session.files, stopped)
    return Result(session.model, session.metrics, plan.out, final, stopped, session.files)


def _write_epoch(plan: Plan, session: _Session, context: distributed.Context, last: bool, **state: Any) -> None:
    """Checkpoint and metrics CSV after an epoch, and the curves after the ``last`` epoch or where
    drawing them, this time included (expected to take as long as the last time), stays within
    :data:`PLOT_SHARE` of the run so far (rank 0; every rank gives its RNG state)."""
    rng = distributed.gather(rng_state(), context)
    if context.is_main:
        save_checkpoint(plan.out, make_state(plan.recipe, session.run_info, model=session.model,
                                             scaler=session.scaler, rng=rng, metrics=session.metrics, **state))
        write_csv(session.metrics, session.files["metrics"])
        began = time.monotonic()
        if last or session.plotting + session.drawing <= PLOT_SHARE * (began - session.began):
            plot_curves(session.files["metrics"], session.files["curves"],
                        title=f"{plan.recipe.name} ({plan.recipe.model})")
            session.drawing = time.monotonic() - began
            session.plotting += session.drawing


def _epoch(epoch: int, ddp: nn.Module, optimizer, scheduler, session: _Session, context: distributed.Context,
           plan: Plan, reporter: Reporter) -> dict[str, Any]:
    """Train one epoch and evaluate; the metrics row."""
    recipe = plan.recipe
    phase = recipe.phases[recipe.epoch_phases()[epoch - 1]]
    train_loader, val_loader = session.loaders
    train_loader.sampler.set_epoch(epoch)
    began = time.perf_counter()
    advance = reporter.epoch_bar(epoch, recipe.total_epochs, phase.name, len(train_loader))
    train_loss, train_acc = train_epoch(ddp, train_loader, optimizer, scheduler, session.scaler, session.criterion,
                                        context, channels_last=recipe.train.channels_last, advance=advance)
    distributed.sync_buffers(session.model, context)
    val_loss, val_acc = evaluate(session.model, val_loader, session.criterion, context,
                                 channels_last=recipe.train.channels_last, autocast=session.scaler is not None,
                                 advance=reporter.eval_bar(epoch, len(val_loader)))
    return {"epoch": epoch, "phase": phase.name, "train_loss": train_loss, "train_acc": train_acc,
            "val_loss": val_loss, "val_acc": val_acc, "lr": _last_lr(scheduler, phase.lr),
            "seconds": time.perf_counter() - began}


def _prepare_out(plan: Plan, options: Options, context: distributed.Context) -> dict[str, Path]:
    """Create the output directory (rank 0), clear a previous run's files on --overwrite, and write
    the recipe as run."""
    files = {"checkpoint": plan.out / CHECKPOINT_FILE, "metrics": plan.out / "metrics.csv",
             "curves": plan.out / "curves.png", "recipe": plan.out / "recipe.yaml"}
    if context.is_main:
        plan.out.mkdir(parents=True, exist_ok=True)
        if not options.resume:  # --overwrite, or a killed run's leftovers: only what this tool wrote
            outdir.remove(outdir.check_replaceable(plan.out, RUN_FILES))
        outdir.record(plan.out, RUN_FILES)
        atomic_write(files["recipe"], lambda f: f.write(plan.recipe.to_yaml().encode()))
    return files


def _seed_process(seed: int, context: distributed.Context, resumed: dict[str, Any] | None, out: Path) -> None:
    """Random state for augmentation and dropout: per process; restored from the checkpoint on resume."""
    states = resumed["rng"] if resumed else None
    if states and len(states) == context.world_size:
        with restoring(out, "random states"):
            set_rng_state(states[context.rank])
        return
    torch.manual_seed(seed + 1000 * context.rank + (resumed["epoch"] if resumed else 0))
    random.seed(seed + 1000 * context.rank)


def _save_final(model: nn.Module, path: Path) -> Path:
    """se_retrofit.save of a CPU, contiguous copy (the trained model stays where it is)."""
    cpu = copy.deepcopy(model).to("cpu", memory_format=torch.contiguous_format)
    return save(cpu, path, overwrite=True)
