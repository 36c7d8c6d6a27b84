"""Slow things a test session needs, each built once and started in the background as soon as the
collected tests show they are needed (``pytest_collection_finish`` in conftest.py), so that they
overlap the tests that run first; the fixtures that need them wait for them.

- ``PLUGIN_DISTS``: the test plugin distributions (tests/plugin_dists/*), real pip installs: ONE
  ``pip install --target`` of all of them, then each distribution's files (as its
  ``.dist-info/RECORD`` lists them) moved into a directory of its own, so that a test picks plugins
  per directory on ``sys.path`` (``importlib.metadata`` finds their entry points there, exactly as
  in a site-packages).
- ``TRANSFORMERS4``: a virtual environment with transformers 4.57 and diffulex-core (editable, no
  torch), ``.venv-transformers4`` at the repository root; kept between sessions and rebuilt when its
  marker names another transformers or checkout. A lock file keeps two sessions from building it
  at once.
"""

from __future__ import annotations

import csv
import fcntl
import hashlib
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import venv
from contextlib import contextmanager
from pathlib import Path, PurePosixPath
from typing import Callable

TESTS = Path(__file__).resolve().parent
ROOT = TESTS.parent
DISTS = TESTS / "plugin_dists"
TRANSFORMERS4_SPEC = "transformers==4.57.6"
COMPAT_VENV = ROOT / ".venv-transformers4"


class Cancelled(Exception):
    """The session ended before the build finished."""


class Background:
    """``fn()`` run once in a daemon thread: ``start()`` begins it, ``result()`` starts it if need be
    and waits for its value (or re-raises its exception), ``cancel()`` stops its subprocess."""

    def __init__(self, name: str, fn: Callable[[Background], object]) -> None:
        self.name, self._fn = name, fn
        self._lock = threading.Lock()
        self._thread: threading.Thread | None = None
        self._done = threading.Event()
        self._value: object = None
        self._error: BaseException | None = None
        self._proc: subprocess.Popen | None = None
        self.cancelled = False
        self.cleanup: list[Callable[[], None]] = []

    def start(self) -> None:
        with self._lock:
            if self._thread is None:
                self._thread = threading.Thread(target=self._run, name=f"session-build-{self.name}", daemon=True)
                self._thread.start()

    def _run(self) -> None:
        try:
            self._value = self._fn(self)
        except BaseException as exc:  # handed to whoever waits for the result
            self._error = exc
        finally:
            self._done.set()

    def result(self):
        self.start()
        self._done.wait()
        if self._error is not None:
            raise RuntimeError(f"{self.name} could not be built: {self._error}") from self._error
        return self._value

    def run(self, cmd: list[str], *, timeout: float, what: str) -> None:
        """A subprocess of this build, output captured (it never lands in a test's output)."""
        if self.cancelled:
            raise Cancelled(what)
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                text=True, start_new_session=True)  # its own process group: cancel stops all of it
        self._proc = proc
        try:
            out, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            out, _ = proc.communicate()
            raise RuntimeError(f"{what} ran past {timeout} s:\n{out[-6000:]}") from None
        finally:
            self._proc = None
        if self.cancelled:
            raise Cancelled(what)
        if proc.returncode:
            raise RuntimeError(f"{what} exited with {proc.returncode}:\n{out[-6000:]}")

    def cancel(self) -> None:
        """At the end of the session: stop a build still running, wait for its thread, clean up."""
        self.cancelled = True
        proc = self._proc
        if proc is not None and proc.poll() is None:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # pip and the build backend it runs
            except ProcessLookupError:
                pass
        if self._thread is not None:
            self._thread.join(timeout=60)
        for step in self.cleanup:
            step()


# --------------------------------------------------------------------------- the test plugin distributions


def _canonical(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _project_name(dist_info: Path) -> str:
    for line in (dist_info / "METADATA").read_text().splitlines():
        if line.startswith("Name:"):
            return line.split(":", 1)[1].strip()
    raise RuntimeError(f"{dist_info}/METADATA names no project")


def dist_key(source: Path) -> str:
    """``diffulex-test-check-badhook`` -> ``check_badhook``: the name tests use."""
    return source.name.removeprefix("diffulex-test-").replace("-", "_")


def split_by_record(staging: Path, root: Path, sources: list[Path]) -> dict[str, Path]:
    """Move each distribution's installed files (its RECORD) from ``staging`` into ``root/<source
    directory name>``; every file pip installed belongs to exactly one distribution."""
    wanted = {_canonical(s.name): s for s in sources}
    dirs: dict[str, Path] = {}
    for dist_info in sorted(staging.glob("*.dist-info")):
        project = _canonical(_project_name(dist_info))
        if project not in wanted:
            raise RuntimeError(f"pip installed {dist_info.name}, which no directory of {DISTS} is")
        source = wanted.pop(project)
        target = root / source.name
        with (dist_info / "RECORD").open(newline="") as record:
            rows = [row for row in csv.reader(record) if row]
        for row in rows:
            relative = PurePosixPath(row[0])
            if relative.is_absolute() or ".." in relative.parts:
                raise RuntimeError(f"{dist_info.name}/RECORD lists {row[0]!r}, outside the install directory")
            destination = target.joinpath(*relative.parts)
            destination.parent.mkdir(parents=True, exist_ok=True)
            staging.joinpath(*relative.parts).rename(destination)
        dirs[dist_key(source)] = target
    if wanted:
        raise RuntimeError(f"pip installed no distribution for {sorted(wanted)}")
    stray = sorted(str(p.relative_to(staging)) for p in staging.rglob("*") if not p.is_dir())
    if stray:
        raise RuntimeError(f"files no RECORD lists were installed: {stray}")
    shutil.rmtree(staging)
    return dirs


def _install_plugin_dists(build: Background) -> dict[str, Path]:
    root = Path(tempfile.mkdtemp(prefix="diffulex-plugin-dists-"))
    build.cleanup.append(lambda: shutil.rmtree(root, ignore_errors=True))
    sources = sorted(p for p in DISTS.iterdir() if (p / "pyproject.toml").exists())
    staging = root / "pip-target"
    build.run([sys.executable, "-m", "pip", "install", "--quiet", "--disable-pip-version-check", "--no-deps",
               "--no-build-isolation", "--no-index", "--target", str(staging), *map(str, sources)],
              timeout=600, what=f"pip install --target of the {len(sources)} test plugin distributions")
    return split_by_record(staging, root, sources)


PLUGIN_DISTS = Background("the test plugin distributions", _install_plugin_dists)


# --------------------------------------------------------------------------- the transformers 4 environment


@contextmanager
def _exclusive(path: Path):
    """One session at a time builds (or checks) ``path``."""
    digest = hashlib.sha1(str(path).encode()).hexdigest()[:12]
    with open(Path(tempfile.gettempdir()) / f"diffulex-build-{digest}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _build_transformers4(build: Background) -> str:
    python = COMPAT_VENV / "bin" / "python"
    marker = COMPAT_VENV / "diffulex-compat.txt"
    wanted = f"{TRANSFORMERS4_SPEC}\n{ROOT}\n"
    with _exclusive(COMPAT_VENV):
        if python.exists() and marker.exists() and marker.read_text() == wanted:
            return str(python)
        if build.cancelled:
            raise Cancelled("creating the virtual environment")
        venv.create(COMPAT_VENV, with_pip=True, clear=True)
        pip = [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check"]
        build.run([*pip, TRANSFORMERS4_SPEC, "pluggy"], timeout=900, what=f"pip install {TRANSFORMERS4_SPEC}")
        build.run([*pip, "--no-deps", "-e", str(ROOT)], timeout=300, what="pip install -e (diffulex-core)")
        marker.write_text(wanted)
    return str(python)


TRANSFORMERS4 = Background(f"the {TRANSFORMERS4_SPEC} environment ({COMPAT_VENV.name})", _build_transformers4)

# which fixture needs which build: conftest.py starts a build when a collected test uses one of them
NEEDED_BY = {"installed_dists": PLUGIN_DISTS, "use_plugins": PLUGIN_DISTS, "plugin_path": PLUGIN_DISTS,
             "python4": TRANSFORMERS4}
ALL = (PLUGIN_DISTS, TRANSFORMERS4)
