"""Run a guide's steps in document order in the current directory: ``python guide_driver.py STEPS.json``.

Steps (written by tests/test_guides.py): ``{"kind": "python", "text", "source", "line"}`` runs in
one namespace shared by all python steps, compiled so that tracebacks point at the guide's own
line numbers; ``{"kind": "file", "path", "text"}`` writes a file; ``{"kind": "bash", "text",
"source", "line", "timeout"}`` runs the block with ``bash -e -o pipefail`` (the caller's PATH).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def main(steps_file: str) -> None:
    sys.path[0] = "."  # as a script in the working directory would see it, not this file's directory
    steps = json.loads(Path(steps_file).read_text())
    namespace = {"__name__": "__main__", "__builtins__": __builtins__}
    for step in steps:
        kind = step["kind"]
        if kind == "file":
            path = Path(step["path"])
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(step["text"])
            continue
        print(f"----- {kind} block at {step['source']}:{step['line']}", flush=True)
        if kind == "python":
            code = compile("\n" * (step["line"] - 1) + step["text"], step["source"], "exec")
            exec(code, namespace)
        elif kind == "bash":
            done = subprocess.run(["bash", "-e", "-o", "pipefail", "-c", step["text"]], timeout=step["timeout"])
            if done.returncode:
                sys.exit(f"the bash block at {step['source']}:{step['line']} exited with {done.returncode}")
        else:
            raise ValueError(f"unknown step kind {kind!r}")
        sys.stdout.flush()
        sys.stderr.flush()


if __name__ == "__main__":
    main(sys.argv[1])
