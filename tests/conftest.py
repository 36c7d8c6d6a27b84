"""Test plugins are real distributions, pip-installed once per session (one ``pip install --target``
of all of them, split into one directory per distribution by its RECORD: see session_builds.py).

A test picks which of them are "installed" by putting their directories on ``sys.path``
(``importlib.metadata`` finds their ``.dist-info`` entry points there, exactly as for a
site-packages install), so scenarios combine plugins without uninstalling anything.

Slow session builds start in the background and overlap the collection and the tests before the
first that needs them: the plugins' install at the start of the session, the transformers 4
environment of test_tokenizer.py when a collected test needs it; a build no collected test needs
is stopped when the collection ends.
"""

from __future__ import annotations

import os
import sys
import traceback
import warnings
from dataclasses import dataclass
from pathlib import Path

import pytest

from diffulex_core import plugins as plugins_module
from session_builds import ALL, NEEDED_BY, PLUGIN_DISTS

ENV_VARS = (plugins_module.ENV_ALLOW, plugins_module.ENV_BLOCK, plugins_module.ENV_STRICT)


def pytest_sessionstart(session: pytest.Session) -> None:
    """The test plugins' install starts at once, beside the collection (stopped there if no
    collected test needs it)."""
    PLUGIN_DISTS.start()


def _builds_for(item: pytest.Item):
    return {NEEDED_BY[name] for name in getattr(item, "fixturenames", ()) if name in NEEDED_BY}


def pytest_itemcollected(item: pytest.Item) -> None:
    """The first collected test that needs a build starts it, while the rest is still collected."""
    for build in _builds_for(item):
        build.start()


def pytest_collection_finish(session: pytest.Session) -> None:
    """Builds that only deselected tests needed are stopped."""
    needed = set().union(*map(_builds_for, session.items))
    for build in ALL:
        if build not in needed:
            build.cancel()


def pytest_sessionfinish(session: pytest.Session) -> None:
    for build in ALL:
        build.cancel()


@pytest.fixture(scope="session")
def installed_dists() -> dict[str, Path]:
    """Every distribution under tests/plugin_dists, pip-installed once per test session."""
    return PLUGIN_DISTS.result()


@pytest.fixture
def use_plugins(monkeypatch):
    """``use_plugins("healthy", "typo", DIFFULEX_STRICT_PLUGINS="1")``: install, set env, rediscover.

    ``use_plugins()`` (no names) only rediscovers, without waiting for the test plugins' install."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    before = set(sys.modules)

    def use(*names: str, **env: str):
        dists = PLUGIN_DISTS.result() if names else {}
        for name in names:
            monkeypatch.syspath_prepend(str(dists[name]))
        for key, value in env.items():
            monkeypatch.setenv(key, value)
        plugins_module.reset_plugins()
        return plugins_module

    yield use
    plugins_module.reset_plugins()
    for name in set(sys.modules) - before:
        if name.startswith("diffulex_test_"):
            del sys.modules[name]


@pytest.fixture(scope="session")
def plugin_path():
    """PYTHONPATH for a subprocess that should see the given test plugins."""

    def path(*names: str) -> str:
        dists = PLUGIN_DISTS.result()
        return os.pathsep.join(str(dists[n]) for n in names)

    return path


@dataclass
class CliRun:
    """What a run of the command line left, as ``subprocess.run`` reports it."""

    returncode: int
    stdout: str
    stderr: str


def _fresh_process_warning_filters() -> None:
    """The filters of an interpreter started without -W: shown once per place, deprecations hidden."""
    warnings.resetwarnings()
    warnings.simplefilter("default")
    for category in (DeprecationWarning, PendingDeprecationWarning, ImportWarning, ResourceWarning):
        warnings.filterwarnings("ignore", category=category)


@pytest.fixture
def diffulex_cli(use_plugins, monkeypatch, capsys):
    """``diffulex_cli("plan", DIR, "--json", plugins=("gpt2",), DIFFULEX_STRICT_PLUGINS="1")``: the
    ``diffulex`` command line run in this process, ``diffulex_core.tools.cli.main(argv)``, as
    ``python -m diffulex_core ARGS`` runs it: no DIFFULEX_ variable but those given, discovery anew
    with the named test plugins installed, its exit status, stdout and stderr (warnings printed
    there as an interpreter prints them, an exception that escapes ``main`` as its traceback and
    status 1). One subprocess per command (test_cli.py, test_check.py, test_demo.py) checks the
    real process."""
    from diffulex_core.tools.cli import main

    def run(*args: str, plugins: tuple[str, ...] = (), **env: str) -> CliRun:
        for key in [k for k in os.environ if k.startswith("DIFFULEX_")]:
            monkeypatch.delenv(key)
        use_plugins(*plugins, **env)
        capsys.readouterr()  # what the test printed before is not the command's
        with warnings.catch_warnings(record=True) as caught:
            _fresh_process_warning_filters()
            try:
                code = main(list(args))
            except SystemExit as exc:  # argparse
                code = exc.code if isinstance(exc.code, int) else 1
            except Exception:  # what the interpreter would print
                print(traceback.format_exc(), end="", file=sys.stderr)
                code = 1
        out, err = capsys.readouterr()
        err += "".join(warnings.formatwarning(w.message, w.category, w.filename, w.lineno, w.line) for w in caught)
        return CliRun(code, out, err)

    return run
