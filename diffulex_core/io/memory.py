"""Small memory helpers the byte movers share. Imports neither torch nor the rest of diffulex_core,
so any module may use them (``checkpoint`` imports without torch)."""

from __future__ import annotations

import ctypes
from typing import Any, Iterable

__all__ = ["memory_at", "narrowed", "narrowed_ranges"]


def memory_at(address: int, nbytes: int) -> memoryview:
    """Writable bytes at ``address`` (a tensor's storage, a pinned buffer, a mapped file), not owned.

    ``os.preadv`` fills a memoryview in place, so reads land in the destination with no copy;
    the caller keeps the memory alive while the view is used.
    """
    return memoryview((ctypes.c_char * nbytes).from_address(address)).cast("B")


def narrowed(value: Any, narrows: Iterable[tuple[int, int, int]]) -> Any:
    """``value`` (a tensor or a ``CheckpointSlice``) narrowed by each ``(dim, start, length)`` in order.

    The form ``WeightDestination.source`` declares; a slice narrowed this way still reads only
    the bytes it keeps.
    """
    for dim, start, length in narrows:
        value = value.narrow(dim, start, length)
    return value


def narrowed_ranges(shape: Iterable[int], narrows: Iterable[tuple[int, int, int]]
                    ) -> tuple[list[tuple[int, int]], tuple[int, int, int] | None]:
    """The same narrows on a shape alone: ``(start, length)`` per dimension, in the original's
    coordinates, and the first narrow that falls outside (None when all fit). Plans check a
    declaration with it before any tensor exists."""
    ranges = [(0, n) for n in shape]
    for dim, start, length in narrows:
        if not (0 <= dim < len(ranges) and start >= 0 and length >= 0 and start + length <= ranges[dim][1]):
            return ranges, (dim, start, length)
        ranges[dim] = (ranges[dim][0] + start, length)
    return ranges, None
