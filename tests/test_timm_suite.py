"""timm's own model test suite passes on one model of each model class (the peer's tests, not our idea of them).

The suite is ``tests/test_models.py`` of the installed timm's sdist, fetched with pip and cached under pytest's
temporary folder; its network tests (downloads of the pretrained tags) are not selected: ``tests/test_pretrained.py``
covers our tags' downloads without a network. Our model modules are added to timm's feature-API module filter
(``FEAT_INTER_FILTERS``), so the forward_intermediates / features_only / prune contract tests run on them as on
timm's own models. Every case must pass but those of ``tests/timm_plugin/vig_timm_skips.py``'s ``SKIPPED``, skipped
with their reason; a skip the list does not name, or a test of ``tests.timm_suite.EXPECTED_TESTS`` that did not run
on a model, fails the test. Without a network or the sdist the test fails in CI (``CI=true``) and skips elsewhere.
``benchmarks/timm_suite.py`` runs the same suite on every registered model.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import timm
import torch

import vig  # noqa: F401  (registers the models)
from tests.timm_plugin.vig_timm_skips import BATCH_MIXING, GAT_SCRIPT, SKIPPED
from tests.timm_suite import EXPECTED_TESTS, SuiteUnavailable, case_model, fetch_timm_tests, problems, run_suite

pytestmark = pytest.mark.slow

# one model of each model class (and graph rule): isotropic kNN and threshold, pyramid, the CIFAR GAT,
# ConvMixer, the batch-graph head, MobileViG and GreedyViG
MODELS = ["vig_ti_cifar", "svig_ti_cifar", "pvig_ti_cifar", "cnn_gat_cifar", "convmixer_cifar",
          "bgnn_mobilenetv3_small_100", "mobilevig_ti", "greedyvig_s"]


@pytest.fixture(scope="module")
def timm_tests(tmp_path_factory: pytest.TempPathFactory) -> Path:
    try:
        return fetch_timm_tests(tmp_path_factory.getbasetemp() / "timm-sdist")
    except SuiteUnavailable as err:
        if os.environ.get("CI") == "true":
            pytest.fail(f"{err}: CI must run timm's own model tests")
        pytest.skip(f"{err} (network needed for timm's sdist)")


def test_timm_model_suite_passes_on_one_model_per_class(timm_tests: Path, tmp_path: Path) -> None:
    outcomes, last_line = run_suite(timm_tests, MODELS, tmp_path / "report.xml", timeout=1800)
    assert outcomes, f"no case of timm's suite ran on {MODELS}: {last_line}"
    wrong = problems(outcomes, MODELS, SKIPPED)
    assert not wrong, f"timm's suite: {len(wrong)} problems: {wrong} ({last_line})"


def test_skipped_cases_still_need_skipping() -> None:
    """The two reasons a case is skipped still hold: when a torch_geometric release makes GATConv scriptable, or the
    batch-graph model takes features_only, this fails and the skips must go."""
    pytest.importorskip("torch_geometric")
    assert set(SKIPPED.values()) == {GAT_SCRIPT, BATCH_MIXING}
    gat = timm.create_model("cnn_gat_cifar").input_layer
    with pytest.raises(RuntimeError):
        torch.jit.script(gat)
    model = timm.create_model("bgnn_mobilenetv3_small_100", edge_features=8)
    assert not hasattr(model, "prune_intermediate_layers")
    with pytest.raises(ValueError, match="features_only is not supported"):
        timm.create_model("bgnn_mobilenetv3_small_100", features_only=True)


def test_the_judge_fails_unlisted_skips_listed_cases_that_ran_and_missing_tests() -> None:
    """`problems` on made-up outcomes: what counted failures only before (a case that starts skipping, a listed skip
    that runs, a test no longer collected for a model) is each named."""
    model = "vig_ti_cifar"
    outcomes = {f"{test}[1-{model}]": "passed" for test in EXPECTED_TESTS}
    assert problems(outcomes, [model], {}) == []
    skipping = {**outcomes, f"test_model_forward[1-{model}]": "skipped"}
    assert problems(skipping, [model], {}) == [f"skipped but not in the skip list: test_model_forward[1-{model}]"]
    assert problems(skipping, [model], {f"test_model_forward[1-{model}]": "a reason"}) == []
    assert problems(outcomes, [model], {f"test_model_forward[1-{model}]": "a reason"}) == [
        f"in the skip list but passed: test_model_forward[1-{model}]"]
    missing = {case: outcome for case, outcome in outcomes.items() if not case.startswith("test_prune")}
    assert problems(missing, [model], {}) == [f"not collected: test_prune_intermediate_layers_contract on {model}"]
    tagged = {(f"{case[:-1]}.in1k]" if case.startswith("test_model_default_cfgs") else case): outcome
              for case, outcome in outcomes.items()}  # timm's ids for a model with pretrained tags
    assert problems(tagged, [model], {}) == []
    failing = {**outcomes, f"test_model_backward[1-{model}]": "failed"}
    assert problems(failing, [model], {}) == [f"failed: test_model_backward[1-{model}]"]
    assert case_model(f"test_model_forward_intermediates[{model}-1]", [model]) == model  # model first in the id
    assert case_model("test_model_forward[1-resnet18]", [model]) is None
