"""Everything a model-family plugin uses, in one import (no torch needed to import it).

- ``hookimpl``: the marker for hook functions (the hooks: ``diffulex_core.hookspecs``);
- ``ResolvedWeight``, ``LoadContext``, ``WeightDestination``: what ``diffulex_resolve_weight`` and
  module resolvers return and receive, and what a layer's ``weight_destination`` declares;
- ``CheckpointSlice``, ``takes_checkpoint_slices``: tensor-parallel weight loaders that read only
  their rows (these two import torch on first access);
- ``ParallelState``, ``current_parallel_state``, ``divide``: the tensor/expert-parallel state a
  factory builds its rank's shard from;
- ``FamilyExample``: a family's example for ``diffulex check`` (the ``diffulex_family_examples`` hook).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from diffulex_core.checkpoint import LoadContext, ResolvedWeight, WeightDestination
from diffulex_core.hookspecs import hookimpl
from diffulex_core.parallel import ParallelState, current_parallel_state, divide

if TYPE_CHECKING:
    from torch import Tensor, nn

    from diffulex_core.io.slices import CheckpointSlice, takes_checkpoint_slices

__all__ = [
    "CheckpointSlice",
    "FamilyExample",
    "LoadContext",
    "ParallelState",
    "ResolvedWeight",
    "WeightDestination",
    "current_parallel_state",
    "divide",
    "hookimpl",
    "takes_checkpoint_slices",
]

_NEED_TORCH = {"CheckpointSlice", "takes_checkpoint_slices"}


def __getattr__(name: str) -> Any:
    """The slice names import torch, so they are imported on first use."""
    if name in _NEED_TORCH:
        from diffulex_core.io import slices

        return getattr(slices, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


@dataclass(frozen=True)
class FamilyExample:
    """A family's example for ``diffulex check`` (returned by ``diffulex_family_examples``).

    ``config``: a small config mapping, shaped like the family's ``config.json``.
    ``to_checkpoint(model)``: the model's weights under checkpoint names (the family's export);
    ``None``: the model's ``state_dict`` names. ``inputs(model)``: the positional arguments of one
    forward call, as a tuple; ``None``: token ids ``torch.randint(0, vocab, (2, 8))``, ``vocab``
    being the first ``nn.Embedding``'s ``num_embeddings``.
    """

    config: Mapping[str, Any]
    to_checkpoint: Callable[[nn.Module], Mapping[str, Tensor]] | None = None
    inputs: Callable[[nn.Module], tuple] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.config, Mapping):
            raise TypeError(f"FamilyExample.config must be a mapping, got {type(self.config).__name__}")
        for name in ("to_checkpoint", "inputs"):
            value = getattr(self, name)
            if value is not None and not callable(value):
                raise TypeError(f"FamilyExample.{name} must be callable or None, got {type(value).__name__}")
