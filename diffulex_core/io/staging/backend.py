"""What both CUDA copy paths share: the read they perform (``DeviceRead``), what they report
(``StagingStats``) and the backend the ring schedules through (``StagingBackend``, with
``CudaBackend`` the real one). A backend is an interface so the ring's scheduling runs, and is
tested, on CPU (``diffulex_core.testing.cpu_backend``)."""

from __future__ import annotations

from pathlib import Path
from typing import Iterable, NamedTuple

import torch

from diffulex_core.errors import LoadApplyError

__all__ = ["CudaBackend", "DeviceRead", "StagingBackend", "StagingMisuseError", "StagingStats"]

MIB = 1024**2
GIB = 1024**3


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
    copy from it was pending). Only tests see this; it means a bug in the ring."""


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


def require_cuda(what: str) -> None:
    """A clear ``LoadApplyError`` before anything touches CUDA where there is none."""
    if not torch.cuda.is_available():
        raise LoadApplyError(
            f"{what} needs a CUDA device, but torch.cuda.is_available() is False (torch {torch.__version__}); "
            f"load into a model on the CPU, or run where a GPU and a CUDA build of torch are present"
        )


class CudaBackend(StagingBackend):
    """Pinned buffers (``pin_memory=True``), copies with ``non_blocking=True`` on a side stream, CUDA events."""

    name = "cuda"

    def __init__(self) -> None:
        require_cuda("The CUDA staging ring")
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


def checked_reads(reads: Iterable[DeviceRead]) -> tuple[list[DeviceRead], torch.device | None]:
    """The reads with bytes to move, and the one device they all write to (both paths refuse
    the same bad destinations, before anything is read)."""
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


def dest_part(read: DeviceRead, done: int, nbytes: int) -> torch.Tensor:
    """Bytes ``done:done+nbytes`` of the read's destination: both paths split a read into pieces."""
    return read.dest if nbytes == read.nbytes else read.dest[done:done + nbytes]
