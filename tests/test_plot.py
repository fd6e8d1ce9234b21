"""vig.tools.plot: summary.csv files to a curves PNG (library functions and the CLI)."""
from __future__ import annotations

import logging
import math
import re
import subprocess
import sys
from pathlib import Path

import matplotlib.image
import pytest

from vig.tools.plot import main
from vig.trainer.curves import CURVES_SIZE_PX, plot_runs, read_summary, write_curves

REPO_ROOT = Path(__file__).resolve().parents[1]
BASE_COLUMNS = ["epoch", "train_loss", "eval_loss", "eval_top1", "eval_top5", "lr"]
EMA_COLUMNS = ["eval_loss_ema", "eval_top1_ema", "eval_top5_ema"]


def write_summary(folder: Path, epochs: int, ema: bool, extra: bool = False) -> Path:
    """A summary.csv like the trainer's: one row per epoch, optional EMA and unrelated columns."""
    folder.mkdir(parents=True, exist_ok=True)
    columns = BASE_COLUMNS + (EMA_COLUMNS if ema else []) + (["grad_norm"] if extra else [])
    lines = [",".join(columns)]
    for epoch in range(epochs):
        values = {"epoch": epoch, "train_loss": 2.3 - 0.1 * epoch, "eval_loss": 2.2 - 0.1 * epoch,
                  "eval_top1": 10.0 + 4 * epoch, "eval_top5": 50.0 + 3 * epoch,
                  "lr": 1e-3 * 0.5 * (1 + math.cos(math.pi * epoch / epochs)),
                  "eval_loss_ema": 2.25 - 0.1 * epoch, "eval_top1_ema": 9.0 + 4.2 * epoch,
                  "eval_top5_ema": 49.0 + 3 * epoch, "grad_norm": 1.5}
        lines.append(",".join(str(values[c]) for c in columns))
    path = folder / "summary.csv"
    path.write_text("\n".join(lines) + "\n")
    return path


def png_size(path: Path) -> tuple[int, int]:
    """(width, height) in pixels of a PNG file."""
    height, width = matplotlib.image.imread(path).shape[:2]
    return width, height


@pytest.mark.parametrize("ema", [False, True])
def test_read_summary_names_run_after_folder_and_keeps_ema(tmp_path: Path, ema: bool) -> None:
    run = read_summary(write_summary(tmp_path / "vig_ti_run3", epochs=4, ema=ema, extra=True))
    assert run.name == "vig_ti_run3"
    assert run.epochs == [0.0, 1.0, 2.0, 3.0]
    assert run.columns["eval_top1"] == [10.0, 14.0, 18.0, 22.0]
    assert run.has("eval_top1_ema") is ema
    assert "grad_norm" not in run.columns


def test_read_summary_accepts_ema_prefix(tmp_path: Path) -> None:
    path = tmp_path / "run" / "summary.csv"
    path.parent.mkdir()
    path.write_text("epoch,train_loss,eval_loss,eval_top1,lr,ema_eval_top1,ema_eval_top5\n0,2,2,10,0.1,12,40\n")
    run = read_summary(path)
    assert run.columns["eval_top1_ema"] == [12.0]
    assert "eval_top5_ema" not in run.columns


def test_read_summary_reads_empty_cell_as_gap(tmp_path: Path) -> None:
    path = tmp_path / "run" / "summary.csv"
    path.parent.mkdir()
    path.write_text("epoch,train_loss,eval_loss,eval_top1,lr\n0,2.0,,,0.1\n1,1.5,1.4,30,0.05\n")
    run = read_summary(path)
    assert math.isnan(run.columns["eval_loss"][0])
    assert run.columns["eval_loss"][1] == 1.4


@pytest.mark.parametrize("content, message", [
    ("epoch,train_loss,eval_top1\n0,1,2\n", "missing required column(s) eval_loss, lr"),
    ("epoch,train_loss,eval_loss,eval_top1,lr\n", "no epochs recorded"),
    ("epoch,train_loss,eval_loss,eval_top1,lr\n0,1,x,3,4\n", "column 'eval_loss' holds 'x'"),
    ("", "missing required column(s)"),
])
def test_read_summary_rejects_bad_files(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "summary.csv"
    path.write_text(content)
    with pytest.raises(ValueError, match=re.escape(message)):
        read_summary(path)


@pytest.mark.parametrize("epochs", [1, 40])
def test_plot_runs_overlays_runs_into_png_of_fixed_size(tmp_path: Path, epochs: int) -> None:
    summaries = [write_summary(tmp_path / "knn", epochs, ema=True),
                 write_summary(tmp_path / "thresh", epochs, ema=False)]
    out = tmp_path / "curves.png"
    plot_runs(summaries, out)
    assert png_size(out) == CURVES_SIZE_PX


def test_write_curves_logs_instead_of_raising(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    out = tmp_path / "curves.png"
    with caplog.at_level(logging.WARNING, logger="vig.tools.plot"):
        write_curves(tmp_path / "missing" / "summary.csv", out)
    assert not out.exists()
    assert "summary file not found" in caplog.text
    write_curves(write_summary(tmp_path / "run", epochs=2, ema=False), out)
    assert png_size(out) == CURVES_SIZE_PX
    assert sorted(p.name for p in tmp_path.iterdir()) == ["curves.png", "run"]  # no temporary file left
    reference = tmp_path / "reference"
    reference.touch()
    assert out.stat().st_mode == reference.stat().st_mode  # the usual permissions, not a temp file's 0600


@pytest.mark.parametrize("case", ["missing_csv", "missing_out_folder", "not_png"])
def test_cli_gives_one_line_error(tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str) -> None:
    good = write_summary(tmp_path / "run", epochs=2, ema=False)
    argv = {"missing_csv": [str(tmp_path / "nope.csv"), "--out", str(tmp_path / "c.png")],
            "missing_out_folder": [str(good), "--out", str(tmp_path / "no" / "c.png")],
            "not_png": [str(good), "--out", str(tmp_path / "c.pdf")]}[case]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("vig-plot: error: ")
    assert err.count("\n") == 1
    assert not list(tmp_path.glob("c.*"))


def test_cli_as_module_writes_png(tmp_path: Path) -> None:
    summaries = [str(write_summary(tmp_path / name, epochs=3, ema=True)) for name in ("a", "b")]
    out = tmp_path / "curves.png"
    result = subprocess.run([sys.executable, "-m", "vig.tools.plot", *summaries, "--out", str(out)],
                            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""
    assert png_size(out) == CURVES_SIZE_PX


def test_cli_takes_a_run_folder_for_its_summary(tmp_path: Path) -> None:
    write_summary(tmp_path / "a", epochs=3, ema=False)
    out = tmp_path / "curves.png"
    assert main([str(tmp_path / "a"), "--out", str(out)]) == 0
    assert png_size(out) == CURVES_SIZE_PX
