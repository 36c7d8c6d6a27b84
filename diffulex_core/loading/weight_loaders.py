"""Writing one checkpoint tensor into its destination: a parameter's ``weight_loader`` (with or
without a shard id), the seed's default copy, which casts keep values, and where a declared
``weight_destination`` puts the bytes (a ``Layout``: no code runs per tensor)."""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, NamedTuple

import torch

from diffulex_core.checkpoint import WeightDestination
from diffulex_core.errors import WeightSpecError
from diffulex_core.files.headers import TensorRecord
from diffulex_core.io.memory import narrowed_ranges
from diffulex_core.io.slices import accepts_checkpoint_slice

__all__ = ["WHOLE", "Layout", "castable", "declared_layout", "default_weight_loader", "load_into", "takes_slice",
           "whole_tensor_loader"]


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy ``loaded_weight`` into ``param`` (casting dtype, moving device); shapes must match."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint tensor "
                         f"{tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def whole_tensor_loader(dest: torch.Tensor) -> Callable | None:
    """The parameter's ``weight_loader`` if it can take a whole tensor, ``(param, tensor)``.

    A loader that requires a shard id only knows how to place shards; a whole tensor of the
    parameter's own shape (an engine-format checkpoint) is then copied directly.
    """
    weight_loader = getattr(dest, "weight_loader", None)
    if weight_loader is None:
        return None
    try:
        inspect.signature(weight_loader).bind(dest, dest)
    except TypeError:
        return None
    except ValueError:  # no introspectable signature (a builtin): trust it
        pass
    return weight_loader


def load_into(dest: torch.Tensor, storage: torch.Tensor, tensor: torch.Tensor, shard_id: Any) -> None:
    """Call ``dest``'s loader on ``storage`` (``dest`` itself, or its meta twin during planning)."""
    if shard_id is not None:
        weight_loader = getattr(dest, "weight_loader", None)
        if weight_loader is None:
            raise WeightSpecError(f"shard id {shard_id!r} given but the parameter has no weight_loader(param, tensor, "
                                  "shard_id)")
        weight_loader(storage, tensor, shard_id)
        return
    weight_loader = whole_tensor_loader(dest)
    if weight_loader is not None:
        weight_loader(storage, tensor)
    else:
        default_weight_loader(storage, tensor)


def takes_slice(dest: torch.Tensor, shard_id: Any) -> bool:
    """Whether the loader that will write ``dest`` takes a ``CheckpointSlice`` (reads only its part)."""
    loader = getattr(dest, "weight_loader", None) if shard_id is not None else whole_tensor_loader(dest)
    return loader is not None and accepts_checkpoint_slice(loader)


def castable(src: torch.dtype, dst: torch.dtype, kind: str) -> bool:
    """Casts that keep values: float<->float, int<->int, and, into a buffer, integers or bools
    into floats (position tables, as ``copy_`` does). An integer tensor for a floating
    parameter is refused: it is a quantized or mislabelled weight, and copying it makes garbage."""
    if src == dst:
        return True
    integral = lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool  # noqa: E731
    if src.is_floating_point and dst.is_floating_point:
        return True
    if kind == "buffer" and dst.is_floating_point and not src.is_complex:
        return True
    return integral(src) and integral(dst)


class Layout(NamedTuple):
    """Where a checkpoint tensor's bytes go: the part ``ranges`` of it (``(start, length)`` per
    dimension, C order; None: all of it) fills the contiguous elements of the destination from
    ``offset``."""

    offset: int
    ranges: tuple[tuple[int, int], ...] | None


WHOLE = Layout(0, None)  # a plain copy: the whole tensor into the whole destination


def declared_layout(dest: torch.Tensor, name: str, record: TensorRecord,
                    shard_id: Any) -> tuple[str | None, Layout | None]:
    """(problem, layout) from the parameter's ``weight_destination``; (None, None) where the
    declaration cannot be read straight into memory (its ``weight_loader`` then runs)."""
    shard = f" (shard {shard_id!r})" if shard_id is not None else ""
    declared = f"the weight_destination of param {name!r}{shard}"
    try:
        found = dest.weight_destination(dest, record.shape, shard_id)
    except Exception as exc:
        return f"{declared} raised {type(exc).__name__}: {exc}", None
    if not isinstance(found, WeightDestination):
        return f"{declared} returned {type(found).__name__}, not a WeightDestination", None
    ranges, outside = narrowed_ranges(record.shape, found.source)
    if outside is not None:
        dim, start, length = outside
        return f"{declared} narrows ({dim}, {start}, {length}) outside shape {list(record.shape)}", None
    target = found.target
    if tuple(length for _, length in ranges) != tuple(target.shape):
        return (f"{declared} takes a part of shape {[n for _, n in ranges]} into a destination of "
                f"shape {list(target.shape)}"), None
    offset = target.storage_offset() - dest.storage_offset()
    if (target.untyped_storage()._cdata != dest.untyped_storage()._cdata or target.dtype != dest.dtype
            or not (target.is_contiguous() and dest.is_contiguous())
            or not 0 <= offset <= dest.numel() - target.numel()):
        return None, None
    return None, Layout(offset, tuple(ranges))
