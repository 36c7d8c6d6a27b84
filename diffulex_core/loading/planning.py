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
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch
from torch import nn

from diffulex_core.checkpoint import (
    LoadContext,
    ResolvedWeight,
    as_resolved_weight,
)
from diffulex_core.empty_weights import REBUILT_BUFFERS
from diffulex_core.errors import CheckpointFormatError, LoadError
from diffulex_core.files.finding import CheckpointFiles, find_checkpoint_files
from diffulex_core.files.handles import OpenFiles
from diffulex_core.files.headers import DTYPES, TensorRecord, read_records
from diffulex_core.io.slices import CheckpointSlice
from diffulex_core.loading.destinations import Destinations, Target, joined_note
from diffulex_core.loading.packed_mapping import PackedMapping, merge_mappings
from diffulex_core.loading.report import LoadReport, TensorPlacement
from diffulex_core.loading.weight_loaders import (
    WHOLE,
    Layout,
    castable,
    declared_layout,
    load_into,
    takes_slice,
    whole_tensor_loader,
)
from diffulex_core.loading.write_watch import MetaOnly
from diffulex_core.parallel import ParallelState, current_parallel_state
from diffulex_core.plugins.hook_calls import collect_results, first_result, plugin_label

__all__ = ["WRITTEN_KINDS", "LoadPlan", "Planned", "gc_paused", "model_packed_mapping", "plan_checkpoint",
           "plan_for_load"]

WRITTEN_KINDS = ("param", "buffer", "loader")
_DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in DTYPES.values()}


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
    own = getattr(model, "packed_modules_mapping", None) or {}
    parts = [(f"{type(model).__qualname__}.packed_modules_mapping", own)]
    parts += [(f"plugin {p!r}", m) for p, m in collect_results(
        _plugin_manager().hook.diffulex_packed_modules_mapping, {"model": model, "config": config}, error=LoadError,
        context=" while planning")]
    return PackedMapping(merge_mappings([*parts, *extra]))


def _plugin_manager():
    from diffulex_core.plugins import get_plugin_manager

    return get_plugin_manager()


@dataclass
class _Tally:
    """What the tensors planned so far write: for missing parameters, aliases and watched loaders."""

    written: set = field(default_factory=set)  # destination memory written, whole or in part
    whole_writers: dict = field(default_factory=dict)  # destination memory -> index of the first whole writer
    aliases: dict = field(default_factory=dict)  # destination memory -> every whole writer's index, when 2 or more
    covered: set = field(default_factory=set)  # names undeclared loaders say they cover
    undeclared_loaders: int = 0


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
        self.ignored = [(p, f"{model_name}.ignored_checkpoint_keys")
                        for p in getattr(model, "ignored_checkpoint_keys", None) or ()]
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
        asks = self.resolve_hook is not None or self.dests.resolvers
        ctx = LoadContext(full_name=name, **self.ctx_fields) if asks else None
        if self.resolve_hook is not None:
            plugin, spec = first_result(self.resolve_hook, {"model": self.model, "name": name, "ctx": ctx},
                                        error=LoadError, context=f" (tensor {name!r})")
            if spec is not None:
                rule = f"plugin:{plugin}"
                if not isinstance(spec, ResolvedWeight):  # Diffulex's own is converted, anything else refused
                    who = f"{plugin_label(self.manager, plugin)}: diffulex_resolve_weight"
                    spec = as_resolved_weight(spec, who, name)
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
            problem, layout = declared_layout(dest, name, record, target.shard_id)
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
        tally = _Tally()
        for record in _records(files, open_files):
            items.append(self.place(record, len(items), items, tally, report))
        report.placements = [item.placement for item in items]
        pending = _report_unwritten(self, report, tally)
        report.bytes_total = sum(i.record.nbytes for i in items if i.placement.kind in WRITTEN_KINDS)
        report.plan_seconds = time.perf_counter() - started
        return LoadPlan(files, items, report, self.dests, open_files, pending, list(tally.aliases.values()))

    def place(self, record: TensorRecord, index: int, items: list[Planned], tally: _Tally,
              report: LoadReport) -> Planned:
        """Plan one checkpoint tensor (the ``index``-th): its placement, problems in ``report``."""
        layout, watched = None, False
        target, rule, note = self.resolve(record.name)
        base = (record.name, record.file.name, record.shape, _DTYPE_NAMES[record.dtype])
        if target is not None and target.note:
            note = f"{note}; {target.note}" if note else target.note
        if target is None:
            placement = TensorPlacement(*base, "unexpected", None, rule, None, note)
            report.add_problem("unexpected", f"unexpected tensor {record.name!r} in {record.file.name}: nothing in "
                                             f"{type(self.model).__qualname__} takes it"
                                             + (f" ({note})" if note else ""))
        elif target.kind == "empty":
            placement = TensorPlacement(*base, "rejected", None, rule, None, target.note)
            report.add_problem("rejected", f"tensor {record.name!r} in {record.file.name}: {target.note}")
        elif target.kind == "skip":
            placement = TensorPlacement(*base, "skip", None, rule, None, target.reason)
        elif target.kind == "loader":
            placement = TensorPlacement(*base, "loader", None, rule, None, note)
            tally.covered.update(target.covers)
            watched = True
            tally.undeclared_loaders += not target.covers
        else:
            placement, layout, watched = self.place_direct(record, target, base, rule, note, index, items, tally,
                                                           report)
        if target is not None and target.transform is not None:  # not a plain copy: the report says so
            transform = getattr(target.transform, "__name__", type(target.transform).__name__)
            placement = placement._replace(transform=transform)
        return Planned(record, placement, target, layout, watched)

    def place_direct(self, record: TensorRecord, target: Target, base: tuple, rule: str, note: str | None,
                     index: int, items: list[Planned], tally: _Tally,
                     report: LoadReport) -> tuple[TensorPlacement, Layout | None, bool]:
        """A tensor for a parameter or buffer: checked, and counted as written (once whole: aliases)."""
        problem, layout, deferral = self.check(record, target)
        key = self.dests.tie_keys.get(target.name)
        if problem is None:
            if target.shard_id is None and key in tally.whole_writers:
                first = items[tally.whole_writers[key]].record.name
                tally.aliases.setdefault(key, [tally.whole_writers[key]]).append(index)
                note = joined_note(note, f"also written whole by {first!r}: the two must hold the same values "
                                         f"(compared when read)")
            elif target.shard_id is None:
                tally.whole_writers[key] = index
            tally.written.add(key)
        elif key is not None:
            tally.written.add(key)  # a rejected one is not also missing
        if deferral is not None:
            note = joined_note(note, f"checked when applied: {deferral}")
        if problem is not None:
            report.add_problem("rejected", f"tensor {record.name!r} in {record.file.name}: {problem}")
            placement = TensorPlacement(*base, "rejected", target.name, rule, target.shard_id, problem)
        else:
            placement = TensorPlacement(*base, target.kind, target.name, rule, target.shard_id, note)
        return placement, layout, deferral is not None



def _report_unwritten(planner: _Planner, report: LoadReport, tally: _Tally) -> list[str]:
    """Meta buffers without values and parameters nothing writes, as problems; the parameters left
    to undeclared loaders (watched when applied) are returned instead."""
    model_name = type(planner.model).__qualname__
    without_values = _meta_buffers_without_values(planner, tally.written, tally.covered)
    for name in without_values:
        report.add_problem("no_values", (
            f"buffer {name!r} is on the meta device and no checkpoint tensor writes it: materializing "
            f"{model_name} would leave it without values (a cache computed in __init__, such as a rotary "
            f"cos/sin table). Build the model under diffulex_core.empty_weights.init_empty_weights() "
            f"(parameters on meta, buffers computed), or name it in its module's {REBUILT_BUFFERS} "
            f"if the module recomputes it when moved"))
    no_values = set(without_values)
    unwritten = [n for n in _unwritten(planner, tally.written, tally.covered) if n not in no_values]
    if tally.undeclared_loaders and unwritten:
        report.notes.append(f"{len(unwritten)} parameter(s) no declared destination writes, e.g. {unwritten[0]!r}, "
                            f"are left to {tally.undeclared_loaders} loader(s) that do not declare what they "
                            f"write; the apply step watches what they write, and whatever they leave is missing")
        return unwritten
    report.missing = unwritten
    for name in unwritten:
        report.add_problem("missing", f"{name} is not written by any checkpoint tensor (missing)")
    return []

def _meta_buffers_without_values(planner: _Planner, written: set, covered: set[str]) -> list[str]:
    """Buffers on the meta device that nothing writes and that their module does not rebuild."""
    keys = planner.dests.tie_keys
    return [name for name, buffer in planner.dests.buffers.items()
            if buffer.is_meta and keys[name] not in written and name not in covered
            and name not in planner.dests.rebuilt_buffers]

def _unwritten(planner: _Planner, written: set, covered: set[str]) -> list[str]:
    """Parameters and persistent buffers nothing writes; tied ones (one object or one storage) count once."""
    seen: set = set()
    out = []
    keys = planner.dests.tie_keys
    for name in planner.dests.persistent():
        key = keys[name]
        if key in seen:
            continue
        seen.add(key)
        if key not in written and name not in covered and name not in planner.adapter_params and not any(
                fnmatch.fnmatchcase(name, pattern) for pattern in planner.expected_missing):
            out.append(name)
    return out


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
                f"the index names {len(absent)} tensor(s) its files lack, e.g. {absent[0]!r} in "
                f"{files.index[absent[0]]}"
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
