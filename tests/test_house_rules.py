"""The house rules of issue 20, kept: no module over 500 lines, no class over 200, in the core and the
bundled plugins; every core module says what it offers in ``__all__``, names it defines."""

from __future__ import annotations

import ast
import importlib
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SOURCES = sorted([*(ROOT / "diffulex_core").rglob("*.py"), *(ROOT / "plugins").glob("*/diffulex_*/*.py")])
MAX_MODULE_LINES = 500
MAX_CLASS_LINES = 200


def label(path: Path) -> str:
    return str(path.relative_to(ROOT))


@pytest.mark.parametrize("path", SOURCES, ids=label)
def test_modules_and_classes_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= MAX_MODULE_LINES
    large = [f"{node.name}: {node.end_lineno - node.lineno + 1} lines" for node in ast.walk(ast.parse(text))
             if isinstance(node, ast.ClassDef) and node.end_lineno - node.lineno + 1 > MAX_CLASS_LINES]
    assert large == []


CORE_MODULES = sorted(".".join(p.relative_to(ROOT).with_suffix("").parts).removesuffix(".__init__")
                      for p in (ROOT / "diffulex_core").rglob("*.py") if p.name != "__main__.py")


@pytest.mark.parametrize("name", CORE_MODULES)
def test_every_core_module_declares_its_public_names(name):
    module = importlib.import_module(name)
    assert isinstance(getattr(module, "__all__", None), list), f"{name} has no __all__"
    assert [n for n in module.__all__ if not hasattr(module, n)] == []
    assert [n for n in module.__all__ if n.startswith("_") and not n.endswith("__")] == []


def test_the_plugin_api_imports_without_torch_or_discovery_and_holds_what_a_plugin_uses():
    import subprocess
    import sys

    code = ("import sys, diffulex_core.plugin_api as api; "
            "assert 'torch' not in sys.modules and 'diffulex_core.plugins' not in sys.modules, sorted(sys.modules); "
            "names = set(api.__all__); "
            "assert {'hookimpl', 'ResolvedWeight', 'LoadContext', 'WeightDestination', 'CheckpointSlice', "
            "'takes_checkpoint_slices', 'FamilyExample', 'ParallelState', 'current_parallel_state', "
            "'divide'} <= names; "
            "from diffulex_core import hookimpl; from diffulex_core.checkpoint import ResolvedWeight; "
            "from diffulex_core.conformance import FamilyExample; "
            "assert api.hookimpl is hookimpl and api.ResolvedWeight is ResolvedWeight "
            "and api.FamilyExample is FamilyExample; "
            "from diffulex_core.checkpoint_slice import CheckpointSlice; "
            "assert api.CheckpointSlice is CheckpointSlice and 'torch' in sys.modules")
    subprocess.run([sys.executable, "-c", code], check=True)
