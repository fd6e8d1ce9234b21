"""The whole GPU measurement (docs/BENCHMARKS.md) in one command, each piece in its own process with its own time limit.

    python benchmarks/gpu_suite.py --out output/gpu-suite                      # everything, at most 23 minutes
    python benchmarks/gpu_suite.py --out output/gpu-suite --budget-s 540       # the same in calls of 9 minutes
    python benchmarks/gpu_suite.py --out output/tiny --device cpu --tiny       # the pipeline itself, tiny

Each step is a process with its own time limit (``LIMITS``), started only while that limit still fits
in the call's budget (``--budget-s``); a step that does not fit is left for the next call with the same
``--out``, which keeps the outcome of every step already run (delete ``results.json`` to start over).
The steps, in this order:

1. ``pytest -m cuda tests/test_kernels.py``: the fused kernel against the torch oracle at ViG-Ti sizes;
2. ``python -m vig.tools.benchmark`` for ViG-Ti, SViG-Ti (t = 0.89, dec 0.03) and the dense floor (ViG-Ti with
   the graph aggregation replaced by zeros, ``--no-graph``), each in eager mode: a training step with
   AdamW at batch 128 and inference at batch 256, bfloat16 autocast, channels-last; images per second
   are the median of the timed steps after warm-up, each synchronised with the device, and the peak
   memory is torch's ``max_memory_allocated``;
3. a torch.profiler table of one SViG-Ti training step (the top GPU kernels by time);
4. the threshold aggregation alone (``vig.tools.benchmark --mode graph``, B = 128, C = 192, N = 196):
   dense, scatter, the kernel, and the dense form under ``torch.compile``;
5. high resolution: pyramid ViG-Ti (the 224-px model, its ``relative_pos`` resized) on 896 x 896 images, inference
   at batch 2 in eager mode: the graph built and consumed in blocks of queries, peak memory against the 224-px row;
6. the models of step 2 again under ``torch.compile`` (inductor).

Everything lands in ``--out``: ``results.json``, ``results.md`` (both rewritten after every step), the
profile (``profile_svig_train.json``) and one log per process (``logs/``); a short table is printed last.
The exit status is 1 when a step failed or timed out, 0 otherwise. ``--tiny`` uses 32 x 32 images,
batch 2, one timed step, eager mode only and (on the CPU) no autocast, to test the pipeline itself.
"""
from __future__ import annotations

import argparse
import json
import os
import signal
import subprocess
import sys
import time
import xml.etree.ElementTree as ElementTree
from dataclasses import dataclass
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
SVIG_THRESHOLDS = ["--start-thresh", "0.89", "--dec", "0.03"]
# name -> (model, extra vig.tools.benchmark flags)
MODELS: dict[str, tuple[str, list[str]]] = {
    "vig_ti": ("vig_ti_224_gelu", []),
    "svig_ti": ("svig_ti_224_gelu", SVIG_THRESHOLDS),
    "dense_floor": ("vig_ti_224_gelu", ["--no-graph"]),
    "mobilevig_ti": ("mobilevig_ti", []),
    "greedyvig_s": ("greedyvig_s", []),
}
# the high-resolution step (5): name, model, image side (tiny: 64), inference batch
HIGH_RES = ("pvig_ti 896px", "pvig_ti_224_gelu", 896, 2)
# seconds one process may take: a step starts only while this much of the call's budget (--budget-s) is left
LIMITS = {"pytest": 360, "eager": 180, "compile": 300, "profile": 150, "graph": 150}
NOT_RUN = "not run"
SUMMARY_COLUMNS = ("variant", "step", "batch", "images_per_s", "ms_per_step", "peak_gib", "status")


@dataclass
class Step:
    """One process of the suite: a name, the command, its own time limit, and what became of it."""

    name: str
    kind: str
    argv: list[str]
    limit_s: float
    rows_path: Path | None = None  # the vig.tools.benchmark JSON of a model variant
    kinds: tuple[str, ...] = ("train", "infer")  # the rows it measures
    status: str = NOT_RUN
    seconds: float = 0.0
    log: str = ""


def _benchmark_argv(args: argparse.Namespace, model: str, flags: list[str], warmup: int, iters: int) -> list[str]:
    """vig.tools.benchmark arguments for one model: bfloat16 autocast (not on the CPU in tiny mode), channels-last,
    training at batch 128 and inference at batch 256 (tiny: 32 x 32 images, batch 2, one step after one)."""
    argv = ["-m", "vig.tools.benchmark", "--model", model, *flags, "--device", args.device, "--channels-last"]
    if not (args.tiny and args.device == "cpu"):
        argv += ["--amp-dtype", "bfloat16"]
    if args.tiny:
        return argv + ["--img-size", "32", "--batch-size", "2", "--infer-batch-size", "2", "--warmup", "1",
                       "--iters", "1"]
    return argv + ["--batch-size", "128", "--infer-batch-size", "256", "--warmup", str(warmup),
                   "--iters", str(iters)]


def plan(args: argparse.Namespace) -> list[Step]:
    """The processes of the suite, most important first (the budget may not reach the last ones)."""
    out: Path = args.out
    steps = [Step("pytest -m cuda", "pytest",
                  ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "cuda", "tests/test_kernels.py",
                   f"--junitxml={out / 'pytest_cuda.xml'}"], LIMITS["pytest"])]
    modes = [("eager", [])] if args.tiny else [("eager", []), ("compile", ["--torchcompile"])]
    for mode, mode_flags in modes:
        for name, (model, flags) in MODELS.items():
            rows_path = out / f"{name}_{mode}.json"
            argv = [*_benchmark_argv(args, model, [*flags, *mode_flags], warmup=5, iters=20), "--json", str(rows_path)]
            steps.append(Step(f"{name} {mode}", mode, argv, LIMITS[mode], rows_path))
        if mode == "eager":
            argv = [*_benchmark_argv(args, "svig_ti_224_gelu", [*SVIG_THRESHOLDS, "--no-infer"], warmup=3, iters=1),
                    "--profile", str(out / "profile_svig_train.json")]
            steps.append(Step("profile svig_ti train step", "profile", argv, LIMITS["profile"]))
            steps.append(Step("graph op", "graph", _graph_argv(args, out / "graph_op.json"), LIMITS["graph"]))
            name, model, side, batch = HIGH_RES
            rows_path = out / "high_res_eager.json"
            argv = [*_benchmark_argv(args, model, [], warmup=2, iters=5), "--no-train", "--img-size",
                    str(64 if args.tiny else side), "--infer-batch-size", str(batch), "--json", str(rows_path)]
            steps.append(Step(f"{name} eager", "eager", argv, LIMITS["eager"], rows_path, kinds=("infer",)))
    return steps


def _graph_argv(args: argparse.Namespace, json_path: Path) -> list[str]:
    """vig.tools.benchmark's graph mode: the threshold aggregation alone, forward + backward, for each implementation
    (dense, scatter, the kernel where it runs, and the compiled dense form except in tiny mode)."""
    argv = ["-m", "vig.tools.benchmark", "--mode", "graph", "--threshold", "0.89", "--device", args.device,
            "--json", str(json_path)]
    if args.tiny:
        return argv + ["--batch-size", "2", "--channels", "8", "--nodes", "16", "--warmup", "1", "--iters", "1"]
    return argv + ["--batch-size", "128", "--channels", "192", "--nodes", "196", "--amp-dtype", "bfloat16",
                   "--torchcompile", "--warmup", "3", "--iters", "10"]


def run_step(step: Step, logs: Path) -> None:
    """Run one step in its own process group (torch.compile's workers die with it) within its limit."""
    step.log = str(logs / f"{step.name.replace(' ', '_')}.log")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])))
    start = time.monotonic()
    with open(step.log, "w") as log:
        log.write(" ".join([sys.executable, *step.argv]) + "\n")
        log.flush()
        process = subprocess.Popen([sys.executable, *step.argv], cwd=REPO_ROOT, env=env, stdout=log,
                                   stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = process.wait(timeout=step.limit_s)
            step.status = "ok" if code == 0 else f"failed (exit status {code})"
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()
            step.status = f"timed out after {step.limit_s:.0f} s"
    step.seconds = round(time.monotonic() - start, 1)


def _pytest_summary(xml_path: Path) -> dict:
    """Counts of the junit report: tests, failures, errors, skipped, and the names of the failed tests."""
    if not xml_path.exists():
        return {}
    suite = ElementTree.parse(xml_path).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {key: int(suite.get(key, 0)) for key in ("tests", "failures", "errors", "skipped")}
    counts["failed"] = [f"{case.get('classname')}::{case.get('name')}" for case in suite.iter("testcase")
                        if case.find("failure") is not None or case.find("error") is not None]
    return counts


def collect(args: argparse.Namespace, steps: list[Step]) -> dict:
    """The results document: metadata, every step, one row per variant and step kind, pytest, profile."""
    out: Path = args.out
    rows = []
    meta: dict = {}
    for step in steps:
        if step.rows_path is None:
            continue
        measured = {}
        if step.rows_path.exists():
            written = json.loads(step.rows_path.read_text())
            meta = meta or written["meta"]
            measured = {row["step"]: row for row in written["rows"]}
        rows += [{"variant": step.name, **measured.get(kind, {"step": kind}), "status": step.status}
                 for kind in step.kinds]
    profile_path = out / "profile_svig_train.json"
    graph_path = out / "graph_op.json"
    commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True)
    meta.update(command=" ".join(sys.argv), commit=commit.stdout.strip() or None, budget_s=args.budget_s,
                tiny=args.tiny, device=args.device)
    return {"meta": meta,
            "steps": [{"name": s.name, "status": s.status, "seconds": s.seconds, "log": s.log,
                       "command": " ".join(["python", *s.argv])} for s in steps],
            "pytest_cuda": _pytest_summary(out / "pytest_cuda.xml"),
            "rows": rows,
            "graph_rows": json.loads(graph_path.read_text())["rows"] if graph_path.exists() else [],
            "profile": json.loads(profile_path.read_text()) if profile_path.exists() else None}


def _markdown_table(columns: list[str], rows: list[dict]) -> list[str]:
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(str(row.get(column, "")) for column in columns) + " |" for row in rows]
    return lines


def markdown(results: dict) -> str:
    """results.md: the measurement table, then pytest, the steps and the profile."""
    meta = results["meta"]
    lines = [f"# GPU suite: {meta.get('gpu', '?')}, torch {meta.get('torch', '?')}, {meta.get('date', '?')}", "",
             f"`{meta['command']}` at commit `{meta['commit']}`", "",
             "## Throughput and peak memory", "",
             *_markdown_table(["variant", "model", "graph", "step", "batch", "amp_dtype", "channels_last",
                               "images_per_s", "ms_per_step", "peak_gib", "status"], results["rows"]), ""]
    if results["graph_rows"]:
        lines += ["## Threshold aggregation alone (forward + backward)", "",
                  *_markdown_table(["impl", "batch", "channels", "nodes", "t", "dtype", "images_per_s", "ms_per_step",
                                    "peak_gib"], results["graph_rows"]), ""]
    tests = results["pytest_cuda"]
    lines += ["## pytest -m cuda", "",
              (f"{tests['tests']} tests: {tests['failures']} failed, {tests['errors']} errors, "
               f"{tests['skipped']} skipped" + (f"; failed: {', '.join(tests['failed'])}" if tests["failed"] else ""))
              if tests else "no report", "",
              "## Steps", "", *_markdown_table(["name", "status", "seconds", "log"], results["steps"]), ""]
    profile = results["profile"]
    if profile:
        lines += ["## Profile of one SViG-Ti training step", "",
                  *_markdown_table(["name", "calls", "self_ms"], profile["top"]), "",
                  "```", profile["table"].rstrip(), "```", ""]
    return "\n".join(lines)


def short_table(rows: list[dict]) -> str:
    """A fixed-width table of the SUMMARY_COLUMNS of the rows."""
    cells = [[str(row.get(column, "")) for column in SUMMARY_COLUMNS] for row in rows]
    widths = [max(len(column), *(len(cell[i]) for cell in cells)) for i, column in enumerate(SUMMARY_COLUMNS)]
    lines = ["  ".join(column.ljust(width) for column, width in zip(SUMMARY_COLUMNS, widths))]
    lines += ["  ".join(cell.ljust(width) for cell, width in zip(row, widths)) for row in cells]
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python benchmarks/gpu_suite.py", description=__doc__.split("\n")[0])
    parser.add_argument("--out", type=Path, required=True, help="folder for results.json, results.md and logs")
    parser.add_argument("--device", default="cuda")
    parser.add_argument("--tiny", action="store_true", help="32 x 32 images, batch 2, eager only (tests the suite)")
    parser.add_argument("--budget-s", type=float, default=1380,
                        help="seconds this call may spend (default 23 minutes): a step starts only if its own "
                             "limit still fits; the others stay 'not run' and a later call with the same --out "
                             "runs them (steps already run are kept)")
    return parser.parse_args(argv)


def resume(steps: list[Step], results_path: Path) -> None:
    """Take over the outcome of every step that an earlier call with the same --out already ran."""
    if not results_path.exists():
        return
    earlier = {step["name"]: step for step in json.loads(results_path.read_text())["steps"]}
    for step in steps:
        done = earlier.get(step.name)
        if done and done["status"] != NOT_RUN:
            step.status, step.seconds, step.log = done["status"], done["seconds"], done["log"]


def write_results(args: argparse.Namespace, steps: list[Step]) -> dict:
    results = collect(args, steps)
    (args.out / "results.json").write_text(json.dumps(results, indent=2))
    (args.out / "results.md").write_text(markdown(results))
    return results


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logs = args.out / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    deadline = time.monotonic() + args.budget_s
    steps = plan(args)
    resume(steps, args.out / "results.json")
    for step in steps:
        if step.status != NOT_RUN:
            print(f"{step.name}: {step.status} (earlier call)", flush=True)
            continue
        if deadline - time.monotonic() < step.limit_s:
            print(f"{step.name}: left for the next call ({step.limit_s:.0f} s limit, less left of --budget-s)",
                  flush=True)
            continue
        print(f"[{time.strftime('%H:%M:%S')}] {step.name} ...", flush=True)
        run_step(step, logs)
        print(f"[{time.strftime('%H:%M:%S')}] {step.name}: {step.status} ({step.seconds} s)", flush=True)
        write_results(args, steps)
    results = write_results(args, steps)
    print(f"\nresults: {args.out / 'results.json'}, {args.out / 'results.md'}")
    print(short_table(results["rows"]))
    return 0 if all(step.status in ("ok", NOT_RUN) for step in steps) else 1


if __name__ == "__main__":
    sys.exit(main())
