"""pytest plugin for the run of timm's ``test_models.py`` on this project's models (loaded by ``tests/timm_suite.py``):
skips the cases of `SKIPPED`, each with its reason. A case is listed only where a third-party layer, not this
project's code, cannot take the test; ``tests/test_timm_suite.py`` checks that each reason still holds.
"""
from __future__ import annotations

import pytest

GAT_SCRIPT = ("torch_geometric's GATConv cannot be compiled by TorchScript (its forward tests an Optional[Tensor] "
              "as a bool), so neither the model nor its fx graph (GATConv is a leaf) can be scripted")

# case id -> reason
SKIPPED: dict[str, str] = {
    "test_model_forward_torchscript[1-cnn_gat_cifar]": GAT_SCRIPT,
    "test_model_forward_fx_torchscript[1-cnn_gat_cifar]": GAT_SCRIPT,
}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        reason = SKIPPED.get(item.name)
        if reason is not None:
            item.add_marker(pytest.mark.skip(reason=reason))
