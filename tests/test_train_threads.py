"""The main process's CPU thread count (vig.trainer.threads, project issue #23 item 7): chosen from the cores
of the affinity mask and -j, logged in one line, and left alone when the environment names one."""
from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Iterator

import pytest
import torch

import train
from tests.train_helpers import make_image_folder
from vig.trainer import threads
from vig.trainer.threads import choose_threads, set_cpu_threads


@pytest.fixture
def keep_threads() -> Iterator[None]:
    before = torch.get_num_threads()
    yield
    torch.set_num_threads(before)


@pytest.mark.parametrize(("cores", "workers", "processes", "expected"), [
    (2, 1, 1, 1), (2, 0, 1, 2), (2, 4, 1, 1), (16, 4, 1, 12), (16, 2, 2, 6), (3, 0, 2, 1), (1, 0, 4, 1)])
def test_threads_are_the_process_share_of_cores_less_its_workers(cores: int, workers: int, processes: int,
                                                                 expected: int) -> None:
    assert choose_threads(cores, workers, processes) == expected


@pytest.mark.usefixtures("keep_threads")
@pytest.mark.parametrize(("environ", "expected"), [
    ({}, 3), ({"LOCAL_WORLD_SIZE": "2"}, 1), ({"OMP_NUM_THREADS": "5"}, 2), ({"MKL_NUM_THREADS": "1"}, 2)])
def test_the_environment_wins_and_the_choice_is_logged(monkeypatch: pytest.MonkeyPatch,
                                                       caplog: pytest.LogCaptureFixture, environ: dict[str, str],
                                                       expected: int) -> None:
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3})
    torch.set_num_threads(2)
    with caplog.at_level(logging.INFO, logger=threads.__name__):
        assert set_cpu_threads(1, environ) == expected
    assert torch.get_num_threads() == expected
    lines = [record.getMessage() for record in caplog.records]
    if "OMP_NUM_THREADS" in environ or "MKL_NUM_THREADS" in environ:
        name = next(iter(environ))
        assert lines == [f"CPU threads: 2, as the environment sets ({name}={environ[name]}; the trainer leaves "
                         "torch's count alone)"], lines
    else:
        shared = " shared by 2 processes" if environ else ""
        assert lines == [f"CPU threads: {expected} for the main process (4 cores usable{shared}, 1 loader "
                         "worker(s)); OMP_NUM_THREADS=N sets another count"], lines


@pytest.mark.usefixtures("fast_in_process_runs", "keep_threads")
def test_a_cpu_run_sets_and_logs_its_thread_count(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                  caplog: pytest.LogCaptureFixture) -> None:
    """train.py on CPU without OMP_NUM_THREADS / MKL_NUM_THREADS, 2 usable cores and one loader worker: the
    2 threads torch had become 1."""
    for name in threads.THREAD_VARIABLES:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1})
    torch.set_num_threads(2)
    data = make_image_folder(tmp_path / "data", {"train": {"a": 2, "b": 2}, "val": {"a": 1, "b": 1}}, size=8)
    argv = [str(data), "--model", "resnet10t", "--img-size", "8", "--epochs", "1", "--warmup-epochs", "0", "-b", "2",
            "-j", "1", "--device", "cpu", "--output", str(tmp_path / "out"), "--experiment", "run"]
    with caplog.at_level(logging.INFO, logger=threads.__name__):
        assert train.main(argv) == 0
    assert torch.get_num_threads() == 1
    assert "CPU threads: 1 for the main process (2 cores usable, 1 loader worker(s))" in caplog.text
