"""Checkpoint files opened once per load, so the plan and the apply step read the same bytes.

A load plans from headers and applies later. Reopening each file by name for the apply step
would read whatever sits at that path by then: a shard replaced in between (``os.replace``) with
the same tensors behind a longer header made a load report success with garbage in every
tensor. ``OpenFiles`` opens each file once, before its header is read, and the apply step reads
through those descriptors: a file replaced or deleted after planning is still read as planned.
Headers are read through the same descriptors. A file changed in place (truncated, rewritten)
is caught by comparing its size and modification time before the first byte is written.
Opening never blocks and only regular files are accepted (``regular.open_regular``).
"""

from __future__ import annotations

import os
from pathlib import Path

from diffulex_core.errors import CheckpointFormatError
from diffulex_core.files.regular import open_regular

__all__ = ["OpenFiles"]


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class OpenFiles:
    """One read-only descriptor per checkpoint file, and what each file looked like when opened."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}
        self._seen: dict[Path, tuple[int, int, int, int]] = {}

    def open(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is None:
            fd = self.fds[path] = open_regular(path, "file")
            self._seen[path] = _identity(os.fstat(fd))
        return fd

    def check_unchanged(self) -> None:
        """Refuse, before anything is written, a file whose size or modification time moved since it was opened."""
        for path, fd in self.fds.items():
            now = _identity(os.fstat(fd))
            if now != self._seen[path]:
                raise CheckpointFormatError(
                    f"{path} changed after it was planned (size {self._seen[path][2]:,} -> {now[2]:,} bytes, or it "
                    f"was rewritten in place); nothing was loaded. Load again once the file is complete"
                )

    def close(self) -> None:
        for fd in self.fds.values():
            os.close(fd)
        self.fds.clear()

    def __enter__(self) -> "OpenFiles":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
