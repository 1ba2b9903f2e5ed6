"""The metrics CSV of a fine-tuning run, and a PNG of its loss and accuracy curves.

Example:
    >>> import tempfile, pathlib
    >>> out = pathlib.Path(tempfile.mkdtemp())
    >>> rows = [{"epoch": e, "phase": "full", "train_loss": 1 / e, "train_acc": 0.5, "val_loss": 1 / e,
    ...          "val_acc": 0.5, "lr": 0.1, "seconds": 1.0} for e in (1, 2)]
    >>> path = write_csv(rows, out / "metrics.csv")
    >>> [r["epoch"] for r in read_csv(out / "metrics.csv")]
    [1, 2]
    >>> plot_curves(out / "metrics.csv", out / "curves.png").read_bytes()[:8] == PNG_SIGNATURE
    True
"""
from __future__ import annotations

import csv
import io
import os
from pathlib import Path
from typing import Any

from .checkpoint import atomic_write

COLUMNS = ("epoch", "phase", "train_loss", "train_acc", "val_loss", "val_acc", "lr", "seconds")
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# Kept rather than timm.utils.update_summary, which appends one row in place (a kill can leave half a row)
# under train_*/eval_* names; this file is rewritten whole and atomically from the checkpoint's rows, so a
# resumed run's CSV holds exactly its finished epochs under the names plot_curves and the benchmarks read.
def write_csv(rows: list[dict[str, Any]], path: str | os.PathLike) -> Path:
    """Write the rows (one per epoch, :data:`COLUMNS`) atomically; the file is rewritten whole."""
    buffer = io.StringIO()
    writer = csv.DictWriter(buffer, fieldnames=COLUMNS, extrasaction="ignore", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({k: (f"{v:.6g}" if isinstance(v, float) else v) for k, v in row.items()})
    atomic_write(path, lambda file: file.write(buffer.getvalue().encode()))
    return Path(path)


def read_csv(path: str | os.PathLike) -> list[dict[str, Any]]:
    """The rows of a metrics CSV with numbers as numbers."""
    with open(path, newline="") as file:
        return [{k: (v if k == "phase" else int(v) if k == "epoch" else float(v)) for k, v in row.items()}
                for row in csv.DictReader(file)]


def plot_curves(csv_path: str | os.PathLike, png_path: str | os.PathLike, *, title: str = "") -> Path:
    """Draw training and validation loss and accuracy per epoch, with the phase changes marked.

    Uses matplotlib's Agg canvas directly (no pyplot, no global backend change), written atomically.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.ticker import MaxNLocator

    rows = read_csv(csv_path)
    epochs = [r["epoch"] for r in rows]
    figure = Figure(figsize=(10, 4), dpi=100)
    FigureCanvasAgg(figure)
    for axis, metric, label in zip(figure.subplots(1, 2), ("loss", "acc"), ("loss", "accuracy")):
        for split, style in (("train", "-o"), ("val", "-s")):
            axis.plot(epochs, [r[f"{split}_{metric}"] for r in rows], style, label=split, markersize=4)
        if metric == "acc":
            axis.set_ylim(0, 1.02)
        for previous, row in zip([None] + rows, rows):
            if previous is None or row["phase"] != previous["phase"]:
                if previous is not None:
                    axis.axvline(row["epoch"] - 0.5, color="grey", linestyle="--", linewidth=1)
                axis.text(row["epoch"] - 0.45, 0.01, row["phase"], transform=axis.get_xaxis_transform(),
                          va="bottom", fontsize=8, color="grey")
        axis.set_xlim(epochs[0] - 0.5, epochs[-1] + 0.5)
        axis.xaxis.set_major_locator(MaxNLocator(integer=True, min_n_ticks=1))
        axis.set_xlabel("epoch")
        axis.set_ylabel(label)
        axis.grid(alpha=0.3)
        axis.legend()
    if title:
        figure.suptitle(title)
    figure.tight_layout()
    atomic_write(png_path, lambda file: figure.savefig(file, format="png"))
    return Path(png_path)
