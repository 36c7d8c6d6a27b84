"""Marking a model that a failed load left partly written, so it cannot be used by mistake.

Most failures leave the model as it was (the plan finds problems before any write; code that
writes first is undone). Where that cannot hold (model code failing under ``load_model`` or
``rollback=False``, which keep no undo copies; a read failing after bytes moved; a second
Ctrl-C), the model is marked: every module's forward raises ``PartialLoadError`` naming the
failed load, until a load into it writes every parameter again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from torch import nn

from diffulex_core.errors import PartialLoadError

__all__ = ["PartialLoad", "mark_partial", "clear_partial", "partial_load_of"]

MARK = "diffulex_partial_load"
_HOOKS = "_diffulex_partial_load_hooks"


@dataclass(frozen=True)
class PartialLoad:
    """Which load left the model partly written, and why."""

    checkpoint: str
    reason: str
    report: Any = field(default=None, compare=False, repr=False)  # the failed load's LoadReport

    def message(self, model: nn.Module) -> str:
        return (f"{type(model).__qualname__} was left partly written by the failed load of {self.checkpoint} "
                f"({self.reason}); its weights are a mix of two checkpoints. Load a checkpoint into it again "
                f"(a load that writes every parameter clears this) before using it")


def partial_load_of(model: nn.Module) -> PartialLoad | None:
    """The failed load that left ``model`` partly written, or None."""
    return model.__dict__.get(MARK)


def mark_partial(model: nn.Module, checkpoint: str, reason: str, report: Any = None) -> PartialLoad:
    """Mark ``model``: its forward, and every submodule's, raise ``PartialLoadError`` from now on."""
    clear_partial(model)
    mark = PartialLoad(checkpoint, reason, report)

    def refuse(module: nn.Module, args) -> None:
        raise PartialLoadError(mark.message(model), mark)

    hooks = [module.register_forward_pre_hook(refuse) for module in model.modules()]
    object.__setattr__(model, MARK, mark)  # plain attributes: not submodules, not state
    object.__setattr__(model, _HOOKS, hooks)
    return mark


def clear_partial(model: nn.Module) -> None:
    """Remove the mark (a later load wrote every parameter)."""
    for hook in model.__dict__.pop(_HOOKS, ()):
        hook.remove()
    model.__dict__.pop(MARK, None)
