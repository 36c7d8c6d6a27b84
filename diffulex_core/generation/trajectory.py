"""Per-step and per-request storage of generation trajectories: ``ReqStep``, ``ReqTrajectory``,
and how their block traces are packed (``TraceStatuses``, ``TRACE_DTYPE``).

It exists so that what a trajectory *stores* (change sets, packed trace records, counters) lives
apart from how steps are *recorded* and *measured* (``diffulex_core.generation.outputs``, which re-exports
these names: import them from either). Imports go one way: ``output`` imports this module, never
the reverse.
"""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Any, Iterable, Mapping, Sequence

import numpy as np

from diffulex_core.generation.requests import Outcome

__all__ = [
    "ReqStep",
    "ReqTrajectory",
    "TraceStatuses",
    "TRACE_DTYPE",
    "TRACE_FIELDS",
    "SEED_TRACE_FIELDS",
]

TRACE_FIELDS = ("block_id", "active", "dummy", "masked_count", "mask_ratio", "progress", "status")
# The same fields under the names of Diffulex's trace dicts (``ReqStep.block_trace``).
SEED_TRACE_FIELDS = ("block_id", "is_active", "is_dummy", "num_mask_tokens", "mask_ratio", "progress", "block_status")
# One record per block, 31 bytes (a dict per block took about 350): traces for 256 requests x
# 1,000 steps x 64 blocks stay in the hundreds of MiB. ``status`` is an index into the status
# names seen so far (``TraceStatuses``); -1 means none.
TRACE_DTYPE = np.dtype([("block_id", "<i8"), ("active", "?"), ("dummy", "?"), ("masked_count", "<i4"),
                        ("mask_ratio", "<f8"), ("progress", "<f8"), ("status", "<i2")])


class TraceStatuses:
    """The distinct block status strings of one ``GenerationOutputs``, stored once."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self._codes: dict[str, int] = {}
        self._members: dict[Enum, int] = {}  # str() of an Enum member is slow; a member's never changes

    def __repr__(self) -> str:
        return f"TraceStatuses({self.names!r})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, TraceStatuses) and other.names == self.names

    __hash__ = None  # mutable
    def code(self, status: Any) -> int:
        if status is None:
            return -1
        if status.__class__ is not str:
            if isinstance(status, Enum):
                code = self._members.get(status)
                if code is None:
                    code = self._members[status] = self.code(str(status))
                return code
            status = str(status)
        code = self._codes.get(status)
        if code is None:
            code = self._codes[status] = len(self.names)
            self.names.append(status)
        return code

    @staticmethod
    def pack_rows(rows: list[tuple]) -> np.ndarray:
        """``TRACE_DTYPE`` tuples (status already coded) as records."""
        return np.array(rows, dtype=TRACE_DTYPE)

    def pack_seed(self, blocks: Iterable[Mapping[str, Any]]) -> np.ndarray:
        """Mappings with ``SEED_TRACE_FIELDS`` (Diffulex's trace dicts) as records."""
        rows = [(b.get("block_id", -1), bool(b.get("is_active")), bool(b.get("is_dummy")), b.get("num_mask_tokens", 0),
                 b.get("mask_ratio", 0.0), b.get("progress", 0.0), self.code(b.get("block_status"))) for b in blocks]
        return self.pack_rows(rows)

    def _rows(self, trace: np.ndarray, keys: Sequence[str], no_status: str | None) -> list[dict[str, Any]]:
        names = self.names
        return [dict(zip(keys, (*row[:6], names[row[6]] if row[6] >= 0 else no_status), strict=True))
                for row in trace.tolist()]

    def unpack(self, trace: np.ndarray) -> list[dict[str, Any]]:
        """Records as dicts with ``TRACE_FIELDS`` (no status: None)."""
        return self._rows(trace, TRACE_FIELDS, None)

    def unpack_seed(self, trace: np.ndarray) -> list[dict[str, Any]]:
        """Records as Diffulex's trace dicts (``SEED_TRACE_FIELDS``; no status: ``"?"``, as there)."""
        return self._rows(trace, SEED_TRACE_FIELDS, "?")


class ChangeLog:
    """One request's change sets in step order, shared by its recorded steps so that any step can
    rebuild its running sequence. It holds no step (no reference cycle) and caches the last
    sequence it rebuilt, so reading the steps in order costs one change set each."""

    __slots__ = ("lengths", "positions", "values", "_at", "_sequence")

    def __init__(self) -> None:
        self.lengths: list[int] = []
        self.positions: list[list[int]] = []
        self.values: list[list[int]] = []
        self._at = -1
        self._sequence: list[int] = []

    def append(self, length: int, positions: list[int], values: list[int]) -> int:
        self.lengths.append(length)
        self.positions.append(positions)
        self.values.append(values)
        return len(self.lengths) - 1

    def sequence(self, index: int) -> list[int]:
        if 0 <= self._at <= index:
            sequence, start = self._sequence, self._at + 1
        else:
            sequence, start = [], 0
        self._at = -1  # invalid until the replay below completes
        for i in range(start, index + 1):
            length = self.lengths[i]
            del sequence[length:]
            sequence.extend([0] * (length - len(sequence)))
            for position, value in zip(self.positions[i], self.values[i], strict=True):
                sequence[position] = value
        self._at, self._sequence = index, sequence
        return list(sequence)


@dataclass(init=False)
class ReqStep:
    """One request in one engine step.

    The running sequence is kept as a change set against the request's previous step
    (``changed_positions``/``changed_values``, and ``running_length``); ``snapshot`` holds the
    whole sequence only when snapshots were asked for. ``running_token_ids`` gives the whole
    sequence as a list either way. ``step_id`` is the step's index in its trajectory (Diffulex's
    meaning); ``batch_step`` the index of the engine step.

    Keyword construction with Diffulex's names works (``running_token_ids=``, ``buffer_bids=``,
    ``block_trace=`` with Diffulex's trace dicts); such a step stores its sequence as a snapshot.
    """

    # Slots by hand: the change log is shared state, not a field (``dataclasses.asdict`` and
    # ``==`` leave it out).
    __slots__ = ("step_id", "step_time", "is_prefill", "num_generated_tokens", "block_size", "buffer_block_ids",
                 "running_length", "changed_positions", "changed_values", "snapshot", "trace", "statuses",
                 "batch_step", "_log", "_log_index")
    step_id: int
    step_time: float
    is_prefill: bool
    num_generated_tokens: int
    block_size: int
    buffer_block_ids: list[int]
    running_length: int
    changed_positions: list[int]
    changed_values: list[int]
    snapshot: np.ndarray | None
    trace: np.ndarray | None  # TRACE_DTYPE records; read through ``block_trace``
    statuses: TraceStatuses | None  # the codes of ``trace``'s status column
    batch_step: int | None

    def __init__(self, step_id: int, step_time: float, is_prefill: bool, num_generated_tokens: int,
                 block_size: int = 0, buffer_block_ids: Sequence[int] | None = None, running_length: int | None = None,
                 changed_positions: list[int] | None = None, changed_values: list[int] | None = None,
                 running_token_ids: Sequence[int] | np.ndarray | None = None, trace: np.ndarray | None = None,
                 statuses: TraceStatuses | None = None, *, buffer_bids: Sequence[int] | None = None,
                 block_trace: Sequence[Mapping[str, Any]] | None = None, batch_step: int | None = None) -> None:
        if buffer_bids is not None:
            if buffer_block_ids is not None:
                raise TypeError("ReqStep: give buffer_block_ids or buffer_bids (Diffulex's name), not both")
            buffer_block_ids = buffer_bids
        if block_trace:
            if trace is not None:
                raise TypeError("ReqStep: give trace (records) or block_trace (Diffulex's dicts), not both")
            statuses = statuses if statuses is not None else TraceStatuses()
            trace = statuses.pack_seed(block_trace)
        if trace is not None and statuses is None:
            raise TypeError("ReqStep: trace records need the TraceStatuses that coded their status")
        snapshot = None if running_token_ids is None else np.asarray(running_token_ids, dtype=np.int64).ravel()
        if changed_positions is None and snapshot is not None:  # self-contained: everything "changed"
            changed_positions, changed_values = list(range(snapshot.size)), snapshot.tolist()
        self.step_id = step_id
        self.step_time = step_time
        self.is_prefill = is_prefill
        self.num_generated_tokens = num_generated_tokens
        self.block_size = block_size
        self.buffer_block_ids = [] if buffer_block_ids is None else list(buffer_block_ids)
        if running_length is None:
            running_length = 0 if snapshot is None else int(snapshot.size)
        self.running_length = running_length
        self.changed_positions = [] if changed_positions is None else changed_positions
        self.changed_values = [] if changed_values is None else changed_values
        self.snapshot = snapshot
        self.trace = trace
        self.statuses = statuses
        self.batch_step = batch_step
        self._log = None
        self._log_index = 0

    @classmethod
    def _recorded(cls, step_id: int, step_time: float, is_prefill: bool, num_generated_tokens: int,
                  block_size: int, buffer_block_ids: list[int], running_length: int, changed_positions: list[int],
                  changed_values: list[int], snapshot: np.ndarray | None, trace: np.ndarray | None,
                  statuses: TraceStatuses | None, batch_step: int, log: ChangeLog, log_index: int) -> ReqStep:
        """What ``record_step`` builds: inputs already checked and copied, so none of ``__init__``'s work."""
        step = object.__new__(cls)
        step.step_id = step_id
        step.step_time = step_time
        step.is_prefill = is_prefill
        step.num_generated_tokens = num_generated_tokens
        step.block_size = block_size
        step.buffer_block_ids = buffer_block_ids
        step.running_length = running_length
        step.changed_positions = changed_positions
        step.changed_values = changed_values
        step.snapshot = snapshot
        step.trace = trace
        step.statuses = statuses
        step.batch_step = batch_step
        step._log = log
        step._log_index = log_index
        return step

    @property
    def running_token_ids(self) -> list[int]:
        """The whole running sequence after this step, as a list (rebuilt from change sets)."""
        if self.snapshot is not None:
            return self.snapshot.tolist()
        if self._log is not None:
            return self._log.sequence(self._log_index)
        sequence = [0] * self.running_length  # built by hand: its own change set is all there is
        for position, value in zip(self.changed_positions, self.changed_values, strict=True):
            sequence[position] = value
        return sequence

    @property
    def buffer_bids(self) -> list[int]:
        """Diffulex's name for ``buffer_block_ids``."""
        return self.buffer_block_ids

    @buffer_bids.setter
    def buffer_bids(self, value: Sequence[int]) -> None:
        self.buffer_block_ids = list(value)

    @property
    def block_trace(self) -> list[dict[str, Any]]:
        """The per-block trace as Diffulex's dicts (``SEED_TRACE_FIELDS``); ``[]`` when traces were off."""
        return [] if self.trace is None else self.statuses.unpack_seed(self.trace)

    def trace_dicts(self) -> list[dict[str, Any]] | None:
        """The per-block trace as dicts with this package's ``TRACE_FIELDS``; None when traces were off."""
        return None if self.trace is None else self.statuses.unpack(self.trace)

    def to_dict(self) -> dict[str, Any]:
        """This package's format: change sets (``running_token_ids`` is the snapshot or None), and
        ``block_trace`` with ``TRACE_FIELDS``."""
        return {
            "step_id": self.step_id, "batch_step": self.batch_step, "step_time": self.step_time,
            "is_prefill": self.is_prefill, "num_generated_tokens": self.num_generated_tokens,
            "block_size": self.block_size, "buffer_block_ids": self.buffer_block_ids,
            "running_length": self.running_length, "changed_positions": self.changed_positions,
            "changed_values": self.changed_values,
            "running_token_ids": None if self.snapshot is None else self.snapshot.tolist(),
            "block_trace": self.trace_dicts(),
        }


def _one_of(name: str, value: Any, alias: str, alias_value: Any) -> Any:
    if alias_value is not None:
        if value is not None:
            raise TypeError(f"ReqTrajectory: give {name} or {alias} (Diffulex's name), not both")
        return alias_value
    return value


@dataclass(init=False)
class ReqTrajectory:
    """One prompt's result: final tokens, the full response, text, flags, steps, running counters.

    ``token_ids`` is the response cut before the first EOS (``EngineRequest``) or the engine's
    ``truncated_response`` (Diffulex); ``full_token_ids`` keeps the EOS and whatever followed.
    ``req_id`` and ``trajectory`` are Diffulex's names for ``prompt_id`` and ``steps``; either
    works as a constructor keyword. The counters (``generated_tokens``, ``total_step_time``, ...)
    are kept up to date by ``record_step`` and computed from ``steps`` at construction; steps
    appended by hand later are not counted.
    """

    prompt_id: int
    token_ids: list[int]
    full_token_ids: list[int]
    truncated_at_eos: bool
    finished: bool
    completion_reason: str | None
    text: str | None
    full_text: str | None
    steps: list[ReqStep]
    is_truncated: bool
    max_new_tokens_reached: bool
    max_model_len_reached: bool
    max_nfe_reached: bool
    max_repetition_run_reached: bool
    eos_token_generated: bool
    # running counters, so metrics never rescan steps ("own": this request's own steps only)
    generated_tokens: int
    prompt_tokens: int
    decode_steps: int
    decode_tokens: int
    decode_time: float  # own decode steps' time
    total_step_time: float  # own steps' time
    first_token_step_time: float | None  # own steps' time up to its first step with a token
    first_token_time: float | None  # batch clock at the end of that step
    finish_time: float | None  # batch clock at the end of the last step it took part in

    def __init__(self, prompt_id: int | None = None, token_ids: list[int] | None = None,
                 full_token_ids: list[int] | None = None, truncated_at_eos: bool = False, finished: bool = False,
                 completion_reason: str | None = None, text: str | None = None, full_text: str | None = None,
                 steps: list[ReqStep] | None = None, *, req_id: int | None = None,
                 trajectory: list[ReqStep] | None = None, is_truncated: bool = False,
                 max_new_tokens_reached: bool = False, max_model_len_reached: bool = False,
                 max_nfe_reached: bool = False, max_repetition_run_reached: bool = False,
                 eos_token_generated: bool = False) -> None:
        prompt_id = _one_of("prompt_id", prompt_id, "req_id", req_id)
        if prompt_id is None:
            raise TypeError("ReqTrajectory: prompt_id (or req_id) is required")
        steps = _one_of("steps", steps, "trajectory", trajectory)
        self.prompt_id = prompt_id
        self.token_ids = [] if token_ids is None else token_ids
        self.full_token_ids = [] if full_token_ids is None else full_token_ids
        self.truncated_at_eos = truncated_at_eos
        self.finished = finished
        self.completion_reason = completion_reason
        self.text = text
        self.full_text = full_text
        self.steps = [] if steps is None else steps
        self.is_truncated = is_truncated
        self.max_new_tokens_reached = max_new_tokens_reached
        self.max_model_len_reached = max_model_len_reached
        self.max_nfe_reached = max_nfe_reached
        self.max_repetition_run_reached = max_repetition_run_reached
        self.eos_token_generated = eos_token_generated
        self.generated_tokens = self.prompt_tokens = self.decode_steps = self.decode_tokens = 0
        self.decode_time = self.total_step_time = 0.0
        self.first_token_step_time = self.first_token_time = self.finish_time = None
        self._last_running: np.ndarray | None = None  # the previous step's sequence, while recording
        self._log: ChangeLog | None = None
        for step in self.steps:
            self._count(step, None)

    req_id = property(lambda self: self.prompt_id, lambda self, value: setattr(self, "prompt_id", value),
                      doc="Diffulex's name for ``prompt_id``.")
    trajectory = property(lambda self: self.steps, lambda self, value: setattr(self, "steps", value),
                          doc="Diffulex's name for ``steps``.")

    def _count(self, step: ReqStep, elapsed: float | None) -> None:
        """Add one step to the counters; ``elapsed`` is the batch clock (None: unknown)."""
        step_time, generated = step.step_time, step.num_generated_tokens
        self.total_step_time += step_time
        self.generated_tokens += generated
        if not step.is_prefill:
            self.decode_steps += 1
            self.decode_time += step_time
            self.decode_tokens += generated
        if generated > 0 and self.first_token_step_time is None:
            self.first_token_step_time = self.total_step_time
            self.first_token_time = elapsed
        if elapsed is not None:
            self.finish_time = elapsed

    def note_running(self, running: Any) -> tuple[np.ndarray, int, list[int], list[int], ChangeLog, int]:
        """Take a step's running sequence: the positions that changed since the previous step (all of
        them the first time) and their values, appended to the change log. Returns the sequence (an
        int64 copy), its length, the positions, the values, the log and the index of this change set."""
        if isinstance(running, (list, tuple)):  # fromiter: about 20% faster than asarray on a list of ints
            running = np.fromiter(running, dtype=np.int64, count=len(running))
        else:  # an array or tensor: copy, as it may be the engine's own memory
            running = np.asarray(running, dtype=np.int64).ravel().copy()
        previous = self._last_running
        if previous is None:
            changed = np.arange(running.size)
        else:
            common = min(previous.size, running.size)
            changed = np.flatnonzero(previous[:common] != running[:common])
            if running.size > common:
                changed = np.concatenate([changed, np.arange(common, running.size)])
        self._last_running = running
        positions, values = changed.tolist(), running[changed].tolist()
        if self._log is None:
            self._log = ChangeLog()
        length = int(running.size)
        return running, length, positions, values, self._log, self._log.append(length, positions, values)

    def forget_running(self) -> None:
        """The request finished: no further change sets, so the previous sequence is not kept."""
        self._last_running = None

    def _apply(self, outcome: Outcome) -> None:
        for name in Outcome.__slots__:
            setattr(self, name, getattr(outcome, name))

    @property
    def nfe(self) -> int:
        """Forward evaluations this request took part in (prefill and decode steps)."""
        return len(self.steps)

    def running_token_ids(self, step_index: int = -1) -> list[int]:
        """The running sequence after step ``step_index`` (same as ``steps[step_index].running_token_ids``)."""
        return self.steps[step_index].running_token_ids

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id, "token_ids": self.token_ids, "full_token_ids": self.full_token_ids,
            "truncated_at_eos": self.truncated_at_eos, "finished": self.finished,
            "completion_reason": self.completion_reason, "text": self.text, "full_text": self.full_text,
            "is_truncated": self.is_truncated, "max_new_tokens_reached": self.max_new_tokens_reached,
            "max_model_len_reached": self.max_model_len_reached, "max_nfe_reached": self.max_nfe_reached,
            "max_repetition_run_reached": self.max_repetition_run_reached,
            "eos_token_generated": self.eos_token_generated,
            "nfe": self.nfe, "generated_tokens": self.generated_tokens, "prompt_tokens": self.prompt_tokens,
            "steps": [s.to_dict() for s in self.steps],
        }
