"""Launching ranks of ``parallel_worker.py`` as ``torchrun`` would: gloo over TCP, one process each.

``launch`` runs one scenario; ``launch_many`` runs several, in turn, in one launch (one process
group), and ``Launched.get(name)`` gives each its results or fails naming it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pytest

INPUT_IDS = [[1, 7, 254, 100, 3, 9], [200, 2, 0, 128, 127, 33]]
WORKER = Path(__file__).parent / "parallel_worker.py"
WAIT_SECONDS = 240  # every rank must be done by then; a hang fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _run_ranks(scenario_file: Path, world: int, out: Path) -> tuple[list[subprocess.Popen], list[str]]:
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(scenario_file), str(rank), str(world), str(port),
                               str(out)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=WAIT_SECONDS)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"ranks did not finish within {WAIT_SECONDS} s (a hang)")
    return procs, outputs


def launch(scenario: dict, world: int, tmp_path: Path) -> tuple[list[dict], Path]:
    """Run ``world`` ranks of the worker to completion; (each rank's result, output directory)."""
    out = tmp_path / f"ranks{world}"
    out.mkdir()
    scenario_file = out / "scenario.json"
    scenario_file.write_text(json.dumps({"input_ids": INPUT_IDS, **scenario}))
    procs, outputs = _run_ranks(scenario_file, world, out)
    results = []
    for rank, (proc, output) in enumerate(zip(procs, outputs, strict=True)):
        result_file = out / f"rank{rank}.json"
        assert proc.returncode == 0 and result_file.exists(), f"rank {rank} exited {proc.returncode}:\n{output}"
        results.append(json.loads(result_file.read_text()))
    return results, out


@dataclass
class Launched:
    """What one launch of several scenarios left: per scenario, every rank's result and its directory."""

    world: int
    out: Path
    names: list[str]
    codes: list[int | None]
    outputs: list[str]

    def get(self, name: str) -> tuple[list[dict], Path]:
        """(each rank's result, output directory) of scenario ``name``. A rank that left no result
        for it fails the caller, naming the scenario, with every rank's exit status and output; a
        rank that exited non-zero after every scenario fails the last scenario's caller."""
        out = self.out / name
        files = [out / f"rank{rank}.json" for rank in range(self.world)]
        missing = [rank for rank, file in enumerate(files) if not file.exists()]
        if missing or (name == self.names[-1] and any(self.codes)):
            logs = "\n".join(f"--- rank {r} exited {code}:\n{text[-4000:]}"
                             for r, (code, text) in enumerate(zip(self.codes, self.outputs, strict=True)))
            what = f"rank(s) {missing} left no result" if missing else "a rank exited non-zero after the last scenario"
            pytest.fail(f"scenario {name!r}: {what}\n{logs}")
        return [json.loads(file.read_text()) for file in files], out


def launch_many(scenarios: dict[str, dict], world: int, tmp_path: Path) -> Launched:
    """Run every scenario, in order, in ONE launch of ``world`` ranks (one process group); a rank
    that exits early fails the scenarios it left without results, each by its name."""
    out = tmp_path / f"ranks{world}-many"
    out.mkdir()
    scenario_file = out / "scenarios.json"
    scenario_file.write_text(json.dumps([{"input_ids": INPUT_IDS, **scenario, "name": name}
                                         for name, scenario in scenarios.items()]))
    procs, outputs = _run_ranks(scenario_file, world, out)
    return Launched(world, out, list(scenarios), [proc.returncode for proc in procs], outputs)
