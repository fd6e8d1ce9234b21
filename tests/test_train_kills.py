"""Restarts after SIGKILL at every step of the save sequence and at random instants, stop signals in mid-epoch,
and skipped non-finite steps in BatchNorm models (project issue #23).

Each interrupted run is a forked child (a real process, killed by a real SIGKILL: by itself at a
`vig.trainer.faults` point, or by the test after a random delay); forking after the imports keeps a
restart cheap. Every restart is the same command plus ``--resume auto``, and the chain must end with
the weights, summary and history of the uninterrupted run.
"""
from __future__ import annotations

import csv
import multiprocessing
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from torch import nn

import train
from tests.train_helpers import REPO_ROOT, child_env, make_image_folder
from vig.trainer.distributed import DistributedContext
from vig.trainer.engine import Precision, train_one_epoch
from vig.trainer.faults import ENV_ACTION, ENV_POINT
from vig.trainer.step import PlainLoss, TrainStep
from vig.trainer.saver import CheckpointSaver, append_summary, atomic_write, repair_summary

pytestmark = pytest.mark.usefixtures("fast_in_process_runs")

SMALL = ["--model", "resnet10t", "--img-size", "8", "--warmup-epochs", "0", "--lr", "1e-2", "-b", "4", "-j", "0",
         "--checkpoint-hist", "2", "--log-interval", "100"]
SAVE_POINTS = ["epoch-end", "after-last", "after-checkpoint", "after-best", "after-summary", "after-curves"]


@pytest.fixture(scope="module")
def small_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """8 training images (2 steps of 4) and 2 validation images, 8 x 8 px."""
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 4, "b": 4}, "val": {"a": 1, "b": 1}},
                             size=8)


def _child(argv: list[str], fault: str | None) -> None:
    if fault is not None:
        os.environ[ENV_POINT] = fault
    else:
        os.environ.pop(ENV_POINT, None)
    os._exit(train.main(argv))


def _run(argv: list[str], fault: str | None = None, kill_after: float | None = None) -> int:
    """Exit code of train.main(argv) in a forked child (negative: the signal that ended it)."""
    child = multiprocessing.get_context("fork").Process(target=_child, args=(argv, fault))
    child.start()
    if kill_after is not None:
        child.join(kill_after)
        if child.exitcode is None:
            os.kill(child.pid, signal.SIGKILL)
    child.join(300)
    return child.exitcode


def _summary_epochs(folder: Path) -> list[int]:
    with open(folder / "summary.csv", newline="") as handle:
        return [int(row["epoch"]) for row in csv.DictReader(handle)]


def _next_epoch(folder: Path) -> int:
    last = folder / "last.pth.tar"
    return torch.load(last, weights_only=True)["epoch"] + 1 if last.exists() else 0


def _assert_same_run(folder: Path, reference: Path) -> None:
    expected = torch.load(reference / "last.pth.tar", weights_only=True)
    found = torch.load(folder / "last.pth.tar", weights_only=True)
    assert found["epoch"] == expected["epoch"]
    unequal = [key for key in expected["state_dict"]
               if not torch.equal(expected["state_dict"][key], found["state_dict"][key])]
    assert not unequal, unequal[:5]
    assert _summary_epochs(folder) == _summary_epochs(reference)
    names = sorted(path.name for path in folder.iterdir())
    assert names == sorted(path.name for path in reference.iterdir()), names
    for name in names:
        if name.endswith(".pth.tar"):
            assert (torch.load(folder / name, weights_only=True)["epoch"]
                    == torch.load(reference / name, weights_only=True)["epoch"]), name


@pytest.fixture(scope="module")
def reference(tmp_path_factory: pytest.TempPathFactory, small_data: Path) -> Path:
    """The uninterrupted 3-epoch run."""
    out = tmp_path_factory.mktemp("reference")
    assert _run([str(small_data), *SMALL, "--epochs", "3", "--output", str(out), "--experiment", "run"]) == 0
    return out / "run"


@pytest.mark.slow
@pytest.mark.parametrize("epoch", [0, 1])
@pytest.mark.parametrize("point", SAVE_POINTS)
def test_sigkill_at_a_save_step_then_resume_auto_ends_as_the_uninterrupted_run(
        tmp_path: Path, small_data: Path, reference: Path, point: str, epoch: int) -> None:
    argv = [str(small_data), *SMALL, "--epochs", "3", "--output", str(tmp_path), "--experiment", "run",
            "--resume", "auto"]
    assert _run(argv, fault=f"{point}:{epoch}") == -signal.SIGKILL
    assert _run(argv) == 0
    _assert_same_run(tmp_path / "run", reference)


@pytest.mark.slow
def test_fifty_random_sigkills_across_epoch_ends_each_restart_succeeds(tmp_path: Path, small_data: Path,
                                                                         tmp_path_factory: pytest.TempPathFactory
                                                                         ) -> None:
    epochs, kills = 60, 50
    out = tmp_path_factory.mktemp("uninterrupted")
    common = [str(small_data), *SMALL, "--epochs", str(epochs), "--experiment", "run"]
    assert _run([*common, "--output", str(out)]) == 0
    argv = [*common, "--output", str(tmp_path), "--resume", "auto"]
    rng = random.Random(23)
    folder = tmp_path / "run"
    start = time.perf_counter()
    killed = 0
    while killed < kills:
        epoch = _next_epoch(folder) if folder.exists() else 0
        assert epoch < epochs, f"the run finished after {killed} kills"
        backstop = f"after-curves:{epoch + 1}"  # points after the first may not be reached: the best-k history
        if rng.random() < 0.25:  # a random instant: start-up, training, validation or saving
            status = _run(argv, fault=backstop, kill_after=rng.uniform(0.0, 1.5))
        else:
            status = _run(argv, fault=f"{rng.choice(SAVE_POINTS)}:{epoch},{backstop}")
        assert status in (0, -signal.SIGKILL), status
        killed += status == -signal.SIGKILL
    assert _run(argv) == 0
    _assert_same_run(folder, out / "run")
    print(f"{kills} kills and restarts in {time.perf_counter() - start:.0f} s")


@pytest.mark.parametrize("left", ["args-only", "summary-and-curves", "temporary"])
def test_resume_auto_starts_afresh_in_a_folder_killed_before_its_first_checkpoint(
        tmp_path: Path, small_data: Path, reference: Path, left: str) -> None:
    """What a kill (or a full disk, or a corrupt image) in epoch 0 leaves: main refused it forever."""
    folder = tmp_path / "run"
    folder.mkdir()
    (folder / "args.yaml").write_text("lr: 0.5\n")
    if left != "args-only":
        (folder / "summary.csv").write_text("epoch,train_loss\n0,0.5\n")
        (folder / "curves.png").write_bytes(b"half a png")
    if left == "temporary":
        (folder / ".last.pth.tar.12345.tmp").write_bytes(b"half a checkpoint")
    argv = [str(small_data), *SMALL, "--epochs", "3", "--output", str(tmp_path), "--experiment", "run",
            "--resume", "auto"]
    assert _run(argv) == 0
    _assert_same_run(folder, reference)


def test_a_restart_relinks_model_best_behind_last(tmp_path: Path) -> None:
    """Killed after last.pth.tar of a better epoch was renamed into place, before its links were made."""
    saver = CheckpointSaver(tmp_path, max_history=2)
    saver.save({"epoch": 0, "metric": 1.0, "state_dict": {"w": torch.zeros(2)}}, 0, 1.0)
    atomic_write(tmp_path / "last.pth.tar",
                 lambda handle: torch.save({"epoch": 1, "metric": 2.0, "state_dict": {"w": torch.ones(2)}}, handle))
    restarted = CheckpointSaver(tmp_path, max_history=2)
    assert restarted.best == (1, 2.0) and restarted.history == [(1, 2.0), (0, 1.0)]
    for name in ("model_best.pth.tar", "checkpoint-1.pth.tar"):
        assert torch.load(tmp_path / name, weights_only=True)["epoch"] == 1


def test_a_restart_restores_the_summary_row_of_last(tmp_path: Path) -> None:
    append_summary(tmp_path, {"epoch": 0, "train_loss": 1.0})
    repair_summary(tmp_path, 1, {"epoch": 1, "train_loss": 0.5})
    assert _summary_epochs(tmp_path) == [0, 1]
    append_summary(tmp_path, {"epoch": 2, "train_loss": 0.25})
    repair_summary(tmp_path, 1, {"epoch": 1, "train_loss": 0.5})
    assert _summary_epochs(tmp_path) == [0, 1]


def _signalled_run(argv: list[str], point: str, signum: int, marker: Path) -> subprocess.CompletedProcess:
    """train.py in a real subprocess that pauses at `point` until the test sends it `signum`."""
    env = {**child_env(), ENV_POINT: point, ENV_ACTION: f"pause:{marker}"}
    process = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), *argv], cwd=marker.parent, env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and process.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), process.communicate(timeout=60)
        os.kill(process.pid, signum)
        out, err = process.communicate(timeout=300)
    finally:
        if process.poll() is None:
            process.kill()
    return subprocess.CompletedProcess(process.args, process.returncode, out, err)


AUGMENTED = ["--mixup", ".8", "--cutmix", "1.0", "--aa", "rand-m9-mstd0.5-inc1", "--reprob", "0.25",
             "--drop-path", ".1", "--repeated-aug", "--model-ema", "--model-ema-decay", "0.9"]


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "workers", "epoch"), [(signal.SIGTERM, "0", 0), (signal.SIGUSR1, "2", 1),
                                                          (signal.SIGINT, "0", 1)])
def test_a_stop_signal_in_mid_epoch_saves_and_resumes_bitwise(tmp_path: Path, signum: int, workers: str,
                                                              epoch: int) -> None:
    data = make_image_folder(tmp_path / "data", {"train": {"a": 6, "b": 6}, "val": {"a": 1, "b": 1}}, size=8)
    common = [str(data), *SMALL, *AUGMENTED, "-b", "4", "-j", workers, "--epochs", "2", "--output", str(tmp_path)]
    assert _run([*common, "--experiment", "full"]) == 0
    argv = [*common, "--experiment", "run", "--resume", "auto"]
    stopped = _signalled_run(argv, f"train-step:{epoch}:1", signum, tmp_path / "paused")
    assert stopped.returncode == 128 + signum, stopped.stderr[-3000:]
    warnings = [line for line in stopped.stderr.splitlines() if " WARNING " in line or "Traceback" in line]
    folder = tmp_path / "run"
    assert len(warnings) == 1 and (f"{signal.Signals(signum).name}: stopped after step 1 of 3 of epoch {epoch}; "
                                   f"saved {folder / 'interrupted.pth.tar'}") in warnings[0], stopped.stderr[-3000:]
    assert _run(argv) == 0
    assert not (folder / "interrupted.pth.tar").exists()
    expected = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)
    found = torch.load(folder / "last.pth.tar", weights_only=True)
    for entry in ("state_dict", "state_dict_ema"):
        unequal = [key for key in expected[entry] if not torch.equal(expected[entry][key], found[entry][key])]
        assert not unequal, f"{entry}: {unequal[:5]}"
    assert _summary_epochs(folder) == [0, 1]


def test_skip_nonfinite_keeps_batchnorm_statistics_finite() -> None:
    """A NaN image poisons the forward's BatchNorm update before the loss says so: the skip must undo it."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 2))
    batches = [(torch.randn(4, 3, 6, 6), torch.tensor([0, 1, 0, 1])) for _ in range(3)]
    batches[1][0][2, :, 1, 1] = float("nan")
    ctx = DistributedContext(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    before = {name: buffer.clone() for name, buffer in model[1].named_buffers()}
    step = TrainStep(model, torch.optim.SGD(model.parameters(), lr=0.1), PlainLoss(nn.CrossEntropyLoss()),
                     Precision("cpu", None, None), skip_nonfinite=True)
    stats = train_one_epoch(0, batches, step, ctx, 0)
    assert stats.skipped_steps == 1
    assert all(torch.isfinite(buffer).all() for buffer in model[1].buffers())
    assert int(model[1].num_batches_tracked) == int(before["num_batches_tracked"]) + 2


def test_resume_auto_on_a_finished_run_says_so(tmp_path: Path, small_data: Path, reference: Path,
                                                caplog: pytest.LogCaptureFixture) -> None:
    shutil.copytree(reference, tmp_path / "run")
    argv = [str(small_data), *SMALL, "--epochs", "3", "--output", str(tmp_path), "--experiment", "run",
            "--resume", "auto"]
    assert train.main(argv) == 0
    assert "already finished epoch 2 of --epochs 3: nothing to train" in caplog.text


def _torchrun(argv: list[str], env: dict[str, str] | None = None) -> subprocess.Popen:
    """train.py on 2 gloo processes under torchrun, in a session of its own (its process group is the launcher's)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
               f"--master_port={port}", str(REPO_ROOT / "train.py"), *argv]
    return subprocess.Popen(command, cwd=REPO_ROOT, env={**child_env(), **(env or {})}, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True, start_new_session=True)


def _finish(launcher: subprocess.Popen) -> str:
    try:
        return launcher.communicate(timeout=300)[0]
    finally:
        if launcher.poll() is None:
            os.killpg(launcher.pid, signal.SIGKILL)


@pytest.mark.slow
@pytest.mark.parametrize(("signum", "target"), [(signal.SIGTERM, "launcher"), (signal.SIGINT, "process group")])
def test_a_stop_signal_under_torchrun_saves_once_and_resumes_bitwise(tmp_path: Path, signum: int,
                                                                     target: str) -> None:
    """SIGTERM to torchrun (which forwards it to its workers), or Ctrl-C (SIGINT to the launcher and every worker,
    each worker receiving it twice): both ranks stop after the same step, rank 0 saves and logs one line, no worker
    prints a traceback. After the SIGTERM, --resume auto on 2 processes ends bit for bit as the uninterrupted
    2-process run (the Ctrl-C case stops at the same point through the same code; its resume is not repeated)."""
    data = make_image_folder(tmp_path / "data", {"train": {"a": 6, "b": 6}, "val": {"a": 1, "b": 1}}, size=8)
    common = [str(data), *SMALL, "-b", "2", "--epochs", "2", "--output", str(tmp_path)]  # 3 steps per rank, epoch
    argv = [*common, "--experiment", "run", "--resume", "auto"]
    marker = tmp_path / "paused"
    stopped = _torchrun(argv, {ENV_POINT: "train-step:1:1", ENV_ACTION: f"pause:{marker}"})
    resume = signum == signal.SIGTERM
    reference = _torchrun([*common, "--experiment", "full"]) if resume else None
    try:
        deadline = time.monotonic() + 300
        while not marker.exists() and stopped.poll() is None and time.monotonic() < deadline:
            time.sleep(0.02)
        assert marker.exists(), _finish(stopped)[-4000:]
        if target == "launcher":
            os.kill(stopped.pid, signum)
        else:
            os.killpg(stopped.pid, signum)
        output = _finish(stopped)
    finally:
        reference_output = _finish(reference) if reference is not None else ""
    folder = tmp_path / "run"
    ours = [line for line in output.splitlines() if " WARNING " in line or "KeyboardInterrupt" in line]
    assert stopped.returncode != 0 and len(ours) == 1, output[-4000:]
    assert (f"{signal.Signals(signum).name}: stopped after step 1 of 3 of epoch 1; "
            f"saved {folder / 'interrupted.pth.tar'}") in ours[0], output[-4000:]
    # the only traceback is torchrun's own: its agent re-raises the signal it forwarded (SignalException)
    assert output.count("Traceback (most recent call last)") <= output.count("SignalException: Process"), output
    position = torch.load(folder / "interrupted.pth.tar", weights_only=True)["position"]
    assert (position["epoch"], position["step"], len(position["ranks"])) == (1, 1, 2)
    if reference is None:
        return
    assert reference.returncode == 0, reference_output[-4000:]

    resumed = _torchrun(argv)
    output = _finish(resumed)
    assert resumed.returncode == 0, output[-4000:]
    assert not (folder / "interrupted.pth.tar").exists()
    expected = torch.load(tmp_path / "full" / "last.pth.tar", weights_only=True)["state_dict"]
    found = torch.load(folder / "last.pth.tar", weights_only=True)["state_dict"]
    assert not [key for key in expected if not torch.equal(expected[key], found[key])]
    assert _summary_epochs(folder) == [0, 1]
