"""Seeing, and undoing, what model or plugin code writes into a model's tensors.

The seed's loaders (``ResolvedWeight(loader=fn)``) write wherever they like without saying
where, and weight loaders that cannot run on meta tensors cannot be dry-run by the plan. Such
code runs under ``WriteWatcher``: a torch dispatch mode that sees every aten op with a
mutated argument (``copy_``, ``fill_``, ``index_put_``, ``out=``, ... through ``.data`` too,
which parameter version counters miss), names the parameters and buffers whose memory it
touches, and can keep the bytes it is about to overwrite so the load can be undone.
``MetaOnly`` is the plan's guard: a dry run may write meta tensors only.
"""

from __future__ import annotations

from typing import Any, Iterator

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["ModelMemory", "WriteWatcher", "MetaOnly", "NonMetaWrite"]


_WRITE_ARGUMENTS: dict[Any, tuple[tuple[int, str], ...]] = {}


def _write_arguments(func: Any) -> tuple[tuple[int, str], ...]:
    """(position, name) of the arguments an aten op mutates, from its schema (cached per op)."""
    written = _WRITE_ARGUMENTS.get(func)
    if written is None:
        written = _WRITE_ARGUMENTS[func] = tuple(
            (i, a.name) for i, a in enumerate(func._schema.arguments)
            if a.alias_info is not None and a.alias_info.is_write)
    return written


def _written_tensors(written: tuple[tuple[int, str], ...], args: tuple, kwargs: dict) -> Iterator[torch.Tensor]:
    for i, name in written:
        value = args[i] if i < len(args) else kwargs.get(name)
        if isinstance(value, torch.Tensor):
            yield value
        elif isinstance(value, (list, tuple)):
            yield from (v for v in value if isinstance(v, torch.Tensor))


class _Mode(TorchDispatchMode):
    @classmethod
    def _should_skip_dynamo(cls) -> bool:
        # Loads never run under torch.compile. Letting torch wrap __torch_dispatch__ in
        # dynamo's "disable" would import torch._dynamo on first use (~2 s) and cost ~50 us per op.
        return False


def _byte_range(t: torch.Tensor) -> tuple[int, int, int]:
    """(storage address, first byte, end byte) of the memory ``t`` can reach."""
    if t.numel() == 0:
        return 0, 0, 0
    extent = 1 + sum((size - 1) * abs(stride) for size, stride in zip(t.shape, t.stride(), strict=True))
    start = t.storage_offset() * t.element_size()
    return t.untyped_storage().data_ptr(), start, start + extent * t.element_size()


class ModelMemory:
    """Which named tensors of a model live where, so a written view can be traced to its owners."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.sizes: dict[str, int] = {}
        self._by_storage: dict[int, list[tuple[int, int, str]]] = {}
        for name, tensor in tensors.items():
            address, start, end = _byte_range(tensor)
            self.sizes[name] = end - start
            if end > start:
                self._by_storage.setdefault(address, []).append((start, end, name))

    def owners(self, t: torch.Tensor) -> list[tuple[str, int, int]]:
        """(name, first byte, end byte) of each named tensor ``t`` overlaps, relative to that tensor."""
        address, start, end = _byte_range(t)
        return [(name, max(start, s) - s, min(end, e) - s)
                for s, e, name in self._by_storage.get(address, ()) if s < end and start < e]


class WriteWatcher(_Mode):
    """Records which model tensors code writes, and which of their bytes; with ``keep_undo`` the old bytes too.

    ``undo`` holds (view, saved copy on the CPU) in write order; ``rollback(mark)`` restores
    everything written since ``mark`` (a length of ``undo``), newest first. A strided write
    counts the whole span it reaches, so coverage can be overstated, never understated.
    """

    def __init__(self, memory: ModelMemory, keep_undo: bool) -> None:
        super().__init__()
        self.memory, self.keep_undo = memory, keep_undo
        self.log: list[tuple[str, int, int]] = []  # (name, first byte, end byte) per write, in order
        self.undo: list[tuple[torch.Tensor, torch.Tensor]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        written = _write_arguments(func)
        if not written:  # views, reads: most ops
            return func(*args, **kwargs)
        for tensor in _written_tensors(written, args, kwargs):
            owners = self.memory.owners(tensor)
            if owners:
                self.log += owners
                if self.keep_undo:
                    self.undo.append((tensor, tensor.to("cpu", copy=True)))
        return func(*args, **kwargs)

    def mark(self) -> tuple[int, int]:
        return len(self.log), len(self.undo)

    def written_since(self, mark: tuple[int, int]) -> set[str]:
        return {name for name, _, _ in self.log[mark[0]:]}

    def coverage(self) -> dict[str, int]:
        """How many bytes of each written tensor were written, overlapping writes counted once."""
        spans: dict[str, list[tuple[int, int]]] = {}
        for name, start, end in self.log:
            spans.setdefault(name, []).append((start, end))
        out = {}
        for name, pieces in spans.items():
            total = reach = 0
            for start, end in sorted(pieces):
                start = max(start, reach)
                if end > start:
                    total += end - start
                    reach = end
            out[name] = total
        return out

    def rollback(self, mark: tuple[int, int] = (0, 0)) -> None:
        """Put back every byte written since ``mark``, newest first (bytes only with ``keep_undo``)."""
        del self.log[mark[0]:]
        with torch.no_grad():
            while len(self.undo) > mark[1]:
                view, saved = self.undo.pop()
                view.copy_(saved)


class NonMetaWrite(RuntimeError):
    """A dry run on meta tensors tried to write a real tensor (the model's own memory)."""


class MetaOnly(_Mode):
    """Lets a dry run write meta tensors only, so planning can never change a materialized model."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        for tensor in _written_tensors(_write_arguments(func), args, kwargs):
            if not tensor.is_meta:
                raise NonMetaWrite(f"{func.__name__} would write a {tensor.device.type} tensor during a dry run")
        return func(*args, **kwargs)
