"""The guides' code runs, so it cannot rot.

- docs/integrating.md and docs/parallel.md: each guide's python blocks run in order in one
  namespace, in a subprocess, in an empty working directory; ``# file:`` blocks are written there
  and ``bash`` blocks run there (the test environment's ``bin`` first on PATH, so ``torchrun``
  launches real processes: gloo on the CPU), all in document order.
- docs/writing-a-plugin.md, as a new user: every ``# file:`` block is written into an empty
  directory, a new virtual environment sees this one's packages (torch, ...) and gets
  diffulex-core installed into it (editable, offline), and the guide's bash blocks run there in
  order; then ``diffulex check tinylm --json`` must pass, and the plugin's tests must have run
  against the kit's fixtures. Nothing is installed into the environment running these tests.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import sysconfig
import xml.etree.ElementTree as ET
from pathlib import Path

from guide_blocks import Block, read_blocks

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
DRIVER = Path(__file__).resolve().with_name("guide_driver.py")
THIS_BIN = Path(sys.executable).parent  # the test environment's bin (torchrun, diffulex, ...)


def _guide(name: str) -> list[Block]:
    return read_blocks(DOCS / name, label=f"docs/{name}")


def _clean_env(path_first: Path, drop_bin: Path | None = None) -> dict[str, str]:
    """The caller's environment without settings that would change what the guide sees."""
    env = {k: v for k, v in os.environ.items()
           if not k.startswith(("DIFFULEX_", "PYTEST_", "PIP_", "VIRTUAL_ENV", "PYTHONPATH", "PYTHONHOME"))}
    rest = [p for p in env.get("PATH", "/usr/bin:/bin").split(os.pathsep)
            if p and (drop_bin is None or Path(p).resolve() != drop_bin.resolve())]
    env["PATH"] = os.pathsep.join([str(path_first), *rest])
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env["HF_HUB_OFFLINE"] = "1"  # the guides load local files only; never wait on the network
    return env


def _run(cmd: list[str], *, cwd: Path, env: dict[str, str], timeout: float, what: str) -> str:
    try:
        done = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        out = (exc.stdout or b"").decode(errors="replace") if isinstance(exc.stdout, bytes) else exc.stdout or ""
        err = (exc.stderr or b"").decode(errors="replace") if isinstance(exc.stderr, bytes) else exc.stderr or ""
        raise AssertionError(f"{what} ran past {timeout} s\n--- stdout\n{out[-6000:]}\n"
                             f"--- stderr\n{err[-6000:]}") from None
    assert done.returncode == 0, (f"{what} exited with {done.returncode}\n--- stdout\n{done.stdout[-8000:]}"
                                  f"\n--- stderr\n{done.stderr[-8000:]}")
    return done.stdout


# --------------------------------------------------------------------------- guides run in one session


def _steps(name: str, bash_timeout: float = 120) -> list[dict]:
    """The guide's blocks as guide_driver.py steps, in document order."""
    steps = []
    for block in _guide(name):
        if block.file is not None:
            steps.append({"kind": "file", "path": block.file, "text": block.text})
        elif block.lang == "python":
            steps.append({"kind": "python", "text": block.text, "source": block.source, "line": block.line})
        elif block.lang == "bash":
            steps.append({"kind": "bash", "text": block.text, "source": block.source, "line": block.line,
                          "timeout": bash_timeout})
    return steps


def _run_steps(name: str, steps: list[dict], tmp_path: Path, timeout: float) -> str:
    work = tmp_path / "work"
    work.mkdir()
    steps_file = tmp_path / "steps.json"
    steps_file.write_text(json.dumps(steps))
    return _run([sys.executable, str(DRIVER), str(steps_file)], cwd=work, env=_clean_env(THIS_BIN),
                timeout=timeout, what=f"the blocks of docs/{name}")


def test_integrating_guide_runs(tmp_path):
    steps = _steps("integrating.md")
    kinds = [s["kind"] for s in steps]
    assert kinds.count("python") >= 5 and "bash" in kinds and "file" in kinds, kinds
    assert any("torchrun" in s["text"] for s in steps if s["kind"] == "bash")

    out = _run_steps("integrating.md", steps, tmp_path, timeout=240)
    for expected in ("tensors loaded", "model.layers.0.self_attn.qkv_proj", "'tpf': '2.00tok/step'", "rank 0:",
                     "rank 1:"):
        assert expected in out, f"{expected!r} is not in the output of docs/integrating.md:\n{out[-6000:]}"


def test_parallel_guide_runs_its_ranks(tmp_path):
    """docs/parallel.md: its own-groups script on 4 ranks (tensor parallel in pairs), then serve.py
    on 2 (the default group), each launched by torchrun; every rank checks its logits itself."""
    steps = _steps("parallel.md", bash_timeout=180)
    launches = [s["text"] for s in steps if s["kind"] == "bash"]
    assert [f for f in ("own_groups.py", "serve.py") if any(f in t and "torchrun" in t for t in launches)] == [
        "own_groups.py", "serve.py"], launches
    assert {s["path"] for s in steps if s["kind"] == "file"} == {"own_groups.py", "serve.py"}

    out = _run_steps("parallel.md", steps, tmp_path, timeout=420)
    for rank in range(4):  # own_groups.py: each rank in a pair of tensor-parallel rank 0 or 1 of 2
        assert f"rank {rank}: {{'tp_rank': {rank % 2}, 'tp_size': 2, 'ep_rank': {rank % 2}, 'ep_size': 2}}" in out, out
    for rank in range(2):  # serve.py: the default group
        assert f"rank {rank}: tp rank {rank}/2, ep rank {rank}/2: " in out, out


# --------------------------------------------------------------------------- docs/writing-a-plugin.md


def _new_venv(venv: Path, env: dict[str, str]) -> None:
    """A virtual environment that sees this one's packages and has its own editable diffulex-core
    (so ``venv/bin/diffulex`` exists and the plugin installs into ``venv``, not here).

    ``--without-pip``: the pip and setuptools that ``venv`` bundles would shadow this environment's
    (Python 3.11 bundles setuptools 65, too old for diffulex-core's pyproject). ``bin/pip`` runs
    this environment's pip, which installs into ``venv``, as a pip of its own would.
    """
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True, timeout=60)
    python = venv / "bin" / "python"
    purelib = Path(subprocess.check_output(
        [str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"], text=True).strip())
    ours = sysconfig.get_paths()["purelib"]
    # addsitedir, not a bare path: this environment's own .pth files (editable installs) must run too
    (purelib / "_diffulex_guide_test.pth").write_text(f"import site; site.addsitedir({ours!r})\n")
    pip = venv / "bin" / "pip"
    pip.write_text(f'#!/bin/sh\nexec "{python}" -m pip "$@"\n')
    pip.chmod(0o755)
    _run([str(pip), "install", "--quiet", "--no-deps", "--no-build-isolation", "-e", str(ROOT)], cwd=venv, env=env,
         timeout=120, what="installing diffulex-core into the guide's virtual environment")
    assert (venv / "bin" / "diffulex").exists()


def test_writing_a_plugin_guide_builds_an_installed_tested_plugin(tmp_path):
    blocks = _guide("writing-a-plugin.md")
    files = [b for b in blocks if b.file is not None]
    shell = [b for b in blocks if b.lang == "bash"]
    assert {b.file for b in files} >= {"pyproject.toml", "diffulex_tinylm/__init__.py", "diffulex_tinylm/model.py"}
    assert len({b.file for b in files}) == len(files), "a file appears twice in the guide"
    tests = [b for b in files if re.match(r"tests/test_\w+\.py$", b.file)]
    n_tests = sum(len(re.findall(r"^def test_", b.text, re.M)) for b in tests)
    assert n_tests >= 2
    shell_text = "\n".join(b.text for b in shell)
    for command in ("pip install -e .", "pytest", "diffulex check tinylm"):
        assert command in shell_text, f"the guide's bash blocks do not run {command!r}"

    plugin = tmp_path / "diffulex-tinylm"
    plugin.mkdir()
    for block in files:
        target = plugin / block.file
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(block.text)

    venv = tmp_path / "venv"
    env = _clean_env(venv / "bin", drop_bin=THIS_BIN)
    env.update({
        "VIRTUAL_ENV": str(venv),
        "PIP_NO_INDEX": "1",  # offline: everything the guide installs is already visible
        "PIP_NO_BUILD_ISOLATION": "0",  # pip reads this inverted: "0" turns build isolation OFF
        "PIP_DISABLE_PIP_VERSION_CHECK": "1",
        "PYTEST_ADDOPTS": f"-p no:cacheprovider --basetemp={tmp_path / 'inner-basetemp'} "
                          f"--junitxml={tmp_path / 'junit.xml'}",
    })
    _new_venv(venv, env)

    outputs = {}
    for block in shell:
        outputs[block.where] = _run(["bash", "-e", "-o", "pipefail", "-c", block.text], cwd=plugin, env=env,
                                    timeout=180, what=f"the bash block at {block.where}")

    # the plugin's own tests ran, all of them, and passed
    junit = tmp_path / "junit.xml"
    assert junit.exists(), "the guide's bash blocks never ran pytest"
    suite = ET.parse(junit).getroot()
    suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
    counts = {k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}
    assert counts == {"tests": n_tests, "failures": 0, "errors": 0, "skipped": 0}, counts

    # ... with the kit's fixtures, found through diffulex-core's pytest11 entry point (no conftest)
    env_plain = {k: v for k, v in env.items() if k != "PYTEST_ADDOPTS"}
    fixtures = _run([str(venv / "bin" / "python"), "-m", "pytest", "-p", "no:cacheprovider", "--fixtures-per-test",
                     "-q"], cwd=plugin, env=env_plain, timeout=120, what="pytest --fixtures-per-test")
    kit = str(ROOT / "diffulex_core" / "testing" / "__init__.py")
    for fixture in ("diffulex_plugins", "diffulex_checkpoint"):
        found = re.findall(rf"^{fixture} -- (\S+?):\d+", fixtures, re.M)
        assert found and all(Path(plugin, f).resolve() == Path(kit) for f in found), (fixture, found, fixtures)

    # the installed plugin passes `diffulex check`
    check = _run([str(venv / "bin" / "diffulex"), "check", "tinylm", "--json"], cwd=plugin, env=env, timeout=120,
                 what="diffulex check tinylm --json")
    result = json.loads(check[check.index("{"):check.rindex("}") + 1])
    assert result["ok"] is True, result
    statuses = {(c["family"], c["check"]): c["status"] for c in result["checks"]}
    assert any(family == "tinylm" for family, _ in statuses), statuses
    assert set(statuses.values()) == {"pass"}, statuses
