"""Test plugins are real distributions, installed by pip into one target directory each.

A test picks which of them are "installed" by putting their directories on ``sys.path``
(``importlib.metadata`` finds their ``.dist-info`` entry points there, exactly as for a
site-packages install), so scenarios combine plugins without uninstalling anything.
"""

from __future__ import annotations

import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from diffulex_core import plugins as plugins_module

DISTS = Path(__file__).parent / "plugin_dists"
ENV_VARS = (plugins_module.ENV_ALLOW, plugins_module.ENV_BLOCK, plugins_module.ENV_STRICT)


def _pip_install(source: Path, target: Path) -> Path:
    subprocess.run(
        [sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "--no-build-isolation",
         "--no-index", "--target", str(target), str(source)],
        check=True, capture_output=True, text=True,
    )
    return target


@pytest.fixture(scope="session")
def installed_dists(tmp_path_factory) -> dict[str, Path]:
    """Every distribution under tests/plugin_dists, pip-installed once per test session."""
    root = tmp_path_factory.mktemp("plugin_dists")
    sources = sorted(p for p in DISTS.iterdir() if (p / "pyproject.toml").exists())
    with ThreadPoolExecutor(max_workers=4) as pool:
        targets = pool.map(lambda s: _pip_install(s, root / s.name), sources)
    return {s.name.removeprefix("diffulex-test-").replace("-", "_"): t for s, t in zip(sources, targets)}


@pytest.fixture
def use_plugins(installed_dists, monkeypatch):
    """``use_plugins("healthy", "typo", DIFFULEX_STRICT_PLUGINS="1")``: install, set env, rediscover."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    before = set(sys.modules)

    def use(*names: str, **env: str):
        for name in names:
            monkeypatch.syspath_prepend(str(installed_dists[name]))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugins_module.reset_plugins()
        return plugins_module

    yield use
    plugins_module.reset_plugins()
    for name in set(sys.modules) - before:
        if name.startswith("diffulex_test_"):
            del sys.modules[name]


@pytest.fixture
def plugin_path(installed_dists):
    """PYTHONPATH for a subprocess that should see the given test plugins."""

    def path(*names: str) -> str:
        return os.pathsep.join(str(installed_dists[n]) for n in names)

    return path
