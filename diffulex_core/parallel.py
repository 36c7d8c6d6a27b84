"""Which slice of the model this process holds: tensor- and expert-parallel groups.

The state comes from ``torch.distributed``: with only the default group initialised (``torchrun``
and nothing else) the tensor-parallel group is the whole world, and so is the expert-parallel
group (experts are split across the same ranks as the attention heads, as vLLM does with expert
parallelism on). Engines with their own groups pass them (``parallel_state(tp_group=...,
ep_group=...)``) and install the result with ``use_parallel_state`` while they build and load
the model. A single process needs no setup: rank 0 of 1.

Family factories read ``current_parallel_state()`` to build their rank's shard; the loader fills
``LoadContext.tp_rank/tp_size/ep_rank/ep_size`` from the same state.
"""

from __future__ import annotations

import contextlib
import contextvars
from dataclasses import dataclass
from typing import Any, Iterator

from diffulex_core.errors import ParallelConfigError

__all__ = ["ParallelState", "agree", "current_parallel_state", "divide", "parallel_state", "use_parallel_state"]


@dataclass(frozen=True)
class ParallelState:
    """Ranks and sizes of this process in its tensor- and expert-parallel groups.

    A group is a ``torch.distributed`` process group, or ``None`` for a group of one.
    """

    tp_rank: int = 0
    tp_size: int = 1
    tp_group: Any = None
    ep_rank: int = 0
    ep_size: int = 1
    ep_group: Any = None

    def __post_init__(self) -> None:
        for kind in ("tp", "ep"):
            rank, size = getattr(self, f"{kind}_rank"), getattr(self, f"{kind}_size")
            if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
                raise ParallelConfigError(f"{kind}_rank={rank!r} and {kind}_size={size!r}: need 0 <= rank < size")
            if size > 1 and getattr(self, f"{kind}_group") is None:
                raise ParallelConfigError(f"{kind}_size={size} needs a torch.distributed process group ({kind}_group)")

    @property
    def distributed(self) -> bool:
        """True when any group has more than one rank (collectives are needed)."""
        return self.tp_size > 1 or self.ep_size > 1

    def to_dict(self) -> dict[str, int]:
        return {"tp_rank": self.tp_rank, "tp_size": self.tp_size, "ep_rank": self.ep_rank, "ep_size": self.ep_size}

    def describe(self) -> str:
        return (f"tensor-parallel rank {self.tp_rank} of {self.tp_size}, "
                f"expert-parallel rank {self.ep_rank} of {self.ep_size}")


SINGLE = ParallelState()
_installed: contextvars.ContextVar[ParallelState | None] = contextvars.ContextVar("diffulex_parallel_state",
                                                                                 default=None)


def _group_rank_size(group: Any, what: str) -> tuple[int, int]:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ParallelConfigError(f"{what} was given but torch.distributed is not initialised; "
                                  f"call torch.distributed.init_process_group first")
    rank = dist.get_rank(group)
    if rank < 0:
        raise ParallelConfigError(f"this process (global rank {dist.get_rank()}) is not a member of {what}")
    return rank, dist.get_world_size(group)


def parallel_state(*, tp_group: Any = None, ep_group: Any = None) -> ParallelState:
    """The state for explicit groups; a group not given is the default group when
    ``torch.distributed`` is initialised (the expert-parallel group defaults to the tensor-parallel
    one), and a group of one otherwise."""
    import torch.distributed as dist

    initialised = dist.is_available() and dist.is_initialized()
    if tp_group is None and initialised:
        tp_group = dist.group.WORLD
    if ep_group is None:
        ep_group = tp_group
    if tp_group is None:
        return SINGLE
    tp_rank, tp_size = _group_rank_size(tp_group, "the tensor-parallel group")
    ep_rank, ep_size = _group_rank_size(ep_group, "the expert-parallel group")
    return ParallelState(tp_rank, tp_size, tp_group, ep_rank, ep_size, ep_group)


def current_parallel_state() -> ParallelState:
    """The state installed by ``use_parallel_state``, else the one ``torch.distributed`` implies."""
    installed = _installed.get()
    return installed if installed is not None else parallel_state()


@contextlib.contextmanager
def use_parallel_state(state: ParallelState) -> Iterator[ParallelState]:
    """Make ``state`` current while a model is built and loaded (engines with their own groups)."""
    if not isinstance(state, ParallelState):
        raise ParallelConfigError(f"use_parallel_state needs a ParallelState, got {type(state).__name__}")
    token = _installed.set(state)
    try:
        yield state
    finally:
        _installed.reset(token)


def divide(total: int, parts: int, what: str) -> int:
    """``total / parts`` where it divides, else a ``ParallelConfigError`` naming ``what``."""
    if total % parts:
        raise ParallelConfigError(f"{what} = {total} is not divisible by the parallel group size {parts}")
    return total // parts


def agree(state: ParallelState, step: str, error: BaseException | None) -> None:
    """Called by every rank at the same point of a load: if any rank failed, all raise.

    Each rank tells the others whether ``step`` failed for it (``all_gather_object`` over its
    tensor- and expert-parallel groups). A rank that failed alone would otherwise leave the
    others waiting in their next collective, or serving a model whose other shards never loaded.
    """
    if not state.distributed:
        if error is not None:
            raise error
        return
    import torch.distributed as dist

    from diffulex_core.errors import ParallelLoadError

    mine = None if error is None else f"{type(error).__name__}: {error}"
    failures: dict[int, str] = {}
    groups = [state.tp_group] if state.ep_group is state.tp_group else [state.tp_group, state.ep_group]
    for group in groups:
        if dist.get_world_size(group) == 1:
            continue
        gathered: list[Any] = [None] * dist.get_world_size(group)
        dist.all_gather_object(gathered, (dist.get_rank(), mine), group=group)
        failures.update({rank: message for rank, message in gathered if message is not None})
    if failures:
        ranks = ", ".join(str(rank) for rank in sorted(failures))
        detail = "\n".join(f"  - rank {rank}: {failures[rank]}" for rank in sorted(failures))
        raise ParallelLoadError(f"{step} failed on rank(s) {ranks} (this is rank {dist.get_rank()}, "
                                f"{state.describe()}):\n{detail}", failures) from error
