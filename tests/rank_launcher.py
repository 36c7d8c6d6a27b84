"""Launching ranks of ``parallel_worker.py`` as ``torchrun`` would: gloo over TCP, one process each."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

INPUT_IDS = [[1, 7, 254, 100, 3, 9], [200, 2, 0, 128, 127, 33]]
WORKER = Path(__file__).parent / "parallel_worker.py"
WAIT_SECONDS = 240  # every rank must be done by then; a hang fails the test instead of blocking CI


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(scenario: dict, world: int, tmp_path: Path) -> tuple[list[dict], Path]:
    """Run ``world`` ranks of the worker to completion; (each rank's result, output directory)."""
    out = tmp_path / f"ranks{world}"
    out.mkdir()
    scenario_file = out / "scenario.json"
    scenario_file.write_text(json.dumps({"input_ids": INPUT_IDS, **scenario}))
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    procs = [subprocess.Popen([sys.executable, str(WORKER), str(scenario_file), str(rank), str(world), str(port), str(out)],
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
             for rank in range(world)]
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=WAIT_SECONDS)[0])
    except subprocess.TimeoutExpired:
        for proc in procs:
            proc.kill()
        pytest.fail(f"ranks did not finish within {WAIT_SECONDS} s (a hang)")
    results = []
    for rank, (proc, output) in enumerate(zip(procs, outputs)):
        result_file = out / f"rank{rank}.json"
        assert proc.returncode == 0 and result_file.exists(), f"rank {rank} exited {proc.returncode}:\n{output}"
        results.append(json.loads(result_file.read_text()))
    return results, out
