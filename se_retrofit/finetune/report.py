"""What a fine-tuning run prints: a header, rich progress bars, one line per epoch, the files written.

Only rank 0 reports (``Reporter(enabled=False)`` on the others). Progress bars are transient: on a
terminal they show the running epoch and disappear, leaving the per-epoch lines; in a log file
(no terminal) only the lines appear.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Any, Callable, Iterator

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, \
    TimeRemainingColumn
from torch import nn

from ..core import record_of
from ..training import attention_parameters


class Reporter:
    """Prints a run's progress; every method is a no-op when ``enabled`` is false."""

    def __init__(self, *, enabled: bool = True, progress: bool = True, console: Console | None = None,
                 errors: Console | None = None):
        self.enabled, self.show_bars = enabled, progress
        self.console = console or Console(soft_wrap=True, highlight=False)
        self.errors = errors or Console(stderr=True, soft_wrap=True, highlight=False)
        self._progress: Progress | None = None
        self._task = None

    def print(self, text: str) -> None:
        if self.enabled:
            self.console.print(text, markup=False, highlight=False)

    def warnings(self, messages: list[str]) -> None:
        if self.enabled:
            for message in messages:
                self.errors.print(f"warning: {message}", markup=False, style="yellow")

    def start(self, plan, origin: str, model: nn.Module, context, run_info: dict[str, Any]) -> None:
        if not self.enabled:
            return
        recipe = plan.recipe
        self.print(f"{recipe.name}: {describe_model(plan, model)}")
        self.print(f"weights: {origin}")
        self.print(f"data: {plan.splits.describe()}; {run_info['num_classes']} outputs; "
                   f"images {run_info['image_size']}px")
        self.print(f"device: {context.device}, {context.world_size} process{'es' if context.world_size > 1 else ''},"
                   f" batch {recipe.train.batch_size} per process")
        self.print("phases: " + " → ".join(
            f"{p.name} ({p.trainable}, {p.epochs} epoch{'s' if p.epochs > 1 else ''}, lr {p.lr:g}"
            f"{f', attention ×{p.new_lr_scale:g}' if p.new_lr_scale != 1 else ''})" for p in recipe.phases))
        if plan.checkpoint and plan.checkpoint["epoch"] >= recipe.total_epochs:
            self.print(f"the run in {plan.out} finished all {recipe.total_epochs} epochs; writing its final model")
        elif plan.checkpoint:
            self.print(f"resuming after epoch {plan.checkpoint['epoch']} from {plan.out / 'checkpoint.pt'}")

    @contextmanager
    def live(self) -> Iterator[None]:
        if not (self.enabled and self.show_bars and self.console.is_terminal):
            yield
            return
        self._progress = Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                                  TextColumn("loss {task.fields[loss]}"), TimeElapsedColumn(),
                                  TimeRemainingColumn(), console=self.console, transient=True)
        try:
            with self._progress:
                yield
        finally:
            self._progress = None

    def _bar(self, description: str, steps: int) -> Callable[[float], None]:
        if self._progress is None:
            return lambda loss: None
        if self._task is not None:
            self._progress.remove_task(self._task)
        task = self._task = self._progress.add_task(description, total=steps, loss="-")
        progress = self._progress
        return lambda loss: progress.update(task, advance=1, loss=f"{loss:.4f}")

    def epoch_bar(self, epoch: int, total: int, phase: str, steps: int) -> Callable[[float], None]:
        return self._bar(f"epoch {epoch}/{total} {phase}", steps)

    def eval_bar(self, epoch: int, steps: int) -> Callable[[float], None]:
        return self._bar(f"epoch {epoch} validation", steps)

    def epoch_done(self, row: dict[str, Any], total: int) -> None:
        self.print(format_row(row, total))

    def finished(self, plan, files: dict, stopped: int | None) -> None:
        if not self.enabled:
            return
        if stopped is not None:
            self.print(f"stopped after epoch {stopped} as asked (--stop-after-epoch); continue with --resume")
        else:
            self.print(f"saved the fine-tuned model to {files['model']} (se_retrofit.load reads it)")
        self.print(f"checkpoint {files['checkpoint']}; metrics {files['metrics']}; curves {files['curves']}")

    def exported(self, plan, origin: str, model: nn.Module, identity: float, final, statistics: str = "") -> None:
        if not self.enabled:
            return
        self.print(f"{plan.recipe.name}: {describe_model(plan, model)}")
        self.print(f"weights: {origin}")
        self.print(f"identity check{' (backbone features)' if plan.recipe.task == 'detection' else ''}: "
                   f"max |Δ| = {identity:.3g}" + (f" on {statistics}" if statistics else ""))
        self.print(f"saved the retrofitted model to {final} (se_retrofit.load reads it); train it with the "
                   f"recipe's phases: " + ", ".join(f"{p.name} ({p.trainable}, lr {p.lr:g})" for p in plan.recipe.phases))


def describe_model(plan, model: nn.Module) -> str:
    """``timm:resnet18 + se at standard, r=16: 8 sites, +90,112 parameters (+0.80%)``."""
    record = record_of(model)
    config = record.config
    added = sum(p.numel() for p in attention_parameters(model))
    total = sum(p.numel() for p in model.parameters())
    r = f", r={config.reduction}" if config.reduction else ""
    return (f"{plan.ref} + {config.attention} at {config.position}{r}: {len(record.sites)} sites, "
            f"+{added:,} parameters (+{100 * added / max(1, total - added):.2f}%)")


def format_row(row: dict[str, Any], total: int) -> str:
    """One epoch's line: ``epoch  2/5  full   train loss 0.9123 acc  61.4%  val loss …``."""
    return (f"epoch {row['epoch']:>2}/{total}  {row['phase']:<12} train loss {row['train_loss']:.4f} "
            f"acc {row['train_acc']:6.1%}  val loss {row['val_loss']:.4f} acc {row['val_acc']:6.1%}  "
            f"lr {row['lr']:.3g}  {row['seconds']:.1f}s")
