"""benchmarks/gpu_suite.py: the tiny CPU pipeline end to end, the per-call budget with resume, and step outcomes."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks import gpu_suite
from tests.train_helpers import REPO_ROOT

VARIANTS = ["vig_ti eager", "svig_ti eager", "dense_floor eager", "mobilevig_ti eager", "greedyvig_s eager"]


@pytest.mark.slow
def test_tiny_cpu_run_writes_every_variant(tmp_path: Path) -> None:
    out = tmp_path / "suite"
    env = dict(os.environ, OMP_NUM_THREADS="1")  # eight small processes on a shared 2-core machine
    result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "gpu_suite.py"), "--out", str(out),
                             "--device", "cpu", "--tiny"], env=env, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout + result.stderr
    results = json.loads((out / "results.json").read_text())
    assert [step["status"] for step in results["steps"]] == ["ok"] * 9, results["steps"]
    rows = {(row["variant"], row["step"]): row for row in results["rows"]}
    high_res = rows.pop(("pvig_ti 896px eager", "infer"))
    assert set(rows) == {(variant, step) for variant in VARIANTS for step in ("train", "infer")}
    assert all(row["images_per_s"] > 0 and row["batch"] == 2 and row["img_size"] == 32 for row in rows.values())
    assert high_res["images_per_s"] > 0 and high_res["batch"] == 2 and high_res["img_size"] == 64
    assert {row["graph"] for row in rows.values()} == {"knn", "threshold", "none", "own"}
    assert rows[("dense_floor eager", "train")]["graph"] == "none"
    assert results["pytest_cuda"]["tests"] > 0 and results["pytest_cuda"]["failed"] == []
    assert results["profile"]["top"] and "Self CPU" in results["profile"]["table"]
    assert {"dense", "scatter"} <= {row["impl"] for row in results["graph_rows"]}
    markdown = (out / "results.md").read_text()
    for variant in VARIANTS:
        assert markdown.count(f"| {variant} |") == 3  # train row, infer row, step row
    assert "## Profile of one SViG-Ti training step" in markdown and "| scatter | 2 | 8 | 16 |" in markdown
    table = result.stdout.strip().splitlines()[-12:]  # the short table comes last
    assert table[0].split()[:3] == ["variant", "step", "batch"]
    assert [line.split()[0] + " " + line.split()[1] for line in table[1:]] == [
        *(v for v in VARIANTS for _ in "ti"), "pvig_ti 896px"]


def test_budget_leaves_steps_for_the_next_call_which_keeps_earlier_outcomes(tmp_path: Path, capsys) -> None:
    out = tmp_path / "suite"
    assert gpu_suite.main(["--out", str(out), "--device", "cpu", "--budget-s", "1"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert {step["status"] for step in results["steps"]} == {gpu_suite.NOT_RUN}
    assert len(results["steps"]) == 14  # pytest, 5 eager, profile, graph op, high resolution, 5 compiled
    assert {(row["variant"], row["step"]) for row in results["rows"]} == {
        (f"{name} {mode}", step) for name in ("vig_ti", "svig_ti", "dense_floor", "mobilevig_ti", "greedyvig_s") for mode in ("eager", "compile")
        for step in ("train", "infer")} | {("pvig_ti 896px eager", "infer")}
    assert "left for the next call" in capsys.readouterr().out
    # an earlier call's outcome is kept, not run again
    results["steps"][0].update(status="ok", seconds=12.5)
    (out / "results.json").write_text(json.dumps(results))
    assert gpu_suite.main(["--out", str(out), "--device", "cpu", "--budget-s", "1"]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["steps"][0]["status"] == "ok" and again["steps"][0]["seconds"] == 12.5
    assert "pytest -m cuda: ok (earlier call)" in capsys.readouterr().out


@pytest.mark.parametrize("code, limit, expected", [
    ("pass", 60, "ok"),
    ("import sys; sys.exit(3)", 60, "failed (exit status 3)"),
    ("import time; time.sleep(60)", 1, "timed out after 1 s"),
])
def test_step_outcome(tmp_path: Path, code: str, limit: float, expected: str) -> None:
    step = gpu_suite.Step("probe step", "eager", ["-c", code], limit)
    gpu_suite.run_step(step, tmp_path)
    assert step.status == expected and step.seconds < 30
    assert Path(step.log).read_text().startswith(sys.executable)
