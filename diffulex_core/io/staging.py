"""Moving tensor bytes from files onto a CUDA device at close to PCIe speed.

Reading each tensor into a CPU temporary and ``copy_``-ing it runs at 5 GiB/s on an H200, where a
pinned host-to-device copy runs at 51 GiB/s. Two ways past that, behind one shape of call
(``reads``, open descriptors, options -> ``StagingStats``):

* ``copy_to_device`` (path ``"cuda-ring"``): a ring of a few reusable pinned host buffers. Reader
  threads fill a buffer with ``os.preadv`` (small neighbouring tensors packed into one buffer, a
  large tensor split across several); the caller's thread then copies the buffer to the device
  asynchronously on a side stream and records an event; the buffer is filled again only once its
  event has completed. Reading and copying overlap, and staging never exceeds
  ``ring_buffers * buffer_bytes``. The scheduling goes through a ``StagingBackend``, so it runs
  (and is tested) on CPU with ``CpuStandInBackend``.
* ``copy_registered`` (path ``"cuda-registered"``): map each file read-only, register the mapped
  pages with CUDA (``cudaHostRegister`` with the read-only flag), copy each tensor straight from
  the page cache, unregister. No CPU copy at all; registration (per segment, in parallel) overlaps
  with the copies. Needs a GPU; nothing here touches CUDA at import time.

``choose_path`` maps the user's option to one of them.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import queue
import threading
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from diffulex_core.errors import ConfigurationError, LoadApplyError
from diffulex_core.io.reader import read_exact

__all__ = [
    "CpuStandInBackend",
    "CudaBackend",
    "DeviceRead",
    "StagingBackend",
    "StagingMisuseError",
    "StagingStats",
    "choose_path",
    "copy_registered",
    "copy_to_device",
]

MIB = 1024**2
GIB = 1024**3
RING_BUFFERS = 4  # pinned buffers in the ring
BUFFER_BYTES = 64 * MIB  # each buffer's size; staging is bounded by RING_BUFFERS * BUFFER_BYTES
MAX_PIECE_BYTES = 16 * MIB  # the most one reader thread reads for a buffer at once
MIN_PIECE_BYTES = 256 * 1024
MAX_GAP = 64 * 1024  # skipped bytes between packed tensors that are read (into staging) rather than split on
SEGMENT_BYTES = 256 * MIB  # registered path: the unit registered with CUDA, so copies start before a file is done
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly; the default flags fail on read-only maps
PAGE = mmap.PAGESIZE


class DeviceRead(NamedTuple):
    """Copy ``nbytes`` at ``start`` of ``file`` into ``dest``, a contiguous 1-D uint8 view of the
    destination's bytes on the device (``dest.numel() == nbytes``). ``name`` is the checkpoint
    tensor, for errors."""

    file: Path
    start: int
    nbytes: int
    dest: torch.Tensor
    name: str


class StagingStats(NamedTuple):
    """What one ``copy_to_device`` / ``copy_registered`` call moved, and how fast."""

    path: str  # "cuda-ring" or "cuda-registered"
    nbytes: int
    seconds: float
    threads: int = 0
    staging_bytes: int = 0  # host staging allocated (ring), or bytes registered (registered path)

    @property
    def gib_per_s(self) -> float:
        return self.nbytes / GIB / self.seconds if self.seconds > 0 else 0.0


class StagingMisuseError(AssertionError):
    """``CpuStandInBackend`` saw the scheduler break a rule (a buffer refilled or released while a
    copy from it was pending). Only tests see this; it means a bug in this module."""


# --------------------------------------------------------------------------- backends


class StagingBackend:
    """Where staging buffers come from and how their contents reach the device.

    The ring calls every method from the caller's thread (never from reader threads), in this
    order: ``open`` once; ``allocate`` up to ``ring_buffers`` times; per filled buffer
    ``begin_fill`` (before reader threads write into it), ``copy`` (enqueue, asynchronous) and
    ``record`` (an event completing after every copy enqueued so far); ``done`` / ``wait`` on
    events; ``synchronize`` at the end; ``release`` per buffer and ``close``, also after errors.
    A copy failure may surface from ``copy``, ``wait`` or ``synchronize``.
    """

    name = "abstract"

    def open(self, device: torch.device) -> None:
        pass

    def allocate(self, nbytes: int) -> torch.Tensor:
        """A host uint8 buffer of ``nbytes`` that copies can read asynchronously (pinned)."""
        raise NotImplementedError

    def release(self, buffer: torch.Tensor) -> None:
        pass

    def begin_fill(self, buffer: torch.Tensor) -> None:
        pass

    def copy(self, buffer: torch.Tensor, pairs: list[tuple[torch.Tensor, torch.Tensor]]) -> None:
        """Enqueue ``dest.copy_(src)`` for each pair; every ``src`` is a view of ``buffer``."""
        raise NotImplementedError

    def record(self, buffer: torch.Tensor):
        raise NotImplementedError

    def done(self, event) -> bool:
        raise NotImplementedError

    def wait(self, event) -> None:
        raise NotImplementedError

    def synchronize(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


def _require_cuda(what: str) -> None:
    if not torch.cuda.is_available():
        raise LoadApplyError(
            f"{what} needs a CUDA device, but torch.cuda.is_available() is False (torch {torch.__version__}); "
            f"load into a model on the CPU, or run where a GPU and a CUDA build of torch are present"
        )


class CudaBackend(StagingBackend):
    """Pinned buffers (``pin_memory=True``), copies with ``non_blocking=True`` on a side stream, CUDA events."""

    name = "cuda"

    def __init__(self) -> None:
        _require_cuda("The CUDA staging ring")
        self.stream = None

    def open(self, device: torch.device) -> None:
        if device.type != "cuda":
            raise ValueError(f"CudaBackend copies to CUDA tensors; the destinations are on {device}")
        self.stream = torch.cuda.Stream(device)
        # Destinations may still be written by queued work on the current stream (allocation, zeroing).
        self.stream.wait_stream(torch.cuda.current_stream(device))

    def allocate(self, nbytes: int) -> torch.Tensor:
        return torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)

    def copy(self, buffer, pairs) -> None:
        with torch.cuda.stream(self.stream):
            for dest, src in pairs:
                dest.copy_(src, non_blocking=True)

    def record(self, buffer):
        event = torch.cuda.Event(blocking=True)  # waiting sleeps instead of spinning on a core readers need
        event.record(self.stream)
        return event

    def done(self, event) -> bool:
        return event.query()

    def wait(self, event) -> None:
        event.synchronize()

    def synchronize(self) -> None:
        if self.stream is not None:
            self.stream.synchronize()  # after this the destinations are ready for any stream


class _StandInEvent:
    def __init__(self, slot: int) -> None:
        self.slot = slot
        self.flag = threading.Event()
        self.error: BaseException | None = None


class CpuStandInBackend(StagingBackend):
    """The ring's scheduling on CPU: ordinary tensors stand for pinned buffers and device memory,
    copies run on a worker thread in the order enqueued (as on one CUDA stream), events are
    ``threading.Event``-like. It checks the scheduler's rules and records what happened:

    * ``log``: ``("alloc"|"fill"|"copy"|"complete"|"release", slot, nbytes)`` in order (``copy`` when enqueued).
    * ``max_busy_bytes``: the most bytes of buffers handed out for filling whose copies had not
      completed; ``max_pending_copy_bytes``: the most bytes enqueued and not yet copied;
      ``max_allocated_bytes``; ``live_buffers`` (allocated and not released).
    * A buffer filled or released while a copy from it is pending raises ``StagingMisuseError``;
      with ``check_sources`` each copy also compares its source with a snapshot taken when it was
      enqueued, so a buffer overwritten early fails the copy.
    * ``copy_delay`` seconds before each copy; ``fail_copy_at=k`` makes the k-th copy (0-based)
      raise ``fail_with`` (a ``RuntimeError`` by default). Like a CUDA error, a failure is sticky:
      later copies are skipped and every later event raises it.
    """

    name = "cpu-stand-in"

    def __init__(self, *, copy_delay: float = 0.0, fail_copy_at: int | None = None,
                 fail_with: BaseException | None = None, check_sources: bool = True) -> None:
        self.copy_delay = copy_delay
        self.fail_copy_at = fail_copy_at
        self.fail_with = fail_with
        self.check_sources = check_sources
        self.log: list[tuple[str, int, int]] = []
        self.max_busy_bytes = self.max_pending_copy_bytes = self.max_allocated_bytes = 0
        self.live_buffers = 0
        self.copies_done = 0
        self._lock = threading.Lock()
        self._slots: dict[int, int] = {}  # buffer data_ptr -> slot
        self._sizes: list[int] = []
        self._pending: list[int] = []  # per slot: copies enqueued, not yet performed
        self._busy: set[int] = set()
        self._allocated = self._pending_bytes = 0
        self._jobs: queue.SimpleQueue = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._error: BaseException | None = None
        self._copies_started = 0

    # bookkeeping -----------------------------------------------------------------------------

    def _slot(self, buffer: torch.Tensor) -> int:
        return self._slots[buffer.data_ptr()]

    def _note(self, op: str, slot: int, nbytes: int) -> None:
        self.log.append((op, slot, nbytes))

    # backend ---------------------------------------------------------------------------------

    def open(self, device: torch.device) -> None:
        self._error = None
        self._worker = threading.Thread(target=self._run, name="diffulex-standin-copy", daemon=True)
        self._worker.start()

    def allocate(self, nbytes: int) -> torch.Tensor:
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        with self._lock:
            slot = len(self._sizes)
            self._slots[buffer.data_ptr()] = slot
            self._sizes.append(nbytes)
            self._pending.append(0)
            self.live_buffers += 1
            self._allocated += nbytes
            self.max_allocated_bytes = max(self.max_allocated_bytes, self._allocated)
            self._note("alloc", slot, nbytes)
        return buffer

    def release(self, buffer: torch.Tensor) -> None:
        with self._lock:
            slot = self._slot(buffer)
            if self._pending[slot]:
                raise StagingMisuseError(f"buffer {slot} released with {self._pending[slot]} copies from it pending")
            self.live_buffers -= 1
            self._allocated -= self._sizes[slot]
            del self._slots[buffer.data_ptr()]
            self._note("release", slot, self._sizes[slot])

    def begin_fill(self, buffer: torch.Tensor) -> None:
        with self._lock:
            slot = self._slot(buffer)
            if self._pending[slot] or slot in self._busy:
                raise StagingMisuseError(f"buffer {slot} handed out for filling while a copy from it is pending")
            self._busy.add(slot)
            self.max_busy_bytes = max(self.max_busy_bytes, sum(self._sizes[s] for s in self._busy))
            self._note("fill", slot, self._sizes[slot])

    def copy(self, buffer, pairs) -> None:
        slot = self._slot(buffer)
        for dest, src in pairs:
            if dest.device != torch.device("cpu") or src.data_ptr() < buffer.data_ptr() or \
                    src.data_ptr() + src.numel() > buffer.data_ptr() + buffer.numel():
                raise StagingMisuseError(f"copy from outside buffer {slot}, or to a non-CPU tensor")
            snapshot = src.clone() if self.check_sources else None
            with self._lock:
                self._pending[slot] += 1
                self._pending_bytes += src.numel()
                self.max_pending_copy_bytes = max(self.max_pending_copy_bytes, self._pending_bytes)
                self._note("copy", slot, src.numel())
            self._jobs.put(("copy", slot, dest, src, snapshot))

    def record(self, buffer):
        event = _StandInEvent(self._slot(buffer))
        self._jobs.put(("event", event))
        return event

    def done(self, event) -> bool:
        return event.flag.is_set()

    def wait(self, event) -> None:
        event.flag.wait()
        if event.error is not None:
            raise event.error

    def synchronize(self) -> None:
        if self._worker is None:
            return
        event = _StandInEvent(-1)
        self._jobs.put(("event", event))
        self.wait(event)

    def close(self) -> None:
        if self._worker is not None:
            self._jobs.put(None)
            self._worker.join()
            self._worker = None

    def _run(self) -> None:
        while (job := self._jobs.get()) is not None:
            if job[0] == "event":
                event = job[1]
                event.error = self._error
                with self._lock:
                    if event.slot >= 0:
                        self._busy.discard(event.slot)
                        self._note("complete", event.slot, 0)
                event.flag.set()
                continue
            _, slot, dest, src, snapshot = job
            try:
                if self._error is None:
                    if self.copy_delay:
                        time.sleep(self.copy_delay)
                    if self._copies_started == self.fail_copy_at:
                        raise self.fail_with or RuntimeError(f"injected copy failure (copy {self.fail_copy_at})")
                    self._copies_started += 1
                    if snapshot is not None and not torch.equal(src, snapshot):
                        raise StagingMisuseError(f"buffer {slot} was overwritten before its copy ran")
                    dest.copy_(src)
                    self.copies_done += 1
            except BaseException as exc:  # sticky, like an asynchronous CUDA error
                self._error = exc
            finally:
                with self._lock:
                    self._pending[slot] -= 1
                    self._pending_bytes -= src.numel()


# --------------------------------------------------------------------------- common checks


def _memory(address: int, nbytes: int) -> memoryview:
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def _checked(reads: Iterable[DeviceRead]) -> tuple[list[DeviceRead], torch.device | None]:
    """The reads with bytes to move, and the one device they all write to."""
    out: list[DeviceRead] = []
    device = None
    for read in reads:
        if read.nbytes == 0:
            continue
        dest = read.dest
        if dest.dtype != torch.uint8 or dest.dim() != 1 or not dest.is_contiguous() or dest.numel() != read.nbytes:
            raise ValueError(f"{read.file}: tensor {read.name!r}: dest must be a contiguous 1-D uint8 view of "
                             f"{read.nbytes} bytes, got {dest.dtype} of shape {tuple(dest.shape)}")
        if device is None:
            device = dest.device
        elif dest.device != device:
            raise ValueError(f"tensor {read.name!r} goes to {dest.device}, others to {device}; "
                             f"make one call per device")
        out.append(read)
    return out, device


def _dest_part(read: DeviceRead, done: int, nbytes: int) -> torch.Tensor:
    return read.dest if nbytes == read.nbytes else read.dest[done:done + nbytes]


# --------------------------------------------------------------------------- the pinned ring


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
                    read_exact(self.fds[chunk.file], _memory(base + chunk.at, chunk.nbytes), chunk.offset, chunk.what)
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

    def _fill(self, slot: int, packet: _Packet) -> None:
        self.backend.begin_fill(self.buffers[slot])
        self.loaded[slot] = packet
        with self.cond:
            self.remaining[slot] = len(packet.tasks)
        for task in packet.tasks:
            self.work.put((slot, task))

    def _issue(self, slot: int) -> object:
        buffer = self.buffers[slot]
        pairs = [(_dest_part(p.read, p.done, p.nbytes), buffer[p.at:p.at + p.nbytes]) for p in self.loaded[slot].parts]
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
                    if free:
                        slot = free.popleft()
                    else:
                        slot = len(self.buffers)
                        self.buffers.append(backend.allocate(self.buffer_bytes))
                        self.bases.append(self.buffers[-1].data_ptr())
                        self.loaded.append(None)
                        self.remaining.append(0)
                    self._fill(slot, self.packets[following])
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
    todo, device = _checked(reads)
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


# --------------------------------------------------------------------------- registered mappings


class _Segment(NamedTuple):
    """Pages ``lo:hi`` of ``file`` (page-aligned, disjoint from every other segment) and the parts
    of reads inside them: ``(read, done, nbytes)``."""

    file: Path
    lo: int
    hi: int
    parts: list[tuple[DeviceRead, int, int]]


def _segments(reads: list[DeviceRead], sizes: Mapping[Path, int], segment_bytes: int) -> list[_Segment]:
    """Cut each file at multiples of ``segment_bytes`` (page-aligned); a read crossing a cut is
    split into one copy per segment, so no two registrations overlap and each copy's source lies
    in one registration."""
    step = max(PAGE, segment_bytes // PAGE * PAGE)
    cut: dict[tuple[Path, int], list] = {}
    for read in reads:
        size = sizes[read.file]
        if read.start + read.nbytes > size:
            raise LoadApplyError(f"{read.file}: tensor {read.name!r}: the file ended before the tensor did "
                                 f"({size:,} bytes, the tensor ends at {read.start + read.nbytes:,}); was it "
                                 f"changed during the load?")
        done = 0
        while done < read.nbytes:
            offset = read.start + done
            index = offset // step
            take = min(read.nbytes - done, (index + 1) * step - offset)
            entry = cut.setdefault((read.file, index), [offset, offset + take, []])
            entry[0], entry[1] = min(entry[0], offset), max(entry[1], offset + take)
            entry[2].append((read, done, take))
            done += take
    return [_Segment(file, lo // PAGE * PAGE, -(-hi // PAGE) * PAGE, parts)
            for (file, _), (lo, hi, parts) in sorted(cut.items(), key=lambda kv: (str(kv[0][0]), kv[0][1]))]


_libc_handle = None


def _libc():
    global _libc_handle
    if _libc_handle is None:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.mmap.restype = ctypes.c_void_p
        libc.mmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t, ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_long]
        libc.munmap.restype = ctypes.c_int
        libc.munmap.argtypes = [ctypes.c_void_p, ctypes.c_size_t]
        _libc_handle = libc
    return _libc_handle


def _map_read_only(fd: int, size: int, file: Path) -> int:
    """The address of a shared read-only mapping of the whole file (Python's ``mmap`` cannot hand
    out the address of a read-only map, which registration needs)."""
    address = _libc().mmap(None, size, mmap.PROT_READ, mmap.MAP_SHARED, fd, 0)
    if address is None or address == ctypes.c_void_p(-1).value:
        err = ctypes.get_errno()
        raise LoadApplyError(f"{file}: mapping {size:,} bytes failed ({os.strerror(err)})")
    return address


def _unmap(address: int, size: int) -> None:
    _libc().munmap(address, size)


def _host_tensor(address: int, nbytes: int) -> torch.Tensor:
    """A CPU uint8 tensor over existing memory (not owned; valid while the mapping lives)."""
    return torch.frombuffer((ctypes.c_char * nbytes).from_address(address), dtype=torch.uint8)


def _cudart():
    _require_cuda("The registered-mapping path (copy_registered)")
    cudart = torch.cuda.cudart()
    if not (hasattr(cudart, "cudaHostRegister") and hasattr(cudart, "cudaHostUnregister")):
        raise LoadApplyError(f"torch {torch.__version__} does not expose cudaHostRegister in torch.cuda.cudart(); "
                             f"use the ring path instead (choose_path('ring'))")
    return cudart


def copy_registered(reads: Iterable[DeviceRead], fds: Mapping[Path, int], *, threads: int | None = None,
                    on_progress: Callable[[int], None] | None = None,
                    segment_bytes: int = SEGMENT_BYTES) -> StagingStats:
    """Perform every read by copying straight from the page cache: each file is mapped read-only,
    registered with CUDA in segments of ``segment_bytes`` on ``threads`` threads, each segment's
    tensors are copied (``non_blocking``, side stream) as soon as it is registered; after the
    stream is synchronized everything is unregistered and unmapped, also after an error.
    Same call shape as ``copy_to_device`` (``fds``: file -> open descriptor, owned by the caller).
    """
    start = time.perf_counter()
    todo, device = _checked(reads)
    if not todo:
        return StagingStats("cuda-registered", 0, time.perf_counter() - start)
    cudart = _cudart()
    if device.type != "cuda":
        raise ValueError(f"copy_registered copies to CUDA tensors; the destinations are on {device}")
    files = {read.file for read in todo}
    sizes = {file: os.fstat(fds[file]).st_size for file in files}
    segments = _segments(todo, sizes, segment_bytes)
    workers = max(1, min(threads or os.cpu_count() or 1, len(segments)))

    def register(address: int, nbytes: int, file: Path) -> int:
        with torch.cuda.device(device):  # register in the destination device's context
            err = int(cudart.cudaHostRegister(address, nbytes, CUDA_HOST_REGISTER_READ_ONLY))
        if err != 0:
            raise LoadApplyError(f"{file}: cudaHostRegister of {nbytes:,} mapped bytes (read-only flag) failed "
                                 f"with cudaError {err}; use the ring path instead (choose_path('ring'))")
        return address

    def unregister(address: int) -> int:
        with torch.cuda.device(device):
            return int(cudart.cudaHostUnregister(address))

    mapped: dict[Path, int] = {}
    futures: dict = {}
    stream = None
    failed = True
    pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffulex-register")
    try:
        for file in files:
            mapped[file] = _map_read_only(fds[file], sizes[file], file)
        stream = torch.cuda.Stream(device)
        stream.wait_stream(torch.cuda.current_stream(device))
        futures = {pool.submit(register, mapped[s.file] + s.lo, s.hi - s.lo, s.file): s for s in segments}
        waiting, pending = set(futures), deque()  # pending: (event, nbytes) of copies enqueued
        while waiting:
            ready, waiting = wait(waiting, return_when=FIRST_COMPLETED)
            for future in ready:
                segment, address = futures[future], future.result()
                source = _host_tensor(address, segment.hi - segment.lo)
                with torch.cuda.stream(stream):
                    for read, done, nbytes in segment.parts:
                        at = read.start + done - segment.lo
                        _dest_part(read, done, nbytes).copy_(source[at:at + nbytes], non_blocking=True)
                event = torch.cuda.Event()
                event.record(stream)
                pending.append((event, sum(part[2] for part in segment.parts)))
            while on_progress and pending and pending[0][0].query():
                on_progress(pending.popleft()[1])
        stream.synchronize()
        while on_progress and pending:
            on_progress(pending.popleft()[1])
        failed = False
    finally:
        pool.shutdown(wait=True, cancel_futures=True)
        try:
            if stream is not None:
                stream.synchronize()  # copies read the mapped pages until here
        except BaseException:
            if not failed:
                raise
        finally:
            registered = [f.result() for f in futures if f.done() and not f.cancelled() and f.exception() is None]
            errors = []
            if registered:
                with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="diffulex-unregister") as unpool:
                    errors = [err for err in unpool.map(unregister, registered) if err != 0]
            for file, address in mapped.items():
                _unmap(address, sizes[file])
            if errors and not failed:
                raise LoadApplyError(f"cudaHostUnregister failed for {len(errors)} segment(s) (cudaError {errors[0]})")
    nbytes = sum(read.nbytes for read in todo)
    return StagingStats("cuda-registered", nbytes, time.perf_counter() - start, workers,
                        sum(s.hi - s.lo for s in segments))


# --------------------------------------------------------------------------- choosing


PATHS = {"ring": copy_to_device, "registered": copy_registered}


def choose_path(option: str | None = "auto") -> Callable[..., StagingStats]:
    """The copy function for ``option``: ``"auto"`` (or ``None``), ``"ring"`` or ``"registered"``.

    Both take ``(reads, fds, *, threads=None, on_progress=None)``. ``"auto"`` is the ring for
    now: it needs no driver support beyond pinned memory and its staging is bounded. The GPU
    benchmark (``benchmarks/bench_load.py --device cuda``) decides the default later; the
    registered path is the one that can reach the PCIe limit.
    """
    key = "ring" if option in (None, "auto") else option
    if key not in PATHS:
        raise ConfigurationError(f"unknown device copy path {option!r}; expected 'auto', 'ring' or 'registered'")
    return PATHS[key]
