"""The three layers import one way (project issue #13): gcn_lib <- models (vig) <- trainer (vig.trainer) <- tools;
inside the trainer, modules import one another without a circle.

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


def _project_module(module: str) -> bool:
    return layer_of(module) is not None


def private_imports(path: Path) -> list[str]:
    """``from <project module> import _name`` in ``path`` (relative imports resolved), as 'module._name'."""
    package = module_name(path) if path.name == "__init__.py" else module_name(path).rpartition(".")[0]
    found = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")[: len(package.split(".")) - node.level + 1] if node.level else []
            source = ".".join([*base, node.module] if node.module else base)
            found += [f"{source}.{alias.name}" for alias in node.names
                      if alias.name.startswith("_") and not alias.name.startswith("__") and _project_module(source)]
    return found


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_module_imports_another_modules_private_names(path: Path) -> None:
    """What two modules share is public (e.g. `vig.models.vig_blocks` for the isotropic and pyramid ViG), so a
    module's underscore names stay its own (project issue #23)."""
    assert not private_imports(path), f"{module_name(path)} imports private names: {private_imports(path)}"


def test_isotropic_and_pyramid_vig_share_a_base_instead_of_each_other() -> None:
    """The pyramid model neither imports the isotropic module nor skips a constructor (``nn.Module.__init__(self)``):
    both build on `VisionGNNBase` through ``super().__init__``."""
    from vig.models import PyramidVisionGNN, VisionGNN
    from vig.models.vig_blocks import VisionGNNBase

    assert issubclass(VisionGNN, VisionGNNBase) and issubclass(PyramidVisionGNN, VisionGNNBase)
    assert not issubclass(PyramidVisionGNN, VisionGNN) and not issubclass(VisionGNN, PyramidVisionGNN)
    for own, other in (("pyramid", "isotropic"), ("isotropic", "pyramid")):
        path = ROOT / "vig" / "models" / f"{own}.py"
        assert not any(name.startswith(f"vig.models.{other}") for name in imported_modules(path)), own
        tree = ast.parse(path.read_text(encoding="utf-8"))
        skipped = [node.lineno for node in ast.walk(tree) if isinstance(node, ast.Call)
                   and isinstance(node.func, ast.Attribute) and node.func.attr == "__init__"
                   and not (isinstance(node.func.value, ast.Call)
                            and getattr(node.func.value.func, "id", "") == "super")]
        assert not skipped, f"{own}.py calls a constructor other than super().__init__ at lines {skipped}"


def module_name_lookups(path: Path) -> list[int]:
    """Lines of ``path`` that call ``list_models(..., module=...)`` (timm's registry searched by module name)."""
    return [node.lineno for node in ast.walk(ast.parse(path.read_text(encoding="utf-8")))
            if isinstance(node, ast.Call) and (getattr(node.func, "attr", None) or getattr(node.func, "id", None))
            == "list_models" and any(keyword.arg == "module" for keyword in node.keywords)]


@pytest.mark.parametrize("path", SOURCES, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_module_detects_a_model_family_by_its_module_name(path: Path) -> None:
    """Models tell the trainer what they need through `vig.models.training_api` (project issue #23), not through
    the registry module they live in."""
    lines = module_name_lookups(path)
    assert not lines, f"{module_name(path)} looks models up by module: lines {lines}"


TRAINER = sorted((ROOT / "vig" / "trainer").glob("*.py"))


def trainer_imports() -> dict[str, set[str]]:
    """The modules of vig.trainer each of its modules imports (any import: module level, in a function, or
    under TYPE_CHECKING; ``from vig.trainer.x import name`` counts as importing vig.trainer.x)."""
    modules = {module_name(path) for path in TRAINER}
    return {module_name(path): {name for name in imported_modules(path) if name in modules} - {module_name(path)}
            for path in TRAINER}


def import_circle(graph: dict[str, set[str]]) -> list[str]:
    """One circle of imports in ``graph`` (module -> the modules it imports), as the list of its modules with
    the first repeated at the end; [] when there is none."""
    state: dict[str, str] = {}
    path: list[str] = []

    def visit(module: str) -> list[str]:
        state[module] = "open"
        path.append(module)
        for imported in sorted(graph[module]):
            if state.get(imported) == "open":
                return path[path.index(imported):] + [imported]
            if imported not in state:
                found = visit(imported)
                if found:
                    return found
        state[module] = "done"
        path.pop()
        return []

    for module in sorted(graph):
        if module not in state:
            found = visit(module)
            if found:
                return found
    return []


def test_import_circle_finder_finds_a_circle_and_accepts_a_tree() -> None:
    assert import_circle({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == ["a", "b", "c", "a"]
    assert import_circle({"a": {"b", "c"}, "b": {"c"}, "c": set()}) == []


def test_no_import_circle_inside_the_trainer() -> None:
    """Modules of vig.trainer import one another one way (the config does not import what it configures)."""
    circle = import_circle(trainer_imports())
    assert not circle, f"import circle inside vig.trainer: {' -> '.join(circle)}"


MODEL_FILES = sorted(path for path in (ROOT / "vig" / "models").glob("*.py") if "@register_model" in path.read_text())


def test_the_model_files_are_found() -> None:
    assert {path.stem for path in MODEL_FILES} >= {"isotropic", "pyramid", "mobilevig", "greedyvig", "cifar_gat",
                                                   "convmixer_cifar", "batch_graph"}


@pytest.mark.parametrize("path", MODEL_FILES, ids=lambda path: path.stem)
def test_no_model_file_imports_another_model_file(path: Path) -> None:
    """Each model family is one file built from the shared blocks (`vig.models.vig_blocks`, `vig.models.features`);
    what two families share lives there, never in one of them."""
    others = {module_name(other) for other in MODEL_FILES if other != path}
    imported = sorted(name for name in imported_modules(path)
                      if any(name == other or name.startswith(other + ".") for other in others))
    assert not imported, f"{path.stem} imports another model file: {imported}"
