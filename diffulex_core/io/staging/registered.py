"""``copy_registered`` (path ``"cuda-registered"``): tensor bytes copied to a CUDA device straight
from the page cache.

Each file is mapped read-only and the mapped pages are registered with CUDA
(``cudaHostRegister`` with the read-only flag), each tensor is copied from there, then everything
is unregistered. No CPU copy at all; registration (per segment, in parallel) overlaps with the
copies. Needs a GPU; nothing here touches CUDA at import time.
"""

from __future__ import annotations

import ctypes
import mmap
import os
import time
from collections import deque
from concurrent.futures import FIRST_COMPLETED, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Callable, Iterable, Mapping, NamedTuple

import torch

from diffulex_core.errors import LoadApplyError
from diffulex_core.io.memory import memory_at
from diffulex_core.io.staging.backend import MIB, DeviceRead, StagingStats, checked_reads, dest_part, require_cuda

__all__ = ["copy_registered"]

SEGMENT_BYTES = 256 * MIB  # the unit registered with CUDA, so copies start before a file is done
CUDA_HOST_REGISTER_READ_ONLY = 8  # cudaHostRegisterReadOnly; the default flags fail on read-only maps
PAGE = mmap.PAGESIZE


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
    return torch.frombuffer(memory_at(address, nbytes), dtype=torch.uint8)


def _cudart():
    require_cuda("The registered-mapping path (copy_registered)")
    cudart = torch.cuda.cudart()
    if not (hasattr(cudart, "cudaHostRegister") and hasattr(cudart, "cudaHostUnregister")):
        raise LoadApplyError(f"torch {torch.__version__} does not expose cudaHostRegister in torch.cuda.cudart(); "
                             f"use the ring path instead (choose_path('ring'))")
    return cudart


class _Registration:
    """One ``copy_registered`` call's mappings, registrations and copies; ``run`` undoes all of
    them, also after an error."""

    def __init__(self, device: torch.device, cudart, workers: int, sizes: Mapping[Path, int]) -> None:
        self.device = device
        self.cudart = cudart
        self.workers = workers
        self.sizes = sizes
        self.mapped: dict[Path, int] = {}
        self.futures: dict = {}
        self.stream = None

    def register(self, address: int, nbytes: int, file: Path) -> int:
        with torch.cuda.device(self.device):  # register in the destination device's context
            err = int(self.cudart.cudaHostRegister(address, nbytes, CUDA_HOST_REGISTER_READ_ONLY))
        if err != 0:
            raise LoadApplyError(f"{file}: cudaHostRegister of {nbytes:,} mapped bytes (read-only flag) failed "
                                 f"with cudaError {err}; use the ring path instead (choose_path('ring'))")
        return address

    def unregister(self, address: int) -> int:
        with torch.cuda.device(self.device):
            return int(self.cudart.cudaHostUnregister(address))

    def _copy(self, segment: _Segment, address: int) -> tuple[object, int]:
        """Enqueue the copies of one registered segment: (an event after them, their bytes)."""
        source = _host_tensor(address, segment.hi - segment.lo)
        with torch.cuda.stream(self.stream):
            for read, done, nbytes in segment.parts:
                at = read.start + done - segment.lo
                dest_part(read, done, nbytes).copy_(source[at:at + nbytes], non_blocking=True)
        event = torch.cuda.Event()
        event.record(self.stream)
        return event, sum(part[2] for part in segment.parts)

    def run(self, segments: list[_Segment], fds: Mapping[Path, int], on_progress: Callable[[int], None] | None) -> None:
        failed = True
        pool = ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="diffulex-register")
        try:
            for file, size in self.sizes.items():
                self.mapped[file] = _map_read_only(fds[file], size, file)
            self.stream = torch.cuda.Stream(self.device)
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            self.futures = {pool.submit(self.register, self.mapped[s.file] + s.lo, s.hi - s.lo, s.file): s
                            for s in segments}
            waiting, pending = set(self.futures), deque()  # pending: (event, nbytes) of copies enqueued
            while waiting:
                ready, waiting = wait(waiting, return_when=FIRST_COMPLETED)
                for future in ready:
                    pending.append(self._copy(self.futures[future], future.result()))
                while on_progress and pending and pending[0][0].query():
                    on_progress(pending.popleft()[1])
            self.stream.synchronize()
            while on_progress and pending:
                on_progress(pending.popleft()[1])
            failed = False
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self._undo(failed)

    def _undo(self, failed: bool) -> None:
        """Wait for the copies, then unregister and unmap everything; after a failure an error
        here is dropped, so the first one is what the caller sees."""
        try:
            if self.stream is not None:
                self.stream.synchronize()  # copies read the mapped pages until here
        except BaseException:
            if not failed:
                raise
        finally:
            registered = [f.result() for f in self.futures if f.done() and not f.cancelled() and f.exception() is None]
            errors = []
            if registered:
                with ThreadPoolExecutor(max_workers=self.workers, thread_name_prefix="diffulex-unregister") as unpool:
                    errors = [err for err in unpool.map(self.unregister, registered) if err != 0]
            for file, address in self.mapped.items():
                _unmap(address, self.sizes[file])
            if errors and not failed:
                raise LoadApplyError(f"cudaHostUnregister failed for {len(errors)} segment(s) (cudaError {errors[0]})")


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
    todo, device = checked_reads(reads)
    if not todo:
        return StagingStats("cuda-registered", 0, time.perf_counter() - start)
    cudart = _cudart()
    if device.type != "cuda":
        raise ValueError(f"copy_registered copies to CUDA tensors; the destinations are on {device}")
    files = {read.file for read in todo}
    sizes = {file: os.fstat(fds[file]).st_size for file in files}
    segments = _segments(todo, sizes, segment_bytes)
    workers = max(1, min(threads or os.cpu_count() or 1, len(segments)))
    _Registration(device, cudart, workers, sizes).run(segments, fds, on_progress)
    nbytes = sum(read.nbytes for read in todo)
    return StagingStats("cuda-registered", nbytes, time.perf_counter() - start, workers,
                        sum(s.hi - s.lo for s in segments))
