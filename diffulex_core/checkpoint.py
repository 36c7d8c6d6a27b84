"""Value objects for checkpoint weight resolution: ``LoadContext``, ``ResolvedWeight`` and
``WeightDestination``."""

from __future__ import annotations

import sys
from dataclasses import dataclass, fields, is_dataclass, replace
from typing import Any, Callable, NamedTuple

from diffulex_core.errors import WeightSpecError
from diffulex_core.io.memory import narrowed

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
        return replace(self, param=join(self.param), buffer=join(self.buffer),
                       covers=tuple(join(n) for n in self.covers))


@dataclass(frozen=True)
class ConvertedResolvedWeight(ResolvedWeight):
    """A ``ResolvedWeight`` made from an object of another class with its fields (Diffulex's own
    ``diffulex.utils.checkpoint.ResolvedWeight``, say); ``converted_from`` names that class, and
    the load report's placement note says so."""

    converted_from: str = ""

    @property
    def conversion_note(self) -> str:
        return f"converted from {self.converted_from}; import ResolvedWeight from diffulex_core.checkpoint instead"

    def plain(self) -> ResolvedWeight:
        return ResolvedWeight(**{f.name: getattr(self, f.name) for f in fields(ResolvedWeight)})


def as_resolved_weight(value: Any, who: str, tensor: str) -> ResolvedWeight:
    """``value``, a resolver's answer for checkpoint tensor ``tensor`` that is not None, as a
    ``ResolvedWeight``.

    An object of another class named ``ResolvedWeight`` whose dataclass fields are all ours
    (Diffulex's own, from model code that still imports it from ``diffulex.utils.checkpoint``) is
    converted. Anything else is a ``WeightSpecError`` naming ``who`` answered, the class and its
    module, and for a foreign ``ResolvedWeight`` the import to change.
    """
    if isinstance(value, ResolvedWeight):
        return value
    cls = type(value)
    kind = cls.__qualname__ if cls.__module__ == "builtins" else f"{cls.__module__}.{cls.__qualname__}"
    expected = f"{who} returned {kind} for {tensor!r}; expected ResolvedWeight or None"
    if cls.__name__ != "ResolvedWeight":
        raise WeightSpecError(expected)
    change = (f"import it from diffulex_core.checkpoint (`from diffulex_core.checkpoint import ResolvedWeight`), "
              f"not from {cls.__module__}")
    theirs = [f.name for f in fields(value)] if is_dataclass(value) else None
    ours = {f.name for f in fields(ResolvedWeight)}
    if theirs is None or not set(theirs) <= ours:
        has = ("is not a dataclass" if theirs is None
               else f"has fields ours lacks: {', '.join(sorted(set(theirs) - ours))}")
        raise WeightSpecError(f"{expected}: that class {has}, so it cannot be converted; {change}")
    try:
        return ConvertedResolvedWeight(**{name: getattr(value, name) for name in theirs}, converted_from=kind)
    except WeightSpecError as exc:
        raise WeightSpecError(f"{who} returned {kind} for {tensor!r}, which cannot be converted: {exc}") from None


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
        loaded_weight = narrowed(loaded_weight, self.source)
        if tuple(loaded_weight.shape) != tuple(self.target.shape):
            raise ValueError(f"the narrowed checkpoint tensor has shape {list(loaded_weight.shape)} but its "
                             f"destination has shape {list(self.target.shape)}")
        self.target.copy_(loaded_weight)
