"""Applying a load plan: code the plan could not check runs first, watched; then bytes move.

1. **Watched** tensors (custom loaders, and transforms or weight loaders that cannot run on
   meta tensors) are read and handed to their code first, under ``WriteWatcher``: what each
   writes is recorded (so a loader that did not declare ``covers`` still counts), a failure is
   a problem of that tensor, and whatever the code overwrote can be put back. Parameters that
   only such loaders could write and that none wrote are missing. If any of this is fatal the
   watched writes are undone and ``LoadPlanError`` is raised: nothing else was written yet.
   Undoing keeps a host copy of every byte the watched code overwrites (``undo="bytes"``); a
   model materialized by this load goes back to the meta device instead (``undo="caller"``);
   with ``undo="none"`` (the seed's door) a fatal problem is a ``LoadApplyError`` that names
   what was written.
2. **Everything else**, all checked by the plan: plain copies straight from the file into the
   parameters' memory (``reader``), then the rest through transforms and ``weight_loader``s;
   a ``weight_loader`` that takes a ``CheckpointSlice`` reads only the part it keeps (a
   tensor-parallel rank's rows or columns). Plain copies and declared ``WeightDestination``s
   need no code: on the CPU their bytes are read straight into place (cast in bounded chunks
   where dtypes differ); on a CUDA device of their dtype they go through a pinned staging ring
   (``io.staging``), and everything else gets its tensor on the device before its code runs.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Mapping

import torch

from diffulex_core.errors import LoadApplyError, LoadPlanError
from diffulex_core.io.reader import CastRead, DirectRead, read_direct, read_record
from diffulex_core.io.slices import ByteMeter, CheckpointSlice, byte_runs
from diffulex_core.io.staging import DeviceRead, choose_path
from diffulex_core.loading.destinations import Destinations
from diffulex_core.loading.interrupts import InterruptGate
from diffulex_core.loading.planning import WRITTEN_KINDS, LoadPlan, Planned
from diffulex_core.loading.report import LoadReport
from diffulex_core.loading.weight_loaders import load_into, takes_slice
from diffulex_core.loading.write_watch import ModelMemory, WriteWatcher

__all__ = ["apply_plan", "problem_message", "WriteState"]

PROGRESS_MIN_BYTES = 512 * 1024**2
MAX_PROBLEMS_SHOWN = 10


def problem_message(report: LoadReport, problems: list[str] | None = None, outcome: str = "nothing was loaded",
                    full_list: str = "LoadPlanError.report") -> str:
    """The problems, the first few spelled out; ``full_list`` says where the caller finds the report."""
    problems = report.problems if problems is None else problems
    shown = problems[:MAX_PROBLEMS_SHOWN]
    more = len(problems) - len(shown)
    lines = [f"checkpoint {report.checkpoint}: {len(problems)} problem(s); {outcome}:"]
    lines += [f"  - {p}" for p in shown]
    if more:
        lines.append(f"  ... and {more} more ({full_list} has them all)")
    return "\n".join(lines)


def _read_tensor(item: Planned, fds: Mapping[Path, int]) -> torch.Tensor:
    return read_record(fds[item.record.file], item.record)


def _run_code(item: Planned, dest: torch.Tensor | None, tensor: torch.Tensor) -> None:
    """Hand a tensor to its code in the seed's order: transform, then loader or weight_loader/copy."""
    target = item.target
    if target.transform is not None:
        tensor = target.transform(tensor)
    if target.loader is not None:
        target.loader(tensor)
    else:
        load_into(dest, dest, tensor, target.shard_id)


def _dest(dests: Destinations, item: Planned) -> torch.Tensor | None:
    return dests.tensor(item.target.kind, item.target.name) if item.target.name else None


def _watched_loop(report: LoadReport, dests: Destinations, watched: list[tuple[int, Planned]],
                  fds: Mapping[Path, int], watcher: WriteWatcher, advance, gate: InterruptGate | None) -> None:
    for index, item in watched:
        if gate is not None:
            gate.stop_if_requested()
        tensor = _read_tensor(item, fds)
        mark = watcher.mark()
        try:
            with watcher:
                _run_code(item, _dest(dests, item), tensor)
        except Exception as exc:
            watcher.rollback(mark)
            shard = f" (shard {item.target.shard_id!r})" if item.target.shard_id is not None else ""
            into = f"into {item.target.kind} {item.target.name!r}{shard} " if item.target.name else ""
            problem = f"writing it {into}raised {type(exc).__name__}: {exc}"
            p = item.placement
            report.placements[index] = p._replace(kind="rejected", note=problem)
            report.add_problem("rejected", f"tensor {p.name!r} in {p.file} ({p.rule}): {problem}")
            continue
        if item.target.kind == "loader" and not item.target.covers:
            for name in sorted(watcher.written_since(mark)):
                report.written_by_loaders.setdefault(name, []).append(item.record.name)
        advance(item.record.nbytes)


def _run_watched(plan: LoadPlan, dests: Destinations, watched: list[tuple[int, Planned]], fds: Mapping[Path, int],
                 undo: str, fatal: tuple[str, ...], advance, gate: InterruptGate, state: WriteState) -> None:
    """Phase 1: run code the plan could not check, watching its writes; raise (undone) if fatal.

    A held Ctrl-C (``gate``) stops it between two tensors, and at its end, with everything
    undone where undo is possible; without undo copies it runs to the end."""
    report = plan.report
    everything = {**dests.params, **dests.buffers}
    watcher = WriteWatcher(ModelMemory(everything), keep_undo=undo == "bytes")
    storages = {name: (t, t.data) for name, t in everything.items()}  # ``param.data = x`` swaps are writes too

    def undo_all() -> None:
        watcher.rollback()
        for t, data in storages.values():
            if t.data_ptr() != data.data_ptr():
                t.data = data

    state.unrestored = undo == "none"  # from the first write on, nothing can put it back
    try:
        _watched_loop(report, dests, watched, fds, watcher, advance, gate if undo != "none" else None)
        if undo != "none":
            gate.stop_if_requested()
    except BaseException:  # a held or second Ctrl-C, or a failure of our own
        if undo == "bytes":
            with gate.shield():
                undo_all()
        raise
    swapped = {name for name, (t, data) in storages.items() if t.data_ptr() != data.data_ptr()}
    for name in sorted(swapped):
        report.written_by_loaders.setdefault(name, []).append("(replaced its .data)")
    coverage = watcher.coverage()
    for name in plan.pending:
        size, done = watcher.memory.sizes[name], coverage.get(name, 0)
        if name in swapped or done >= size:
            continue
        report.missing.append(name)
        how = f"loaders wrote only {done} of its {size} bytes" if done else "nor by any loader"
        report.add_problem("missing", f"{name} is not written by any checkpoint tensor, {how} (missing)")
    blocking = report.problems_of(*fatal)
    if not blocking:
        return
    written = sorted({name for name, _, _ in watcher.log} | swapped)
    if undo == "none" and written:
        raise LoadApplyError(problem_message(report, blocking, full_list="LoadApplyError.report", outcome=(
            f"model code had already written {len(written)} tensor(s), e.g. {written[0]!r}, which were not undone "
            f"(no undo copies were kept: load_model, or load_checkpoint with rollback=False)")), report)
    with gate.shield():
        undo_all()
    state.unrestored = False
    raise LoadPlanError(problem_message(report, blocking), report)


def _settle_aliases(plan: LoadPlan, dests: Destinations, fds: Mapping[Path, int], fatal: tuple[str, ...]) -> set[int]:
    """Tensors that each write one destination whole (DiffusionGemma's ``layer_scalar`` in encoder
    and decoder) are compared before anything is written; the indices of those not to write.

    Same values: the first is written once, the others are noted as its aliases. Different: a
    ``"conflicting"`` problem naming both (fatal for ``load_checkpoint``); otherwise the last in
    Diffulex's reading order (file name, then tensor name) is written, as Diffulex's loader does.
    """
    report, not_written = plan.report, set()
    for group in plan.aliases:
        dest = _dest(dests, plan.items[group[0]])
        values = {}
        for index in group:
            item = plan.items[index]
            value = _read_tensor(item, fds)
            if item.target.transform is not None:
                value = item.target.transform(value)
            values[index] = value.to(dest.dtype)
        first, *others = group
        same = all(values[i].shape == values[first].shape and torch.equal(values[i], values[first]) for i in others)
        if same:
            keep, why = first, f"alias of {plan.items[first].record.name!r}: the same values, written once"
        else:
            keep = max(group, key=lambda i: (plan.items[i].record.file.name, plan.items[i].record.name))
            why = f"overridden by {plan.items[keep].record.name!r}: they differ, and the last read wins, as in Diffulex"
            names = " and ".join(f"{plan.items[i].record.name!r} ({plan.items[i].record.file.name})" for i in group)
            target = plan.items[keep].target
            report.add_problem("conflicting", (
                f"tensors {names} all write {target.kind} {target.name!r} whole and hold different values; "
                f"a load that goes on writes {plan.items[keep].record.name!r}, the last in Diffulex's reading order"))
        for index in group:
            if index == keep:
                continue
            not_written.add(index)
            p = plan.items[index].placement
            report.placements[index] = p._replace(kind="skip" if not same else p.kind, note=why)
            plan.items[index].placement = report.placements[index]
    blocking = report.problems_of(*fatal)
    if blocking:
        raise LoadPlanError(problem_message(report, blocking), report)
    return not_written


def _reads_into(item: Planned, dest: torch.Tensor, direct: list[DirectRead], casts: list[CastRead]) -> None:
    """The reads that put ``item``'s bytes where its layout says, in ``dest``'s memory (cast where dtypes differ)."""
    record, layout = item.record, item.layout
    if record.dtype == dest.dtype:
        if layout.ranges is None:  # the common case, kept cheap for checkpoints of 100,000 tensors
            direct.append(DirectRead(record.file, record.start, record.nbytes, dest.data_ptr(), record.name))
            return
        address = dest.data_ptr() + layout.offset * dest.element_size()
        for offset, nbytes in byte_runs(record, layout.ranges):
            direct.append(DirectRead(record.file, offset, nbytes, address, record.name))
            address += nbytes
        return
    flat, first, size = dest.detach().view(-1), layout.offset, record.dtype.itemsize  # reader threads: no autograd
    for offset, nbytes in byte_runs(record, layout.ranges):
        part = flat.narrow(0, first, nbytes // size)
        casts.append(CastRead(record.file, offset, nbytes, record.dtype, part, record.name))
        first += nbytes // size


def _device_reads_into(item: Planned, dest: torch.Tensor, device: list[DeviceRead]) -> None:
    """The reads that put ``item``'s bytes where its layout says in a device tensor of its dtype."""
    record = item.record
    flat, position = dest.view(-1).view(torch.uint8), item.layout.offset * dest.element_size()
    for offset, nbytes in byte_runs(record, item.layout.ranges):
        device.append(DeviceRead(record.file, offset, nbytes, flat.narrow(0, position, nbytes), record.name))
        position += nbytes


def _by_device(reads: list[DeviceRead]) -> list[list[DeviceRead]]:
    groups: dict[torch.device, list[DeviceRead]] = {}
    for read in reads:
        groups.setdefault(read.dest.device, []).append(read)
    return list(groups.values())


class WriteState:
    """Whether the model's memory holds writes of this load that nothing can put back any more."""

    unrestored = False


def apply_plan(plan: LoadPlan, dests: Destinations, *, progress: bool | None, threads: int | None,
               undo: str, fatal: tuple[str, ...], cuda_path: str = "auto", gate: InterruptGate | None = None,
               state: WriteState | None = None) -> None:
    """Write every planned tensor; ``fatal`` problem kinds found while applying undo phase 1 and raise.

    ``cuda_path`` picks how bytes reach CUDA destinations (``io.staging.choose_path``).
    ``gate`` is asked for a held Ctrl-C where the load can still stop with the model whole;
    ``state`` says, when this raises, whether the model holds writes that were not undone."""
    gate = gate or InterruptGate()
    state = state or WriteState()
    report = plan.report
    work = [(i, item) for i, item in enumerate(plan.items) if item.placement.kind in WRITTEN_KINDS]
    show = progress if progress is not None else (sys.stderr.isatty() and report.bytes_total >= PROGRESS_MIN_BYTES)
    from tqdm.auto import tqdm

    bar = tqdm(total=report.bytes_total, unit="B", unit_scale=True, unit_divisor=1024, desc="loading", disable=not show)
    started = time.perf_counter()

    def advance(nbytes: int, read: int | None = None) -> None:
        """``nbytes`` of planned tensors done, ``read`` of them actually read (default: all)."""
        report.bytes_read += nbytes if read is None else read
        bar.update(nbytes)

    fds = plan.open_files.fds
    try:
        with torch.no_grad():
            if plan.aliases:
                once = _settle_aliases(plan, dests, fds, fatal)
                work = [(i, item) for i, item in work if i not in once]
            watched = [(i, item) for i, item in work if item.watched]
            if watched or plan.pending:
                _run_watched(plan, dests, watched, fds, undo, fatal, advance, gate, state)
            else:
                gate.stop_if_requested()  # nothing written yet: stop cleanly
            direct, casts, device, coded = [], [], [], []
            for _, item in work:  # ``dests`` keeps every destination alive while its address is in use
                if item.watched:
                    continue
                dest = _dest(dests, item)
                fast = item.layout is not None and dest.is_contiguous()
                if fast and dest.device.type == "cpu":
                    _reads_into(item, dest, direct, casts)
                elif fast and dest.device.type == "cuda" and dest.dtype == item.record.dtype:
                    _device_reads_into(item, dest, device)
                else:
                    coded.append((item, dest))
            state.unrestored = True  # from here on bytes move without undo copies: finish, or mark the model
            read_direct(direct, fds, casts=casts, threads=threads, on_progress=advance)
            for group in _by_device(device):  # a staging ring per device; the report says which path ran
                stats = choose_path(cuda_path)(group, fds, threads=threads, on_progress=advance)
                report.read_paths[stats.path] = {"bytes": stats.nbytes, "seconds": stats.seconds,
                                                 "gib_per_s": stats.gib_per_s}
            meter = ByteMeter()
            for item, dest in coded:
                read_before = meter.bytes
                if item.target.transform is None and takes_slice(dest, item.target.shard_id):
                    tensor = CheckpointSlice(item.record, fds[item.record.file], meter)  # reads only what it keeps
                else:
                    tensor = _read_tensor(item, fds)
                    meter.bytes += item.record.nbytes
                    if dest is not None and dest.device.type != "cpu":  # code gets its tensor on the device
                        tensor = tensor.to(dest.device)
                try:
                    _run_code(item, dest, tensor)
                except Exception as exc:
                    raise LoadApplyError(
                        f"writing tensor {item.record.name!r} ({item.placement.rule}) raised {type(exc).__name__}: "
                        f"{exc}; tensors before it in file order were already written"
                    ) from exc
                advance(item.record.nbytes, meter.bytes - read_before)
    finally:
        bar.close()
        report.apply_seconds = time.perf_counter() - started
    report.applied = True
