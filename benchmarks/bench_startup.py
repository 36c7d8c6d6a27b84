"""Start-up cost: ``import diffulex_core`` and first plugin discovery, against baselines.

Each figure is the median of N fresh interpreters, so module caches never help.
Baselines in the same run: a bare interpreter, ``import pluggy``, and ``import transformers``
(what an eager import of the tokenizer stack would cost).

    python benchmarks/bench_startup.py [--runs 15]
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time


def median_seconds(code: str, runs: int) -> float:
    times = []
    for _ in range(runs):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-c", code], check=True)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=15)
    runs = parser.parse_args().runs
    cases = {
        "bare interpreter": "pass",
        "import pluggy": "import pluggy",
        "import diffulex_core": "import diffulex_core",
        "import + discover plugins": "from diffulex_core.plugins import get_plugins; get_plugins()",
        "import transformers": "import transformers",
    }
    results = {name: median_seconds(code, runs) for name, code in cases.items()}
    bare = results["bare interpreter"]
    print(f"median of {runs} fresh interpreters ({sys.platform}, Python {sys.version.split()[0]})")
    for name, seconds in results.items():
        print(f"  {name:28s} {seconds * 1000:8.1f} ms   +{(seconds - bare) * 1000:7.1f} ms over bare")
    core = results["import diffulex_core"] - bare
    pluggy_cost = results["import pluggy"] - bare
    print(f"ratio: import diffulex_core / import pluggy (over bare) = {core / pluggy_cost:.2f}x")


if __name__ == "__main__":
    main()
