"""Under CI=true a missing test library fails its tests instead of skipping them (tests.shared_files); in a
user's clone they skip. Checked by running the test modules with the library made unimportable."""
from __future__ import annotations

import os
import subprocess
import sys

import pytest

from tests.train_helpers import REPO_ROOT

# pytest run in a child whose import of the library fails (a None entry in sys.modules raises ImportError)
RUNNER = "import sys; sys.modules[sys.argv[1]] = None; import pytest; sys.exit(pytest.main(sys.argv[2:]))"


EXPORT = ["tests/test_export.py", "-k", "vig_ti_cifar"]
HFDS = ["tests/test_train_sources.py", "-k", "hfds_train_then_evaluate"]


@pytest.mark.slow
@pytest.mark.parametrize(("library", "selection", "ci"), [
    ("onnxruntime", EXPORT, True), ("onnxscript", EXPORT, True), ("datasets", HFDS, True),
    ("onnxruntime", EXPORT, False), ("datasets", HFDS, False),
])
def test_a_missing_test_library_fails_under_ci(library: str, selection: list[str], ci: bool) -> None:
    env = {key: value for key, value in os.environ.items() if key != "CI"}
    if ci:
        env["CI"] = "true"
    result = subprocess.run([sys.executable, "-c", RUNNER, library, *selection, "-q", "-p", "no:cacheprovider",
                             "-p", "no:xdist", "-rs"], cwd=REPO_ROOT, env=env, capture_output=True, text=True,
                            timeout=300)
    output = result.stdout + result.stderr
    assert f"{library} is not installed" in output, output[-3000:]
    if ci:
        assert result.returncode != 0 and "skipped" not in output.splitlines()[-1], output[-3000:]
    else:
        # 5: pytest's "no tests collected" (the module skipped as a whole)
        assert result.returncode in (0, 5) and "skipped" in output.splitlines()[-1], output[-3000:]
