"""benchmarks/side_by_side.py: usage mistakes are one line with exit 2, and a worker measures one figure in-process."""
from __future__ import annotations

import subprocess
import sys

import pytest

from benchmarks import side_by_side
from tests.train_helpers import REPO_ROOT


@pytest.mark.parametrize("argv, message", [
    (["--memory-only", "--speed-only"], "exclude each other"),
    (["--rounds", "0"], "must be >= 1"),
    (["--published-dir", "/nonexistent/published"], "not a directory"),
])
def test_usage_mistakes_are_one_line(argv: list[str], message: str) -> None:
    done = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "side_by_side.py"), *argv],
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2
    assert done.stderr.strip().splitlines() == [f"side_by_side.py: error: {done.stderr.split('error: ')[1].strip()}"]
    assert message in done.stderr and done.stdout == ""


@pytest.mark.parametrize("mode", ["memory", "infer", "train"])
def test_worker_measures_one_figure(mode: str) -> None:
    spec = {"impl": "ours", "model": "vig_ti_224_gelu", "kwargs": {"img_size": 64}, "mode": mode, "batch": 2,
            "size": 64, "warmup": 0, "steps": 1}
    out = side_by_side.worker(spec)
    if mode == "memory":
        assert out["added_mib"] >= 0 and out["shapes"] == [(2, 1000)]
    else:
        assert out["images_per_s"] > 0
