"""Moving tensor bytes from files into memory: ``os.preadv`` straight into destination storage.

A run of neighbouring tensors in a file is read with one ``preadv`` whose buffers are the
destinations themselves (up to ``IOV_MAX`` of them; a small gap between two tensors lands in a
scratch buffer), so a run of small tensors costs one system call and no copy. Large tensors are
read in chunks, so threads can share them. A destination of another dtype (a bf16 checkpoint
into float32 parameters) is read in bounded chunks into a per-thread staging buffer and cast
into place by ``Tensor.copy_``. Work is spread over a few threads by bytes: ``preadv`` and the
cast copies release the GIL. There is no memory map, so peak RSS stays at the model's size.
"""

from __future__ import annotations

import os
import threading
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Callable, Iterable, Mapping, NamedTuple

import torch

from diffulex_core.errors import LoadApplyError
from diffulex_core.io.memory import memory_at

if TYPE_CHECKING:
    from diffulex_core.files.headers import TensorRecord

__all__ = ["CastRead", "DirectRead", "read_direct", "read_exact", "read_record", "read_runs"]

CHUNK_BYTES = 16 * 1024**2  # a large tensor is read in pieces of this size, so threads can share it
BATCH_BYTES = 16 * 1024**2  # the most one batched preadv covers
CAST_CHUNK_BYTES = 4 * 1024**2  # source bytes cast at once (the per-thread staging buffer's size)
TASK_BYTES = 16 * 1024**2  # work handed to a thread at once: fewer, larger tasks keep overhead low
MAX_GAP = 64 * 1024  # skipped bytes between batched reads that are read into scratch rather than split on
IOV_MAX = os.sysconf("SC_IOV_MAX") if hasattr(os, "sysconf") and "SC_IOV_MAX" in os.sysconf_names else 1024


class DirectRead(NamedTuple):
    """Copy ``nbytes`` at ``start`` of ``file`` to memory at ``address`` (kept alive by the caller).

    Reads of one file share one ``Path`` object, so grouping compares by identity (cheap).
    """

    file: Path
    start: int
    nbytes: int
    address: int
    name: str


class CastRead(NamedTuple):
    """Read ``nbytes`` at ``start`` of ``file`` as ``dtype`` and cast them into ``dest`` (a
    contiguous 1-D tensor of ``nbytes / dtype.itemsize`` elements, kept alive by the caller)."""

    file: Path
    start: int
    nbytes: int
    dtype: torch.dtype
    dest: torch.Tensor
    name: str


def read_exact(fd: int, buffer: memoryview, offset: int, what: str) -> None:
    """Fill ``buffer`` from ``offset`` of ``fd``; a short file or an I/O error is a ``LoadApplyError``
    naming ``what``."""
    readv_exact(fd, [buffer], offset, what)


def readv_exact(fd: int, buffers: list[memoryview], offset: int, what: str) -> None:
    """Fill ``buffers`` in order from ``offset`` of ``fd`` (``preadv`` may stop short: go on from there)."""
    pending = [b for b in buffers if len(b)]
    while pending:
        try:
            n = os.preadv(fd, pending[:IOV_MAX], offset)
        except OSError as exc:
            raise LoadApplyError(f"{what}: reading failed ({exc.strerror or exc})") from exc
        if n <= 0:
            raise LoadApplyError(f"{what}: the file ended before the tensor did; was it changed during the load?")
        offset += n
        while n and pending:
            first = pending[0]
            if n >= len(first):
                n -= len(first)
                pending.pop(0)
            else:
                pending[0] = first[n:]
                n = 0


def read_runs(fd: int, dest: torch.Tensor, runs: Iterable[tuple[int, int]], what: str) -> int:
    """Read each ``(file offset, nbytes)`` of ``runs`` in turn, back to back into ``dest`` (a
    contiguous CPU tensor), straight into its memory: no temporary. Returns the bytes read."""
    address = dest.data_ptr()
    done = 0
    for offset, nbytes in runs:
        if nbytes:
            read_exact(fd, memory_at(address + done, nbytes), offset, what)
        done += nbytes
    return done


def read_record(fd: int, record: TensorRecord) -> torch.Tensor:
    """The tensor ``record`` describes, as a new CPU tensor read through ``fd`` (its file's descriptor)."""
    tensor = torch.empty(record.shape, dtype=record.dtype)
    read_runs(fd, tensor, [(record.start, record.nbytes)], f"{record.file}: tensor {record.name!r}")
    return tensor


class _Scratch(threading.local):
    buffer: bytearray | None = None
    staging: torch.Tensor | None = None
    staging_view: memoryview | None = None

    def get(self, nbytes: int) -> memoryview:
        if self.buffer is None or len(self.buffer) < nbytes:
            self.buffer = bytearray(nbytes)  # grows to the largest gap seen, at most MAX_GAP
        return memoryview(self.buffer)[:nbytes]

    def cast_staging(self) -> tuple[torch.Tensor, memoryview]:
        """This thread's cast buffer (``CAST_CHUNK_BYTES``), as a tensor and as memory to read into."""
        if self.staging is None or self.staging.numel() < CAST_CHUNK_BYTES:
            self.staging = torch.empty(CAST_CHUNK_BYTES, dtype=torch.uint8)
            self.staging_view = memory_at(self.staging.data_ptr(), CAST_CHUNK_BYTES)
        return self.staging, self.staging_view


class _Batch(NamedTuple):
    """One ``preadv`` from ``offset``: ``parts`` are the destination reads in file order."""

    file: Path
    offset: int
    nbytes: int
    parts: tuple[DirectRead, ...]


class _Cast(NamedTuple):
    read: CastRead
    first: int  # element range of ``read`` this op casts
    count: int


def _batches(reads: list[DirectRead]) -> list[_Batch]:
    """Chunks of large reads, and runs of neighbouring small ones, in file order."""
    ops: list[_Batch] = []
    run: list[DirectRead] = []
    iovecs = 0  # buffers the run's preadv will take: one per read, one per gap

    def flush() -> None:
        nonlocal iovecs
        if run:
            start = run[0].start
            ops.append(_Batch(run[0].file, start, run[-1].start + run[-1].nbytes - start, tuple(run)))
            run.clear()
        iovecs = 0

    for read in sorted(reads, key=lambda r: (str(r.file), r.start)):
        if read.nbytes == 0:  # an empty tensor: nothing to move (and its address may be 0)
            continue
        for offset in range(0, read.nbytes, CHUNK_BYTES):
            piece = read if read.nbytes <= CHUNK_BYTES else read._replace(
                start=read.start + offset, address=read.address + offset, nbytes=min(CHUNK_BYTES, read.nbytes - offset))
            gap = piece.start - (run[-1].start + run[-1].nbytes) if run else 0
            if run and (piece.file is not run[0].file or gap > MAX_GAP or gap < 0  # overlapping source: its own call
                        or piece.start + piece.nbytes - run[0].start > BATCH_BYTES or iovecs + 2 > IOV_MAX):
                flush()
                gap = 0
            iovecs += 1 + (gap > 0)
            run.append(piece)
    flush()
    return ops


def _casts(reads: list[CastRead]) -> list[_Cast]:
    ops = []
    for read in reads:
        size = read.dtype.itemsize
        per = max(1, CAST_CHUNK_BYTES // size)
        total = read.nbytes // size
        ops += [_Cast(read, first, min(per, total - first)) for first in range(0, total, per)]
    return ops


def _tasks(ops: list) -> list[list]:
    """Consecutive ops grouped into tasks of about ``TASK_BYTES``, one thread's unit of work."""
    tasks: list[list] = []
    size = TASK_BYTES
    for op in ops:
        if size >= TASK_BYTES:
            tasks.append([])
            size = 0
        tasks[-1].append(op)
        size += op.nbytes if isinstance(op, _Batch) else op.count * op.read.dtype.itemsize
    return tasks


def read_direct(reads: list[DirectRead], fds: Mapping[Path, int], *, casts: list[CastRead] = (),
                threads: int | None = None, on_progress: Callable[[int], None] | None = None) -> None:
    """Perform every read through the open descriptors ``fds`` (file -> fd, owned by the caller);
    ``on_progress(nbytes)`` is called from this thread as tasks finish."""
    tasks = _tasks([*_batches(reads), *_casts(list(casts))])
    scratch = _Scratch()

    def run(task: list) -> int:
        done = 0
        for op in task:
            if isinstance(op, _Batch):
                buffers, end = [], op.offset
                for part in op.parts:
                    if part.start > end:  # a gap: read it into scratch rather than make another call
                        buffers.append(scratch.get(part.start - end))
                    buffers.append(memory_at(part.address, part.nbytes))
                    end = part.start + part.nbytes
                first, last = op.parts[0].name, op.parts[-1].name
                readv_exact(fds[op.file], buffers, op.offset,
                            f"{op.file}: tensor {first!r}" + (f"..{last!r}" if last != first else ""))
                done += sum(part.nbytes for part in op.parts)
            else:
                read, size = op.read, op.read.dtype.itemsize
                nbytes = op.count * size  # read while it fits in cache, then cast from there
                staging, memory = scratch.cast_staging()
                read_exact(fds[read.file], memory[:nbytes], read.start + op.first * size,
                           f"{read.file}: tensor {read.name!r}")
                read.dest.narrow(0, op.first, op.count).copy_(staging[:nbytes].view(read.dtype))
                done += nbytes
        return done

    workers = min(threads or os.cpu_count() or 1, len(tasks))
    if workers <= 1:
        for task in tasks:
            done = run(task)
            if on_progress:
                on_progress(done)
    else:
        pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffulex-read")
        try:
            for done in pool.map(run, tasks):
                if on_progress:
                    on_progress(done)
        finally:  # on a failure (or an abort) the tasks not yet started are dropped, the running ones end
            pool.shutdown(wait=True, cancel_futures=True)
