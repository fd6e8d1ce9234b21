"""--skip-nonfinite for real: a skipped step leaves no trace (weights, BatchNorm statistics, optimizer state,
EMA) on every rank, and too many skips in a row stop the run in one line. A BatchNorm model trained at
--lr 1e6, and a NaN loss injected through the fault points (vig.trainer.faults), on one and two processes."""
from __future__ import annotations

import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch

import train
from tests.train_helpers import REPO_ROOT, child_env, make_image_folder

# test_resnet: BatchNorm layers whose running statistics a forward pass changes; 2 steps of 8 images per epoch
BN_MODEL = ["--model", "test_resnet", "--img-size", "32", "--warmup-epochs", "0", "-b", "8", "-j", "0",
            "--model-ema", "--model-ema-decay", "0.5"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})


def _tensors(value: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """Every tensor in a checkpoint, by its path of keys."""
    if isinstance(value, torch.Tensor):
        return {prefix: value}
    if isinstance(value, dict):
        return {name: tensor for key, item in value.items() for name, tensor in _tensors(item, f"{prefix}/{key}").items()}
    if isinstance(value, (list, tuple)):
        return {name: tensor for index, item in enumerate(value)
                for name, tensor in _tensors(item, f"{prefix}/{index}").items()}
    return {}


def _all_finite(folder: Path) -> None:
    checkpoints = sorted(folder.glob("*.pth.tar"))
    assert checkpoints
    for path in checkpoints:
        for name, tensor in _tensors(torch.load(path, weights_only=True, map_location="cpu")).items():
            assert not tensor.is_floating_point() or bool(torch.isfinite(tensor).all()), f"{path.name}{name}"


def _ok_or_one_stop_line(status: int, err: str) -> None:
    """Exit 0, or status 1 with the one line of --max-consecutive-skips naming epoch and step."""
    assert "Traceback" not in err, err
    if status == 0:
        return
    lines = [line for line in err.splitlines() if line.startswith("error:")]
    assert status == 1 and len(lines) == 1, err
    assert "steps skipped in a row" in lines[0] and "stopped at epoch" in lines[0] and ", step " in lines[0], lines


@pytest.mark.usefixtures("fast_in_process_runs")
@pytest.mark.parametrize("max_skips", [None, "2"])
def test_a_huge_learning_rate_on_a_batchnorm_model_never_writes_a_non_finite_tensor(
        tmp_path: Path, data: Path, capsys: pytest.CaptureFixture[str], max_skips: str | None) -> None:
    status = train.main([str(data), *BN_MODEL, "--lr", "1e6", "--epochs", "3", "--skip-nonfinite",
                         "--output", str(tmp_path), "--experiment", "run",
                         *(["--max-consecutive-skips", max_skips] if max_skips else [])])
    _ok_or_one_stop_line(status, capsys.readouterr().err)
    if max_skips:
        assert status == 1
    _all_finite(tmp_path / "run")


def _interrupted_after(data: Path, folder: Path, epoch: int, step: int) -> dict[str, Any]:
    """The state of a run stopped by SIGTERM after `step` of `epoch` (interrupted.pth.tar: weights, buffers,
    optimizer and EMA as they are at that step)."""
    paused = folder / "paused"
    env = {**child_env(), "VIG_FAULT_AT": f"train-step:{epoch}:{step}", "VIG_FAULT_ACTION": f"pause:{paused}"}
    child = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), str(data), *BN_MODEL, "--lr", "0.05",
                              "--epochs", "2", "--output", str(folder), "--experiment", "run"],
                             cwd=REPO_ROOT, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not paused.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    child.terminate()
    _, err = child.communicate(timeout=120)
    assert child.returncode == 143, err
    return torch.load(folder / "run" / "interrupted.pth.tar", weights_only=True, map_location="cpu")


@pytest.mark.slow
@pytest.mark.usefixtures("fast_in_process_runs")
def test_a_skipped_step_leaves_no_trace(tmp_path: Path, data: Path, monkeypatch: pytest.MonkeyPatch,
                                        caplog: pytest.LogCaptureFixture) -> None:
    """Epoch 1's last step is NaN: the epoch's checkpoint is bit for bit the state after its first step."""
    reference = _interrupted_after(data, tmp_path / "reference", epoch=1, step=1)
    monkeypatch.setenv("VIG_FAULT_AT", "nan-loss:1:2")
    status = train.main([str(data), *BN_MODEL, "--lr", "0.05", "--epochs", "2", "--skip-nonfinite",
                         "--output", str(tmp_path / "skipped"), "--experiment", "run"])
    assert status == 0
    assert "epoch 1: skipped 1 of 2 steps" in caplog.text
    skipped = torch.load(tmp_path / "skipped" / "run" / "last.pth.tar", weights_only=True, map_location="cpu")
    for entry in ("state_dict", "state_dict_ema", "optimizer"):
        expected, actual = _tensors(reference[entry]), _tensors(skipped[entry])
        assert expected.keys() == actual.keys(), entry
        assert any(name.endswith("running_var") for name in expected) or entry == "optimizer"
        for name in expected:
            torch.testing.assert_close(actual[name], expected[name], rtol=0, atol=0, msg=f"{entry}{name}")


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.mark.slow
@pytest.mark.parametrize(("fault", "lr"), [("nan-loss:0:1@1", "0.05"), ("", "1e6")], ids=["nan-on-rank-1", "lr-1e6"])
def test_two_processes_skip_together(tmp_path: Path, data: Path, fault: str, lr: str) -> None:
    env = {**child_env(), "VIG_FAULT_AT": fault}
    launcher = ["-m", "torch.distributed.run", "--nproc_per_node=2", "--master_addr=127.0.0.1",
                f"--master_port={_free_port()}"]
    done = subprocess.run([sys.executable, *launcher, str(REPO_ROOT / "train.py"), str(data), *BN_MODEL, "-b", "4",
                           "--lr", lr, "--epochs", "2", "--skip-nonfinite", "--output", str(tmp_path),
                           "--experiment", "run"], cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=400)
    if fault:  # one NaN on rank 1 only: both ranks skip that step, no rank updates, every later step is kept
        assert done.returncode == 0, done.stderr[-3000:]
        assert "epoch 0: skipped 1 of 2 steps" in done.stderr
        last = torch.load(tmp_path / "run" / "last.pth.tar", weights_only=True, map_location="cpu")
        assert {int(state["step"]) for state in last["optimizer"]["state"].values()} == {3}
    else:  # (torchrun adds its own report of a worker that exited 1)
        lines = [line for line in done.stderr.splitlines() if line.startswith("error:")]
        assert done.returncode == 0 or (len(lines) == 1 and "steps skipped in a row" in lines[0]), done.stderr[-3000:]
    _all_finite(tmp_path / "run")
