"""Failpoints (`vig.trainer.faults`): configured once from the environment, inert when unset, and a malformed
setting is one line naming the variable. What an armed failpoint does to a real run (SIGKILL, pause until a real
signal) is tested in tests/test_train_kills.py."""
from __future__ import annotations

import re
from pathlib import Path
from typing import Iterator

import pytest

from vig.errors import UsageError
from vig.trainer import faults


@pytest.fixture(autouse=True)
def disarmed() -> Iterator[None]:
    yield
    faults.configure("")


def test_the_environment_is_read_at_configuration_only(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Variables set after start-up arm nothing: a step does not look at the environment."""
    marker = tmp_path / "paused"
    faults.configure_from_env({})
    monkeypatch.setenv(faults.ENV_POINT, "train-step:0:1")
    monkeypatch.setenv(faults.ENV_ACTION, f"pause:{marker}")
    faults.fault_point("train-step", 0, 1)
    assert not marker.exists()


@pytest.mark.parametrize("spec, action, message", [
    ("train-stpe:0:1", "kill", "VIG_FAULT_AT: 'train-stpe:0:1' is not POINT:EPOCH[:STEP]"),
    ("epoch-end", "kill", "VIG_FAULT_AT: 'epoch-end' is not POINT:EPOCH[:STEP]"),
    ("epoch-end:x", "kill", "VIG_FAULT_AT: 'epoch-end:x' is not POINT:EPOCH[:STEP]"),
    ("epoch-end:1", "stop", "VIG_FAULT_ACTION: expected kill or pause:PATH, got 'stop'"),
    ("epoch-end:1", "pause:", "VIG_FAULT_ACTION: expected kill or pause:PATH, got 'pause:'"),
])
def test_a_malformed_setting_is_one_line(spec: str, action: str, message: str) -> None:
    with pytest.raises(UsageError, match="^" + re.escape(message)):
        faults.configure_from_env({faults.ENV_POINT: spec, faults.ENV_ACTION: action})


def test_an_armed_point_acts_only_at_its_epoch_and_step(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """With a pause action and a stop already requested, the armed point leaves its marker and returns; the
    same point at another step or epoch does nothing."""
    marker = tmp_path / "paused"
    monkeypatch.setattr(faults, "stop_requested", lambda: 15)
    faults.configure("train-step:2:3,epoch-end:1", f"pause:{marker}")
    for name, epoch, step in (("train-step", 2, 4), ("train-step", 1, 3), ("epoch-end", 2, 0), ("after-last", 1, 0)):
        faults.fault_point(name, epoch, step)
        assert not marker.exists(), (name, epoch, step)
    faults.fault_point("train-step", 2, 3)
    assert marker.exists()
    marker.unlink()
    faults.fault_point("epoch-end", 1)
    assert marker.exists()
