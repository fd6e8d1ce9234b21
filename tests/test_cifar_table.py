"""benchmarks/cifar_table.py: every model's recipe is a valid train.py command line that sets what the recipe
says, finished runs are read back instead of retrained, and the table has one row per model."""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest

from benchmarks import cifar_table
from vig.trainer.cli import parse_args


def _table_args(tmp_path: Path, epochs: int = 3) -> argparse.Namespace:
    return argparse.Namespace(data=tmp_path / "data", epochs=epochs, batch_size=128, workers=1,
                              output=tmp_path / "runs")


@pytest.mark.parametrize("model", sorted(cifar_table.RECIPES))
def test_every_recipe_parses_as_train_py_flags_with_the_shared_settings(tmp_path: Path, model: str) -> None:
    flags = parse_args(cifar_table.train_argv(_table_args(tmp_path), model, ["--seed", "7"])[1:]).to_flags()
    assert (flags["model"], flags["epochs"], flags["batch_size"], flags["workers"], flags["seed"]) == (
        model, 3, 128, 1, 7)
    assert (flags["train_split"], flags["val_split"], flags["experiment"]) == ("train", "test", f"table-{model}-3ep")


@pytest.mark.parametrize("model", ["convmixer_cifar", "convmixer_xl_cifar"])
def test_the_convmixer_recipe_is_the_published_one(tmp_path: Path, model: str) -> None:
    flags = parse_args(cifar_table.train_argv(_table_args(tmp_path), model, [])[1:]).to_flags()
    assert (flags["opt"], flags["lr"], flags["weight_decay"], flags["smoothing"], flags["sched"]) == (
        "adamw", 0.005, 0.01, 0.0, "onecycle-linear")
    assert (flags["train_crop"], flags["scale"], flags["ratio"], flags["aa"]) == (
        "rrc", [0.75, 1.0], [1.0, 1.0], "tv-rand-n2-m12")
    assert (flags["color_jitter"], flags["force_color_jitter"], flags["reprob"], flags["remode"]) == (
        0.2, True, 0.2, "const")


def test_a_finished_run_is_read_back_not_retrained(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    args = _table_args(tmp_path, epochs=2)
    folder = args.output / "table-convmixer_cifar-2ep"
    folder.mkdir(parents=True)
    (folder / "summary.csv").write_text("epoch,train_loss,eval_top1\n0,2.0,30.5\n1,1.5,41.25\n")
    (folder / "table_seconds.json").write_text(json.dumps({"seconds": 300.0}))
    monkeypatch.setattr(cifar_table.subprocess, "run", lambda *a, **k: pytest.fail("retrained a finished run"))
    entry = cifar_table.run_model(args, "convmixer_cifar", [])
    assert (entry["params"], entry["seconds_per_epoch"], entry["top1"]) == (594_186, 150.0, 41.25)
    table = cifar_table.markdown([entry], args.epochs).splitlines()
    assert table[0].endswith("test top-1 after epoch 2 |") and len(table) == 3
    assert table[2] == "| `convmixer_cifar` | 0.594 M | 0.136 G | 150 | 41.25 % |"


def test_an_unfinished_run_is_not_counted(tmp_path: Path) -> None:
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "summary.csv").write_text("epoch,eval_top1\n0,30.5\n")
    assert cifar_table.final_row(folder, 2) is None
    assert cifar_table.final_row(folder, 1) == {"epoch": "0", "eval_top1": "30.5"}
    assert cifar_table.final_row(tmp_path / "absent", 1) is None
