"""Holding Ctrl-C while a load moves bytes, so an interrupted reload is never silently mixed.

Python raises ``KeyboardInterrupt`` wherever the main thread happens to be, while the reader
threads go on writing: a model that held weights would end part old, part new. During the
byte moves a first SIGINT is only recorded; the load stops at the next point where it can
still put everything back (and does), or finishes, and the signal is then delivered to the
handler that was there before, as if it had arrived at that moment. A second SIGINT aborts at
once; what the load had written is then marked (``partial_load``).
"""

from __future__ import annotations

import contextlib
import signal
import sys
import threading
from typing import Iterator

__all__ = ["InterruptGate", "deferred_interrupts"]


class InterruptGate:
    """Whether a Ctrl-C arrived during the block; the load asks at points where it can stop cleanly."""

    def __init__(self) -> None:
        self.requested = False
        self.delivered = False  # an abort (second Ctrl-C) or ``stop_if_requested`` raised it already
        self.shielded = 0  # > 0 while the model is being put back: no abort may cut that short

    @contextlib.contextmanager
    def shield(self) -> Iterator[None]:
        """Hold every Ctrl-C, the second too, while the block restores or marks the model."""
        self.shielded += 1
        try:
            yield
        finally:
            self.shielded -= 1

    def stop_if_requested(self) -> None:
        """Raise the held ``KeyboardInterrupt`` now (the caller restores the model first)."""
        if self.requested and not self.delivered:
            self.delivered = True
            raise KeyboardInterrupt


@contextlib.contextmanager
def deferred_interrupts() -> Iterator[InterruptGate]:
    """Hold SIGINT during the block (main thread only: signals reach no other thread)."""
    gate = InterruptGate()
    if threading.current_thread() is not threading.main_thread():
        yield gate
        return
    previous = signal.getsignal(signal.SIGINT)
    if previous is None:  # a handler installed outside Python: leave it alone
        yield gate
        return

    def hold(signum, frame) -> None:
        if gate.requested:  # the second Ctrl-C: abort now, unless the model is being put back or it was raised
            if gate.shielded or gate.delivered:
                return
            gate.delivered = True
            raise KeyboardInterrupt
        gate.requested = True
        print("diffulex: Ctrl-C received; the load stops where the model can be left whole "
              "(press Ctrl-C again to abort at once and leave it marked as partly written)", file=sys.stderr)

    signal.signal(signal.SIGINT, hold)
    try:
        yield gate
    finally:
        signal.signal(signal.SIGINT, previous)
        if gate.requested and not gate.delivered:
            signal.raise_signal(signal.SIGINT)  # to the previous handler, now restored
