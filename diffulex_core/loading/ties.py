"""Tied tensors: parameters that are one object, or share one storage, are written once.

Models tie in two ways: by sharing a ``Parameter`` object (``lm_head.weight = embed.weight``)
or by sharing storage (``lm_head.weight.data = embed.weight.data``, as Diffulex's families
do). ``storage_key`` makes both look alike to the plan. ``to_empty`` (materializing a model
built on the meta device) breaks both kinds; ``materialize`` restores them, so a checkpoint
that stores a tied tensor once fills every name that shares it.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["storage_key", "tie_keys", "materialize"]


def storage_key(t: torch.Tensor) -> tuple[Any, ...]:
    """Equal for tensors over the same memory region (the same object, or views alike)."""
    return (t.untyped_storage()._cdata, t.storage_offset(), tuple(t.shape), t.stride(), t.dtype)


def tie_keys(tensors: dict[str, torch.Tensor]) -> dict[str, Any]:
    """A key per name, equal exactly for names over the same memory region.

    Names are grouped by address (meta and empty tensors, all at address 0, by storage); the full
    ``storage_key`` (~10 us) is computed only within groups of two or more, which keeps planning a
    checkpoint of 100,000 tensors fast.
    """
    groups: dict[Any, list[str]] = {}
    for name, t in tensors.items():
        groups.setdefault(t.data_ptr() or ("storage", t.untyped_storage()._cdata), []).append(name)
    keys: dict[str, Any] = {}
    for address, names in groups.items():
        if len(names) == 1:
            keys[names[0]] = address
        else:
            keys.update((name, storage_key(tensors[name])) for name in names)
    return keys


def _slots(model: nn.Module) -> list[tuple[nn.Module, str, str, torch.Tensor]]:
    """(module, table, attribute name, tensor) for every parameter and buffer slot, shared ones repeated."""
    slots = []
    for _, module in model.named_modules(remove_duplicate=False):
        for table in ("_parameters", "_buffers"):
            slots += [(module, table, name, t) for name, t in getattr(module, table).items() if t is not None]
    return slots


def materialize(model: nn.Module, device: Any) -> Callable[[], None]:
    """``model.to_empty(device=device)``, keeping every tie, every attribute set on a parameter and
    the values of tensors that were not on the meta device; returns what puts the model back.

    ``to_empty`` makes new ``Parameter`` objects, which lose attributes such as the
    ``weight_loader`` that layers attach in ``__init__``; they are copied over. It also drops the
    values of real tensors (buffers computed in ``__init__`` under ``init_empty_weights``): they
    are copied to ``device``. The returned function restores the very objects the model held
    before, so a failed load leaves it exactly as it was.
    """
    slots = _slots(model)
    groups: dict[int, list[tuple[nn.Module, str, str, torch.Tensor]]] = {}
    for slot in slots:
        groups.setdefault(slot[3].untyped_storage()._cdata, []).append(slot)
    model.to_empty(device=device)
    for module, table, name, old in slots:
        new = getattr(module, table)[name]
        if new is not old and getattr(old, "__dict__", None):
            new.__dict__.update(old.__dict__)
    for group in (g for g in groups.values() if len(g) > 1):
        first_module, first_table, first_name, first_old = group[0]
        anchor = getattr(first_module, first_table)[first_name]
        # zeros, not empty: rows no checkpoint tensor writes (a padded vocabulary's, which the
        # layers zero when moved) must not come back as garbage through the re-tie
        storage = torch.zeros(first_old.untyped_storage().nbytes(), dtype=torch.uint8,
                              device=anchor.device).untyped_storage()
        made: dict[int, torch.Tensor] = {}  # old object -> its new one, so shared objects stay shared
        for module, table, name, old in group:
            new = made.get(id(old))
            if new is None:
                new = getattr(module, table)[name]
                new.data = torch.empty(0, dtype=old.dtype, device=anchor.device).set_(
                    storage, old.storage_offset(), old.shape, old.stride())
                made[id(old)] = new
            getattr(module, table)[name] = new
    with torch.no_grad():
        for module, table, name, old in slots:
            if not old.is_meta:
                getattr(module, table)[name].copy_(old)

    def restore() -> None:
        for module, table, name, old in slots:
            getattr(module, table)[name] = old

    return restore
