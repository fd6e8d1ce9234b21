"""pytest plugin for the run of timm's ``test_models.py`` on this project's models (loaded by ``tests/timm_suite.py``).

- It puts this project's model modules into timm's ``FEAT_INTER_FILTERS``, the list of modules whose models
  ``test_models.py`` holds to the feature API (``test_model_forward_intermediates``,
  ``test_model_forward_intermediates_features``, ``test_prune_intermediate_layers_contract``), as if the models lived
  in timm. The test module builds its parameter lists with ``list_models(module=FEAT_INTER_FILTERS)`` while it is
  imported, so the plugin wraps ``timm.list_models``: the first call made from a module that defines
  ``FEAT_INTER_FILTERS`` appends our module names to that very list, and every later call sees them.
- It skips the cases of `SKIPPED`, each with its reason. A case is listed only where the model cannot take the
  test for a reason written next to it; ``tests/test_timm_suite.py`` checks that each reason still holds.
"""
from __future__ import annotations

import functools
import inspect
import pkgutil
from typing import Any, Callable

import pytest
import timm

GAT_SCRIPT = ("torch_geometric's GATConv cannot be compiled by TorchScript (its forward tests an Optional[Tensor] "
              "as a bool), so neither the model nor its fx graph (GATConv is a leaf) can be scripted")
BATCH_MIXING = ("the batch-graph head mixes the images of a batch (each prediction depends on the others), so the "
                "model is no dense per-image backbone: features_only is refused and it has no "
                "prune_intermediate_layers")

FEATURE_FILTER = "FEAT_INTER_FILTERS"  # the name of timm's module list in test_models.py
BATCH_GRAPH_MODELS = ("bgnn", "bgnn_mobilenetv3_small_100")
BATCH_GRAPH_TESTS = ("test_model_forward_features[1-{}]", "test_model_forward_intermediates_features[1-{}]",
                     "test_prune_intermediate_layers_contract[{}]")

# case id -> reason
SKIPPED: dict[str, str] = {
    "test_model_forward_torchscript[1-cnn_gat_cifar]": GAT_SCRIPT,
    "test_model_forward_fx_torchscript[1-cnn_gat_cifar]": GAT_SCRIPT,
    **{case.format(name): BATCH_MIXING for name in BATCH_GRAPH_MODELS for case in BATCH_GRAPH_TESTS},
}


def project_modules() -> list[str]:
    """The modules of ``vig.models`` that register models with timm (timm's names for them: the last part)."""
    import vig.models

    registering = set(timm.list_modules())
    return sorted(info.name for info in pkgutil.iter_modules(vig.models.__path__) if info.name in registering)


def with_project_modules(list_models: Callable[..., list[str]]) -> Callable[..., list[str]]:
    """``list_models`` that first appends `project_modules` to the caller's ``FEAT_INTER_FILTERS`` list, if the
    calling module defines one (timm's test_models.py), once."""

    @functools.wraps(list_models)
    def wrapped(*args: Any, **kwargs: Any) -> list[str]:
        frame = inspect.currentframe()
        caller = frame.f_back.f_globals if frame is not None and frame.f_back is not None else {}
        filters = caller.get(FEATURE_FILTER)
        if isinstance(filters, list):
            filters.extend(name for name in project_modules() if name not in filters)
        return list_models(*args, **kwargs)

    wrapped.__wrapped_for_vig__ = True  # type: ignore[attr-defined]
    return wrapped


def pytest_configure(config: pytest.Config) -> None:
    """Wrap ``timm.list_models`` before pytest imports timm's test module (which binds it by name)."""
    if not getattr(timm.list_models, "__wrapped_for_vig__", False):
        timm.list_models = with_project_modules(timm.list_models)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        reason = SKIPPED.get(item.name)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
