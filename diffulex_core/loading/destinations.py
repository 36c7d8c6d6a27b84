"""Where a checkpoint tensor can go in a model: its parameters and buffers by name and by object
(ties included), module resolvers most specific first, and packed-module mappings in place or from
the model's root. The planner asks these in the documented order."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, NamedTuple

import torch
from torch import nn

from diffulex_core.checkpoint import ConvertedResolvedWeight, LoadContext, ResolvedWeight, as_resolved_weight
from diffulex_core.empty_weights import REBUILT_BUFFERS
from diffulex_core.errors import DiffulexError, LoadError, WeightSpecError
from diffulex_core.loading.packed_mapping import MappedName, PackedMapping
from diffulex_core.loading.ties import storage_key, tie_keys

__all__ = ["RESOLVER", "Destinations", "Target", "ask_module_resolvers", "joined_note", "precedence_note",
           "resolver_of"]

RESOLVER = "resolve_checkpoint_weight"


def joined_note(note: str | None, more: str) -> str:
    """A placement's note with one more remark."""
    return f"{note}; {more}" if note else more


def resolver_of(module: nn.Module) -> Callable | None:
    """``module.resolve_checkpoint_weight``: a method of its class, or a function set on the
    instance (as Diffulex's families do). Looked up without ``nn.Module.__getattr__``, which
    would raise and catch an exception for every module that has none."""
    if RESOLVER in module.__dict__ or callable(getattr(type(module), RESOLVER, None)):
        resolve = getattr(module, RESOLVER)
        return resolve if callable(resolve) else None
    return None


class Target(NamedTuple):
    """A destination in planning form, with names made full; cheap to create."""

    kind: str  # "param", "buffer", "loader", "skip" or "empty"
    name: str | None
    shard_id: Any = None
    transform: Callable | None = None
    loader: Callable | None = None
    reason: str | None = None
    covers: tuple[str, ...] = ()
    note: str | None = None


def precedence_note(spec: ResolvedWeight, winner: str) -> str | None:
    """Say which fields the seed's precedence ignored, so a surprising spec is visible in the report."""
    ignored = [f for f in ("param", "buffer", "loader") if f != winner and getattr(spec, f) is not None]
    if spec.shard_id is not None and winner != "param":
        ignored.append("shard_id")
    return f"{winner} wins over {', '.join(ignored)} (the seed's precedence)" if ignored else None


def ask_module_resolvers(resolver_at: Callable[[str], Callable | None], name: str,
                         ctx: LoadContext) -> tuple[ResolvedWeight, str] | None:
    """(answer with names made full, prefix) of the first module resolver that answers for ``name``.

    ``resolver_at(prefix)`` gives the resolver of the module at ``prefix`` (``""``: the root), or
    None. Prefixes are asked most specific first, the tensor's own full name included.
    """
    cuts = [len(name)]  # prefix ends, most specific first: the name itself, each dot, the root
    at = name.rfind(".")
    while at >= 0:
        cuts.append(at)
        at = name.rfind(".", 0, at)
    cuts.append(0)
    for cut in cuts:
        prefix = name[:cut]
        resolve = resolver_at(prefix)
        if resolve is None:
            continue
        where = prefix or "<root>"
        try:
            spec = resolve(name[cut + 1:] if cut else name, ctx)
        except DiffulexError:
            raise
        except Exception as exc:
            raise LoadError(f"{RESOLVER} of module {where!r} raised {type(exc).__name__} "
                            f"for tensor {name!r}: {exc}") from exc
        if spec is not None:
            if not isinstance(spec, ResolvedWeight):  # Diffulex's own is converted, anything else refused
                spec = as_resolved_weight(spec, f"{RESOLVER} of module {where!r}", name)
            return spec.rebased(prefix), prefix
    return None


class Destinations:
    """Name lookups into one model, computed in one walk of the module tree per load.

    Reads ``_parameters``/``_buffers``/``_non_persistent_buffers_set`` directly: the public
    ``named_parameters``/``named_buffers``/``state_dict`` would walk the tree three more times,
    which dominates planning for checkpoints of 100,000 tensors.
    """

    def __init__(self, model: nn.Module) -> None:
        self.model = model
        self.params: dict[str, torch.Tensor] = {}
        self.buffers: dict[str, torch.Tensor] = {}
        self.persistent_buffers: set[str] = set()
        self.resolvers: dict[str, Callable] = {}
        self.rebuilt_buffers: set[str] = set()  # buffers their module recomputes when moved off meta
        self._by_object: dict[int, tuple[str, str]] | None = None
        self._by_storage: dict[int, list[tuple[str, str]]] | None = None
        self._tie_keys: dict[str, Any] | None = None
        for prefix, module in model.named_modules(remove_duplicate=False):
            dot = f"{prefix}." if prefix else ""
            for name, param in module._parameters.items():
                if param is not None:
                    self.params[dot + name] = param
            for name, buffer in module._buffers.items():
                if buffer is not None:
                    self.buffers[dot + name] = buffer
                    if name not in module._non_persistent_buffers_set:
                        self.persistent_buffers.add(dot + name)
            resolve = resolver_of(module)
            if resolve is not None:
                self.resolvers[prefix] = resolve
            rebuilt = getattr(type(module), REBUILT_BUFFERS, None) or module.__dict__.get(REBUILT_BUFFERS)
            if rebuilt:
                self.rebuilt_buffers.update(dot + name for name in rebuilt)

    def tensor(self, kind: str, name: str) -> torch.Tensor | None:
        return (self.params if kind == "param" else self.buffers).get(name)

    @property
    def tie_keys(self) -> dict[str, Any]:
        """Name -> a key equal for names over the same memory (tied parameters), computed once."""
        if self._tie_keys is None:
            self._tie_keys = tie_keys({**self.params, **self.buffers})
        return self._tie_keys

    def persistent(self) -> dict[str, torch.Tensor]:
        """Parameters and persistent buffers: what a checkpoint is expected to fill."""
        return {**self.params, **{n: b for n, b in self.buffers.items() if n in self.persistent_buffers}}

    def exact(self, name: str) -> Target | None:
        if name in self.params:
            return Target("param", name)
        if name in self.buffers:
            return Target("buffer", name)
        return None

    def name_of(self, tensor: torch.Tensor) -> tuple[str, str] | None:
        """(kind, name) of a parameter or buffer given as an object, or a tensor over its memory (``.data``)."""
        tables = (("param", self.params), ("buffer", self.buffers))
        if self._by_object is None:
            self._by_object = {}
            for kind, table in tables:
                for name, t in table.items():
                    self._by_object.setdefault(id(t), (kind, name))
        found = self._by_object.get(id(tensor))
        if found is not None:
            return found
        if self._by_storage is None:  # only when an object was not found as itself
            self._by_storage = {}
            for kind, table in tables:
                for name, t in table.items():
                    self._by_storage.setdefault(t.untyped_storage()._cdata, []).append((kind, name))
        key = storage_key(tensor)
        return next((found for found in self._by_storage.get(key[0], ())
                     if storage_key(self.tensor(*found)) == key), None)

    def target(self, spec: ResolvedWeight, tensor_name: str, source: str) -> Target:
        """A ``ResolvedWeight`` (names full) as a ``Target``, in the seed's precedence."""
        if type(spec) is ConvertedResolvedWeight:  # another class's answer: the report says so
            found = self.target(spec.plain(), tensor_name, source)
            if found.kind == "skip":
                return found._replace(reason=f"{found.reason}; {spec.conversion_note}")
            return found._replace(note=joined_note(found.note, spec.conversion_note))
        if spec.skip:
            return Target("skip", None, reason=spec.reason or f"skipped by {source} (no reason given)")
        if spec.loader is not None:
            return Target("loader", None, transform=spec.transform, loader=spec.loader, covers=spec.covers,
                          note=precedence_note(spec, "loader"))
        for kind in ("param", "buffer"):
            value = getattr(spec, kind)
            if value is None:
                continue
            shard_id = spec.shard_id if kind == "param" else None
            note = precedence_note(spec, kind)
            if isinstance(value, str):
                return Target(kind, value, shard_id, spec.transform, note=note)
            found = self.name_of(value)
            if found is None:
                raise WeightSpecError(
                    f"{source} resolved checkpoint tensor {tensor_name!r} to a {type(value).__name__} of shape "
                    f"{list(value.shape)} that is not a parameter or buffer of {type(self.model).__qualname__}"
                )
            return Target(found[0], found[1], shard_id if found[0] == "param" else None, spec.transform, note=note)
        return Target("empty", None, note=f"{source} returned a ResolvedWeight with no param, buffer, loader or skip")

    def module_resolver(self, name: str, ctx: LoadContext) -> tuple[Target, str] | None:
        """Ask module resolvers, most specific prefix first (the tensor's own name included), then the root."""
        found = ask_module_resolvers(self.resolvers.get, name, ctx) if self.resolvers else None
        if found is None:
            return None
        spec, prefix = found
        rule = f"module:{prefix or '<root>'}"
        return self.target(spec, name, rule), rule

    def packed(self, mapping: PackedMapping, name: str) -> tuple[Target | None, str, str | None]:
        """The packed mapping's destination for ``name``: in place, else from the model's root."""
        mapped = mapping.map(name)
        if mapped is None:
            return None, "", None
        found = self._mapped_target(mapped)
        if found is not None:
            return found, "packed_mapping", f"keys: {', '.join(mapped.keys)}"
        for rooted in mapping.rooted(name):
            found = self._mapped_target(rooted)
            if found is not None:
                why = f"keys: {', '.join(rooted.keys)}; {mapped.name!r} names nothing, so from the root"
                return found, "packed_mapping:root", why
        return None, "", f"packed mapping {list(mapped.keys)} rewrote it to {mapped.name!r}, which is not a parameter"

    def _mapped_target(self, mapped: MappedName) -> Target | None:
        if mapped.name in self.params:
            return Target("param", mapped.name, mapped.shard_id)
        if mapped.shard_id is None and mapped.name in self.buffers:
            return Target("buffer", mapped.name)
        return None
