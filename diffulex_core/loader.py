"""Loading ``.safetensors`` checkpoints into a ``torch.nn.Module``: plan from headers, then apply.

Per checkpoint tensor the destination is decided, in this order, by
1. plugin hooks (``diffulex_resolve_weight``), first non-None answer wins;
2. module resolvers: ``module.resolve_checkpoint_weight(suffix, ctx)`` (a method of the module's
   class), most specific prefix first;
3. the packed-module mapping (``model.packed_modules_mapping`` merged with the hook's);
4. the exact parameter or buffer name.
The plan reads headers only and finds every problem a header can reveal (unexpected tensors,
missing parameters, shape and dtype mismatches, duplicates, bad files) before one byte is
written, so a failed load leaves the model as it was. The apply step then reads each tensor's
bytes once, straight into parameter storage where it can (see ``reader``).
"""

from __future__ import annotations

import contextlib
import fnmatch
import gc
import inspect
import logging
import os
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, NamedTuple

import torch
from torch import nn

from .checkpoint import LoadContext, ResolvedWeight
from .checkpoint_files import DTYPES, CheckpointFiles, TensorRecord, find_checkpoint_files, read_records
from .errors import CheckpointFormatError, DiffulexError, LoadApplyError, LoadError, LoadPlanError, WeightSpecError
from .packed_mapping import PackedMapping, merge_mappings
from .plugins import call_impl, collect_results, impls_in_call_order
from .reader import DirectRead, read_direct, read_exact
from .report import LoadReport, TensorPlacement

__all__ = [
    "default_weight_loader",
    "resolve_weight_spec",
    "apply_resolved_weight",
    "try_load_direct",
    "try_load_via_packed_mapping",
    "load_checkpoint",
    "plan_checkpoint",
    "load_model",
]

log = logging.getLogger("diffulex_core.loader")

MAX_PROBLEMS_SHOWN = 10
PROGRESS_MIN_BYTES = 512 * 1024**2


# --------------------------------------------------------------------------- writing one tensor


def default_weight_loader(param: torch.Tensor, loaded_weight: torch.Tensor) -> None:
    """Copy ``loaded_weight`` into ``param`` (casting dtype, moving device); shapes must match."""
    if tuple(param.shape) != tuple(loaded_weight.shape):
        raise ValueError(f"shape mismatch: parameter {tuple(param.shape)}, checkpoint tensor {tuple(loaded_weight.shape)}")
    param.data.copy_(loaded_weight)


def _whole_tensor_loader(dest: torch.Tensor) -> Callable | None:
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


def _write(dest: torch.Tensor, tensor: torch.Tensor, shard_id: Any, transform: Callable | None) -> None:
    """Put ``tensor`` into ``dest`` the way a planned tensor says: transform, then weight_loader or copy."""
    if transform is not None:
        tensor = transform(tensor)
    _load_into(dest, dest, tensor, shard_id)


def _load_into(dest: torch.Tensor, storage: torch.Tensor, tensor: torch.Tensor, shard_id: Any) -> None:
    """Call ``dest``'s loader on ``storage`` (``dest`` itself, or its meta twin during planning)."""
    if shard_id is not None:
        weight_loader = getattr(dest, "weight_loader", None)
        if weight_loader is None:
            raise WeightSpecError(f"shard id {shard_id!r} given but the parameter has no weight_loader(param, tensor, shard_id)")
        weight_loader(storage, tensor, shard_id)
        return
    weight_loader = _whole_tensor_loader(dest)
    if weight_loader is not None:
        weight_loader(storage, tensor)
    else:
        default_weight_loader(storage, tensor)


def _castable(src: torch.dtype, dst: torch.dtype) -> bool:
    if src == dst:
        return True
    if src.is_floating_point and dst.is_floating_point:
        return True
    integral = lambda d: not d.is_floating_point and not d.is_complex and d != torch.bool  # noqa: E731
    return integral(src) and integral(dst)


# --------------------------------------------------------------------------- destinations


class _Target(NamedTuple):
    """A destination in planning form: a ``ResolvedWeight`` minus validation, cheap to create."""

    kind: str  # "param", "buffer", "loader" or "skip"
    name: str | None
    shard_id: Any = None
    transform: Callable | None = None
    loader: Callable | None = None
    reason: str | None = None
    covers: tuple[str, ...] = ()

    @classmethod
    def of(cls, spec: ResolvedWeight) -> "_Target":
        if spec.skip:
            return cls("skip", None, reason=spec.reason)
        if spec.loader is not None:
            return cls("loader", None, transform=spec.transform, loader=spec.loader, covers=spec.covers)
        if spec.param is not None:
            return cls("param", spec.param, spec.shard_id, spec.transform)
        return cls("buffer", spec.buffer, None, spec.transform)


class _Destinations:
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
        self.resolvers: dict[str, nn.Module] = {}
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
            if callable(getattr(type(module), "resolve_checkpoint_weight", None)):
                self.resolvers[prefix] = module

    def tensor(self, kind: str, name: str) -> torch.Tensor | None:
        return (self.params if kind == "param" else self.buffers).get(name)

    def exact(self, name: str) -> "_Target | None":
        if name in self.params:
            return _Target("param", name)
        if name in self.buffers:
            return _Target("buffer", name)
        return None

    def module_resolver(self, name: str, ctx: LoadContext) -> tuple[ResolvedWeight, str] | None:
        if not self.resolvers:
            return None
        parts = name.split(".")
        for cut in range(len(parts) - 1, -1, -1):
            prefix = ".".join(parts[:cut])
            module = self.resolvers.get(prefix)
            if module is None:
                continue
            try:
                spec = module.resolve_checkpoint_weight(".".join(parts[cut:]), ctx)
            except DiffulexError:
                raise
            except Exception as exc:
                raise LoadError(f"{type(module).__qualname__}.resolve_checkpoint_weight (module {prefix or '<root>'!r}) "
                                f"raised {type(exc).__name__} for tensor {name!r}: {exc}") from exc
            if spec is not None:
                if not isinstance(spec, ResolvedWeight):
                    raise WeightSpecError(
                        f"{type(module).__qualname__}.resolve_checkpoint_weight (module {prefix or '<root>'!r}) returned "
                        f"{type(spec).__name__} for {name!r}; expected ResolvedWeight or None"
                    )
                return spec.rebased(prefix), f"module:{prefix or '<root>'}"
        return None


def resolve_weight_spec(model: nn.Module, name: str, config: Any = None, *, ctx: LoadContext | None = None) -> ResolvedWeight | None:
    """Ask module resolvers, most specific prefix first, then the root; names in the answer are full."""
    found = _Destinations(model).module_resolver(name, ctx or LoadContext(config=config, full_name=name))
    return found[0] if found else None


def apply_resolved_weight(model: nn.Module, spec: ResolvedWeight, loaded_weight: torch.Tensor) -> None:
    """Apply a ``ResolvedWeight`` (full names) with a tensor in hand: skip, custom loader, or copy."""
    if spec.skip:
        return
    if spec.loader is not None:
        spec.loader(spec.transform(loaded_weight) if spec.transform else loaded_weight)
        return
    dests = _Destinations(model)
    kind, target = ("param", spec.param) if spec.param is not None else ("buffer", spec.buffer)
    dest = dests.tensor(kind, target)
    if dest is None:
        raise WeightSpecError(f"ResolvedWeight names {kind} {target!r}, which {type(model).__qualname__} does not have")
    with torch.no_grad():
        _write(dest, loaded_weight, spec.shard_id, spec.transform)


def try_load_direct(model: nn.Module, name: str, loaded_weight: torch.Tensor) -> bool:
    """Load by exact parameter or buffer name; False when the model has no such name."""
    target = _Destinations(model).exact(name)
    if target is None:
        return False
    apply_resolved_weight(model, ResolvedWeight(**{target.kind: name}), loaded_weight)
    return True


def try_load_via_packed_mapping(model: nn.Module, packed_mapping: dict, name: str, loaded_weight: torch.Tensor,
                                config: Any = None) -> bool:
    """Load through a packed-module mapping (segment keys, most specific wins); False if it does not apply."""
    mapped = PackedMapping(merge_mappings([("packed_mapping argument", packed_mapping)])).map(name)
    if mapped is None or mapped.name not in dict(model.named_parameters(remove_duplicate=False)):
        return False
    apply_resolved_weight(model, ResolvedWeight(param=mapped.name, shard_id=mapped.shard_id), loaded_weight)
    return True


# --------------------------------------------------------------------------- planning


@dataclass(slots=True)
class _Planned:
    record: TensorRecord
    placement: TensorPlacement
    target: _Target | None
    plain: bool = False  # same dtype and shape, no code involved: bytes can go straight into memory


@dataclass
class LoadPlan:
    """Every tensor's destination, decided from headers alone; ``report`` already lists the problems."""

    files: CheckpointFiles
    items: list[_Planned]
    report: LoadReport
    dests: _Destinations


@contextlib.contextmanager
def _gc_paused():
    """Plans and loads create an object or two per tensor; with 100,000 tensors the cyclic
    collector would rescan the whole model again and again. Nothing here makes cycles."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


def _plugin_manager():
    from .plugins import get_plugin_manager

    return get_plugin_manager()


class _Planner:
    def __init__(self, model: nn.Module, path: Path, family: str | None, config: Any, strict: bool) -> None:
        self.model, self.strict = model, strict
        self.dests = _Destinations(model)
        hook = _plugin_manager().hook
        self.resolve_impls = impls_in_call_order(hook.diffulex_resolve_weight)
        model_name = f"{type(model).__qualname__}.packed_modules_mapping"
        mapping_parts = [(model_name, getattr(model, "packed_modules_mapping", None) or {})]
        mapping_parts += [(f"plugin {p!r}", m) for p, m in
                          collect_results(hook.diffulex_packed_modules_mapping, {"model": model, "config": config}, error=LoadError)]
        self.mapping = PackedMapping(merge_mappings(mapping_parts))
        self.expected_missing = list(getattr(model, "expected_missing_keys", None) or ())
        for _, names in collect_results(hook.diffulex_expected_missing, {"model": model}, error=LoadError):
            self.expected_missing += list(names)
        distributed = torch.distributed.is_available() and torch.distributed.is_initialized()
        rank, size = (torch.distributed.get_rank(), torch.distributed.get_world_size()) if distributed else (0, 1)
        self.ctx_fields = dict(config=config, family=family, tp_rank=rank, tp_size=size, checkpoint=str(path))

    def resolve(self, name: str) -> tuple[_Target | None, str, str | None]:
        """(destination, rule, note) for one checkpoint name, in the documented order."""
        ctx = LoadContext(full_name=name, **self.ctx_fields) if self.resolve_impls or self.dests.resolvers else None
        for impl in self.resolve_impls:
            spec = call_impl(impl, {"model": self.model, "name": name, "ctx": ctx}, error=LoadError,
                             context=f" for tensor {name!r}")
            if spec is not None:
                if not isinstance(spec, ResolvedWeight):
                    raise WeightSpecError(f"plugin {impl.plugin_name!r}: diffulex_resolve_weight returned "
                                          f"{type(spec).__name__} for {name!r}; expected ResolvedWeight or None")
                return _Target.of(spec), f"plugin:{impl.plugin_name}", None
        found = self.dests.module_resolver(name, ctx) if ctx is not None else None
        if found is not None:
            return _Target.of(found[0]), found[1], None
        note = None
        mapped = self.mapping.map(name) if self.mapping else None
        if mapped is not None:
            if mapped.name in self.dests.params:
                return _Target("param", mapped.name, mapped.shard_id), "packed_mapping", f"keys: {', '.join(mapped.keys)}"
            note = f"packed mapping {list(mapped.keys)} rewrote it to {mapped.name!r}, which is not a parameter"
        exact = self.dests.exact(name)
        if exact is not None:
            return exact, "exact", None
        return None, "unexpected", note

    def check(self, record: TensorRecord, target: _Target) -> tuple[str | None, bool]:
        """(problem or None, plain): checks the write, on the meta device where code is involved.

        ``plain`` means same dtype and shape with no code in between, so the file's bytes can
        go straight into the destination's memory.
        """
        kind, name = target.kind, target.name
        dest = self.dests.tensor(kind, name)
        if dest is None:
            return f"it resolves to {kind} {name!r}, which {type(self.model).__qualname__} does not have", False
        shape, dtype, tensor = record.shape, record.dtype, None
        if target.transform is not None:
            try:
                tensor = target.transform(torch.empty(shape, dtype=dtype, device="meta"))
            except Exception as exc:
                return f"its transform failed on a meta tensor ({type(exc).__name__}: {exc}); transforms must accept meta tensors", False
            if not isinstance(tensor, torch.Tensor):
                return f"its transform returned {type(tensor).__name__}, not a tensor", False
            shape, dtype = tuple(tensor.shape), tensor.dtype
        if not _castable(dtype, dest.dtype):
            return f"dtype {dtype} cannot be cast to {kind} {name!r} ({dest.dtype})", False
        if target.shard_id is None and _whole_tensor_loader(dest) is None:
            if shape != tuple(dest.shape):
                return f"shape {list(shape)} does not fit {kind} {name!r} of shape {list(dest.shape)}", False
            return None, tensor is None and dtype == dest.dtype
        twin = nn.Parameter(torch.empty_like(dest, device="meta"), requires_grad=False)
        try:
            _load_into(dest, twin, tensor if tensor is not None else torch.empty(shape, dtype=dtype, device="meta"),
                       target.shard_id)
        except Exception as exc:
            return f"loading it into {kind} {name!r} (shard {target.shard_id!r}) fails: {type(exc).__name__}: {exc}", False
        return None, False

    def plan(self, path: Path) -> LoadPlan:
        started = time.perf_counter()
        files = find_checkpoint_files(path)
        report = LoadReport(checkpoint=str(path), files=[str(f) for f in files.files], strict=self.strict,
                            notes=list(files.notes))
        items: list[_Planned] = []
        written: set[int] = set()
        whole_writers: dict[int, str] = {}  # destination -> the tensor that writes all of it
        covered: set[str] = set()
        model_name = type(self.model).__qualname__
        for record in _records(files):
            plain = False
            target, rule, note = self.resolve(record.name)
            base = (record.name, record.file.name, record.shape, _DTYPE_NAMES[record.dtype])
            if target is None:
                placement = TensorPlacement(*base, "unexpected", None, rule, None, note)
                report.problems.append(f"unexpected tensor {record.name!r} in {record.file.name}: nothing in {model_name} takes it"
                                       + (f" ({note})" if note else ""))
            elif target.kind == "skip":
                placement = TensorPlacement(*base, "skip", None, rule, None, target.reason)
            elif target.kind == "loader":
                placement = TensorPlacement(*base, "loader", None, rule, None, note)
                covered.update(target.covers)
            else:
                problem, plain = self.check(record, target)
                dest_id = id(self.dests.tensor(target.kind, target.name))
                if problem is None:
                    if target.shard_id is None and dest_id in whole_writers:
                        problem = (f"{target.kind} {target.name!r} is also written whole by {whole_writers[dest_id]!r} "
                                   f"(tied or aliased); skip one of them with a resolver")
                    elif target.shard_id is None:
                        whole_writers[dest_id] = record.name
                written.add(dest_id)  # a rejected one is not also "missing"
                if problem is None:
                    placement = TensorPlacement(*base, target.kind, target.name, rule, target.shard_id, note)
                else:
                    placement = TensorPlacement(*base, "rejected", target.name, rule, target.shard_id, problem)
                    report.problems.append(f"tensor {record.name!r} in {record.file.name}: {problem}")
            items.append(_Planned(record, placement, target, plain))
        report.placements = [item.placement for item in items]
        report.missing = self.missing(written, covered)
        report.problems += [f"{name} is not written by any checkpoint tensor (missing)" for name in report.missing]
        report.bytes_total = sum(i.record.nbytes for i in items if i.placement.kind in _WRITTEN_KINDS)
        report.plan_seconds = time.perf_counter() - started
        return LoadPlan(files, items, report, self.dests)

    def missing(self, written: set[int], covered: set[str]) -> list[str]:
        """Parameters and persistent buffers nothing writes; tied parameters count once."""
        seen: set[int] = set()
        candidates = []
        for name, param in self.dests.params.items():
            if id(param) not in seen:
                seen.add(id(param))
                candidates.append((name, param))
        candidates += [(n, b) for n, b in self.dests.buffers.items() if n in self.dests.persistent_buffers]
        return [
            name for name, tensor in candidates
            if id(tensor) not in written and name not in covered
            and not any(fnmatch.fnmatchcase(name, pattern) for pattern in self.expected_missing)
        ]


_WRITTEN_KINDS = ("param", "buffer", "loader")
_DTYPE_NAMES = {dtype: str(dtype).removeprefix("torch.") for dtype in DTYPES.values()}


def _records(files: CheckpointFiles) -> list[TensorRecord]:
    """All tensors of all files, with duplicates and index disagreements refused."""
    records: list[TensorRecord] = []
    seen: dict[str, TensorRecord] = {}
    for file in files.files:
        relative = file.relative_to(files.root).as_posix()
        for record in read_records(file):
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


# --------------------------------------------------------------------------- applying


def _apply(plan: LoadPlan, dests: _Destinations, progress: bool | None, threads: int | None) -> None:
    """Write every planned tensor: plain copies straight from the file, the rest through their code."""
    report = plan.report
    work = [item for item in plan.items if item.placement.kind in _WRITTEN_KINDS]
    show = progress if progress is not None else (sys.stderr.isatty() and report.bytes_total >= PROGRESS_MIN_BYTES)
    from tqdm.auto import tqdm

    bar = tqdm(total=report.bytes_total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", disable=not show)
    started = time.perf_counter()

    def advance(nbytes: int) -> None:
        report.bytes_read += nbytes
        bar.update(nbytes)

    try:
        direct, coded = [], []
        for item in work:  # ``dests`` keeps every destination alive while its address is in use
            dest = dests.tensor(item.target.kind, item.target.name) if item.target.name else None
            if item.plain and dest.device.type == "cpu" and dest.is_contiguous():
                record = item.record
                direct.append(DirectRead(record.file, record.start, record.nbytes, dest.data_ptr(), record.name))
            else:
                coded.append((item, dest))
        with torch.no_grad():
            read_direct(direct, threads=threads, on_progress=advance)
            fds: dict[Path, int] = {}
            try:
                for item, dest in coded:
                    _apply_coded(item, dest, fds)
                    advance(item.record.nbytes)
            finally:
                for fd in fds.values():
                    os.close(fd)
    finally:
        bar.close()
        report.apply_seconds = time.perf_counter() - started
    report.applied = True


def _apply_coded(item: _Planned, dest: torch.Tensor | None, fds: dict[Path, int]) -> None:
    """Read one tensor into a temporary, then transform / weight_loader / custom loader it."""
    record, target = item.record, item.target
    fd = fds.get(record.file)
    if fd is None:
        fd = fds[record.file] = os.open(record.file, os.O_RDONLY)
    tensor = torch.empty(record.shape, dtype=record.dtype)
    buffer = memoryview(tensor.reshape(-1).view(torch.uint8).numpy()).cast("B")
    read_exact(fd, buffer, record.start, f"{record.file}: tensor {record.name!r}")
    try:
        if target.loader is not None:
            target.loader(target.transform(tensor) if target.transform else tensor)
        else:
            _write(dest, tensor, target.shard_id, target.transform)
    except Exception as exc:
        raise LoadApplyError(
            f"writing tensor {record.name!r} ({item.placement.rule}) raised {type(exc).__name__}: {exc}; "
            f"tensors before it in file order were already written"
        ) from exc


def _problem_message(report: LoadReport) -> str:
    shown = report.problems[:MAX_PROBLEMS_SHOWN]
    more = len(report.problems) - len(shown)
    lines = [f"checkpoint {report.checkpoint}: {len(report.problems)} problem(s); nothing was loaded:"]
    lines += [f"  - {p}" for p in shown]
    if more:
        lines.append(f"  ... and {more} more (LoadPlanError.report has them all)")
    return "\n".join(lines)


def plan_checkpoint(model: nn.Module, path: str | Path, *, family: str | None = None, config: Any = None,
                    strict: bool = True) -> LoadPlan:
    """Plan a load from headers alone: no tensor bytes are read and nothing is written."""
    with _gc_paused():
        return _Planner(model, Path(path), family, config, strict).plan(Path(path))


def load_checkpoint(model: nn.Module, path: str | Path, *, family: str | None = None, config: Any = None,
                    strict: bool = True, device: str | torch.device | None = None,
                    progress: bool | None = None, threads: int | None = None) -> LoadReport:
    """Load a safetensors checkpoint into ``model`` and return a ``LoadReport``.

    ``strict=True`` raises ``LoadPlanError`` (nothing written) when the plan finds any problem;
    ``strict=False`` loads what it can, logs a warning and returns the report. A model on the
    meta device is materialized on ``device`` after a successful plan. ``progress=None`` shows
    a progress bar only on a terminal and for large loads; ``threads`` caps the reading threads
    (default: one per core).
    """
    with _gc_paused():
        plan = plan_checkpoint(model, path, family=family, config=config, strict=strict)
        report, dests = plan.report, plan.dests
        if report.problems:
            if strict:
                raise LoadPlanError(_problem_message(report), report)
            log.warning("%s", _problem_message(report).replace("nothing was loaded", "loading the rest (strict=False)"))
        tensors = [*dests.params.values(), *dests.buffers.values()]
        if any(t.is_meta for t in tensors):
            if device is None:
                raise LoadError(f"{type(model).__qualname__} is on the meta device; pass device=... to materialize it")
            model.to_empty(device=device)
            dests = _Destinations(model)  # materializing made new parameter objects
        elif device is not None and any(t.device != torch.device(device) for t in tensors):
            raise LoadError(f"{type(model).__qualname__} is already materialized on another device than {device}; "
                            f"move it first or build it on the meta device")
        _apply(plan, dests, progress, threads)
    return report


def load_model(model: nn.Module, config: Any) -> nn.Module:
    """Seed-compatible entry point: load ``config.model`` (a checkpoint directory) into ``model``.

    ``config`` is any object with ``model`` (path), ``model_name`` (family), ``use_lora``,
    ``lora_path`` and ``pre_merge_lora``. Strict; returns the model.
    """
    if getattr(config, "use_lora", False):  # refuse before writing anything, never load base-only silently
        raise LoadError(
            f"use_lora=True (lora_path={getattr(config, 'lora_path', None)!r}): LoRA adapter loading is not "
            f"available in this version of diffulex-core; nothing was loaded"
        )
    load_checkpoint(model, config.model, family=getattr(config, "model_name", None), config=config)
    return model
