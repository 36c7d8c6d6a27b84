"""``CpuStandInBackend``: the CUDA staging ring's scheduling run on CPU, so tests and
``benchmarks/bench_load.py --dry-run`` can check it without a GPU. Test-only code, hence here."""

from __future__ import annotations

import queue
import threading
import time

import torch

from diffulex_core.io.staging import StagingBackend, StagingMisuseError

__all__ = ["CpuStandInBackend"]


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
