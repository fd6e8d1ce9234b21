"""--sched plateau: the decay follows --eval-metric's direction (a loss decays when it stops falling), timm's
--patience-epochs / --cooldown-epochs set it, and its counters are in the checkpoint, so that a resumed run
decays the learning rate when the uninterrupted run does."""
from __future__ import annotations

import csv
import shutil
from pathlib import Path

import pytest
import torch

import train
from tests.train_helpers import make_image_folder

pytestmark = pytest.mark.usefixtures("fast_in_process_runs")

MODEL = ["--model", "convmixer_cifar", "--model-kwargs", "dim=16", "depth=1"]
DECAY = 0.5


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 6, "b": 6, "c": 4},
                                                               "val": {"a": 3, "b": 3, "c": 2}}, size=32)


def _run(data: Path, output: Path, experiment: str, *flags: str) -> list[dict[str, str]]:
    argv = [str(data), *MODEL, "--sched", "plateau", "--eval-metric", "loss", "--decay-rate", str(DECAY),
            "--warmup-epochs", "0", "-b", "8", "-j", "0", "--output", str(output), "--experiment", experiment, *flags]
    assert train.main(argv) == 0
    with open(output / experiment / "summary.csv", newline="") as handle:
        return list(csv.DictReader(handle))


def _plateau_lrs(losses: list[float], lr: float, mode: str, patience: int, cooldown: int) -> list[float]:
    """The learning rate of each epoch that torch's ReduceLROnPlateau (what timm's plateau schedule steps, with
    timm's threshold 1e-4) gives for the validation losses of the epochs before it."""
    optimizer = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=lr)
    plateau = torch.optim.lr_scheduler.ReduceLROnPlateau(optimizer, mode=mode, factor=DECAY, patience=patience,
                                                         cooldown=cooldown, threshold=1e-4)
    lrs = [lr]
    for loss in losses[:-1]:
        plateau.step(loss)
        lrs.append(optimizer.param_groups[0]["lr"])
    return lrs


def test_plateau_on_a_loss_decays_when_the_loss_stops_falling(data: Path, tmp_path: Path) -> None:
    """Before the fix the schedule ran in 'max' mode for --eval-metric loss: it halved the rate after every
    epoch whose loss fell."""
    rows = _run(data, tmp_path, "run", "--epochs", "5", "--lr", "1e-2", "--patience-epochs", "0")
    losses = [float(row["eval_loss"]) for row in rows]
    expected = _plateau_lrs(losses, 1e-2, "min", patience=0, cooldown=0)
    assert expected != _plateau_lrs(losses, 1e-2, "max", patience=0, cooldown=0)  # the run tells the modes apart
    assert [float(row["lr"]) for row in rows] == pytest.approx(expected, rel=1e-12)


def test_plateau_resume_repeats_the_uninterrupted_run(data: Path, tmp_path: Path) -> None:
    """Epochs 3-5 resumed from epoch 2's checkpoint equal the uninterrupted run's, weights and learning rates
    bit for bit. The run is chosen so that the plateau counters matter: at epoch 2's end one epoch without
    improvement is counted (--patience-epochs 1), and epoch 3's loss, again no better, decays the rate; a run
    that forgot the count (timm 1.0.31 saves only the best value) keeps the rate."""
    flags = ["--epochs", "6", "--lr", "0.1", "--patience-epochs", "1", "--cooldown-epochs", "1"]
    full = _run(data, tmp_path, "full", *flags)
    losses = [float(row["eval_loss"]) for row in full]
    expected = _plateau_lrs(losses, 0.1, "min", patience=1, cooldown=1)
    assert [float(row["lr"]) for row in full] == pytest.approx(expected, rel=1e-12)
    # the precondition that makes this test able to fail: the count carried over epoch 2 decides epoch 4's rate
    assert min(losses[:2]) < losses[2] and min(losses[:2]) < losses[3] and expected[4] == expected[3] * DECAY

    resumed_folder = tmp_path / "resumed"
    resumed_folder.mkdir()
    shutil.copy(tmp_path / "full" / "checkpoint-2.pth.tar", resumed_folder / "last.pth.tar")
    resumed = _run(data, tmp_path, "resumed", *flags, "--resume", "auto")
    assert [row["lr"] for row in resumed[-3:]] == [row["lr"] for row in full[-3:]]
    expected_state = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    actual_state = torch.load(resumed_folder / "last.pth.tar", weights_only=True)
    assert actual_state["epoch"] == expected_state["epoch"] == 5
    torch.testing.assert_close(actual_state["state_dict"], expected_state["state_dict"], rtol=0, atol=0)
    assert actual_state["scheduler"] == expected_state["scheduler"]


def test_plateau_counters_must_be_non_negative() -> None:
    assert train.main(["--patience-epochs", "-1"]) == 2
