"""Planning a load from safetensors headers alone: every checkpoint tensor gets a destination.

Per checkpoint tensor the destination is decided, in this order, by
1. plugin hooks (``diffulex_resolve_weight``), first non-None answer wins;
2. module resolvers: ``module.resolve_checkpoint_weight(suffix, ctx)`` (a method of the class or
   a function set on the instance), most specific prefix first, then the root;
3. the packed-module mapping (``model.packed_modules_mapping`` merged with the hook's), in place,
   or from the model's root where the in-place name names nothing;
4. the exact parameter or buffer name.
Every problem a header can reveal is found here, before one byte is written. Code the plan
cannot dry-run on meta tensors (custom loaders, transforms and weight loaders that need real
data) is marked ``watched``: the apply step runs it first, observes what it writes, and undoes
it if the load fails (``applying``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import inspect
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from diffulex_core.checkpoint import ConvertedResolvedWeight, LoadContext, ResolvedWeight, WeightDestination, as_resolved_weight
from diffulex_core.files.headers import DTYPES, CheckpointFiles, TensorRecord, find_checkpoint_files, read_records
from diffulex_core.io.slices import CheckpointSlice, accepts_checkpoint_slice
from diffulex_core.errors import CheckpointFormatError, DiffulexError, LoadError, WeightSpecError
from diffulex_core.files.handles import OpenFiles
from diffulex_core.loading.packed_mapping import MappedName, PackedMapping, merge_mappings
from diffulex_core.parallel import ParallelState, current_parallel_state
from diffulex_core.plugins.hook_calls import collect_results, first_result, plugin_label
from diffulex_core.loading.report import LoadReport, TensorPlacement
from diffulex_core.loading.ties import storage_key, tie_keys
from diffulex_core.empty_weights import REBUILT_BUFFERS
from diffulex_core.loading.write_watch import MetaOnly

__all__ = ["LoadPlan", "Destinations", "Layout", "Target", "plan_checkpoint", "plan_for_load", "gc_paused", "default_weight_loader",
           "whole_tensor_loader", "load_into", "resolver_of", "ask_module_resolvers", "takes_slice"]

WRITTEN_KINDS = ("param", "buffer", "loader")
_DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in DTYPES.values()}
RESOLVER = "resolve_checkpoint_weight"


# --------------------------------------------------------------------------- writing one tensor


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy ``loaded_weight`` into ``param`` (casting dtype, moving device); shapes must match."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint tensor {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def whole_tensor_loader(dest: torch.Tensor) -> Callable | None:
    """The parameter's ``weight_loader`` if it can take a whole tensor, ``(param, tensor)``.

    A loader that requires a shard id only knows how to place shards; a whole tensor of the
    parameter's own shape (an engine-format checkpoint) is then copied directly.
    """
    weight_loader = getattr(dest, "weight_loader", None)
    if weight_loader is None:
        return None
    try:
        inspect.signature(weight_loader).bind(dest, dest)
    except TypeError:
        return None
    except ValueError:  # no introspectable signature (a builtin): trust it
        pass
    return weight_loader


def load_into(dest: torch.Tensor, storage: torch.Tensor, tensor: torch.Tensor, shard_id: Any) -> None:
    """Call ``dest``'s loader on ``storage`` (``dest`` itself, or its meta twin during planning)."""
    if shard_id is not None:
        weight_loader = getattr(dest, "weight_loader", None)
        if weight_loader is None:
            raise WeightSpecError(f"shard id {shard_id!r} given but the parameter has no weight_loader(param, tensor, shard_id)")
        weight_loader(storage, tensor, shard_id)
        return
    weight_loader = whole_tensor_loader(dest)
    if weight_loader is not None:
        weight_loader(storage, tensor)
    else:
        default_weight_loader(storage, tensor)


def takes_slice(dest: torch.Tensor, shard_id: Any) -> bool:
    """Whether the loader that will write ``dest`` takes a ``CheckpointSlice`` (reads only its part)."""
    loader = getattr(dest, "weight_loader", None) if shard_id is not None else whole_tensor_loader(dest)
    return loader is not None and accepts_checkpoint_slice(loader)


def castable(src: torch.dtype, dst: torch.dtype, kind: str) -> bool:
    """Casts that keep values: float<->float, int<->int, and, into a buffer, integers or bools
    into floats (position tables, as ``copy_`` does). An integer tensor for a floating
    parameter is refused: it is a quantized or mislabelled weight, and copying it makes garbage."""
    if src == dst:
        return True
    integral = lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool  # noqa: E731
    if src.is_floating_point and dst.is_floating_point:
        return True
    if kind == "buffer" and dst.is_floating_point and not src.is_complex:
        return True
    return integral(src) and integral(dst)


class Layout(NamedTuple):
    """Where a checkpoint tensor's bytes go: the part ``ranges`` of it (``(start, length)`` per
    dimension, C order; None: all of it) fills the contiguous elements of the destination from
    ``offset``."""

    offset: int
    ranges: tuple[tuple[int, int], ...] | None


WHOLE = Layout(0, None)  # a plain copy: the whole tensor into the whole destination


def _declared_layout(dest: torch.Tensor, name: str, record: TensorRecord,
                     shard_id: Any) -> tuple[str | None, Layout | None]:
    """(problem, layout) from the parameter's ``weight_destination``; (None, None) where the
    declaration cannot be read straight into memory (its ``weight_loader`` then runs)."""
    shard = f" (shard {shard_id!r})" if shard_id is not None else ""
    declared = f"the weight_destination of param {name!r}{shard}"
    try:
        found = dest.weight_destination(dest, record.shape, shard_id)
    except Exception as exc:
        return f"{declared} raised {type(exc).__name__}: {exc}", None
    if not isinstance(found, WeightDestination):
        return f"{declared} returned {type(found).__name__}, not a WeightDestination", None
    ranges = [(0, n) for n in record.shape]
    for dim, start, length in found.source:
        if not (0 <= dim < len(ranges) and start >= 0 and length >= 0 and start + length <= ranges[dim][1]):
            return f"{declared} narrows ({dim}, {start}, {length}) outside shape {list(record.shape)}", None
        ranges[dim] = (ranges[dim][0] + start, length)
    target = found.target
    if tuple(length for _, length in ranges) != tuple(target.shape):
        return (f"{declared} takes a part of shape {[n for _, n in ranges]} into a destination of "
                f"shape {list(target.shape)}"), None
    offset = target.storage_offset() - dest.storage_offset()
    if (target.untyped_storage()._cdata != dest.untyped_storage()._cdata or target.dtype != dest.dtype
            or not (target.is_contiguous() and dest.is_contiguous()) or not 0 <= offset <= dest.numel() - target.numel()):
        return None, None
    return None, Layout(offset, tuple(ranges))


# --------------------------------------------------------------------------- destinations


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


def _precedence_note(spec: ResolvedWeight, winner: str) -> str | None:
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
            return found._replace(note=_joined(found.note, spec.conversion_note))
        if spec.skip:
            return Target("skip", None, reason=spec.reason or f"skipped by {source} (no reason given)")
        if spec.loader is not None:
            return Target("loader", None, transform=spec.transform, loader=spec.loader, covers=spec.covers,
                          note=_precedence_note(spec, "loader"))
        for kind in ("param", "buffer"):
            value = getattr(spec, kind)
            if value is None:
                continue
            shard_id = spec.shard_id if kind == "param" else None
            note = _precedence_note(spec, kind)
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
                return found, "packed_mapping:root", f"keys: {', '.join(rooted.keys)}; {mapped.name!r} names nothing, so from the root"
        return None, "", f"packed mapping {list(mapped.keys)} rewrote it to {mapped.name!r}, which is not a parameter"

    def _mapped_target(self, mapped: MappedName) -> Target | None:
        if mapped.name in self.params:
            return Target("param", mapped.name, mapped.shard_id)
        if mapped.shard_id is None and mapped.name in self.buffers:
            return Target("buffer", mapped.name)
        return None


# --------------------------------------------------------------------------- planning


@dataclass(slots=True)
class Planned:
    record: TensorRecord
    placement: TensorPlacement
    target: Target | None
    layout: Layout | None = None  # no code involved: where the bytes go in the destination's memory
    watched: bool = False  # code the plan could not dry-run: run first, under the write watcher


@dataclass
class LoadPlan:
    """Every tensor's destination, decided from headers alone; ``report`` already lists the problems.

    ``pending`` are parameters no declared destination writes while loaders that did not
    declare what they write (``covers``) may: they are missing unless a loader writes them.
    ``open_files`` holds the descriptors the headers were read through (closed by whoever
    planned: ``plan_checkpoint`` before it returns, a load after applying).
    """

    files: CheckpointFiles
    items: list[Planned]
    report: LoadReport
    dests: Destinations
    open_files: OpenFiles
    pending: list[str] = field(default_factory=list)
    aliases: list[list[int]] = field(default_factory=list)  # indices of ``items`` writing one destination whole


@contextlib.contextmanager
def gc_paused():
    """Plans and loads create an object or two per tensor; with 100,000 tensors the cyclic
    collector would rescan the whole model again and again. Nothing here makes cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def model_packed_mapping(model: nn.Module, config: Any = None,
                         extra: tuple[tuple[str, Any], ...] = ()) -> PackedMapping:
    """The model's ``packed_modules_mapping`` merged with every plugin's hook answer (and
    ``extra`` (source, mapping) pairs); one key mapped two ways is an error naming both."""
    parts = [(f"{type(model).__qualname__}.packed_modules_mapping", getattr(model, "packed_modules_mapping", None) or {})]
    parts += [(f"plugin {p!r}", m) for p, m in collect_results(
        _plugin_manager().hook.diffulex_packed_modules_mapping, {"model": model, "config": config}, error=LoadError,
        context=" while planning")]
    return PackedMapping(merge_mappings([*parts, *extra]))


def _plugin_manager():
    from diffulex_core.plugins import get_plugin_manager

    return get_plugin_manager()


class _Planner:
    def __init__(self, model: nn.Module, path: Path, family: str | None, config: Any, strict: bool,
                 parallel: ParallelState) -> None:
        self.model, self.strict = model, strict
        self.dests = Destinations(model)
        self.manager = _plugin_manager()
        hook = self.manager.hook
        # pluggy's own call per tensor (ordering, wrappers, tracing); none at all without an implementation
        self.resolve_hook = hook.diffulex_resolve_weight if hook.diffulex_resolve_weight.get_hookimpls() else None
        model_name = type(model).__qualname__
        self.mapping = model_packed_mapping(model, config)
        self.expected_missing = list(getattr(model, "expected_missing_keys", None) or ())
        # LoRA adapter parameters (diffulex_core.lora.adapters) are written by the adapter load, not the checkpoint.
        self.adapter_params = set(getattr(model, "diffulex_lora_parameters", None) or ())
        for _, names in collect_results(hook.diffulex_expected_missing, {"model": model}, error=LoadError):
            self.expected_missing += list(names)
        self.ignored = [(p, f"{model_name}.ignored_checkpoint_keys") for p in getattr(model, "ignored_checkpoint_keys", None) or ()]
        for plugin, names in collect_results(hook.diffulex_ignored_checkpoint_keys, {"model": model}, error=LoadError):
            self.ignored += [(p, f"plugin {plugin!r}") for p in names]
        self._guard: Callable | None = None
        self.parallel = parallel
        self.ctx_fields = dict(config=config, family=family, tp_rank=parallel.tp_rank, tp_size=parallel.tp_size,
                               ep_rank=parallel.ep_rank, ep_size=parallel.ep_size, checkpoint=str(path))

    def guard(self):
        """Dry runs must not write a materialized model's memory (a weight_loader that writes
        ``self.weight`` rather than its argument would); on an all-meta model nothing can change."""
        if self._guard is None:
            on_meta = all(t.is_meta for t in (*self.dests.params.values(), *self.dests.buffers.values()))
            self._guard = contextlib.nullcontext if on_meta else MetaOnly
        return self._guard()

    def resolve(self, name: str) -> tuple[Target | None, str, str | None]:
        """(destination, rule, note) for one checkpoint name, in the documented order."""
        ctx = LoadContext(full_name=name, **self.ctx_fields) if self.resolve_hook is not None or self.dests.resolvers else None
        if self.resolve_hook is not None:
            plugin, spec = first_result(self.resolve_hook, {"model": self.model, "name": name, "ctx": ctx},
                                        error=LoadError, context=f" (tensor {name!r})")
            if spec is not None:
                rule = f"plugin:{plugin}"
                if not isinstance(spec, ResolvedWeight):  # Diffulex's own is converted, anything else refused
                    spec = as_resolved_weight(spec, f"{plugin_label(self.manager, plugin)}: diffulex_resolve_weight", name)
                return self.dests.target(spec, name, rule), rule, None
        found = self.dests.module_resolver(name, ctx) if ctx is not None else None
        if found is not None:
            return found[0], found[1], None
        note = None
        if self.mapping:
            target, rule, note = self.dests.packed(self.mapping, name)
            if target is not None:
                return target, rule, note
        exact = self.dests.exact(name)
        if exact is not None:
            return exact, "exact", None
        for pattern, source in self.ignored:
            if fnmatch.fnmatchcase(name, pattern):
                return Target("skip", None, reason=f"ignored: matches {pattern!r} of {source}"), "ignored", None
        return None, "unexpected", note

    def check(self, record: TensorRecord, target: Target) -> tuple[str | None, Layout | None, str | None]:
        """(problem, layout, deferral): checks the write on the meta device where code is involved.

        ``layout`` says where the file's bytes go in the destination's memory when no code is
        needed: a plain copy (cast if dtypes differ), or a ``WeightDestination`` the parameter
        declares. A transform or weight_loader that fails on meta tensors is not a problem by
        itself: ``deferral`` says why it will be checked at apply.
        """
        kind, name = target.kind, target.name
        dest = self.dests.tensor(kind, name)
        if dest is None:
            return f"it resolves to {kind} {name!r}, which {type(self.model).__qualname__} does not have", None, None
        shape, dtype, tensor = record.shape, record.dtype, None
        if target.transform is not None:
            try:
                with self.guard():
                    tensor = target.transform(torch.empty(shape, dtype=dtype, device="meta"))
            except Exception as exc:
                return None, None, f"its transform cannot run on a meta tensor ({type(exc).__name__}: {exc})"
            if not isinstance(tensor, torch.Tensor):
                return f"its transform returned {type(tensor).__name__}, not a tensor", None, None
            shape, dtype = tuple(tensor.shape), tensor.dtype
        if target.shard_id is not None and getattr(dest, "weight_loader", None) is None:
            return (f"shard id {target.shard_id!r} given but {kind} {name!r} has no "
                    f"weight_loader(param, tensor, shard_id)"), None, None
        if not castable(dtype, dest.dtype, kind):
            return f"dtype {dtype} cannot be cast to {kind} {name!r} ({dest.dtype}) without losing values", None, None
        if tensor is None and getattr(dest, "weight_destination", None) is not None:
            problem, layout = _declared_layout(dest, name, record, target.shard_id)
            if problem is not None or layout is not None:
                return problem, layout, None
        if target.shard_id is None and whole_tensor_loader(dest) is None:
            if shape != tuple(dest.shape):
                return f"shape {list(shape)} does not fit {kind} {name!r} of shape {list(dest.shape)}", None, None
            return None, (WHOLE if tensor is None else None), None
        twin = nn.Parameter(torch.empty_like(dest, device="meta"), requires_grad=False)
        try:
            if tensor is None:  # a dry-run view where the loader takes one, so its slicing is checked too
                tensor = (CheckpointSlice(record, None) if takes_slice(dest, target.shard_id)
                          else torch.empty(shape, dtype=dtype, device="meta"))
            with self.guard():
                load_into(dest, twin, tensor, target.shard_id)
        except Exception as exc:
            return None, None, f"its weight_loader cannot run on meta tensors ({type(exc).__name__}: {exc})"
        return None, None, None

    def plan(self, path: Path, open_files: OpenFiles) -> LoadPlan:
        started = time.perf_counter()
        files = find_checkpoint_files(path)
        report = LoadReport(checkpoint=str(path), files=[str(f) for f in files.files], strict=self.strict,
                            notes=list(files.notes), parallel=self.parallel.to_dict())
        items: list[Planned] = []
        written: set = set()
        whole_writers: dict = {}  # destination memory -> index of the first tensor that writes all of it
        aliases: dict = {}  # destination memory -> indices of every tensor that writes all of it, when 2 or more
        covered: set[str] = set()
        undeclared_loaders = 0
        model_name = type(self.model).__qualname__
        for record in _records(files, open_files):
            layout, watched = None, False
            target, rule, note = self.resolve(record.name)
            base = (record.name, record.file.name, record.shape, _DTYPE_NAMES[record.dtype])
            if target is not None and target.note:
                note = f"{note}; {target.note}" if note else target.note
            if target is None:
                placement = TensorPlacement(*base, "unexpected", None, rule, None, note)
                report.add_problem("unexpected", f"unexpected tensor {record.name!r} in {record.file.name}: "
                                                 f"nothing in {model_name} takes it" + (f" ({note})" if note else ""))
            elif target.kind == "empty":
                placement = TensorPlacement(*base, "rejected", None, rule, None, target.note)
                report.add_problem("rejected", f"tensor {record.name!r} in {record.file.name}: {target.note}")
            elif target.kind == "skip":
                placement = TensorPlacement(*base, "skip", None, rule, None, target.reason)
            elif target.kind == "loader":
                placement = TensorPlacement(*base, "loader", None, rule, None, note)
                covered.update(target.covers)
                watched = True
                undeclared_loaders += not target.covers
            else:
                problem, layout, deferral = self.check(record, target)
                key = self.dests.tie_keys.get(target.name)
                if problem is None:
                    if target.shard_id is None and key in whole_writers:
                        first = items[whole_writers[key]].record.name
                        aliases.setdefault(key, [whole_writers[key]]).append(len(items))
                        note = _joined(note, f"also written whole by {first!r}: the two must hold the same values "
                                             f"(compared when read)")
                    elif target.shard_id is None:
                        whole_writers[key] = len(items)
                    written.add(key)
                elif key is not None:
                    written.add(key)  # a rejected one is not also missing
                if deferral is not None:
                    watched = True
                    note = _joined(note, f"checked when applied: {deferral}")
                if problem is None:
                    placement = TensorPlacement(*base, target.kind, target.name, rule, target.shard_id, note)
                else:
                    placement = TensorPlacement(*base, "rejected", target.name, rule, target.shard_id, problem)
                    report.add_problem("rejected", f"tensor {record.name!r} in {record.file.name}: {problem}")
            if target is not None and target.transform is not None:  # not a plain copy: the report says so
                transform = getattr(target.transform, "__name__", type(target.transform).__name__)
                placement = placement._replace(transform=transform)
            items.append(Planned(record, placement, target, layout, watched))
        report.placements = [item.placement for item in items]
        without_values = self.meta_buffers_without_values(written, covered)
        for name in without_values:
            report.add_problem("no_values", (
                f"buffer {name!r} is on the meta device and no checkpoint tensor writes it: materializing "
                f"{model_name} would leave it without values (a cache computed in __init__, such as a rotary "
                f"cos/sin table). Build the model under diffulex_core.empty_weights.init_empty_weights() "
                f"(parameters on meta, buffers computed), or name it in its module's {REBUILT_BUFFERS} "
                f"if the module recomputes it when moved"))
        no_values = set(without_values)
        unwritten = [n for n in self.unwritten(written, covered) if n not in no_values]
        pending: list[str] = []
        if undeclared_loaders and unwritten:
            pending = unwritten
            report.notes.append(f"{len(pending)} parameter(s) no declared destination writes, e.g. {pending[0]!r}, are left "
                                f"to {undeclared_loaders} loader(s) that do not declare what they write; the apply step "
                                f"watches what they write, and whatever they leave is missing")
        else:
            report.missing = unwritten
            for name in unwritten:
                report.add_problem("missing", f"{name} is not written by any checkpoint tensor (missing)")
        report.bytes_total = sum(i.record.nbytes for i in items if i.placement.kind in WRITTEN_KINDS)
        report.plan_seconds = time.perf_counter() - started
        return LoadPlan(files, items, report, self.dests, open_files, pending, list(aliases.values()))

    def meta_buffers_without_values(self, written: set, covered: set[str]) -> list[str]:
        """Buffers on the meta device that nothing writes and that their module does not rebuild."""
        keys = self.dests.tie_keys
        return [name for name, buffer in self.dests.buffers.items()
                if buffer.is_meta and keys[name] not in written and name not in covered
                and name not in self.dests.rebuilt_buffers]

    def unwritten(self, written: set, covered: set[str]) -> list[str]:
        """Parameters and persistent buffers nothing writes; tied ones (one object or one storage) count once."""
        seen: set = set()
        out = []
        keys = self.dests.tie_keys
        for name in self.dests.persistent():
            key = keys[name]
            if key in seen:
                continue
            seen.add(key)
            if key not in written and name not in covered and name not in self.adapter_params and not any(
                    fnmatch.fnmatchcase(name, pattern) for pattern in self.expected_missing):
                out.append(name)
        return out


def _joined(note: str | None, more: str) -> str:
    return f"{note}; {more}" if note else more


def _records(files: CheckpointFiles, open_files: OpenFiles) -> list[TensorRecord]:
    """All tensors of all files, with duplicates and index disagreements refused.

    Each header is read through the descriptor the apply step will read tensors through, so
    both come from the same file whatever happens to its name meanwhile.
    """
    records: list[TensorRecord] = []
    seen: dict[str, TensorRecord] = {}
    for file in files.files:
        relative = file.relative_to(files.root).as_posix()
        for record in read_records(file, open_files.open(file)):
            if record.name in seen:
                raise CheckpointFormatError(
                    f"tensor {record.name!r} is in both {seen[record.name].file.name} and {file.name}; remove one copy"
                )
            if files.index is not None and files.index.get(record.name) != relative:
                where = files.index.get(record.name)
                raise CheckpointFormatError(
                    f"tensor {record.name!r} is in {file.name} but the index names "
                    + (f"{where!r} for it" if where else "no file for it")
                )
            seen[record.name] = record
            records.append(record)
    if files.index is not None:
        absent = sorted(set(files.index) - set(seen))
        if absent:
            raise CheckpointFormatError(
                f"the index names {len(absent)} tensor(s) its files lack, e.g. {absent[0]!r} in {files.index[absent[0]]}"
            )
    return records


def plan_for_load(model: nn.Module, path: str | Path, *, family: str | None, config: Any, strict: bool,
                  parallel: ParallelState) -> LoadPlan:
    """The plan of a load, its files left open for the apply step (the caller closes ``open_files``)."""
    open_files = OpenFiles()
    try:
        return _Planner(model, Path(path), family, config, strict, parallel).plan(Path(path), open_files)
    except BaseException:
        open_files.close()
        raise


def plan_checkpoint(model: nn.Module, path: str | Path, *, family: str | None = None, config: Any = None,
                    strict: bool = True, parallel: ParallelState | None = None) -> LoadPlan:
    """Plan a load from headers alone: no tensor bytes are read and nothing is written.

    ``parallel`` is this process's place in its parallel groups (default: ``current_parallel_state()``).
    """
    with gc_paused():
        plan = plan_for_load(model, path, family=family, config=config, strict=strict,
                             parallel=parallel or current_parallel_state())
    plan.open_files.close()
    return plan
