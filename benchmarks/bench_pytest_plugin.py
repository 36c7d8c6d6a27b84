"""The kit's pytest plugin costs nothing in a session that does not use it.

A pytest session over one trivial test, with the plugin (``diffulex_core.testing``, loaded through
its ``pytest11`` entry point) and without it (``-p no:diffulex``), each in a fresh process,
alternating; medians and their ratio. The test also asserts that the session imported neither
torch nor the plugin manager.

    python benchmarks/bench_pytest_plugin.py [--runs 9]
"""

from __future__ import annotations

import argparse
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TEST = '''
import sys

def test_plain():
    assert "torch" not in sys.modules and "diffulex_core.plugins" not in sys.modules
'''


def session_seconds(directory: Path, extra: list[str]) -> float:
    start = time.perf_counter()
    subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *extra, str(directory)],
                   cwd=directory, check=True, capture_output=True)
    return time.perf_counter() - start


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=9)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp)
        (directory / "test_plain.py").write_text(TEST)
        times: dict[str, list[float]] = {"with the plugin": [], "without (-p no:diffulex)": []}
        for _ in range(runs):  # alternating, so drift on a shared machine hits both alike
            times["with the plugin"].append(session_seconds(directory, []))
            times["without (-p no:diffulex)"].append(session_seconds(directory, ["-p", "no:diffulex"]))
    medians = {name: statistics.median(values) for name, values in times.items()}
    print(f"median of {runs} fresh pytest sessions ({platform.system().lower()}, Python {platform.python_version()})")
    for name, value in medians.items():
        print(f"  {name:28s} {value * 1000:8.1f} ms")
    print(f"ratio with / without = {medians['with the plugin'] / medians['without (-p no:diffulex)']:.3f}x")


if __name__ == "__main__":
    main()
