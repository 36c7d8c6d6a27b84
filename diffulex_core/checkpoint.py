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
        if not prefix:
            return self
        join = lambda n: f"{prefix}.{n}" if isinstance(n, str) else n  # noqa: E731
        return ResolvedWeight(
            param=join(self.param), buffer=join(self.buffer), shard_id=self.shard_id, transform=self.transform,
            loader=self.loader, skip=self.skip, reason=self.reason, covers=tuple(join(n) for n in self.covers),
        )


def _is_destination(value: Any) -> bool:
    if isinstance(value, str):
        return bool(value)
    import torch  # only reached when a spec holds an object, so torch is already imported

    return isinstance(value, torch.Tensor)
