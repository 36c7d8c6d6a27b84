"""Opening checkpoint files: regular files only, every failure a typed error naming the file.

``os.stat`` follows symlinks first, and the open is checked with ``fstat``: a FIFO, a device or a
directory in a file's place is refused, never read or waited on. Names and values from a file
are quoted bounded (``shown``), since a hostile one can be 100 MB long.
"""

from __future__ import annotations

import errno
import os
import reprlib
import stat
from pathlib import Path
from typing import Any

from diffulex_core.errors import CheckpointFormatError, CheckpointNotFoundError

__all__ = ["open_regular"]

MAX_SHOWN = 200  # characters of a value or name quoted in an error message

_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict = 3, 8, 8
_REPR.maxstring, _REPR.maxlong, _REPR.maxother = MAX_SHOWN, 60, MAX_SHOWN


def shown(value: Any) -> str:
    """A bounded ``repr``: a hostile header can hold 100 MB strings, huge or deep containers."""
    text = _REPR.repr(value)
    return text if len(text) <= 2 * MAX_SHOWN else text[:2 * MAX_SHOWN] + "..."


_FILE_KINDS = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
               (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"), (stat.S_ISSOCK, "a socket"))


def file_kind(mode: int) -> str:
    """What a file that is not a regular one is, in words, for an error message."""
    return next((name for test, name in _FILE_KINDS if test(mode)), "not a regular file")


def stat_path(path: Path, what: str) -> os.stat_result:
    """``os.stat`` (following symlinks) with every failure turned into a typed error naming ``path``."""
    try:
        return os.stat(path)
    except ValueError:  # the one name every OS call refuses before asking the OS: no path holds a NUL
        raise CheckpointNotFoundError(f"{what} {shown(str(path))} does not exist: its name holds a NUL byte") from None
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise CheckpointFormatError(
                f"{what} {path} is a symlink loop (too many levels of symbolic links)") from None
        if exc.errno == errno.ENAMETOOLONG:
            raise CheckpointNotFoundError(f"{what} {shown(str(path))} does not exist: its name is too long") from None
        if exc.errno in (errno.ENOENT, errno.ENOTDIR):
            if os.path.islink(path):
                raise CheckpointNotFoundError(
                    f"{what} {path} does not exist: it is a dangling symlink to {shown(os.readlink(path))}") from None
            raise CheckpointNotFoundError(f"{what} {path} does not exist") from None
        raise CheckpointFormatError(f"{what} {path} cannot be read: {exc.strerror}") from None


def stat_regular(path: Path, what: str) -> os.stat_result:
    """Stat ``path`` and refuse anything but a regular file (symlinks to regular files are fine)."""
    st = stat_path(path, what)
    if not stat.S_ISREG(st.st_mode):
        raise CheckpointFormatError(f"{what} {path} is {file_kind(st.st_mode)}, not a regular file")
    return st


def open_regular(path: Path, what: str) -> int:
    """A read-only descriptor of a regular file (symlinks to one are fine), or a typed error.

    Checked with ``stat`` before the open and ``fstat`` after it, and opened non-blocking, so a
    file swapped for a FIFO in between is refused rather than waited on.
    """
    stat_regular(path, what)
    try:
        fd = os.open(path, os.O_RDONLY | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0))
    except FileNotFoundError:
        raise CheckpointNotFoundError(f"{what} {path} does not exist") from None
    except OSError as exc:
        raise CheckpointFormatError(f"{what} {path} cannot be opened: {exc.strerror}") from None
    mode = os.fstat(fd).st_mode
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise CheckpointFormatError(f"{what} {path} is {file_kind(mode)}, not a regular file")
    return fd


def read_fd(fd: int, path: Path, what: str, limit: int) -> tuple[int, bytes]:
    """(file size, its first ``limit`` bytes at most) through an open descriptor."""
    try:
        size = os.fstat(fd).st_size
        want, chunks, at = min(size, limit), [], 0
        while at < want:
            chunk = os.pread(fd, want - at, at)
            if not chunk:
                break
            chunks.append(chunk)
            at += len(chunk)
        return size, b"".join(chunks)
    except OSError as exc:
        raise CheckpointFormatError(f"{what} {path} cannot be read: {exc.strerror}") from None


def read_regular(path: Path, what: str, limit: int) -> tuple[int, bytes]:
    """(size, bytes) of a regular file: ``limit`` bytes at most."""
    fd = open_regular(path, what)
    try:
        return read_fd(fd, path, what, limit)
    finally:
        os.close(fd)
