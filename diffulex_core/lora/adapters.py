"""LoRA adapters: the seed's three functions, matched and scaled as PEFT does, strict and atomic.

An adapter (PEFT's ``adapter_model.safetensors`` + ``adapter_config.json``) names the modules it
adapts by their checkpoint names (``model.layers.0.self_attn.q_proj``). Each name is translated
to a model module and shard id through the same packed-module mapping as the base checkpoint, so
q/k/v adapters land on their own rows of a merged QKV projection. Everything is checked before
anything changes: tensors that match no module, targeted modules without tensors, ranks or
shapes that disagree with the config raise ``LoraAdapterError`` naming file, tensor and module,
and the model is left as it was (adapters added by the failed call are removed again).

The module protocol is the seed's (Diffulex's ``LoRAMixin``): ``__init_lora__(r, lora_alpha,
lora_dropout)``, then ``lora_A``/``lora_B``/``scaling``, ``merge_lora()``, and ``tp_size``,
``tp_rank``, ``tp_dim`` for tensor parallelism. A layer may also take ``shard_id=`` and
``scaling=`` keywords in ``__init_lora__`` and declare ``lora_destination(shard_id, part,
loaded_shape)`` (a ``WeightDestination``, as ``weight_destination`` does for weights): the
bundled ``diffulex_layers`` do, which is how packed layers take per-shard adapters.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from diffulex_core.checkpoint import WeightDestination
from diffulex_core.errors import LoadApplyError, LoraAdapterError, LoraError, LoraWarning
from diffulex_core.files.finding import find_checkpoint_files
from diffulex_core.files.handles import OpenFiles
from diffulex_core.files.headers import read_records
from diffulex_core.io.memory import narrowed_ranges
from diffulex_core.io.reader import read_record
from diffulex_core.loading.packed_mapping import PackedMapping
from diffulex_core.loading.planning import model_packed_mapping
from diffulex_core.loading.ties import tie_keys
from diffulex_core.lora.config import LoraConfig, load_lora_config
from diffulex_core.lora.targets import (
    AdapterNames,
    LoraSlot,
    enabled_slots,
    slot_for,
    supports_lora,
    takes_shards,
    targeted_slots,
)

__all__ = ["LoraReport", "PreparedLora", "enable_lora_for_model", "load_lora_weights", "prepare_lora", "warn_base_only"]

log = logging.getLogger("diffulex_core.lora")

PEFT_PREFIX = "base_model.model."
# Adapter tensor suffixes PEFT writes and reads (and the seed's bare ``.lora_A``): part, embedding?
_SUFFIXES = {
    "lora_A.weight": ("A", False), "lora_A.default.weight": ("A", False), "lora_A": ("A", False),
    "lora_B.weight": ("B", False), "lora_B.default.weight": ("B", False), "lora_B": ("B", False),
    "lora_embedding_A": ("A", True), "lora_embedding_A.default": ("A", True),
    "lora_embedding_B": ("B", True), "lora_embedding_B.default": ("B", True),
    "base_layer.weight": ("base", None),  # PEFT saves targeted embedding layers' base weights with the adapter
}  # fmt: skip
_BY_LENGTH = sorted(_SUFFIXES, key=len, reverse=True)


@dataclass
class LoraReport:
    """What a LoRA load did: adapters per module, base weights the adapter replaced, merged or not."""

    adapter: str
    files: list[str]
    modules: dict[str, list[dict[str, Any]]] = field(default_factory=dict)
    base_weights: list[str] = field(default_factory=list)
    merged: bool = False
    tensors: int = 0
    bytes: int = 0

    def summary(self) -> str:
        adapters = sum(len(v) for v in self.modules.values())
        text = (f"LoRA {self.adapter}: {adapters} adapter(s) on {len(self.modules)} module(s) from {self.tensors} "
                f"tensor(s), {'merged into the weights' if self.merged else 'applied per forward'}")
        if self.base_weights:
            text += f"; base weights replaced by the adapter: {', '.join(self.base_weights)}"
        return text

    def to_dict(self) -> dict[str, Any]:
        return {"adapter": self.adapter, "files": self.files, "modules": self.modules,
                "base_weights": self.base_weights, "merged": self.merged, "tensors": self.tensors, "bytes": self.bytes}


# --------------------------------------------------------------------------- adding adapters, undoably


class _Undo:
    """Puts modules' parameters, submodules, buffers and attributes back as they were."""

    def __init__(self) -> None:
        self.saved: dict[int, tuple[nn.Module, dict, dict, dict, dict]] = {}

    def keep(self, module: nn.Module) -> None:
        if id(module) not in self.saved:
            self.saved[id(module)] = (module, dict(module.__dict__), dict(module._parameters), dict(module._modules),
                                      dict(module._buffers))

    def __call__(self) -> None:
        for module, attrs, params, modules, buffers in self.saved.values():
            module.__dict__.clear()
            module.__dict__.update(attrs)
            for live, old in ((module._parameters, params), (module._modules, modules), (module._buffers, buffers)):
                live.clear()
                live.update(old)


def _add(model: nn.Module, names: AdapterNames, slot: LoraSlot, dropout: float, undo: _Undo) -> None:
    module = names.all_modules[slot.module]
    if not supports_lora(module):
        raise LoraAdapterError(f"module {slot.module} ({type(module).__qualname__}, adapter name {slot.adapter_name}) "
                               f"does not support LoRA: it has no __init_lora__")
    undo.keep(module)
    undo.keep(model)
    before = {name for name, _ in module.named_parameters()}
    try:
        if takes_shards(module):
            module.__init_lora__(slot.r, slot.lora_alpha, dropout, shard_id=slot.shard_id, scaling=slot.scaling)
        elif slot.shard_id is not None:
            raise LoraAdapterError(
                f"adapter {slot.adapter_name} targets shard {slot.shard_id!r} of packed module {slot.module} "
                f"({type(module).__qualname__}), which takes LoRA only on the whole module (the seed's protocol); "
                f"give it __init_lora__(..., shard_id=, scaling=) and lora_destination (see diffulex_layers)")
        else:
            module.__init_lora__(slot.r, slot.lora_alpha, dropout)
            if abs(slot.scaling - slot.lora_alpha / slot.r) > 1e-12 * abs(slot.scaling):
                if not hasattr(module, "scaling"):
                    raise LoraAdapterError(f"module {slot.module} ({type(module).__qualname__}) has no `scaling` "
                                           f"attribute to set rsLoRA's alpha/sqrt(r) on")
                module.scaling = slot.scaling
    except LoraError:
        raise
    except Exception as exc:
        raise LoraAdapterError(f"module {slot.module} ({type(module).__qualname__}) refused a LoRA adapter of rank "
                               f"{slot.r} for {slot.adapter_name}: {type(exc).__name__}: {exc}") from exc
    prefix = f"{slot.module}." if slot.module else ""
    added = {prefix + n for n, _ in module.named_parameters() if n not in before}
    registry = dict(enabled_slots(model))
    registry[slot.key] = slot
    object.__setattr__(model, "diffulex_lora", registry)
    object.__setattr__(model, "diffulex_lora_parameters", set(getattr(model, "diffulex_lora_parameters", ())) | added)


def enable_lora_for_model(model: nn.Module, lora_config: Mapping[str, Any] | LoraConfig,
                          packed_modules_mapping: Mapping | None = None) -> nn.Module:
    """Add adapters to the modules ``lora_config`` targets (the seed's call form) and return the model.

    Targets are matched as PEFT matches them, on the adapter's (checkpoint) module names,
    translated through the model's packed-module mapping (and ``packed_modules_mapping``), with
    each module's rank and alpha from ``rank_pattern``/``alpha_pattern``. Targets that select no
    module, or a module that cannot take the adapter, raise ``LoraError``; then no module changed.
    The adapter parameters are listed in ``model.diffulex_lora_parameters``, so a base load that
    follows does not count them as missing.
    """
    config = LoraConfig.from_dict(lora_config)
    names = AdapterNames(model, _mapping(model, packed_modules_mapping))
    slots = targeted_slots(names, config)
    if not slots:
        raise LoraAdapterError(f"{config.source}: target_modules={config.targets_text} select no module of "
                               f"{type(model).__qualname__} that supports LoRA")
    undo = _Undo()
    try:
        for slot in slots.values():
            _add(model, names, slot, config.lora_dropout, undo)
    except BaseException:
        undo()
        raise
    return model


def _mapping(model: nn.Module, extra: Mapping | None) -> PackedMapping:
    return model_packed_mapping(model, getattr(model, "config", None),
                                (("packed_modules_mapping argument", extra),) if extra else ())


# --------------------------------------------------------------------------- reading adapters


@dataclass
class _AdapterTensors:
    root: Path
    files: list[str]
    tensors: dict[str, torch.Tensor]
    file_of: dict[str, str]
    nbytes: int


def _read_adapter(lora_path: Path) -> _AdapterTensors:
    """Every tensor of the adapter's safetensors files, headers validated as checkpoints' are (no pickles)."""
    found = find_checkpoint_files(lora_path)
    tensors, file_of, total = {}, {}, 0
    with OpenFiles() as files:
        for path in found.files:
            fd = files.open(path)
            for record in read_records(path, fd):
                if record.name in tensors:
                    raise LoraAdapterError(f"adapter tensor {record.name} is in both {file_of[record.name]} and {path}")
                try:
                    tensors[record.name] = read_record(fd, record)
                except LoadApplyError as exc:  # a short file or an I/O error, named as an adapter problem
                    raise LoraAdapterError(f"adapter file {path}: reading tensor {record.name} failed: {exc}") from exc
                file_of[record.name] = str(path)
                total += record.nbytes
        files.check_unchanged()
    return _AdapterTensors(found.root, [str(p) for p in found.files], tensors, file_of, total)


def _parse(tensor_name: str) -> tuple[str, str, bool | None] | None:
    """(adapter module name, part "A"/"B"/"base", embedding?) of a PEFT adapter tensor name."""
    name = tensor_name[len(PEFT_PREFIX):] if tensor_name.startswith(PEFT_PREFIX) else tensor_name
    for suffix in _BY_LENGTH:
        if name.endswith(f".{suffix}"):
            part, embedding = _SUFFIXES[suffix]
            return name[: -len(suffix) - 1], part, embedding
    return None


# --------------------------------------------------------------------------- planning an adapter load


@dataclass
class _SlotTensors:
    slot: LoraSlot
    A: str | None = None
    B: str | None = None
    base: str | None = None


def _destination(module: nn.Module, slot: LoraSlot, part: str, shape: tuple[int, ...]) -> WeightDestination:
    """Where this rank's part of a full adapter tensor lands; ``ValueError`` when it does not fit."""
    if takes_shards(module):
        return module.lora_destination(slot.shard_id, part, shape)
    param = module.lora_A if part == "A" else module.lora_B
    split = 1 if part == "A" else 0  # the seed: row-parallel (tp_dim 1) splits A's columns, column-parallel B's rows
    expected, source = list(param.shape), ()
    tp_size = int(getattr(module, "tp_size", 1) or 1)
    if tp_size > 1 and getattr(module, "tp_dim", None) == split:
        local = param.shape[split]
        expected[split] = local * tp_size
        source = ((split, int(getattr(module, "tp_rank", 0)) * local, local),)
    if tuple(shape) != tuple(expected):
        raise ValueError(f"expected lora_{part} of shape {tuple(expected)} (rank {slot.r}) but the adapter has "
                         f"{tuple(shape)}")
    return WeightDestination(param.data, source)


def _base_destination(module: nn.Module, module_name: str, shape: tuple[int, ...]) -> WeightDestination:
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor):
        raise ValueError(f"module {module_name} has no weight for the adapter's base_layer.weight")
    declare = getattr(weight, "weight_destination", None)
    if callable(declare):
        return declare(weight, shape, None)
    if tuple(shape) != tuple(weight.shape):
        raise ValueError(f"expected base_layer.weight of shape {tuple(weight.shape)}, got {tuple(shape)}")
    return WeightDestination(weight.data)


class PreparedLora:
    """An adapter load checked against the model, its adapters added: ``apply()`` writes the
    tensors (and merges), ``undo()`` removes the adapters it added. Nothing else changed yet.

    Between the two the base checkpoint may be loaded, materializing a meta-built model (new
    parameter objects): ``apply()`` finds every destination again, on the live parameters.
    """

    def __init__(self, model: nn.Module, lora_path: Path, names: AdapterNames, tensors: _AdapterTensors,
                 slots: list[_SlotTensors], merge: bool, undo: _Undo) -> None:
        self.model, self.lora_path, self.names, self.tensors, self.slots = model, lora_path, names, tensors, slots
        self.merge, self.undo = merge, undo
        self.report = LoraReport(str(lora_path), tensors.files, tensors=len(tensors.tensors), bytes=tensors.nbytes)
        for entry in slots:
            self.report.modules.setdefault(entry.slot.module, []).append(entry.slot.to_dict())
            if entry.base:
                self.report.base_weights.append(f"{entry.slot.module}.weight")

    def apply(self) -> LoraReport:
        """Write every adapter tensor (this rank's part), then merge when asked (float32, cast back)."""
        writes = _check_destinations(self.model, self.names, self.tensors, self.slots, self.merge)
        still_meta = [name for name, dest in writes if dest.target.is_meta]
        if still_meta:
            raise LoraError(f"{type(self.model).__qualname__} is still on the meta device (adapter tensor "
                            f"{still_meta[0]} has nowhere to go); load the base checkpoint first")
        with torch.no_grad():
            for tensor_name, dest in writes:
                try:
                    dest.apply(self.tensors.tensors[tensor_name])
                except Exception as exc:
                    raise LoadApplyError(f"writing adapter tensor {tensor_name} ({self.tensors.file_of[tensor_name]}) "
                                         f"failed: {type(exc).__name__}: {exc}") from exc
            if self.merge:
                for module_name in dict.fromkeys(e.slot.module for e in self.slots):
                    self.names.all_modules[module_name].merge_lora()
                self.report.merged = True
        log.info("%s", self.report.summary())
        return self.report


def _place(tensor_name: str, model: nn.Module, names: AdapterNames, config: LoraConfig, adapter: _AdapterTensors,
           targeted: dict | None, by_slot: dict[tuple[str, Any], _SlotTensors]) -> str | None:
    """File one adapter tensor under its slot in ``by_slot``; the problem with it, if any."""
    where = f"adapter tensor {tensor_name} ({adapter.file_of[tensor_name]})"
    parsed = _parse(tensor_name)
    if parsed is None:
        return (f"{where} is not a LoRA tensor (expected <module>.lora_A.weight, .lora_B.weight, "
                f".lora_embedding_A/B or .base_layer.weight)")
    adapter_name, part, embedding = parsed
    located = names.locate(adapter_name)
    if located is None:
        return f"{where}: module {adapter_name} matches no module of {type(model).__qualname__}"
    module_name, shard_id = located
    module = names.all_modules[module_name]
    if module_name not in names.modules:
        return f"{where}: module {module_name} ({type(module).__qualname__}) does not support LoRA"
    if embedding is not None and embedding != isinstance(module, nn.Embedding):
        kind = "an embedding" if isinstance(module, nn.Embedding) else "not an embedding"
        return (f"{where}: module {module_name} is {kind}; PEFT writes "
                f"{'lora_embedding_A/B' if isinstance(module, nn.Embedding) else 'lora_A/B'} for it")
    key = (module_name, shard_id)
    if targeted is not None and key not in targeted:
        return (f"{where}: module {adapter_name} (-> {module_name}"
                f"{'' if shard_id is None else f' shard {shard_id!r}'}) is not selected by "
                f"target_modules={config.targets_text} in {config.source}")
    slot = slot_for(names, config, module_name, shard_id, adapter_name)  # patterns apply to the name PEFT saw
    entry = by_slot.setdefault(key, _SlotTensors(slot))
    if getattr(entry, part) is not None:
        return f"{where}: {module_name} already has lora_{part} from {getattr(entry, part)}"
    setattr(entry, part, tensor_name)
    return None


def _slot_problems(by_slot: dict[tuple[str, Any], _SlotTensors], adapter: _AdapterTensors, config: LoraConfig,
                   enabled: dict, targeted: dict | None) -> list[str]:
    """What is wrong with the slots the tensors filled: a missing half, a wrong rank, a selected or
    enabled module without tensors."""
    problems: list[str] = []
    for key, entry in by_slot.items():
        slot, label = entry.slot, f"module {entry.slot.adapter_name} (-> {entry.slot.module})"
        if (entry.A is None) != (entry.B is None):
            has, lacks = ("A", "B") if entry.B is None else ("B", "A")
            problems.append(f"{label} has lora_{has} ({getattr(entry, has)} in {adapter.file_of[getattr(entry, has)]}) "
                            f"but no lora_{lacks}")
        if entry.A is None and entry.B is None:
            problems.append(f"{label}: the adapter has base_layer.weight ({entry.base}) but no LoRA tensors")
            continue
        for part, dim in (("A", 0), ("B", 1)):
            tensor_name = getattr(entry, part)
            if tensor_name is None:
                continue
            shape = tuple(adapter.tensors[tensor_name].shape)
            if len(shape) != 2 or shape[dim] != slot.r:
                problems.append(f"adapter tensor {tensor_name} ({adapter.file_of[tensor_name]}) has shape "
                                f"{list(shape)}, "
                                f"but {config.source} gives {slot.adapter_name} rank r={slot.r}")
        previous = enabled.get(key)
        if previous is not None and previous.r != slot.r:
            problems.append(f"{label} already has an adapter of rank {previous.r}; this adapter has rank {slot.r}")
    for key in (targeted or {}):
        if key not in by_slot:
            problems.append(f"{targeted[key].adapter_name} (-> {key[0]}) is selected by target_modules="
                            f"{config.targets_text} but the adapter has no tensors for it")
    for key, slot in enabled.items():
        if key not in by_slot and key not in (targeted or {}):
            problems.append(f"{slot.module} has a LoRA adapter (enable_lora_for_model) but this adapter has no "
                            "tensors for it")
    return problems


def prepare_lora(model: nn.Module, lora_path: str | Path, *, packed_modules_mapping: Mapping | None = None,
                 merge: bool = False, config: LoraConfig | Mapping | None = None) -> PreparedLora:
    """Read, match and check an adapter against ``model`` and add the adapters it needs.

    Every problem is collected and raised together as ``LoraAdapterError`` before any weight
    changes; adapters this call added are removed again. Adapters already added (by
    ``enable_lora_for_model``) must have the rank the adapter has, and must all get tensors.
    """
    lora_path = Path(lora_path)
    config = LoraConfig.from_dict(config) if config is not None else load_lora_config(lora_path)
    adapter = _read_adapter(lora_path)
    names = AdapterNames(model, _mapping(model, packed_modules_mapping))
    enabled = enabled_slots(model)
    targeted = targeted_slots(names, config) if config.target_modules is not None else None
    by_slot: dict[tuple[str, Any], _SlotTensors] = {}
    problems = [problem for tensor_name in adapter.tensors
                if (problem := _place(tensor_name, model, names, config, adapter, targeted, by_slot)) is not None]
    problems += _slot_problems(by_slot, adapter, config, enabled, targeted)
    if not by_slot and not problems:
        problems.append(f"{lora_path} holds no LoRA tensors")
    if problems:
        _raise(lora_path, problems)

    undo = _Undo()
    try:
        for key, entry in by_slot.items():
            if key not in enabled:
                _add(model, names, entry.slot, config.lora_dropout, undo)
        _check_destinations(model, names, adapter, list(by_slot.values()), merge)
    except BaseException:
        undo()
        raise
    return PreparedLora(model, lora_path, names, adapter, list(by_slot.values()), merge, undo)


def _check_destinations(model: nn.Module, names: AdapterNames, adapter: _AdapterTensors, entries: list[_SlotTensors],
                        merge: bool) -> list[tuple[str, WeightDestination]]:
    """Every tensor's destination, shapes checked without writing; pre-merging into tied weights refused."""
    problems, writes = [], []
    ties = tie_keys(dict(model.named_parameters(remove_duplicate=False))) if merge else {}
    for entry in entries:
        module = names.all_modules[entry.slot.module]
        for part in ("A", "B", "base"):
            tensor_name = getattr(entry, part)
            if tensor_name is None:
                continue
            shape = tuple(adapter.tensors[tensor_name].shape)
            try:
                dest = (_base_destination(module, entry.slot.module, shape) if part == "base"
                        else _destination(module, entry.slot, part, shape))
                ranges, outside = narrowed_ranges(shape, dest.source)
                narrowed = None if outside is not None else tuple(length for _, length in ranges)
                if narrowed != tuple(dest.target.shape):
                    raise ValueError(f"its narrowed shape {narrowed} does not fit the destination "
                                     f"{tuple(dest.target.shape)}")
            except Exception as exc:
                problems.append(f"adapter tensor {tensor_name} ({adapter.file_of[tensor_name]}) does not fit module "
                                f"{entry.slot.module}: {exc}")
                continue
            writes.append((tensor_name, dest))
        if merge and not callable(getattr(module, "merge_lora", None)):
            problems.append(f"module {entry.slot.module} ({type(module).__qualname__}) has no merge_lora(); "
                            f"load this adapter unmerged")
        if merge:
            weight_name = f"{entry.slot.module}.weight" if entry.slot.module else "weight"
            shared = sorted(n for n, k in ties.items()
                            if weight_name in ties and k == ties[weight_name] and n != weight_name)
            if shared:
                problems.append(f"pre-merging into {weight_name} would change {', '.join(shared)} too (tied weights); "
                                f"load this adapter unmerged")
    if problems:
        _raise(adapter.root, problems)
    return writes


def _raise(lora_path: Path | str, problems: list[str]) -> None:
    shown = problems[:20] + ([f"... and {len(problems) - 20} more"] if len(problems) > 20 else [])
    raise LoraAdapterError(f"LoRA adapter {lora_path}: {len(problems)} problem(s); nothing was changed:\n  - "
                           + "\n  - ".join(shown), problems)


def load_lora_weights(model: nn.Module, lora_path: str | Path, packed_modules_mapping: Mapping | None = None,
                      pre_merge_lora: bool = False) -> nn.Module:
    """Load a PEFT adapter into ``model`` (the seed's call form) and return the model.

    Modules the adapter adapts get their adapters here if ``enable_lora_for_model`` did not add
    them. Strict: any problem raises ``LoraAdapterError`` before a weight changes (see
    ``prepare_lora``); nothing is swallowed. ``pre_merge_lora`` adds ``scaling * B @ A`` into
    the weights (float32, cast back; each rank its own slice). The report is
    ``model.diffulex_lora_report`` (and ``model.diffulex_load_report.lora`` when there is one).
    """
    prepared = prepare_lora(model, lora_path, packed_modules_mapping=packed_modules_mapping, merge=pre_merge_lora)
    report = prepared.apply()
    object.__setattr__(model, "diffulex_lora_report", report)
    load_report = getattr(model, "diffulex_load_report", None)
    if load_report is not None:
        load_report.lora = report
    return model


def warn_base_only(lora_path: Any) -> None:
    """The seed's ``use_lora`` with an empty ``lora_path``: the base model, said out loud."""
    warnings.warn(f"use_lora=True but lora_path={lora_path!r} is empty: loading the base model only, as Diffulex does",
                  LoraWarning, stacklevel=3)
