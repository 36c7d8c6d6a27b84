"""diffulex_core's modules import one another one way: no cycle, even through imports deferred
into functions (a deferred import hides a cycle from Python but not from a reader); its layers
(subpackages) too; no module imports another's ``_private`` name; only the kit imports the kit."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PACKAGE = ROOT / "diffulex_core"
PLUGIN_PACKAGES = sorted(p for p in (ROOT / "plugins").glob("*/diffulex_*") if (p / "__init__.py").exists())


def module_name(path: Path, package: Path) -> str:
    parts = path.relative_to(package.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def modules_of(package: Path) -> dict[str, Path]:
    return {module_name(p, package): p for p in sorted(package.rglob("*.py"))}


def absolute(node: ast.ImportFrom, importer: str, is_package: bool) -> str:
    """The module an ``ImportFrom`` names, relative imports resolved against ``importer``."""
    if not node.level:
        return node.module or ""
    base = importer.split(".")
    base = base if is_package else base[:-1]
    base = base[: len(base) - (node.level - 1)]
    return ".".join(base + ([node.module] if node.module else []))


def imported_names(path: Path, importer: str) -> list[tuple[str, str | None]]:
    """``(module, name)`` for every import at any depth of the module's code (name None: ``import m``)."""
    found = []
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            module = absolute(node, importer, path.name == "__init__.py")
            found.extend((module, a.name) for a in node.names)
        elif isinstance(node, ast.Import):
            found.extend((a.name, None) for a in node.names)
    return found


def imports_of(path: Path, importer: str, known: set[str]) -> set[str]:
    """The known modules a module imports (``from pkg import mod`` counts as importing ``pkg.mod``)."""
    found = set()
    for module, name in imported_names(path, importer):
        if name and f"{module}.{name}" in known:
            found.add(f"{module}.{name}")
        elif module in known:
            found.add(module)
    return found - {importer}


def graph_of(package: Path) -> dict[str, set[str]]:
    modules = modules_of(package)
    return {name: imports_of(path, name, set(modules)) for name, path in modules.items()}


def layer(module: str) -> str:
    """A subpackage, or a top-level module: the unit the layering is drawn in."""
    parts = module.split(".")
    return ".".join(parts[:2])


def find_cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, str] = {}

    def visit(node: str, path: list[str]) -> list[str] | None:
        state[node] = "open"
        for dep in sorted(graph.get(node, ())):
            if state.get(dep) == "open":
                return path[path.index(dep):] + [dep]
            if dep not in state and (cycle := visit(dep, path + [dep])):
                return cycle
        state[node] = "done"
        return None

    for node in sorted(graph):
        if node not in state and (cycle := visit(node, [node])):
            return cycle
    return None


def test_no_module_imports_back_a_module_that_imports_it():
    graph = graph_of(PACKAGE)
    assert graph["diffulex_core.registry"] >= {"diffulex_core.plugins"}
    assert "diffulex_core.tokenizer" not in graph["diffulex_core.plugins.builtin_fixups"]
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


# Subpackages ordered from the top: a layer may import only layers after it. Top-level modules not
# named here are the public surface and may import any layer.
LAYERS = [
    "diffulex_core.tools",
    "diffulex_core.lora",
    "diffulex_core.loading",
    "diffulex_core.io",
    "diffulex_core.files",
    "diffulex_core.generation",
    "diffulex_core.plugins",
]


def test_layers_import_downwards_only():
    upward = []
    for module, deps in graph_of(PACKAGE).items():
        if layer(module) not in LAYERS:
            continue
        rank = LAYERS.index(layer(module))
        upward += [f"{module} -> {dep}" for dep in deps if layer(dep) in LAYERS and LAYERS.index(layer(dep)) < rank]
    assert upward == []


def test_only_the_kit_imports_the_kit():
    graph = graph_of(PACKAGE)
    users = sorted(m for m, deps in graph.items() if layer(m) != "diffulex_core.testing"
                   and any(layer(d) == "diffulex_core.testing" for d in deps))
    assert users == []


def is_private(name: str) -> bool:
    return name.startswith("_") and not (name.startswith("__") and name.endswith("__"))


@pytest.mark.parametrize("package", [PACKAGE, *PLUGIN_PACKAGES], ids=lambda p: p.name)
def test_no_module_imports_a_private_name_of_another(package):
    private = []
    for name, path in modules_of(package).items():
        for module, imported in imported_names(path, name):
            dotted = f"{module}.{imported}" if imported else module
            if module.split(".")[0] == package.name and any(is_private(part) for part in dotted.split(".")[1:]):
                private.append(f"{name} imports {dotted}")
    assert private == []


def test_diffulex_layers_has_no_import_circle():
    layers = next(p for p in PLUGIN_PACKAGES if p.name == "diffulex_layers")
    graph = graph_of(layers)
    assert find_cycle(graph) is None, " -> ".join(find_cycle(graph))


def test_the_cycle_finder_finds_cycles():
    assert find_cycle({"a": {"b"}, "b": {"c"}, "c": {"a"}}) == ["a", "b", "c", "a"]
    assert find_cycle({"a": {"b"}, "b": set()}) is None


def test_private_imports_are_seen_through_relative_and_deferred_imports(tmp_path):
    package = tmp_path / "pkg"
    package.mkdir()
    (package / "__init__.py").write_text("")
    (package / "a.py").write_text("def f():\n    from .b import _hidden\n")
    (package / "b.py").write_text("_hidden = 1\n")
    assert imported_names(package / "a.py", "pkg.a") == [("pkg.b", "_hidden")]
    assert graph_of(package) == {"pkg": set(), "pkg.a": {"pkg.b"}, "pkg.b": set()}
