"""Loading ``.safetensors`` checkpoints into a ``torch.nn.Module``: the public doors.

``load_checkpoint`` is ours: strict by default, planned from headers before anything is written
(``planning``), applied with as few copies as the hardware allows (``applying``, ``reader``),
answered with a full ``LoadReport``. ``load_model(model, config)`` is the seed's door: it loads
what Diffulex's loader loads, names what that loader would drop silently, and still refuses
broken files. The seed's per-tensor helpers (``resolve_weight_spec``, ``apply_resolved_weight``,
``try_load_direct``, ``try_load_via_packed_mapping``, ``default_weight_loader``) keep their
call forms for engine code that drives its own loop.
"""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from diffulex_core.checkpoint import LoadContext, ResolvedWeight
from diffulex_core.errors import LoadError, LoadPlanError, LoadWarning, WeightSpecError
from diffulex_core.io.staging import choose_path
from diffulex_core.loading.applying import WriteState, apply_plan, problem_message
from diffulex_core.loading.destinations import Destinations, ask_module_resolvers, resolver_of
from diffulex_core.loading.interrupts import deferred_interrupts
from diffulex_core.loading.packed_mapping import PackedMapping, merge_mappings
from diffulex_core.loading.partial_load import clear_partial, mark_partial
from diffulex_core.loading.planning import LoadPlan, gc_paused, plan_checkpoint, plan_for_load
from diffulex_core.loading.report import LoadReport
from diffulex_core.loading.ties import materialize
from diffulex_core.loading.weight_loaders import default_weight_loader, load_into
from diffulex_core.lora.adapters import enable_lora_for_model, load_lora_weights, prepare_lora, warn_base_only
from diffulex_core.lora.config import load_lora_config
from diffulex_core.parallel import ParallelState, agree, current_parallel_state

__all__ = [
    "default_weight_loader",
    "resolve_weight_spec",
    "apply_resolved_weight",
    "try_load_direct",
    "try_load_via_packed_mapping",
    "load_checkpoint",
    "plan_checkpoint",
    "load_model",
    "LoadPlan",
    "load_lora_config",
    "enable_lora_for_model",
    "load_lora_weights",
]

log = logging.getLogger("diffulex_core.loader")

ALL_PROBLEMS = ("unexpected", "missing", "rejected", "no_values", "conflicting")
SEED_FATAL = ("rejected", "no_values")  # load_model goes on past the rest, as Diffulex's loader does


# --------------------------------------------------------------------------- the seed's per-tensor helpers


def resolve_weight_spec(model: nn.Module, weight_name: str, config: Any = None, *,
                        named_modules: Mapping[str, nn.Module] | None = None,
                        ctx: LoadContext | None = None) -> ResolvedWeight | None:
    """Ask module resolvers, most specific prefix first (the full name included), then the root.

    ``named_modules`` (``dict(model.named_modules())``) saves a walk of the model per call, as in
    the seed. Names in the answer are made full; parameter objects are returned as they are.
    """
    modules = named_modules if named_modules is not None else dict(model.named_modules())

    def resolver_at(prefix: str):
        module = modules.get(prefix) if prefix else model
        return resolver_of(module) if module is not None else None

    found = ask_module_resolvers(resolver_at, weight_name, ctx or LoadContext(config=config, full_name=weight_name))
    return found[0] if found else None


def _named_tensor(model: nn.Module | None, kind: str, name: str) -> torch.Tensor:
    if model is None:
        raise WeightSpecError(f"ResolvedWeight names {kind} {name!r}; pass model= to apply a spec that holds names")
    try:
        return model.get_parameter(name) if kind == "param" else model.get_buffer(name)
    except AttributeError:
        raise WeightSpecError(f"ResolvedWeight names {kind} {name!r}, which {type(model).__qualname__} "
                              f"does not have") from None


def apply_resolved_weight(spec: ResolvedWeight, loaded_weight: torch.Tensor, *, model: nn.Module | None = None) -> None:
    """Apply a ``ResolvedWeight`` to a tensor in hand, in the seed's order.

    ``skip``, then ``transform``, then ``loader``, then ``param`` (its ``weight_loader``, with the
    shard id if any, else a shape-checked copy), then ``buffer``. Specs holding names need ``model``.
    """
    if spec.skip:
        return
    if spec.transform is not None:
        loaded_weight = spec.transform(loaded_weight)
    if spec.loader is not None:
        spec.loader(loaded_weight)
        return
    kind = "param" if spec.param is not None else "buffer" if spec.buffer is not None else None
    if kind is None:
        raise WeightSpecError("ResolvedWeight must name a loader, param, buffer, or skip=True")
    dest = getattr(spec, kind)
    if isinstance(dest, str):
        dest = _named_tensor(model, kind, dest)
    with torch.no_grad():
        load_into(dest, dest, loaded_weight, spec.shard_id if kind == "param" else None)


def try_load_direct(model: nn.Module, weight_name: str, loaded_weight: torch.Tensor) -> bool:
    """Load by exact parameter or buffer name; False when the model has neither."""
    for kind in ("param", "buffer"):
        try:
            dest = _named_tensor(model, kind, weight_name)
        except WeightSpecError:
            continue
        apply_resolved_weight(ResolvedWeight(**{kind: dest}), loaded_weight)
        return True
    return False


def try_load_via_packed_mapping(model: nn.Module, packed_modules_mapping: Mapping, weight_name: str,
                                loaded_weight: torch.Tensor, config: Any = None) -> bool:
    """Load through a packed-module mapping and return True; False when it names nothing in ``model``.

    Keys match whole dotted segments, the most specific wins; where the rewritten name names
    nothing and a key's value names a path from the model's root, that is used (see
    ``PackedMapping.rooted``). ``config`` is accepted for the seed's call form.
    """
    mapping = PackedMapping(merge_mappings([("packed_modules_mapping argument", packed_modules_mapping)]))
    mapped = mapping.map(weight_name)
    if mapped is None:
        return False
    for candidate in (mapped, *mapping.rooted(weight_name)):
        kinds = ("param",) if candidate.shard_id is not None else ("param", "buffer")
        for kind in kinds:
            try:
                dest = _named_tensor(model, kind, candidate.name)
            except WeightSpecError:
                continue
            apply_resolved_weight(ResolvedWeight(**{kind: dest}, shard_id=candidate.shard_id), loaded_weight)
            return True
    return False


# --------------------------------------------------------------------------- whole loads


def _load(model: nn.Module, path: str | Path, *, family: str | None, config: Any, strict: bool,
          device: str | torch.device | None, progress: bool | None, threads: int | None,
          fatal: tuple[str, ...], rollback: bool, parallel: ParallelState | None,
          cuda_path: str = "auto") -> LoadReport:
    """Plan (files kept open), agree across ranks, apply, agree again; a meta model goes back to meta on failure.

    In a parallel group every rank reaches both agreement points whatever happened to it, so a
    failure on one rank is a ``ParallelLoadError`` on all of them, before anything is written
    where it failed in planning.
    """
    state = parallel or current_parallel_state()
    target = check_device(device)  # before planning: nothing allocated for a device that cannot be used
    with gc_paused():
        plan, error = None, None
        try:
            plan = plan_for_load(model, path, family=family, config=config, strict=strict, parallel=state)
            _check_ready(plan, fatal)
        except Exception as exc:
            if not state.distributed:
                if plan is not None:
                    plan.open_files.close()
                raise
            error = exc
        try:
            agree(state, f"planning the load of {path}", error)
        except BaseException:
            if plan is not None:
                plan.open_files.close()
            raise
        with plan.open_files:
            try:
                report, restore = _apply(model, plan, device=target, progress=progress, threads=threads,
                                              fatal=fatal, rollback=rollback, cuda_path=cuda_path)
            except Exception as exc:
                if not state.distributed:
                    raise
                agree(state, f"loading {path}", exc)
                raise  # not reached: agree raises for a failed rank
            try:
                agree(state, f"loading {path}", None)
            except BaseException:
                if restore is not None:  # the shards of the other ranks never loaded: this one goes back too
                    restore()
                raise
            return report


def _check_ready(plan: LoadPlan, fatal: tuple[str, ...]) -> None:
    """Refuse a fatal plan, or a file changed since planning, before anything is written."""
    blocking = plan.report.problems_of(*fatal)
    if blocking:
        raise LoadPlanError(problem_message(plan.report, blocking), plan.report)
    plan.open_files.check_unchanged()


def _apply(model: nn.Module, plan: LoadPlan, *, device: torch.device | None, progress: bool | None,
           threads: int | None, fatal: tuple[str, ...], rollback: bool,
           cuda_path: str) -> tuple[LoadReport, Callable[[], None] | None]:
    """Materialize a meta model, apply; (report, what puts back the model this load materialized, or None).

    Ctrl-C is held meanwhile (``interrupts``): the load stops where the model is still whole, or
    finishes. Where it fails with writes nothing can undo, the model is marked (``partial_load``).
    """
    report, dests = plan.report, plan.dests
    tensors = [*dests.params.values(), *dests.buffers.values()]
    materialized = any(t.is_meta for t in tensors)
    if materialized:
        if device is None:
            raise LoadError(f"{type(model).__qualname__} is on the meta device; pass device=... to materialize it")
    elif device is not None and any(t.device != device for t in tensors):
        raise LoadError(f"{type(model).__qualname__} is already materialized on another device than {device}; "
                        f"move it first or build it on the meta device")
    state, restore = WriteState(), None
    with deferred_interrupts() as gate:
        try:
            if materialized:
                restore = materialize(model, device)
                dests = Destinations(model)  # materializing made new parameter objects
            # A model materialized here gets its meta tensors back on failure; one that held
            # weights keeps the bytes that watched code overwrites, to put them back.
            undo = "caller" if materialized else "bytes" if rollback else "none"
            apply_plan(plan, dests, progress=progress, threads=threads, undo=undo, fatal=fatal, cuda_path=cuda_path,
                       gate=gate, state=state)
            if not report.missing:
                clear_partial(model)  # every parameter holds this load's bytes again
        except BaseException as exc:
            with gate.shield():
                if restore is not None:
                    restore()
                elif state.unrestored:
                    reason = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
                    report.partial = reason.splitlines()[0]
                    mark_partial(model, report.checkpoint, report.partial, report)
                    exc.add_note(f"{type(model).__qualname__} is now marked as partly written: its forward raises "
                                 f"PartialLoadError until a load into it writes every parameter "
                                 f"(model.diffulex_partial_load says which load)")
            raise
    return report, restore


def check_device(device: str | torch.device | None) -> torch.device | None:
    """``device`` checked before anything is allocated: a typed ``LoadError`` naming it otherwise
    (a name that is no torch device, ``meta``, a backend that is not available, an index past
    the device count). The CLI calls it before it builds anything."""
    if device is None:
        return None
    try:
        target = torch.device(device)
    except (RuntimeError, TypeError, ValueError) as exc:
        raise LoadError(f"device {device!r} is not a torch device ({exc})") from None
    if target.type == "meta":
        raise LoadError(f"device {device!r}: a load materializes the model; name a real device (cpu, cuda, ...)")
    if target.type == "cpu":
        return target
    backend = getattr(torch, target.type, None)
    is_available = getattr(backend, "is_available", None)
    if callable(is_available) and not is_available():
        raise LoadError(f"device {device!r}: {target.type} is not available in this process "
                        f"(torch {torch.__version__}); nothing was loaded")
    count = getattr(backend, "device_count", None)
    if target.index is not None and callable(count) and target.index >= count():
        raise LoadError(f"device {device!r}: this process sees {count()} {target.type} device(s) "
                        f"(indices 0..{count() - 1}); nothing was loaded")
    return target


def load_checkpoint(model: nn.Module, path: str | Path, *, family: str | None = None, config: Any = None,
                    strict: bool = True, device: str | torch.device | None = None,
                    progress: bool | None = None, threads: int | None = None,
                    rollback: bool = True, parallel: ParallelState | None = None,
                    cuda_path: str = "auto") -> LoadReport:
    """Load a safetensors checkpoint into ``model`` and return a ``LoadReport``.

    ``strict=True`` raises ``LoadPlanError`` when the load finds any problem, and the model is
    left as it was; ``strict=False`` loads what it can, logs a warning and returns the report.
    Code the plan cannot check (custom loaders, weight loaders that need real tensors) runs first;
    to undo it on failure, a model that already holds weights keeps a host copy of what that code
    overwrites (``rollback=False`` saves that memory and time, and a failure then says what was
    written). A model built on the meta device needs no copy: it simply goes back to meta.
    A model on the meta device is materialized on ``device`` after a successful plan (ties and
    the values of real buffers kept); ``device`` is checked before anything else (``LoadError``).
    A first Ctrl-C is held until the model is whole again (``interrupts``); a model a failure
    leaves partly written is marked (``partial_load``).
    ``progress=None`` shows a progress bar only on a terminal and for large loads; ``threads``
    caps the reading threads (default: one per core).

    Under tensor or expert parallelism (``parallel``, default ``current_parallel_state()``: the
    default ``torch.distributed`` group when one is initialised) resolvers see this rank in
    ``LoadContext``, weight loaders that take a ``CheckpointSlice`` read only their rank's part,
    and every rank of the group must call this together: a failure on any rank raises
    ``ParallelLoadError`` on all of them.

    On a CUDA device, tensors that need no code go through a pinned staging ring (``cuda_path=
    "ring"``, the default ``"auto"``) or straight from the page cache registered with CUDA
    (``"registered"``); ``report.read_paths`` says which ran and its GiB/s.
    """
    choose_path(cuda_path)  # an unknown option fails before anything is read
    report = _load(model, path, family=family, config=config, strict=strict, device=device, progress=progress,
                   threads=threads, fatal=ALL_PROBLEMS if strict else (), rollback=rollback, parallel=parallel,
                   cuda_path=cuda_path)
    if report.problems:
        log.warning("%s", problem_message(report, outcome="loaded the rest (strict=False)",
                                          full_list="the LoadReport load_checkpoint returned"))
    return report


def _seed_device(model: nn.Module, config: Any) -> Any:
    """Where ``load_model`` materializes a meta-built model: ``config.device`` where the config has
    one, else torch's default device (Diffulex's engine sets it with ``torch.set_default_device``)."""
    if not any(t.is_meta for t in (*model.parameters(), *model.buffers())):
        return None
    device = getattr(config, "device", None)
    if device is not None:
        return device
    get_default = getattr(torch, "get_default_device", None)  # torch >= 2.3
    return get_default() if get_default is not None else torch.empty(0).device


def load_model(model: nn.Module, config: Any) -> nn.Module:
    """The seed's door: load ``config.model`` (a checkpoint directory) into ``model`` and return it.

    ``config`` is any object with ``model`` (path), ``model_name`` (family), ``use_lora``,
    ``lora_path`` and ``pre_merge_lora``. Like Diffulex's loader it loads what fits and does not
    stop at checkpoint tensors nothing takes or parameters nothing writes; unlike it, it says so
    (a ``LoadWarning`` listing them) and keeps the full report on ``model.diffulex_load_report``.
    Tensors that do not fit their destination, failing model code, and broken, missing or
    pickle-only checkpoints raise, as ``load_checkpoint`` does. Like Diffulex's loader it keeps no
    copy of what model code overwrites (a copy costs host memory and time per written byte, a lot
    for MoE experts): model code that fails part-way raises ``LoadApplyError`` naming what it had
    written, and the model is marked (its forward raises ``PartialLoadError`` until a load writes
    every parameter). ``load_checkpoint`` is the all-or-nothing door. A model built on the meta
    device is materialized on ``config.device`` where the config has one, else on torch's default
    device (``torch.set_default_device``, as Diffulex's engine sets it).

    With ``use_lora`` and a ``lora_path``, the adapter is read and checked against the model
    before the base weights are loaded (``diffulex_core.lora.adapters``): any problem raises
    ``LoraError`` and nothing was loaded; then the adapters are written (and merged with
    ``pre_merge_lora``). ``use_lora`` with an empty ``lora_path`` loads the base model with a
    ``LoraWarning``, as the seed does; a ``lora_path`` that does not exist is an error.
    """
    state = current_parallel_state()
    prepared, lora_path = None, getattr(config, "lora_path", None)
    if getattr(config, "use_lora", False):
        if not lora_path:
            warn_base_only(lora_path)
        else:
            error = None
            try:
                prepared = prepare_lora(model, lora_path, merge=bool(getattr(config, "pre_merge_lora", False)))
            except Exception as exc:
                if not state.distributed:
                    raise
                error = exc
            if state.distributed:  # every rank checked the adapter; none goes on alone
                try:
                    agree(state, f"checking the LoRA adapter {lora_path}", error)
                except BaseException:
                    if prepared is not None:
                        prepared.undo()
                    raise
    try:
        report = _load(model, config.model, family=getattr(config, "model_name", None), config=config, strict=False,
                       device=_seed_device(model, config), progress=None, threads=None, fatal=SEED_FATAL,
                       rollback=False, parallel=None)
    except BaseException:
        if prepared is not None:
            prepared.undo()
        raise
    model.diffulex_load_report = report
    if prepared is not None:
        report.lora = prepared.apply()
        object.__setattr__(model, "diffulex_lora_report", report.lora)
    if report.problems:
        warnings.warn(problem_message(report, outcome="loaded the rest, as Diffulex's loader would "
                                                      "(model.diffulex_load_report has the details)",
                                      full_list="model.diffulex_load_report"),
                      LoadWarning, stacklevel=2)
    return model
