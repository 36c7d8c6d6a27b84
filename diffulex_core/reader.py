"""Moving tensor bytes from files into memory: ``os.preadv`` straight into destination storage.

Large tensors are read in chunks directly into the parameter's memory (no staging copy, no
memory map, so peak RSS stays at the model's size); runs of small neighbouring tensors are read
with one call into a bounded staging buffer and copied out, so per-tensor cost stays low.
Reads run on a few threads: ``preadv`` and ``memmove`` release the GIL.
"""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Mapping, NamedTuple

from .errors import LoadApplyError

__all__ = ["DirectRead", "read_direct", "read_exact"]

CHUNK_BYTES = 16 * 1024**2  # a large tensor is read in pieces of this size, so threads can share it
SMALL_BYTES = 64 * 1024  # tensors below this are batched with their neighbours through a staging buffer
BATCH_BYTES = 16 * 1024**2  # the most one staged read covers (the staging buffer's size)
TASK_BYTES = 16 * 1024**2  # work handed to a thread at once: fewer, larger tasks keep overhead low
MAX_GAP = 64 * 1024  # skipped bytes between batched tensors that are read rather than split on


class DirectRead(NamedTuple):
    """Copy ``nbytes`` at ``start`` of ``file`` to memory at ``address`` (kept alive by the caller).

    Reads of one file share one ``Path`` object, so grouping compares by identity (cheap).
    """

    file: Path
    start: int
    nbytes: int
    address: int
    name: str


def read_exact(fd: int, buffer: memoryview, offset: int, what: str) -> None:
    """Fill ``buffer`` from ``offset`` of ``fd``; a short file or an I/O error is a ``LoadApplyError`` naming ``what``."""
    done, size = 0, len(buffer)
    while done < size:
        try:
            n = os.preadv(fd, [buffer[done:]], offset + done)
        except OSError as exc:
            raise LoadApplyError(f"{what}: reading failed ({exc.strerror or exc})") from exc
        if n <= 0:
            raise LoadApplyError(f"{what}: the file ended before the tensor did; was it changed during the load?")
        done += n


def _memory(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


class _Staging(threading.local):
    buffer: bytearray | None = None

    def get(self, nbytes: int) -> memoryview:
        if self.buffer is None or len(self.buffer) < nbytes:
            self.buffer = bytearray(nbytes)  # grows to the largest run seen, at most BATCH_BYTES
        return memoryview(self.buffer)[:nbytes]


class _Op(NamedTuple):
    """One ``preadv``: into a tensor's memory (``members`` is one read) or into staging, then copied out."""

    file: Path
    offset: int
    nbytes: int
    members: tuple[DirectRead, ...]
    staged: bool


def _ops(reads: list[DirectRead]) -> list[_Op]:
    """Chunks of large tensors, and runs of small neighbouring ones, in file order."""
    ops: list[_Op] = []
    run: list[DirectRead] = []

    def flush() -> None:
        if run:
            start = run[0].start
            ops.append(_Op(run[0].file, start, run[-1].start + run[-1].nbytes - start, tuple(run), len(run) > 1))
            run.clear()

    for read in sorted(reads, key=lambda r: (str(r.file), r.start)):
        if read.nbytes == 0:  # an empty tensor: nothing to move (and its address may be 0)
            continue
        if read.nbytes >= SMALL_BYTES:
            flush()
            for offset in range(0, read.nbytes, CHUNK_BYTES):
                piece = read._replace(start=read.start + offset, address=read.address + offset,
                                      nbytes=min(CHUNK_BYTES, read.nbytes - offset))
                ops.append(_Op(read.file, piece.start, piece.nbytes, (piece,), False))
            continue
        if run and (read.file is not run[0].file or read.start - (run[-1].start + run[-1].nbytes) > MAX_GAP
                    or read.start + read.nbytes - run[0].start > BATCH_BYTES):
            flush()
        run.append(read)
    flush()
    return ops


def _tasks(ops: list[_Op]) -> list[list[_Op]]:
    """Consecutive ops grouped into tasks of about ``TASK_BYTES``, one thread's unit of work."""
    tasks: list[list[_Op]] = []
    size = TASK_BYTES
    for op in ops:
        if size >= TASK_BYTES:
            tasks.append([])
            size = 0
        tasks[-1].append(op)
        size += op.nbytes
    return tasks


def read_direct(reads: list[DirectRead], fds: Mapping[Path, int], *, threads: int | None = None,
                on_progress: Callable[[int], None] | None = None) -> None:
    """Perform every read through the open descriptors ``fds`` (file -> fd, owned by the caller);
    ``on_progress(nbytes)`` is called from this thread as tasks finish."""
    tasks = _tasks(_ops(reads))
    staging = _Staging()

    def run(task: list[_Op]) -> int:
        done = 0
        for op in task:
            first = op.members[0]
            if not op.staged:  # straight into the tensor's own memory
                read_exact(fds[op.file], _memory(first.address, op.nbytes), op.offset, f"{op.file}: tensor {first.name!r}")
            else:
                buffer = staging.get(op.nbytes)
                read_exact(fds[op.file], buffer, op.offset, f"{op.file}: tensors {first.name!r}..{op.members[-1].name!r}")
                base = ctypes.addressof(ctypes.c_char.from_buffer(buffer))
                for member in op.members:
                    ctypes.memmove(member.address, base + member.start - op.offset, member.nbytes)
            done += sum(member.nbytes for member in op.members)
        return done

    workers = min(threads or os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        for task in tasks:
            done = run(task)
            if on_progress:
                on_progress(done)
    else:
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffulex-read") as pool:
            for done in pool.map(run, tasks):
                if on_progress:
                    on_progress(done)
