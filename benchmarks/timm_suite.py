"""timm's own model test suite (``tests/test_models.py`` of the installed timm's sdist) on every registered model.

    python benchmarks/timm_suite.py [--cache DIR] [--workers N] [--models NAME ...]

Our model modules join timm's feature-API module filter, so the forward_intermediates / features_only / prune
contract tests run too. Prints each problem (a failed case, a skip not in ``tests/timm_plugin/vig_timm_skips.py``,
an expected test that did not run on a model), a count per model and pytest's last line; exits 1 on any problem.
CI runs the same suite on one model per model class (``tests/test_timm_suite.py``).
"""
from __future__ import annotations

import argparse
import sys
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.timm_plugin.vig_timm_skips import SKIPPED  # noqa: E402
from tests.timm_suite import SuiteUnavailable, case_model, fetch_timm_tests, problems, run_suite  # noqa: E402


def registered_models() -> list[str]:
    """Every timm model name registered by a module of the vig.models package."""
    import pkgutil

    import timm

    import vig.models

    modules = [info.name for info in pkgutil.iter_modules(vig.models.__path__)]
    return sorted(timm.list_models(module=modules))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python benchmarks/timm_suite.py", description=__doc__.split("\n")[0])
    parser.add_argument("--cache", default="output/timm-sdist", help="where the sdist is downloaded and extracted")
    parser.add_argument("--workers", type=int, default=2, help="pytest-xdist processes (0: one process)")
    parser.add_argument("--models", nargs="*", default=None, help="model names (default: every registered one)")
    args = parser.parse_args(argv)
    models = args.models or registered_models()
    try:
        tests = fetch_timm_tests(Path(args.cache))
    except SuiteUnavailable as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    print(f"timm's test_models.py from {tests} on {len(models)} models", flush=True)
    start = time.perf_counter()
    outcomes, last_line = run_suite(tests, models, Path(args.cache) / "report.xml", workers=args.workers)
    elapsed = time.perf_counter() - start
    failed = sorted(case for case, outcome in outcomes.items() if outcome == "failed")
    wrong = problems(outcomes, models, SKIPPED)
    for problem in wrong:
        print(f"PROBLEM {problem}")
    per_model = Counter((case_model(case, models), outcome) for case, outcome in outcomes.items())
    for model in models:
        print(f"{model}: {per_model[(model, 'passed')]} passed, {per_model[(model, 'failed')]} failed, "
              f"{per_model[(model, 'skipped')]} skipped")
    print(f"{sum(o == 'passed' for o in outcomes.values())} passed, {len(failed)} failed, "
          f"{sum(o == 'skipped' for o in outcomes.values())} skipped, {len(wrong)} problems in "
          f"{elapsed:.0f} s (pytest: {last_line})")
    return 1 if wrong else 0


if __name__ == "__main__":
    sys.exit(main())
