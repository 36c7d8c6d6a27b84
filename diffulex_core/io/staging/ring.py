"""``copy_to_device`` (path ``"cuda-ring"``): tensor bytes reach a CUDA device through a ring of a
few reusable pinned host buffers.

Reader threads fill a buffer with ``os.preadv`` (small neighbouring tensors packed into one
buffer, a large tensor split across several); the caller's thread then copies the buffer to the
device asynchronously on a side stream and records an event; the buffer is filled again only
once its event has completed. Reading and copying overlap, and staging never exceeds
``ring_buffers * buffer_bytes``. The scheduling goes through a ``StagingBackend``, so it runs
(and is tested) on CPU with ``diffulex_core.testing.cpu_backend.CpuStandInBackend``.
"""

from __future__ import annotations

import os
import queue
import threading
import time
from collections import deque
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from diffulex_core.io.memory import memory_at
from diffulex_core.io.reader import read_exact
from diffulex_core.io.staging.backend import (
    MIB,
    CudaBackend,
    DeviceRead,
    StagingBackend,
    StagingStats,
    checked_reads,
    dest_part,
)

__all__ = ["copy_to_device"]

RING_BUFFERS = 4  # pinned buffers in the ring
BUFFER_BYTES = 64 * MIB  # each buffer's size; staging is bounded by RING_BUFFERS * BUFFER_BYTES
MAX_PIECE_BYTES = 16 * MIB  # the most one reader thread reads for a buffer at once
MIN_PIECE_BYTES = 256 * 1024
MAX_GAP = 64 * 1024  # skipped bytes between packed tensors that are read (into staging) rather than split on


class _Chunk(NamedTuple):
    """One ``preadv`` of ``nbytes`` at ``offset`` of ``file`` into the buffer at ``at``."""

    file: Path
    offset: int
    at: int
    nbytes: int
    what: str


class _Part(NamedTuple):
    """Bytes ``done:done+nbytes`` of ``read``, staged at ``at`` in the buffer."""

    read: DeviceRead
    done: int
    at: int
    nbytes: int


class _Packet(NamedTuple):
    """What one buffer carries: the reader tasks that fill it and the copies that empty it."""

    tasks: list[list[_Chunk]]
    parts: list[_Part]
    nbytes: int  # tensor bytes (progress)
    span: int  # buffer bytes used (tensor bytes plus packed gaps)


def _piece_bytes(ring_buffers: int, buffer_bytes: int, workers: int) -> int:
    """Small enough that every thread has work in the buffers being filled while others are copied."""
    piece = ring_buffers * buffer_bytes // (2 * workers)
    return max(1, min(buffer_bytes, MAX_PIECE_BYTES, max(MIN_PIECE_BYTES, piece)))


def _packets(reads: list[DeviceRead], buffer_bytes: int, piece_bytes: int) -> list[_Packet]:
    """Reads laid out in buffers, in file order: tensors packed while they fit (neighbours within
    ``MAX_GAP`` share one contiguous read), a tensor that does not fit continued in the next buffer."""
    packets: list[_Packet] = []
    runs: list[list] = []  # [file, offset, at, nbytes, first name, last name] per contiguous read
    parts: list[_Part] = []
    used = payload = 0

    def close() -> None:
        nonlocal used, payload
        if not parts:
            return
        tasks: list[list[_Chunk]] = []
        size = piece_bytes
        for file, offset, at, nbytes, first, last in runs:
            what = f"{file}: tensor {first!r}" if first == last else f"{file}: tensors {first!r}..{last!r}"
            for skip in range(0, nbytes, piece_bytes):
                n = min(piece_bytes, nbytes - skip)
                if size + n > piece_bytes:
                    tasks.append([])
                    size = 0
                tasks[-1].append(_Chunk(file, offset + skip, at + skip, n, what))
                size += n
        packets.append(_Packet(tasks, list(parts), payload, used))
        runs.clear()
        parts.clear()
        used = payload = 0

    for read in sorted(reads, key=lambda r: (str(r.file), r.start)):
        done = 0
        while done < read.nbytes:
            offset = read.start + done
            last = runs[-1] if runs else None
            gap = offset - (last[1] + last[3]) if last is not None and last[0] == read.file else -1
            if 0 <= gap <= MAX_GAP and used + gap < buffer_bytes:
                used += gap
                take = min(read.nbytes - done, buffer_bytes - used)
                last[3] += gap + take
                last[5] = read.name
            else:
                take = min(read.nbytes - done, buffer_bytes - used)
                runs.append([read.file, offset, used, take, read.name, read.name])
            parts.append(_Part(read, done, used, take))
            used += take
            payload += take
            done += take
            if used >= buffer_bytes:
                close()
    close()
    return packets


class _Ring:
    """One ``copy_to_device`` call: reader threads fill buffers; the caller's thread hands out
    buffers, issues copies and recycles buffers whose copies completed."""

    def __init__(self, packets: list[_Packet], fds: Mapping[Path, int], backend: StagingBackend,
                 ring_buffers: int, workers: int, on_progress: Callable[[int], None] | None) -> None:
        self.packets = packets
        self.fds = fds
        self.backend = backend
        self.ring_buffers = ring_buffers
        self.workers = workers
        self.on_progress = on_progress
        self.buffer_bytes = max(p.span for p in packets)  # no bigger than the largest packet needs
        self.buffers: list[torch.Tensor] = []
        self.bases: list[int] = []
        self.loaded: list[_Packet | None] = []  # per slot: the packet it carries
        self.cond = threading.Condition()
        self.remaining: list[int] = []  # per slot: reader tasks not finished
        self.filled: deque[int] = deque()  # slots read completely, copies not yet issued
        self.error: BaseException | None = None
        self.stop = False
        self.work: queue.SimpleQueue = queue.SimpleQueue()

    def read(self) -> None:
        """A reader thread: perform tasks until told to stop; the first error stops everyone."""
        while (item := self.work.get()) is not None:
            slot, task = item
            if self.stop:
                continue
            try:
                base = self.bases[slot]
                for chunk in task:
                    read_exact(self.fds[chunk.file], memory_at(base + chunk.at, chunk.nbytes), chunk.offset, chunk.what)
            except BaseException as exc:
                with self.cond:
                    if self.error is None:
                        self.error = exc
                    self.stop = True
                    self.cond.notify_all()
                continue
            with self.cond:
                self.remaining[slot] -= 1
                if self.remaining[slot] == 0:
                    self.filled.append(slot)
                    self.cond.notify_all()

    def _slot(self, free: deque[int]) -> int:
        """A buffer to fill: a free one, else a new one (the caller checked the ring has room)."""
        if free:
            return free.popleft()
        self.buffers.append(self.backend.allocate(self.buffer_bytes))
        self.bases.append(self.buffers[-1].data_ptr())
        self.loaded.append(None)
        self.remaining.append(0)
        return len(self.buffers) - 1

    def _fill(self, slot: int, packet: _Packet) -> None:
        self.backend.begin_fill(self.buffers[slot])
        self.loaded[slot] = packet
        with self.cond:
            self.remaining[slot] = len(packet.tasks)
        for task in packet.tasks:
            self.work.put((slot, task))

    def _issue(self, slot: int) -> object:
        buffer = self.buffers[slot]
        pairs = [(dest_part(p.read, p.done, p.nbytes), buffer[p.at:p.at + p.nbytes]) for p in self.loaded[slot].parts]
        self.backend.copy(buffer, pairs)
        return self.backend.record(buffer)

    def _retire(self, slot: int, free: deque[int]) -> None:
        packet, self.loaded[slot] = self.loaded[slot], None
        free.append(slot)
        if self.on_progress:
            self.on_progress(packet.nbytes)

    def run(self) -> None:
        backend = self.backend
        threads = [threading.Thread(target=self.read, name=f"diffulex-stage-{i}", daemon=True)
                   for i in range(self.workers)]
        for thread in threads:
            thread.start()
        free: deque[int] = deque()
        inflight: deque[tuple[int, object]] = deque()  # (slot, event), in the order copies were enqueued
        following = filling = 0
        failed = True
        try:
            while True:
                while inflight and backend.done(inflight[0][1]):
                    slot, event = inflight.popleft()
                    backend.wait(event)  # raises a copy failure
                    self._retire(slot, free)
                with self.cond:
                    if self.error is not None:
                        raise self.error
                    ready = list(self.filled)
                    self.filled.clear()
                if ready:  # keep the copy engine busy first
                    for slot in ready:
                        filling -= 1
                        inflight.append((slot, self._issue(slot)))
                    continue
                if following < len(self.packets) and (free or len(self.buffers) < self.ring_buffers):
                    self._fill(self._slot(free), self.packets[following])
                    following += 1
                    filling += 1
                    continue
                if inflight and (following < len(self.packets) or not filling):
                    # Copies complete in order (one stream), so the oldest frees a buffer first.
                    slot, event = inflight.popleft()
                    backend.wait(event)
                    self._retire(slot, free)
                    continue
                if filling:
                    with self.cond:
                        while not self.filled and self.error is None:
                            self.cond.wait()
                    continue
                break
            backend.synchronize()
            failed = False
        finally:
            self._finish(threads, failed)

    def _finish(self, threads: list[threading.Thread], failed: bool) -> None:
        """Stop the readers, wait for copies in flight, give the buffers back; after a failure an
        error here is dropped, so the first one is what the caller sees."""
        backend = self.backend
        self.stop = True
        for _ in threads:
            self.work.put(None)
        for thread in threads:
            thread.join()
        try:
            backend.synchronize()  # no buffer is released while a copy may still read it
        except BaseException:
            if not failed:
                raise
        finally:
            try:
                for buffer in self.buffers:
                    backend.release(buffer)
            finally:
                self.buffers.clear()
                backend.close()


def copy_to_device(reads: Iterable[DeviceRead], fds: Mapping[Path, int], *, ring_buffers: int = RING_BUFFERS,
                   buffer_bytes: int = BUFFER_BYTES, threads: int | None = None, backend: StagingBackend | None = None,
                   on_progress: Callable[[int], None] | None = None, piece_bytes: int | None = None) -> StagingStats:
    """Perform every read through a ring of ``ring_buffers`` pinned buffers of ``buffer_bytes``.

    ``fds`` maps each file to an open descriptor (owned by the caller). ``threads`` reader threads
    (default: one per CPU) fill buffers in pieces of ``piece_bytes`` (default: sized so every
    thread has work). All destinations must be on one device. ``on_progress(nbytes)`` is called
    from this thread as buffers' copies complete. Returns when every byte has landed. A failure
    (a short read is a ``LoadApplyError`` naming the file and tensor; a failed copy) stops the
    reader threads, waits for copies in flight, returns the buffers and is raised here; some
    destinations may then hold new bytes and others old ones.
    """
    start = time.perf_counter()
    if ring_buffers < 1 or buffer_bytes < 1:
        raise ValueError(f"ring_buffers ({ring_buffers}) and buffer_bytes ({buffer_bytes}) must be positive")
    todo, device = checked_reads(reads)
    if not todo:
        return StagingStats("cuda-ring", 0, time.perf_counter() - start)
    backend = backend if backend is not None else CudaBackend()
    workers = max(1, threads or os.cpu_count() or 1)
    packets = _packets(todo, buffer_bytes, piece_bytes or _piece_bytes(ring_buffers, buffer_bytes, workers))
    ring = _Ring(packets, fds, backend, ring_buffers, min(workers, sum(len(p.tasks) for p in packets)), on_progress)
    backend.open(device)
    try:
        ring.run()
    except BaseException:
        backend.close()  # idempotent; run() closes it too, unless it failed before starting
        raise
    nbytes = sum(p.nbytes for p in packets)
    return StagingStats("cuda-ring", nbytes, time.perf_counter() - start, ring.workers,
                        min(ring_buffers, len(packets)) * ring.buffer_bytes)

