"""timm's own model tests (``tests/test_models.py`` of the installed timm's sdist) run on this project's models.

Shared by ``tests/test_timm_suite.py`` (one model per model class, in CI) and ``benchmarks/timm_suite.py`` (every
registered model): fetch the sdist with pip, extract its ``tests/``, run pytest on ``test_models.py`` in a
subprocess with ``vig`` loaded as a plugin (so that timm's module-level ``list_models`` sees our models) and
``tests/timm_plugin/vig_timm_skips.py`` (our modules in timm's feature-API module filter, and the cases a model
cannot take, skipped with their reason), selected by model name, and read the per-case outcomes from a JUnit XML
report. `problems` judges them: a failure, a skip that the skip list does not name, a listed skip that ran, or a
test of `EXPECTED_TESTS` that did not run on a model is each a problem.
"""
from __future__ import annotations

import os
import re
import subprocess
import sys
import tarfile
import xml.etree.ElementTree as ET
from pathlib import Path

import timm

ROOT = Path(__file__).resolve().parents[1]
PLUGIN_DIR = Path(__file__).resolve().parent / "timm_plugin"  # a folder of its own: nothing else to shadow


# the tests of timm's test_models.py that must run on every model (each case passes or is a listed skip); the last
# three run only on the modules of FEAT_INTER_FILTERS, which the plugin extends by ours
EXPECTED_TESTS: tuple[str, ...] = (
    "test_model_forward", "test_model_backward", "test_model_default_cfgs", "test_model_forward_torchscript",
    "test_model_forward_features", "test_model_forward_fx", "test_model_backward_fx",
    "test_model_forward_fx_torchscript", "test_model_forward_intermediates_features",
    "test_model_forward_intermediates", "test_prune_intermediate_layers_contract",
)
# timm's NON_STD_FILTERS (names such as '*mixer_*') move a model from these two tests to this one
NON_STD_TEST = "test_model_default_cfgs_non_std"
NON_STD_REPLACED = ("test_model_default_cfgs", "test_model_forward_features")


class SuiteUnavailable(RuntimeError):
    """timm's sdist could not be fetched (no network, no such release)."""


def fetch_timm_tests(cache: Path, version: str = timm.__version__) -> Path:
    """``tests/`` of timm ``version``'s sdist, downloaded with pip into ``cache`` and extracted there once."""
    tests = cache / f"timm-{version}" / "tests"
    if (tests / "test_models.py").exists():
        return tests
    cache.mkdir(parents=True, exist_ok=True)
    download = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
                               f"timm=={version}", "-d", str(cache), "-q"],
                              capture_output=True, text=True, timeout=600)
    archives = sorted(cache.glob(f"timm-{version}.tar.gz"))
    if download.returncode != 0 or not archives:
        tail = (download.stderr or download.stdout).strip().splitlines()[-1:] or ["no output"]
        raise SuiteUnavailable(f"pip download of timm=={version}'s sdist failed: {tail[0]}")
    with tarfile.open(archives[0]) as archive:
        members = [m for m in archive.getmembers() if m.name.startswith(f"timm-{version}/tests/")]
        archive.extractall(cache, members=members, filter="data")
    if not (tests / "test_models.py").exists():
        raise SuiteUnavailable(f"timm {version}'s sdist has no tests/test_models.py")
    return tests


# timm's tests that download each pretrained tag's weights (skipped on timm's own CI): our tags' downloads are
# tested without a network in tests/test_pretrained.py, through a loopback server and an offline hub cache
NETWORK_TESTS: tuple[str, ...] = ("test_model_load_pretrained", "test_model_features_pretrained")


def selection(models: list[str]) -> str:
    """A pytest ``-k`` expression for the cases of ``models`` (parametrised ids end in ``-NAME]``), less the
    `NETWORK_TESTS`."""
    return f"({' or '.join(models)}) and not ({' or '.join(NETWORK_TESTS)})"


def case_model(case: str, models: list[str]) -> str | None:
    """The model of a parametrised case id such as ``test_model_forward[1-vig_ti_cifar]``, if it is one of ours,
    wherever it stands among the parameters (``[greedyvig_s-1]`` too); a pretrained tag
    (``test_model_default_cfgs[1-vig_ti_224_gelu.in1k]``, as timm parametrises the tests of tagged models) counts
    for its model."""
    match = re.search(r"\[([^\]]*)\]$", case)
    names = [part.split(".", 1)[0] for part in match.group(1).split("-")] if match else []
    return next((name for name in names if name in models), None)


def problems(outcomes: dict[str, str], models: list[str], skipped: dict[str, str]) -> list[str]:
    """What is wrong with a run's ``outcomes`` on ``models``, given the skip list ``skipped`` (case id -> reason):
    failed cases, skips the list does not name, listed cases of these models that did not skip, and tests of
    `EXPECTED_TESTS` without a case for a model. Empty when the run is as it must be."""
    found = [f"failed: {case}" for case, outcome in sorted(outcomes.items()) if outcome == "failed"]
    found += [f"skipped but not in the skip list: {case}" for case, outcome in sorted(outcomes.items())
              if outcome == "skipped" and case not in skipped]
    found += [f"in the skip list but {outcomes.get(case, 'not collected')}: {case}" for case in sorted(skipped)
              if case_model(case, models) is not None and outcomes.get(case) != "skipped"]
    collected = {(case.split("[")[0], case_model(case, models)) for case in outcomes}
    for model in models:
        non_std = (NON_STD_TEST, model) in collected
        found += [f"not collected: {test} on {model}" for test in EXPECTED_TESTS
                  if (test, model) not in collected and not (non_std and test in NON_STD_REPLACED)]
    return found


def run_suite(tests: Path, models: list[str], report: Path, workers: int = 0,
              timeout: int = 3600) -> tuple[dict[str, str], str]:
    """Run timm's ``test_models.py`` on ``models``; returns ({case id: 'passed' | 'failed' | 'skipped'}, pytest's
    last output line). Cases of other models that the ``-k`` expression catches are left out of the result."""
    path = [str(ROOT), str(PLUGIN_DIR), os.environ.get("PYTHONPATH", "")]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(path), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "pytest", "-q", "-p", "vig", "-p", "vig_timm_skips", "-p", "no:cacheprovider",
               "-o", "addopts=",
               f"--junitxml={report}", "-k", selection(models), str(tests / "test_models.py")]
    if workers:
        command[4:4] = ["-n", str(workers)]
    done = subprocess.run(command, cwd=tests.parent, env=env, capture_output=True, text=True, timeout=timeout)
    lines = [line for line in done.stdout.strip().splitlines() if line.strip()]
    outcomes: dict[str, str] = {}
    if report.exists():
        for case in ET.parse(report).getroot().iter("testcase"):
            name = case.get("name", "")
            if case_model(name, models) is None:
                continue
            failed = case.find("failure") is not None or case.find("error") is not None
            outcomes[name] = "failed" if failed else "skipped" if case.find("skipped") is not None else "passed"
    return outcomes, lines[-1] if lines else done.stderr.strip()[-300:]
