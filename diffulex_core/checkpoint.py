"""Value objects for checkpoint weight resolution: ``LoadContext``, ``ResolvedWeight`` and
``WeightDestination``."""

from __future__ import annotations

import sys
from dataclasses import dataclass
from typing import Any, Callable, NamedTuple

from .errors import WeightSpecError

__all__ = ["LoadContext", "ResolvedWeight", "WeightDestination"]


@dataclass(frozen=True)
class LoadContext:
    """What a resolver may need to know about the tensor being placed and the load around it.

    ``full_name`` is the tensor's name in the checkpoint; ``config`` the engine configuration
    passed to the loader (any object, or ``None``). ``LoadContext(config, full_name)`` is the
    seed's form; the other fields are ours and optional. ``tp_rank/tp_size`` and
    ``ep_rank/ep_size`` are this process's place in its tensor- and expert-parallel groups
    (``diffulex_core.parallel``).
    """

    config: Any = None
    full_name: str = ""
    family: str | None = None
    tp_rank: int = 0
    tp_size: int = 1
    checkpoint: str | None = None
    ep_rank: int = 0
    ep_size: int = 1


@dataclass(frozen=True)
class ResolvedWeight:
    """Where one checkpoint tensor goes: a parameter, a buffer, a custom loader, or nowhere (skip).

    ``param`` and ``buffer`` are the destination itself (``self.gate_up_proj.weight``, as
    Diffulex's families return) or its name, relative to the module that resolved the tensor
    (the model itself for plugin hooks). ``shard_id`` is handed to the parameter's
    ``weight_loader(param, tensor, shard_id)``. ``transform(tensor) -> tensor`` runs first.
    ``loader(tensor)`` writes the tensor itself; ``covers`` may list the parameter names it
    writes so the plan knows them in advance (without it, the loader's writes are observed).

    Fields may be combined as in the seed; the first that applies wins, in the seed's order:
    ``skip``, then ``loader`` (after ``transform``), then ``param``, then ``buffer``. A spec
    naming none of them resolves the tensor to nothing, which the load reports as a problem.
    ``reason`` is shown in the load report for a skip.
    """

    param: Any = None
    buffer: Any = None
    shard_id: Any = None
    transform: Callable[[Any], Any] | None = None
    loader: Callable[[Any], None] | None = None
    skip: bool = False
    reason: str | None = None
    covers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        for field in ("param", "buffer"):
            value = getattr(self, field)
            if value is not None and not _is_destination(value):
                raise WeightSpecError(
                    f"ResolvedWeight.{field} must be a parameter, a buffer or a non-empty name, got {value!r}"
                )
        for field in ("transform", "loader"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise WeightSpecError(f"ResolvedWeight.{field} must be callable, got {value!r}")
        if isinstance(self.covers, str) or not all(isinstance(n, str) and n for n in self.covers):
            raise WeightSpecError(f"ResolvedWeight.covers must be a tuple of names, got {self.covers!r}")
        if self.covers and self.loader is None:
            raise WeightSpecError("ResolvedWeight.covers only applies to a custom loader")

    def rebased(self, prefix: str) -> "ResolvedWeight":
        """The same destination with names made relative to the root model (objects stay as they are)."""
        if not prefix or not any(isinstance(n, str) for n in (self.param, self.buffer, *self.covers)):
            return self  # objects, or no names: nothing to rebase (and nothing to validate again)
        join = lambda n: f"{prefix}.{n}" if isinstance(n, str) else n  # noqa: E731
        return ResolvedWeight(
            param=join(self.param), buffer=join(self.buffer), shard_id=self.shard_id, transform=self.transform,
            loader=self.loader, skip=self.skip, reason=self.reason, covers=tuple(join(n) for n in self.covers),
        )


def _is_destination(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    torch = sys.modules.get("torch")  # a tensor can only exist once torch is imported
    return torch is not None and isinstance(value, torch.Tensor)


class WeightDestination(NamedTuple):
    """Where a checkpoint tensor lands in a parameter, declared as data instead of code.

    A layer whose ``weight_loader`` only narrows the checkpoint tensor and copies it into part of
    its parameter can say so: the parameter gets ``weight_destination(param, loaded_shape,
    shard_id)`` (``shard_id`` is None for a whole tensor) returning one of these, and its
    ``weight_loader`` becomes ``layer.weight_destination(...).apply(loaded_weight)``. The loader
    then checks the layout once in the plan and reads the bytes straight into ``target`` (cast
    in bounded chunks where dtypes differ) without calling any code per tensor.

    ``target`` is a view of the parameter; ``source`` the narrows of the checkpoint tensor,
    ``(dim, start, length)``, applied in order. A bad shape or shard id is a ``ValueError``, as
    from the ``weight_loader``.
    """

    target: Any
    source: tuple[tuple[int, int, int], ...] = ()

    def apply(self, loaded_weight: Any) -> None:
        """``target.copy_`` of the narrowed tensor (a tensor or a ``CheckpointSlice``)."""
        for dim, start, length in self.source:
            loaded_weight = loaded_weight.narrow(dim, start, length)
        if tuple(loaded_weight.shape) != tuple(self.target.shape):
            raise ValueError(f"the narrowed checkpoint tensor has shape {list(loaded_weight.shape)} but its "
                             f"destination has shape {list(self.target.shape)}")
        self.target.copy_(loaded_weight)
