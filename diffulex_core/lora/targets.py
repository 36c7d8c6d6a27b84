"""Which adapter names reach which model modules: the LoRA-capable modules, the checkpoint names that
reach each (through the packed-module mapping, so q/k/v land on their shards of a packed
projection), and the slots ``target_modules`` selects, PEFT's way."""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any

from torch import nn

from diffulex_core.loading.packed_mapping import MappedName, PackedMapping
from diffulex_core.lora.config import LoraConfig

__all__ = ["AdapterNames", "LoraSlot", "enabled_slots", "slot_for", "supports_lora", "takes_shards", "targeted_slots"]


@dataclass(frozen=True)
class LoraSlot:
    """One adapter on one module: the whole module (``shard_id`` None) or one shard of a packed one."""

    module: str  # the model's module name
    shard_id: Any
    adapter_name: str  # the adapter's (checkpoint) module name: patterns and messages use it
    r: int
    lora_alpha: float
    scaling: float
    embedding: bool

    @property
    def key(self) -> tuple[str, Any]:
        return self.module, self.shard_id

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter_name, "shard_id": self.shard_id, "r": self.r, "lora_alpha": self.lora_alpha,
                "scaling": self.scaling, "kind": "embedding" if self.embedding else "linear"}


def supports_lora(module: nn.Module) -> bool:
    return callable(getattr(module, "__init_lora__", None))


def takes_shards(module: nn.Module) -> bool:
    """Our extension: ``__init_lora__(..., shard_id=, scaling=)`` and ``lora_destination``."""
    if not callable(getattr(module, "lora_destination", None)):
        return False
    params = inspect.signature(module.__init_lora__).parameters
    return "shard_id" in params and "scaling" in params


def output_layer(model: nn.Module) -> nn.Module | None:
    get = getattr(model, "get_output_embeddings", None)
    try:
        return get() if callable(get) else None
    except NotImplementedError:
        return None


class AdapterNames:
    """The model's LoRA-capable modules and the adapter (checkpoint) names that reach them."""

    def __init__(self, model: nn.Module, mapping: PackedMapping) -> None:
        self.model, self.mapping = model, mapping
        self.all_modules = dict(model.named_modules())
        self.modules = {name: m for name, m in self.all_modules.items() if supports_lora(m)}

    def locate(self, adapter_name: str) -> tuple[str, Any] | None:
        """(module name, shard id) of an adapter module name, as its ``.weight`` would be placed:
        packed mapping first (rooted rewrites too), then the name itself; then the seed's
        ``model.`` prefix dialect."""
        for name in (adapter_name, adapter_name[6:] if adapter_name.startswith("model.") else None):
            if name is None:
                continue
            weight = f"{name}.weight"
            mapped = self.mapping.map(weight) if self.mapping else None
            candidates = [mapped, *self.mapping.rooted(weight)] if mapped else []
            for candidate in [*candidates, MappedName(weight, None, ())]:
                if candidate.name.endswith(".weight") and candidate.name[:-7] in self.all_modules:
                    return candidate.name[:-7], candidate.shard_id
        return None

    def adapter_names(self, module: str) -> dict[Any, list[str]]:
        """Shard id -> the checkpoint names that reach it, the most rewritten (most checkpoint-like) first."""
        out: dict[Any, list[tuple[int, str]]] = {}
        for source in self.mapping.sources(f"{module}.weight") if self.mapping else [f"{module}.weight"]:
            name, located = source[:-7], self.locate(source[:-7])
            if located is None or located[0] != module:
                continue
            mapped = self.mapping.map(source) if self.mapping else None
            out.setdefault(located[1], []).append((-len(mapped.keys if mapped else ()), name))
        return {shard: [n for _, n in sorted(names)] for shard, names in out.items()}


def slot_for(names: AdapterNames, config: LoraConfig, module: str, shard_id: Any, adapter_name: str) -> LoraSlot:
    return LoraSlot(module, shard_id, adapter_name, config.rank_for(adapter_name), config.alpha_for(adapter_name),
                    config.scaling_for(adapter_name), isinstance(names.all_modules[module], nn.Embedding))


def targeted_slots(names: AdapterNames, config: LoraConfig) -> dict[tuple[str, Any], LoraSlot]:
    """The slots ``target_modules`` selects, PEFT's way, on the adapter names of each module.

    A packed module is adapted per shard when its shards' names are selected (PEFT trained
    q_proj, k_proj and v_proj); whole only by its own name. Without ``target_modules`` every
    LoRA-capable module, whole (the seed). ``all-linear``: every linear module but the model's
    output layer, as PEFT's ``all-linear``.
    """
    output = output_layer(names.model)
    slots = {}
    for module_name, module in names.modules.items():
        per_shard = names.adapter_names(module_name)
        aliases = tuple(getattr(module, "lora_target_aliases", ()))
        if config.target_modules is None:
            whole = per_shard.get(None, [module_name])[0]
            if not config.excluded(whole):
                slots[(module_name, None)] = slot_for(names, config, module_name, None, whole)
            continue
        if config.all_linear:
            if isinstance(module, nn.Embedding) or module is output:
                continue
            chosen = {s: n for s, n in per_shard.items() if s is not None} or {None: per_shard.get(None, [module_name])}
        else:
            chosen = per_shard
        found = {}
        for shard, candidates in chosen.items():  # the checkpoint's own name: the most rewritten one
            if config.targets(candidates[0], aliases):
                found[shard] = candidates[0]
        if len(found) > 1:
            found.pop(None, None)  # shards named: the whole-module name is the same rows again
        for shard, hit in found.items():
            slots[(module_name, shard)] = slot_for(names, config, module_name, shard, hit)
    return slots


def enabled_slots(model: nn.Module) -> dict[tuple[str, Any], LoraSlot]:
    return getattr(model, "diffulex_lora", None) or {}
