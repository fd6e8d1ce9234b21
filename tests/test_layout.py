"""The three layers import one way (project issue #13): gcn_lib <- models (vig) <- trainer (vig.trainer) <- tools.

Every module's imports are read with ``ast`` (module level and inside functions), so a backward import
anywhere fails here.
"""
from __future__ import annotations

import ast
import tomllib
from importlib import import_module
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# layer of each package, lowest first; a module may import its own layer and the ones below it
LAYERS = {"gcn_lib": 0, "vig": 1, "vig.trainer": 2, "vig.tools": 3}


def layer_of(module: str) -> int | None:
    """Layer of a project module name (the longest matching package), None for third-party modules."""
    matches = [package for package in LAYERS if module == package or module.startswith(package + ".")]
    return LAYERS[max(matches, key=len)] if matches else None


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imported_modules(path: Path) -> set[str]:
    """Absolute names of the modules ``path`` imports (relative imports resolved)."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            name = ".".join([*base, node.module] if node.module else base)
            found.add(name)
            found.update(f"{name}.{alias.name}" for alias in node.names)
    return found


SOURCES = sorted(path for package in ("gcn_lib", "vig") for path in (ROOT / package).rglob("*.py"))


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_imports_point_down_the_layers(path: Path) -> None:
    own = layer_of(module_name(path))
    backward = sorted(name for name in imported_modules(path) if (layer_of(name) or 0) > own
                      and import_module_exists(name))
    assert not backward, f"{module_name(path)} (layer {own}) imports a higher layer: {backward}"


def import_module_exists(name: str) -> bool:
    """True for a module (not a name imported from one) of the project."""
    return (ROOT / Path(*name.split("."))).with_suffix(".py").is_file() or (ROOT / Path(*name.split("."))).is_dir()


def test_every_file_has_a_layer() -> None:
    assert all(layer_of(module_name(path)) is not None for path in SOURCES)
    assert {layer_of(module_name(path)) for path in SOURCES} == set(LAYERS.values())


def test_console_scripts_name_real_entry_points() -> None:
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert set(scripts) == {"vig-macs", "vig-benchmark", "vig-visualize", "vig-plot", "vig-make-shards",
                            "vig-export"}
    for target in scripts.values():
        module, _, function = target.partition(":")
        assert layer_of(module) == LAYERS["vig.tools"] and callable(getattr(import_module(module), function))
