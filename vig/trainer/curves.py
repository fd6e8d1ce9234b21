"""Training curves from summary.csv files: loss, top-1 and learning rate against epoch.

`plot_runs` draws one figure with three panels and overlays the runs, each named after the folder
that holds its CSV (the ``vig-plot`` tool). The trainer calls `write_curves` at the end of every
epoch; it logs a warning instead of raising. Files are read by `vig.trainer.saver.read_summary_rows`.

A summary.csv has one row per epoch and at least the columns ``epoch, train_loss, eval_loss,
eval_top1, lr``; an optional ``train_edge_loss`` (models with a batch-graph edge head) is drawn in the
loss panel, dotted-dashed. A column named ``<column>_ema`` (e.g. ``eval_top1_ema``), or ``ema_<column>``, is
drawn as the EMA variant of ``<column>``. Other columns are ignored; empty cells are drawn as gaps.
"""
from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Sequence

from matplotlib.figure import Figure
from matplotlib.lines import Line2D
from matplotlib.ticker import MaxNLocator

from vig.trainer.saver import read_summary_rows

logger = logging.getLogger(__name__)

REQUIRED_COLUMNS: tuple[str, ...] = ("epoch", "train_loss", "eval_loss", "eval_top1", "lr")
OPTIONAL_COLUMNS: tuple[str, ...] = ("train_edge_loss",)  # drawn when the summary has them
EMA_SUFFIX = "_ema"
EMA_PREFIX = "ema_"
CURVES_SIZE_PX: tuple[int, int] = (1500, 480)
CURVES_DPI = 100
LOG_SCALE_SPAN = 20.0  # a log-scale panel goes logarithmic only when its values span this factor

# (title, y label, columns drawn, log-scale y when the values span LOG_SCALE_SPAN) of each panel, left to right.
PANELS: tuple[tuple[str, str, tuple[str, ...], bool], ...] = (
    ("loss", "loss", ("train_loss", "eval_loss", "train_edge_loss"), False),
    ("top-1 accuracy", "eval top-1", ("eval_top1",), False),
    ("learning rate", "lr", ("lr",), True),
)
SERIES_STYLE: dict[str, str] = {"train_loss": "-", "eval_loss": "--", "train_edge_loss": "-.", "eval_top1": "-",
                                "lr": "-"}
SERIES_LABEL: dict[str, str] = {"train_loss": "train", "eval_loss": "eval", "train_edge_loss": "train edge",
                                "eval_top1": "eval", "lr": "lr"}
EMA_STYLE = ":"


@dataclass(frozen=True)
class RunCurves:
    """One run's summary: ``columns[name]`` holds one float per epoch (NaN for an empty cell)."""

    name: str
    epochs: list[float]
    columns: dict[str, list[float]]

    def has(self, column: str) -> bool:
        """True when the run has the column with at least one finite value."""
        return any(math.isfinite(v) for v in self.columns.get(column, ()))


def _parse_cell(text: str, path: Path, line: int, column: str) -> float:
    text = text.strip()
    if not text:
        return math.nan
    try:
        return float(text)
    except ValueError:
        raise ValueError(f"{path}:{line}: column {column!r} holds {text!r}, not a number") from None


def _ema_key(column: str) -> str | None:
    """'eval_top1_ema' or 'ema_eval_top1' -> 'eval_top1_ema' when eval_top1 is drawn, else None."""
    if column.endswith(EMA_SUFFIX):
        base = column[:-len(EMA_SUFFIX)]
    elif column.startswith(EMA_PREFIX):
        base = column[len(EMA_PREFIX):]
    else:
        return None
    return base + EMA_SUFFIX if base in SERIES_STYLE else None


def read_summary(path: Path, name: str | None = None) -> RunCurves:
    """Read a summary.csv; the run is named after its folder unless ``name`` is given.

    Raises ValueError (one line) when the file is missing, empty, lacks a required column or holds
    a non-numeric value in a column that is drawn.
    """
    path = Path(path)
    header, rows = read_summary_rows(path, REQUIRED_COLUMNS)
    drawn = {c: c for c in (*REQUIRED_COLUMNS, *(c for c in OPTIONAL_COLUMNS if c in header))}
    drawn.update({_ema_key(c): c for c in header if _ema_key(c)})
    columns: dict[str, list[float]] = {key: [] for key in drawn}
    for line, row in enumerate(rows, start=2):
        for key, column in drawn.items():
            columns[key].append(_parse_cell(row.get(column) or "", path, line, column))
    epochs = columns.pop("epoch")
    if not epochs:
        raise ValueError(f"{path}: no epochs recorded yet")
    return RunCurves(name=name or path.resolve().parent.name, epochs=epochs, columns=columns)


def _unique_names(paths: Sequence[Path]) -> list[str]:
    """Folder names of the runs, widened to ``parent/folder`` where two runs share a folder name."""
    names = [p.resolve().parent.name for p in paths]
    widened = [f"{p.resolve().parent.parent.name}/{n}" if names.count(n) > 1 else n for p, n in zip(paths, names)]
    return [f"{n} ({i + 1})" if widened.count(n) > 1 else n for i, n in enumerate(widened)]


def draw_curves(runs: Sequence[RunCurves]) -> Figure:
    """One figure, three panels (loss, top-1, lr against epoch), one colour per run.

    Line style tells the series apart: train solid, eval dashed, EMA dotted.
    """
    if not runs:
        raise ValueError("no runs to draw")
    width, height = CURVES_SIZE_PX
    fig = Figure(figsize=(width / CURVES_DPI, height / CURVES_DPI), dpi=CURVES_DPI)
    axes = fig.subplots(1, len(PANELS))
    colours = [f"C{i % 10}" for i in range(len(runs))]
    few_points = max(len(r.epochs) for r in runs) <= 30
    marker = "o" if few_points else None
    for ax, (title, ylabel, series, log_y) in zip(axes, PANELS):
        styles: dict[str, str] = {}
        for run, colour in zip(runs, colours):
            for column in series:
                variants = [(column, SERIES_STYLE[column], SERIES_LABEL[column]),
                            (column + EMA_SUFFIX, EMA_STYLE, SERIES_LABEL[column] + " (EMA)")]
                for key, style, label in variants:
                    if not run.has(key):
                        continue
                    ax.plot(run.epochs, run.columns[key], linestyle=style, color=colour, marker=marker, markersize=3)
                    styles[label] = style
        values = [v for run in runs for column in series for v in run.columns.get(column, ()) if math.isfinite(v)]
        if log_y and values and min(values) > 0 and max(values) / min(values) >= LOG_SCALE_SPAN:
            ax.set_yscale("log")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_title(title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(ylabel)
        ax.grid(True, alpha=0.3)
        if len(styles) > 1:
            handles = [Line2D([], [], color="0.3", linestyle=s) for s in styles.values()]
            ax.legend(handles, list(styles), loc="best", fontsize="small")
    run_handles = [Line2D([], [], color=c, linewidth=3) for c in colours]
    fig.legend(run_handles, [r.name for r in runs], loc="upper center", ncol=min(len(runs), 5),
               frameon=False, fontsize="medium")
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.12, top=0.85, wspace=0.25)
    return fig


def _save_png(fig: Figure, out_png: Path) -> None:
    """Write the PNG through a temporary file so a reader never sees half a picture."""
    out_png = Path(out_png)
    tmp = out_png.with_name(f".{out_png.name}.{os.getpid()}.tmp")  # created with the usual permissions
    try:
        fig.savefig(tmp, format="png", dpi=CURVES_DPI)
        os.replace(tmp, out_png)
    finally:
        tmp.unlink(missing_ok=True)


def check_output_path(out_png: Path) -> None:
    """ValueError unless ``out_png`` ends in .png and its folder exists."""
    out_png = Path(out_png)
    if out_png.suffix.lower() != ".png":
        raise ValueError(f"output must be a .png file, got {out_png}")
    if not out_png.parent.is_dir():
        raise ValueError(f"output folder does not exist: {out_png.parent}")


def plot_runs(summary_csvs: Sequence[Path], out_png: Path) -> None:
    """Read the summary files and write their overlaid curves to ``out_png`` (a PNG of CURVES_SIZE_PX)."""
    if not summary_csvs:
        raise ValueError("no summary files given")
    check_output_path(out_png)
    paths = [Path(p) for p in summary_csvs]
    runs = [read_summary(p, name) for p, name in zip(paths, _unique_names(paths))]
    _save_png(draw_curves(runs), Path(out_png))


def write_curves(summary_csv: Path, out_png: Path) -> None:
    """Redraw one run's curves; for the trainer's end of epoch. Never raises: failures are logged."""
    try:
        plot_runs([Path(summary_csv)], Path(out_png))
    except Exception as error:  # a picture must never stop a training run
        logger.warning("could not draw %s from %s: %s", out_png, summary_csv, error)
