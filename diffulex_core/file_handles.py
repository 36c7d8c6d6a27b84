"""Checkpoint files opened once per load, so the plan and the apply step read the same bytes.

A load plans from headers and applies later. Reopening each file by name for the apply step
would read whatever sits at that path by then: a shard replaced in between (``os.replace``) with
the same tensors behind a longer header made a load report success with garbage in every
tensor. ``OpenFiles`` opens each file once, before its header is read, and the apply step reads
through those descriptors: a file replaced or deleted after planning is still read as planned.
A file changed in place (truncated, rewritten) is caught by comparing its size and modification
time before the first byte is written. Opening never blocks (``O_NONBLOCK``: a FIFO is refused,
not waited on) and only regular files are accepted.
"""

from __future__ import annotations

import os
import stat
from pathlib import Path

from .errors import CheckpointFormatError, CheckpointNotFoundError

__all__ = ["OpenFiles"]

_FLAGS = os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)


def _identity(st: os.stat_result) -> tuple[int, int, int, int]:
    return st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns


class OpenFiles:
    """One read-only descriptor per checkpoint file, and what each file looked like when opened."""

    def __init__(self) -> None:
        self.fds: dict[Path, int] = {}
        self._seen: dict[Path, tuple[int, int, int, int]] = {}

    def open(self, path: Path) -> int:
        fd = self.fds.get(path)
        if fd is not None:
            return fd
        try:
            fd = os.open(path, _FLAGS)
        except FileNotFoundError:
            raise CheckpointNotFoundError(f"{path} does not exist (or is a dangling symlink)") from None
        except OSError as exc:
            raise CheckpointFormatError(f"{path} cannot be opened: {exc.strerror or exc}") from None
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            os.close(fd)
            raise CheckpointFormatError(f"{path} is not a regular file; a checkpoint file must be one")
        self.fds[path], self._seen[path] = fd, _identity(st)
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
