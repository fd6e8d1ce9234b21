"""The development material in ../shared (fixtures, CIFAR-10 images), for tests that need it."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

SHARED = Path(__file__).resolve().parents[1].parent / "shared"


def shared_path(*parts: str) -> Path:
    """``../shared/<parts>``; skips the test when absent (a user's clone), fails it when CI == 'true'."""
    path = SHARED.joinpath(*parts)
    if not path.exists():
        message = f"{path} not found: ../shared (the development fixtures) is not next to this clone"
        if os.environ.get("CI") == "true":
            pytest.fail(message)
        pytest.skip(message)
    return path
