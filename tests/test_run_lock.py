"""One run folder, one owner: concurrent starts, stale and foreign locks, the lock's removal on every exit
(vig.trainer.run_lock), driven through real train.py processes."""
from __future__ import annotations

import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import train
from tests.train_helpers import REPO_ROOT, child_env, make_image_folder

LOCK = ".run.lock"
TINY = ["--model", "test_resnet", "--img-size", "32", "--warmup-epochs", "0", "--lr", "1e-3", "-b", "8", "-j", "0"]


@pytest.fixture(scope="module")
def data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_image_folder(tmp_path_factory.mktemp("data"), {"train": {"a": 8, "b": 8}, "val": {"a": 2, "b": 2}})


class _Done:
    """train.main run in-process: its status and what it wrote on stderr (the error line and the log)."""

    def __init__(self, returncode: int, stderr: str) -> None:
        self.returncode = returncode
        self.stderr = stderr


@pytest.fixture
def run_train(capsys: pytest.CaptureFixture[str], caplog: pytest.LogCaptureFixture, fast_in_process_runs: None):
    def run(argv: list[str]) -> _Done:
        caplog.clear()
        caplog.set_level(logging.INFO)
        status = train.main(argv)
        return _Done(status, capsys.readouterr().err + "\n".join(
            f"{record.levelname} {record.getMessage()}" for record in caplog.records))
    return run


def _error_lines(stderr: str) -> list[str]:
    assert "Traceback" not in stderr, stderr
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _write_lock(folder: Path, **owner: object) -> None:
    folder.mkdir(parents=True, exist_ok=True)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "start": None, "started": "2026-01-01 00:00:00 UTC",
              "run_id": None, **owner}
    (folder / LOCK).write_text(json.dumps(record))


def _dead_pid() -> int:
    child = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    return int(child.stdout)


@pytest.mark.slow
def test_three_concurrent_starts_one_trains_the_others_are_refused(tmp_path: Path, data: Path) -> None:
    seeds = (11, 12, 13)
    command = [sys.executable, str(REPO_ROOT / "train.py"), str(data), *TINY, "--epochs", "2",
               "--output", str(tmp_path), "--experiment", "shared"]
    children = [subprocess.Popen([*command, "--seed", str(seed)], cwd=REPO_ROOT, env=child_env(), text=True,
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE) for seed in seeds]
    results = [(child.wait(timeout=300), *child.communicate()) for child in children]
    trained = [seed for seed, (status, _, _) in zip(seeds, results) if status == 0]
    assert len(trained) == 1, [(status, err[-2000:]) for status, _, err in results]
    for status, _, err in results:
        if status != 0:
            lines = _error_lines(err)
            assert status == 2 and len(lines) == 1, err
            assert ("is in use by another run: pid" in lines[0] or "already holds another run" in lines[0]), lines
    folder = tmp_path / "shared"
    checkpoints = sorted(folder.glob("*.pth.tar"))
    assert {path.name for path in checkpoints} >= {"last.pth.tar", "model_best.pth.tar"}
    for path in checkpoints:
        assert torch.load(path, weights_only=True, map_location="cpu")["args"]["seed"] == trained[0], path
    assert not (folder / LOCK).exists()
    assert not [path.name for path in folder.iterdir() if path.name.endswith(".tmp")]


def test_a_live_owner_refuses_a_new_start_and_resume_auto(tmp_path: Path, data: Path, run_train) -> None:
    folder = tmp_path / "run"
    owner = os.getppid()  # alive, on this host, not this process
    _write_lock(folder, pid=owner, run_id="job-7")
    before = (folder / LOCK).read_bytes()
    for extra in ([], ["--resume", "auto"]):
        done = run_train([str(data), *TINY, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run", *extra])
        lines = _error_lines(done.stderr)
        assert done.returncode == 2 and len(lines) == 1, done.stderr
        assert f"pid {owner} on host {socket.gethostname()}" in lines[0] and "job-7" in lines[0], lines
    assert (folder / LOCK).read_bytes() == before
    assert sorted(path.name for path in folder.iterdir()) == [LOCK]


def test_a_stale_lock_of_a_dead_process_is_taken_over_with_one_warning(tmp_path: Path, data: Path,
                                                                       run_train) -> None:
    dead = _dead_pid()
    _write_lock(tmp_path / "run", pid=dead)
    done = run_train([str(data), *TINY, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"])
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "lock taken over" in line]
    assert len(warnings) == 1 and f"pid {dead} on host" in warnings[0] and "is gone" in warnings[0], done.stderr
    assert (tmp_path / "run" / "last.pth.tar").exists() and not (tmp_path / "run" / LOCK).exists()


@pytest.mark.parametrize("guard", ["names a dead process", "empty for a while"])
def test_a_takeover_guard_left_by_a_killed_process_does_not_block_the_restart(tmp_path: Path, data: Path, run_train,
                                                                              guard: str) -> None:
    """A process SIGKILLed while taking over a stale lock leaves the lock and its ``.takeover`` guard behind (seen
    in the fifty-kill test). The restart removes the guard of a dead process at once (an empty guard once it
    has stayed empty longer than a live creator ever leaves it) and takes the lock over; it was refused for the
    guard's first 30 s ("other processes keep changing it")."""
    dead = _dead_pid()
    _write_lock(tmp_path / "run", pid=dead)
    guard_path = tmp_path / "run" / (LOCK + ".takeover")
    if guard == "names a dead process":
        guard_path.write_text(json.dumps({"host": socket.gethostname(), "pid": dead, "start": None,
                                          "started": "2026-01-01 00:00:00 UTC", "run_id": None}))
    else:
        guard_path.write_bytes(b"")
        old = time.time() - 5
        os.utime(guard_path, (old, old))
    done = run_train([str(data), *TINY, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"])
    assert done.returncode == 0, done.stderr
    assert [line for line in done.stderr.splitlines() if "lock taken over" in line], done.stderr
    assert not guard_path.exists() and not (tmp_path / "run" / LOCK).exists()


def test_an_empty_lock_file_left_by_a_killed_creator_is_taken_over(tmp_path: Path, data: Path, run_train) -> None:
    """A process killed between creating the lock file and writing it leaves it empty; the restart waits for
    the content a live creator would write, then takes it over with one warning (it was refused as an
    unreadable lock file, which only --break-lock passed)."""
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / LOCK).write_bytes(b"")
    done = run_train([str(data), *TINY, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"])
    assert done.returncode == 0, done.stderr
    warnings = [line for line in done.stderr.splitlines() if "lock taken over" in line]
    assert len(warnings) == 1 and "it is empty" in warnings[0], done.stderr
    assert (tmp_path / "run" / "last.pth.tar").exists() and not (tmp_path / "run" / LOCK).exists()


def test_another_hosts_lock_is_broken_only_by_break_lock(tmp_path: Path, data: Path, run_train) -> None:
    _write_lock(tmp_path / "run", host="node-17.elsewhere", pid=_dead_pid())
    argv = [str(data), *TINY, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run"]
    refused = run_train(argv)
    lines = _error_lines(refused.stderr)
    assert refused.returncode == 2 and len(lines) == 1 and "host node-17.elsewhere" in lines[0], refused.stderr
    assert "--break-lock" in lines[0]
    broken = run_train([*argv, "--break-lock"])
    assert broken.returncode == 0, broken.stderr
    assert sum("lock taken over, --break-lock (pid" in line for line in broken.stderr.splitlines()) == 1
    assert "break_lock" not in (tmp_path / "run" / "args.yaml").read_text()


def test_a_restart_of_the_same_torchrun_job_is_the_same_owner(tmp_path: Path, data: Path, run_train,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    _write_lock(tmp_path / "run", pid=os.getppid(), run_id="job-42")  # alive, but the same job's earlier rank 0
    monkeypatch.setenv("TORCHELASTIC_RUN_ID", "job-42")
    done = run_train([str(data), *TINY, "--epochs", "1", "--output", str(tmp_path), "--experiment", "run",
                      "--resume", "auto"])
    assert done.returncode == 0, done.stderr
    assert "an earlier start of this torchrun job" in done.stderr and "WARNING" not in done.stderr


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_the_lock_is_removed_on_a_signalled_exit(tmp_path: Path, data: Path, signum: int) -> None:
    paused = tmp_path / "paused"
    env = {**child_env(), "VIG_FAULT_AT": "train-step:0:1", "VIG_FAULT_ACTION": f"pause:{paused}"}
    child = subprocess.Popen([sys.executable, str(REPO_ROOT / "train.py"), str(data), *TINY, "--epochs", "1",
                              "--output", str(tmp_path), "--experiment", "run"], cwd=REPO_ROOT, env=env,
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 240
    while not paused.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (tmp_path / "run" / LOCK).exists()
    child.send_signal(signum)
    _, err = child.communicate(timeout=120)
    assert child.returncode == 128 + signum, err
    assert not (tmp_path / "run" / LOCK).exists()
