"""The development material in ../shared (fixtures, CIFAR-10 images) and the optional test libraries, for tests
that need them: absent, they skip the test in a user's clone and fail it under CI=true."""
from __future__ import annotations

import importlib
import os
from pathlib import Path
from types import ModuleType

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


def import_or_skip(name: str) -> ModuleType:
    """The module ``name``; skips the test when it is not installed, fails it when CI == 'true' (where the
    test extras are installed, a missing one is a broken environment, not a reason to test less)."""
    try:
        return importlib.import_module(name)
    except ImportError as err:
        message = f"{name} is not installed ({err}); pip install -e '.[test]'"
        if os.environ.get("CI") == "true":
            pytest.fail(message, pytrace=False)
        pytest.skip(message, allow_module_level=True)
        raise  # unreachable: pytest.skip raises
