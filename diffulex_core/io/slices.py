"""A checkpoint tensor not yet read: narrow it to a rank's rows or columns, then read only those bytes.

Under tensor parallelism each rank keeps a slice of most weights. Handing a ``weight_loader``
the whole tensor would make every rank read every byte; handing it a ``CheckpointSlice`` lets
it say which part it keeps (``narrow``), and ``param.data[...].copy_(view)`` reads exactly that
part from the file, straight into the parameter's memory where dtype and layout allow.

Only weight loaders that say they accept one get a view (``accepts_checkpoint_slice = True`` on
the function); loaders written against the seed keep receiving plain tensors. A view supports
``shape``, ``dtype``, ``ndim``, ``dim()``, ``size()``, ``numel()``, ``narrow()`` and being the
source of ``Tensor.copy_``; any other torch function reads it whole first (``to_tensor``).
"""

from __future__ import annotations

import itertools
import math
from typing import Any, Callable

import torch

from diffulex_core.files.headers import TensorRecord
from diffulex_core.io.reader import read_runs

__all__ = ["CheckpointSlice", "accepts_checkpoint_slice", "takes_checkpoint_slices"]

ATTRIBUTE = "accepts_checkpoint_slice"


def takes_checkpoint_slices(weight_loader: Callable) -> Callable:
    """Mark a ``weight_loader`` as able to take a ``CheckpointSlice`` (narrow + copy_ only).

    Use it as a decorator on the function or method; given a bound method, it marks the method's
    function (bound methods cannot hold attributes, and forward the lookup to their function).
    """
    setattr(getattr(weight_loader, "__func__", weight_loader), ATTRIBUTE, True)
    return weight_loader


def accepts_checkpoint_slice(weight_loader: Any) -> bool:
    """True when ``weight_loader`` is marked (bound methods forward the lookup to their function)."""
    return getattr(weight_loader, ATTRIBUTE, False) is True


def byte_runs(record: TensorRecord, ranges: tuple[tuple[int, int], ...] | None) -> list[tuple[int, int]]:
    """(file offset, bytes) of each contiguous piece of ``record`` limited to ``ranges`` (one
    ``(start, length)`` per dimension, None for all of it), in C order: one piece for rows, one
    per row for columns."""
    if ranges is None:
        return [(record.start, record.nbytes)]
    if any(length == 0 for _, length in ranges):
        return []
    item = record.dtype.itemsize
    full = record.shape
    strides = [item] * len(full)
    for d in range(len(full) - 2, -1, -1):
        strides[d] = strides[d + 1] * full[d + 1]
    inner = len(full)  # dims from ``inner`` on are whole, so one run spans them
    while inner > 0 and ranges[inner - 1] == (0, full[inner - 1]):
        inner -= 1
    if inner == 0:
        return [(record.start, record.nbytes)]
    start, length = ranges[inner - 1]
    run_bytes = length * strides[inner - 1]
    first = record.start + start * strides[inner - 1]
    outer = [range(s, s + n) for s, n in ranges[: inner - 1]]
    return [(first + sum(i * strides[d] for d, i in enumerate(index)), run_bytes)
            for index in itertools.product(*outer)]


class ByteMeter:
    """Bytes actually read from files, shared by the views of one load."""

    __slots__ = ("bytes",)

    def __init__(self) -> None:
        self.bytes = 0


class CheckpointSlice:
    """A view of ``record`` limited to ``ranges`` (one ``(start, length)`` per dimension).

    With ``fd=None`` the view is a dry run: it reads nothing and materializes on the meta
    device, so a plan can check a weight loader's slicing before any byte moves.
    """

    __slots__ = ("record", "fd", "ranges", "meter")

    def __init__(self, record: TensorRecord, fd: int | None, meter: ByteMeter | None = None,
                 ranges: tuple[tuple[int, int], ...] | None = None) -> None:
        self.record, self.fd, self.meter = record, fd, meter
        self.ranges = ranges if ranges is not None else tuple((0, n) for n in record.shape)

    # -- the Tensor-like surface weight loaders use

    @property
    def shape(self) -> torch.Size:
        return torch.Size(length for _, length in self.ranges)

    @property
    def dtype(self) -> torch.dtype:
        return self.record.dtype

    @property
    def ndim(self) -> int:
        return len(self.ranges)

    def dim(self) -> int:
        return len(self.ranges)

    def size(self, dim: int | None = None):
        return self.shape if dim is None else self.shape[dim]

    def numel(self) -> int:
        return math.prod(self.shape)

    def narrow(self, dim: int, start: int, length: int) -> "CheckpointSlice":
        """Like ``Tensor.narrow``: ``length`` entries of dimension ``dim`` from ``start``."""
        if not -self.ndim <= dim < self.ndim:
            raise IndexError(f"{self._what()}: dimension {dim} out of range for {self.ndim} dimensions")
        dim %= self.ndim
        offset, size = self.ranges[dim]
        if start < 0 or length < 0 or start + length > size:
            raise IndexError(f"{self._what()}: narrow({dim}, {start}, {length}) is outside its size {size}")
        ranges = list(self.ranges)
        ranges[dim] = (offset + start, length)
        return CheckpointSlice(self.record, self.fd, self.meter, tuple(ranges))

    def __repr__(self) -> str:
        return (f"CheckpointSlice({self.record.name!r}, shape={list(self.shape)}, dtype={self.dtype}, "
                f"ranges={self.ranges})")

    # -- reading

    def _what(self) -> str:
        return f"{self.record.file}: tensor {self.record.name!r}"

    def runs(self) -> list[tuple[int, int]]:
        """(file offset, bytes) of each contiguous piece of the view, in C order."""
        return byte_runs(self.record, self.ranges)

    def read_into(self, dest: torch.Tensor) -> None:
        """Read the view into ``dest``: a contiguous CPU tensor of its shape and dtype."""
        if self.fd is None:
            raise RuntimeError(f"{self._what()}: a dry-run view has no bytes to read")
        done = read_runs(self.fd, dest, self.runs(), self._what())
        if self.meter is not None:
            self.meter.bytes += done

    def to_tensor(self) -> torch.Tensor:
        """The view as a new CPU tensor (on the meta device for a dry run)."""
        if self.fd is None:
            return torch.empty(self.shape, dtype=self.dtype, device="meta")
        tensor = torch.empty(self.shape, dtype=self.dtype)
        self.read_into(tensor)
        return tensor

    def copy_to(self, dest: torch.Tensor) -> torch.Tensor:
        """``dest.copy_(self)``, reading straight into ``dest`` when it can; shapes must be equal
        (a checkpoint tensor is never broadcast)."""
        if tuple(dest.shape) != tuple(self.shape):
            raise ValueError(f"{self._what()}: a slice of shape {list(self.shape)} cannot be copied into a tensor "
                             f"of shape {list(dest.shape)}")
        if (self.fd is not None and dest.device.type == "cpu" and dest.dtype == self.dtype and dest.is_contiguous()
                and not (dest.requires_grad and torch.is_grad_enabled())):
            self.read_into(dest)
            return dest
        return dest.copy_(self.to_tensor())

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.Tensor.copy_ and len(args) >= 2 and isinstance(args[1], CheckpointSlice) \
                and isinstance(args[0], torch.Tensor):
            return args[1].copy_to(args[0])
        read = lambda v: v.to_tensor() if isinstance(v, CheckpointSlice) else v  # noqa: E731
        return func(*(read(a) for a in args), **{k: read(v) for k, v in kwargs.items()})
