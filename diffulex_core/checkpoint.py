"""Value objects for checkpoint weight resolution: ``LoadContext`` and ``ResolvedWeight``."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .errors import WeightSpecError

__all__ = ["LoadContext", "ResolvedWeight"]


@dataclass(frozen=True)
class LoadContext:
    """What a resolver may need to know about the tensor being placed and the load around it.

    ``full_name`` is the tensor's name in the checkpoint; ``config`` the engine configuration
    passed to the loader (any object, or ``None``).
    """

    config: Any = None
    full_name: str = ""
    family: str | None = None
    tp_rank: int = 0
    tp_size: int = 1
    checkpoint: str | None = None


@dataclass(frozen=True)
class ResolvedWeight:
    """Where one checkpoint tensor goes: a parameter, a buffer, a custom loader, or nowhere (skip).

    Names are relative to the module that resolved the tensor (the model itself for plugin
    hooks). ``shard_id`` is handed to the parameter's ``weight_loader(param, tensor, shard_id)``.
    ``transform(tensor) -> tensor`` runs before the copy; it must also work on meta tensors,
    because the plan checks its output shape before anything is written. ``loader(tensor)``
    writes the tensor itself; ``covers`` lists the parameter names it writes, so they are not
    reported missing. A skip needs a ``reason``, which the load report shows.
    """

    param: str | None = None
    buffer: str | None = None
    shard_id: Any = None
    transform: Callable[[Any], Any] | None = None
    loader: Callable[[Any], None] | None = None
    skip: bool = False
    reason: str | None = None
    covers: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        destinations = [n for n in ("param", "buffer", "loader") if getattr(self, n) is not None]
        if self.skip:
            if destinations or self.transform is not None or self.shard_id is not None:
                raise WeightSpecError(f"a skipped ResolvedWeight cannot also name {destinations or ['a transform/shard']}")
            if not self.reason:
                raise WeightSpecError("ResolvedWeight(skip=True) needs a reason, shown in the load report")
            return
        if len(destinations) != 1:
            raise WeightSpecError(
                f"ResolvedWeight must name exactly one of param, buffer or loader (or skip=True), got {destinations or 'none'}"
            )
        for field in ("param", "buffer"):
            value = getattr(self, field)
            if value is not None and (not isinstance(value, str) or not value):
                raise WeightSpecError(f"ResolvedWeight.{field} must be a non-empty name, got {value!r}")
        if self.shard_id is not None and self.param is None:
            raise WeightSpecError("ResolvedWeight.shard_id only applies to a param destination")
        for field in ("transform", "loader"):
            value = getattr(self, field)
            if value is not None and not callable(value):
                raise WeightSpecError(f"ResolvedWeight.{field} must be callable, got {value!r}")
        if self.covers and self.loader is None:
            raise WeightSpecError("ResolvedWeight.covers only applies to a custom loader")
        if isinstance(self.covers, str):
            raise WeightSpecError("ResolvedWeight.covers must be a tuple of names, not a string")

    def rebased(self, prefix: str) -> "ResolvedWeight":
        """The same destination with names made relative to the root model."""
        if not prefix:
            return self
        join = lambda n: f"{prefix}.{n}" if n else n  # noqa: E731
        return ResolvedWeight(
            param=join(self.param), buffer=join(self.buffer), shard_id=self.shard_id, transform=self.transform,
            loader=self.loader, skip=self.skip, reason=self.reason, covers=tuple(join(n) for n in self.covers),
        )
