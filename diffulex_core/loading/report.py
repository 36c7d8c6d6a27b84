"""``LoadReport``: what a load did with every checkpoint tensor and every parameter."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any, NamedTuple

__all__ = ["LoadReport", "TensorPlacement"]

GIB = 1024**3


class TensorPlacement(NamedTuple):
    """One checkpoint tensor's fate: where it went (or why not), by which rule.

    A NamedTuple because a checkpoint can hold 100,000 tensors and creating one must be cheap.
    """

    name: str
    file: str
    shape: tuple[int, ...]
    dtype: str
    kind: str  # "param", "buffer", "loader", "skip", "unexpected", "rejected"
    target: str | None
    rule: str  # "plugin:<entry point>", "module:<prefix>", "packed_mapping", "packed_mapping:root", "exact", "ignored"
    shard_id: Any = None
    note: str | None = None
    transform: str | None = None  # the name of the transform the tensor goes through ("<lambda>"); None: a plain copy

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name, "file": self.file, "shape": list(self.shape), "dtype": self.dtype,
            "kind": self.kind, "target": self.target, "rule": self.rule,
            "shard_id": self.shard_id if isinstance(self.shard_id, (int, str, type(None))) else repr(self.shard_id),
            "note": self.note, "transform": self.transform,
        }


@dataclass
class LoadReport:
    """Everything a load planned and did. ``problems`` is empty exactly when the load was clean.

    ``problem_kinds`` gives each problem's kind, in step with ``problems``: ``"unexpected"``
    (a tensor nothing takes), ``"missing"`` (a parameter nothing writes), ``"rejected"`` (a
    tensor whose destination does not fit it, or whose code failed) or ``"no_values"`` (a buffer
    on the meta device that nothing writes: materializing would leave it without its computed
    values; fatal through both doors) or ``"conflicting"`` (tensors that write one destination
    whole and hold different values). ``written_by_loaders``
    maps each parameter that a loader without ``covers`` wrote to the tensors whose loaders did.
    """

    checkpoint: str
    files: list[str]
    strict: bool
    placements: list[TensorPlacement] = field(default_factory=list)
    missing: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)
    problem_kinds: list[str] = field(default_factory=list)
    written_by_loaders: dict[str, list[str]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    applied: bool = False
    bytes_total: int = 0
    bytes_read: int = 0
    plan_seconds: float = 0.0
    apply_seconds: float = 0.0
    read_paths: dict[str, dict[str, float]] = field(default_factory=dict)
    parallel: dict[str, int] = field(default_factory=lambda: {"tp_rank": 0, "tp_size": 1, "ep_rank": 0, "ep_size": 1})
    lora: Any = None  # a diffulex_core.lora.adapters.LoraReport when an adapter was loaded with the checkpoint
    partial: str | None = None  # why the failed load left the model partly written (then marked); None: it did not

    def add_problem(self, kind: str, text: str) -> None:
        self.problems.append(text)
        self.problem_kinds.append(kind)

    def problems_of(self, *kinds: str) -> list[str]:
        return [p for p, k in zip(self.problems, self.problem_kinds, strict=True) if k in kinds]

    @property
    def ok(self) -> bool:
        return not self.problems

    @property
    def loaded_by_source(self) -> dict[str, int]:
        return dict(Counter(p.rule for p in self.placements if p.kind in ("param", "buffer", "loader")))

    @property
    def skipped(self) -> dict[str, str]:
        return {p.name: p.note or "" for p in self.placements if p.kind == "skip"}

    @property
    def unexpected(self) -> list[str]:
        return [p.name for p in self.placements if p.kind == "unexpected"]

    @property
    def gib_per_s(self) -> float:
        return self.bytes_read / GIB / self.apply_seconds if self.apply_seconds > 0 else 0.0

    def summary(self) -> str:
        loaded = sum(self.loaded_by_source.values())
        by_source = ", ".join(f"{k}: {v}" for k, v in sorted(self.loaded_by_source.items()))
        verb = "loaded" if self.applied else "planned"
        p = self.parallel
        rank = (f"tp rank {p['tp_rank']}/{p['tp_size']}, ep rank {p['ep_rank']}/{p['ep_size']}: "
                if p["tp_size"] > 1 or p["ep_size"] > 1 else "")
        return (
            f"{rank}{loaded} tensors {verb} ({by_source or 'none'}), {len(self.skipped)} skipped, "
            f"{len(self.unexpected)} unexpected, {len(self.missing)} missing, {len(self.problems)} problem(s); "
            f"{self.bytes_read / GIB:.3f} of {self.bytes_total / GIB:.3f} GiB read, plan {self.plan_seconds:.3f} s, "
            f"apply {self.apply_seconds:.3f} s ({self.gib_per_s:.2f} GiB/s)"
        ) + (f"\n{self.lora.summary()}" if self.lora is not None else "") + (
            f"\nthe load failed part-way and left the model partly written (marked): {self.partial}"
            if self.partial else "")

    def to_dict(self) -> dict[str, Any]:
        return {
            "checkpoint": self.checkpoint, "files": self.files, "strict": self.strict, "ok": self.ok,
            "applied": self.applied, "loaded_by_source": self.loaded_by_source, "skipped": self.skipped,
            "unexpected": self.unexpected, "missing": self.missing, "problems": self.problems,
            "problem_kinds": self.problem_kinds,
            "written_by_loaders": self.written_by_loaders, "notes": self.notes,
            "bytes_total": self.bytes_total, "bytes_read": self.bytes_read, "plan_seconds": self.plan_seconds,
            "apply_seconds": self.apply_seconds, "gib_per_s": self.gib_per_s, "parallel": dict(self.parallel),
            "read_paths": self.read_paths, "partial": self.partial,
            "lora": self.lora.to_dict() if self.lora is not None else None,
            "tensors": [p.to_dict() for p in self.placements],
        }
