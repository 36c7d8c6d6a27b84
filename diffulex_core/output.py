"""Generation trajectories and metrics (TPF, TTFT, TPOT, throughput) recorded step by step.

Engines call ``GenerationOutputs.record_step`` after every step; it reads the attributes listed
in ``EngineRequest`` and nothing else. Exact definitions of every metric: ``docs/metrics.md``.
Memory stays bounded: a step keeps only the positions of the running sequence that changed
since the request's previous step (full snapshots are opt-in), and per-block traces are kept
only while ``DIFFULEX_SAVE_TRACE`` is not ``0``.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Collection, Iterable, Mapping, Protocol, Sequence, runtime_checkable

import numpy as np

__all__ = [
    "EngineRequest",
    "ReqStep",
    "ReqTrajectory",
    "GenerationOutputs",
    "decode_token_ids_robust",
    "save_trace_enabled",
    "TRACE_DTYPE",
]

ENV_SAVE_TRACE = "DIFFULEX_SAVE_TRACE"
TRACE_FIELDS = ("block_id", "active", "dummy", "masked_count", "mask_ratio", "progress", "status")
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

    def code(self, status: Any) -> int:
        if status is None:
            return -1
        status = str(status)
        code = self._codes.get(status)
        if code is None:
            code = self._codes[status] = len(self.names)
            self.names.append(status)
        return code

    def pack(self, blocks: Iterable[Mapping[str, Any]]) -> np.ndarray:
        rows = [(b.get("block_id", -1), bool(b.get("active")), bool(b.get("dummy")), b.get("masked_count", 0),
                 b.get("mask_ratio", 0.0), b.get("progress", 0.0), self.code(b.get("status"))) for b in blocks]
        return np.array(rows, dtype=TRACE_DTYPE)

    def unpack(self, trace: np.ndarray) -> list[dict[str, Any]]:
        return [{"block_id": int(r["block_id"]), "active": bool(r["active"]), "dummy": bool(r["dummy"]),
                 "masked_count": int(r["masked_count"]), "mask_ratio": float(r["mask_ratio"]),
                 "progress": float(r["progress"]),
                 "status": self.names[r["status"]] if r["status"] >= 0 else None} for r in trace]


def save_trace_enabled() -> bool:
    """Per-block traces are recorded unless ``DIFFULEX_SAVE_TRACE=0`` (or false/no/off)."""
    return os.environ.get(ENV_SAVE_TRACE, "1").strip().lower() not in ("0", "false", "no", "off")


def _ids(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    return [int(t) for t in token_ids]


def decode_token_ids_robust(tokenizer: Any, token_ids: Iterable[int], *, skip_special_tokens: bool = False) -> str:
    """Decode with ``tokenizer.decode``; if its signature rejects our arguments (``TypeError``),
    convert ids to tokens one by one (unknown ids become empty) and join them. ``[]`` gives ``""``.
    """
    ids = _ids(token_ids)
    if not ids:
        return ""
    try:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    except TypeError:
        pass  # a stricter decode signature; other errors are real and propagate
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ()) if skip_special_tokens else set()
    tokens = []
    for token_id in ids:
        try:
            token = tokenizer.convert_ids_to_tokens(token_id)
        except (IndexError, KeyError, ValueError, OverflowError):
            token = None
        if token and token not in special:
            tokens.append(token)
    join = getattr(tokenizer, "convert_tokens_to_string", None)
    return join(tokens) if callable(join) else "".join(tokens)


@runtime_checkable
class EngineRequest(Protocol):
    """What ``record_step`` reads from each request of a step. Any object with these works.

    - ``req_id``: int; the prompt index, unless ``req_id_to_prompt_id`` maps it.
    - ``is_prefill``: bool; this step processed the prompt (prefill) rather than decoding.
    - ``num_prompt_tokens``: int; the prompt's length (counts toward prefill throughput).
    - ``num_generated_tokens``: int; tokens this step finalized (committed, no longer masked).
    - ``running_token_ids``: sequence of int; the response region as it stands after this step,
      mask tokens included.
    - ``block_size``: int; tokens per diffusion block.
    - ``buffer_block_ids``: sequence of int; the blocks in the request's working buffer.
    - ``is_finished``: bool; the request completed in this step.
    - ``completion_reason``: str or None; why it finished (``"eos"``, ``"max_tokens"``, ...).
    - ``response_token_ids``: sequence of int; read once finished: the whole response,
      including anything generated after the first EOS.
    - ``eos_token_ids``: collection of int; read once finished, to cut the response at EOS.
    - ``block_trace`` (optional): sequence of mappings with ``TRACE_FIELDS``; read only while
      ``DIFFULEX_SAVE_TRACE`` is on.
    """

    req_id: int
    is_prefill: bool
    num_prompt_tokens: int
    num_generated_tokens: int
    running_token_ids: Sequence[int]
    block_size: int
    buffer_block_ids: Sequence[int]
    is_finished: bool
    completion_reason: str | None
    response_token_ids: Sequence[int]
    eos_token_ids: Collection[int]


@dataclass(slots=True)
class ReqStep:
    """One request in one engine step.

    The running sequence is kept as a change set against the request's previous step
    (``changed_positions``/``changed_values``, and ``running_length``); ``running_token_ids`` holds
    the whole sequence only when snapshots were asked for. ``ReqTrajectory.running_token_ids(k)``
    rebuilds any step's sequence either way.
    """

    step_id: int
    step_time: float
    is_prefill: bool
    num_generated_tokens: int
    block_size: int
    buffer_block_ids: list[int]
    running_length: int
    changed_positions: list[int]
    changed_values: list[int]
    running_token_ids: np.ndarray | None = None  # opt-in snapshot (int64), see GenerationOutputs
    trace: np.ndarray | None = None  # TRACE_DTYPE records; read through ``block_trace``
    statuses: TraceStatuses | None = field(default=None, repr=False)

    @property
    def block_trace(self) -> list[dict[str, Any]] | None:
        """The per-block trace as dicts (``TRACE_FIELDS``), or None when traces were off."""
        return None if self.trace is None else self.statuses.unpack(self.trace)

    def to_dict(self) -> dict[str, Any]:
        return {
            "step_id": self.step_id, "step_time": self.step_time, "is_prefill": self.is_prefill,
            "num_generated_tokens": self.num_generated_tokens, "block_size": self.block_size,
            "buffer_block_ids": self.buffer_block_ids, "running_length": self.running_length,
            "changed_positions": self.changed_positions, "changed_values": self.changed_values,
            "running_token_ids": None if self.running_token_ids is None else self.running_token_ids.tolist(),
            "block_trace": self.block_trace,
        }


@dataclass
class ReqTrajectory:
    """One prompt's result: final tokens (cut before the first EOS), the full response, text, steps.

    ``truncated_at_eos`` says the response held an EOS, so ``token_ids`` is shorter than
    ``full_token_ids`` (which keeps the EOS and whatever the model produced after it).
    """

    prompt_id: int
    token_ids: list[int] = field(default_factory=list)
    full_token_ids: list[int] = field(default_factory=list)
    truncated_at_eos: bool = False
    finished: bool = False
    completion_reason: str | None = None
    text: str | None = None
    full_text: str | None = None
    steps: list[ReqStep] = field(default_factory=list)
    # running counters, so metrics never rescan steps
    generated_tokens: int = 0
    prompt_tokens: int = 0
    first_token_time: float | None = None  # elapsed step time when the first token was finalized
    first_token_step_tokens: int = 0
    finish_time: float | None = None  # elapsed step time at the last step it took part in
    decode_steps: int = 0
    decode_time: float = 0.0
    _last_running: Any = field(default=None, repr=False)

    @property
    def nfe(self) -> int:
        """Forward evaluations this request took part in (prefill and decode steps)."""
        return len(self.steps)

    def running_token_ids(self, step_index: int = -1) -> list[int]:
        """The running sequence after step ``step_index`` (replays change sets when needed)."""
        index = range(len(self.steps))[step_index]
        step = self.steps[index]
        if step.running_token_ids is not None:
            return step.running_token_ids.tolist()
        sequence: list[int] = []
        for past in self.steps[: index + 1]:
            del sequence[past.running_length:]
            sequence.extend([0] * (past.running_length - len(sequence)))
            for position, value in zip(past.changed_positions, past.changed_values):
                sequence[position] = value
        return sequence

    def to_dict(self) -> dict[str, Any]:
        return {
            "prompt_id": self.prompt_id, "token_ids": self.token_ids, "full_token_ids": self.full_token_ids,
            "truncated_at_eos": self.truncated_at_eos, "finished": self.finished,
            "completion_reason": self.completion_reason, "text": self.text, "full_text": self.full_text,
            "nfe": self.nfe, "generated_tokens": self.generated_tokens, "prompt_tokens": self.prompt_tokens,
            "steps": [s.to_dict() for s in self.steps],
        }


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    return float(np.percentile(values, q)) if values else None


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


class GenerationOutputs:
    """Accumulates one batch's trajectories and computes its metrics (see ``docs/metrics.md``).

    ``keep_snapshots=True`` stores every step's whole running sequence (memory: steps x length
    per request); by default a step stores only what changed. ``clock`` (default
    ``time.perf_counter``) times the batch end to end, from construction to the last step.
    """

    def __init__(self, num_prompts: int, *, keep_snapshots: bool = False,
                 save_trace: bool | None = None, clock: Callable[[], float] = time.perf_counter) -> None:
        if not isinstance(num_prompts, int) or num_prompts < 0:
            raise ValueError(f"num_prompts must be a non-negative int, got {num_prompts!r}")
        self.num_prompts = num_prompts
        self.trajectories = [ReqTrajectory(prompt_id=i) for i in range(num_prompts)]
        self.keep_snapshots = keep_snapshots
        self.save_trace = save_trace_enabled() if save_trace is None else save_trace
        self.statuses = TraceStatuses()
        self._clock = clock
        self.start_time = clock()
        self.end_time = self.start_time
        self.num_steps = 0
        self.total_step_time = 0.0
        self.prefill_time = 0.0
        self.decode_time = 0.0
        self.prefill_tokens = 0
        self.decode_tokens = 0

    # ------------------------------------------------------------------ recording

    def record_step(self, reqs: Sequence[EngineRequest], step_time: float,
                    req_id_to_prompt_id: Mapping[int, int] | None = None) -> None:
        """Record one engine step of ``step_time`` seconds for the requests it ran."""
        if step_time < 0 or not math.isfinite(step_time):
            raise ValueError(f"step_time must be a finite, non-negative number of seconds, got {step_time!r}")
        step_id = self.num_steps
        self.num_steps += 1
        self.total_step_time += step_time
        elapsed = self.total_step_time
        self.end_time = self._clock()
        n_prefill = sum(1 for r in reqs if r.is_prefill)
        if reqs:  # a mixed step's time is split by the share of requests in each phase
            self.prefill_time += step_time * n_prefill / len(reqs)
            self.decode_time += step_time * (len(reqs) - n_prefill) / len(reqs)
        for req in reqs:
            prompt_id = req_id_to_prompt_id[req.req_id] if req_id_to_prompt_id is not None else req.req_id
            if not 0 <= prompt_id < self.num_prompts:
                raise IndexError(f"request {req.req_id!r} maps to prompt {prompt_id!r}, outside 0..{self.num_prompts - 1}")
            self._record(self.trajectories[prompt_id], req, step_id, step_time, elapsed)

    def _record(self, traj: ReqTrajectory, req: EngineRequest, step_id: int, step_time: float, elapsed: float) -> None:
        generated = int(req.num_generated_tokens)
        running = np.asarray(req.running_token_ids, dtype=np.int64).ravel()
        previous = traj._last_running
        if previous is None:
            changed = np.arange(running.size)
        else:
            common = min(previous.size, running.size)
            changed = np.flatnonzero(previous[:common] != running[:common])
            if running.size > common:
                changed = np.concatenate([changed, np.arange(common, running.size)])
        traj._last_running = running.copy()
        trace = None
        if self.save_trace:
            raw = getattr(req, "block_trace", None)
            if raw is not None:
                trace = self.statuses.pack(raw)
        traj.steps.append(ReqStep(
            step_id=step_id, step_time=step_time, is_prefill=bool(req.is_prefill), num_generated_tokens=generated,
            block_size=int(req.block_size), buffer_block_ids=[int(b) for b in req.buffer_block_ids],
            running_length=int(running.size), changed_positions=changed.tolist(),
            changed_values=running[changed].tolist(),
            running_token_ids=traj._last_running if self.keep_snapshots else None,
            trace=trace, statuses=self.statuses if trace is not None else None,
        ))
        if req.is_prefill:
            if traj.prompt_tokens == 0:  # a prompt counts once, however many steps prefill it
                traj.prompt_tokens = int(req.num_prompt_tokens)
                self.prefill_tokens += traj.prompt_tokens
        else:
            traj.decode_steps += 1
            traj.decode_time += step_time
            self.decode_tokens += generated
        traj.generated_tokens += generated
        if traj.first_token_time is None and generated > 0:
            traj.first_token_time = elapsed
            traj.first_token_step_tokens = generated
        traj.finish_time = elapsed
        if req.is_finished and not traj.finished:
            self._finish(traj, req)

    @staticmethod
    def _finish(traj: ReqTrajectory, req: EngineRequest) -> None:
        full = _ids(req.response_token_ids)
        eos = set(_ids(req.eos_token_ids)) if req.eos_token_ids is not None else set()
        cut = next((i for i, t in enumerate(full) if t in eos), None)
        traj.full_token_ids = full
        traj.token_ids = full[:cut] if cut is not None else list(full)
        traj.truncated_at_eos = cut is not None
        traj.completion_reason = req.completion_reason
        traj.finished = True
        traj._last_running = None  # no further diffs: free it

    def convert_to_text(self, tokenizer: Any) -> None:
        """Decode every trajectory: ``text`` from tokens cut at EOS, ``full_text`` from the full response."""
        for traj in self.trajectories:
            traj.text = decode_token_ids_robust(tokenizer, traj.token_ids, skip_special_tokens=True)
            traj.full_text = decode_token_ids_robust(tokenizer, traj.full_token_ids, skip_special_tokens=False)

    # ------------------------------------------------------------------ metrics

    @property
    def total_generated_tokens(self) -> int:
        return sum(t.generated_tokens for t in self.trajectories)

    @property
    def wall_time(self) -> float:
        return self.end_time - self.start_time

    def request_metrics(self, i: int) -> dict[str, Any]:
        """Per-request figures: tokens, NFE, TPF, TTFT, TPOT, end-to-end latency and rates."""
        t = self.trajectories[i]
        tpot = None
        if t.first_token_time is not None and t.generated_tokens > 1:
            tpot = (t.finish_time - t.first_token_time) / (t.generated_tokens - 1)
        return {
            "prompt_id": t.prompt_id, "generated_tokens": t.generated_tokens, "prompt_tokens": t.prompt_tokens,
            "nfe": t.nfe, "decode_steps": t.decode_steps, "tpf": _ratio(t.generated_tokens, t.decode_steps),
            "ttft": t.first_token_time, "tpot": tpot, "latency": t.finish_time,
            "e2e_tps": _ratio(t.generated_tokens, t.finish_time or 0.0),
            "decode_tps": _ratio(t.generated_tokens, t.decode_time),
            "finished": t.finished, "completion_reason": t.completion_reason,
        }

    def _per_request(self, key: str) -> list[float]:
        values = (self.request_metrics(i)[key] for i in range(self.num_prompts))
        return [v for v in values if v is not None]

    @property
    def tpf(self) -> float | None:
        """Tokens per forward: all generated tokens / all decode steps, over requests."""
        return _ratio(self.total_generated_tokens, sum(t.decode_steps for t in self.trajectories))

    @property
    def ttft(self) -> float | None:
        return _mean(self._per_request("ttft"))

    @property
    def tpot(self) -> float | None:
        return _mean(self._per_request("tpot"))

    def _percentiles(self, key: str) -> dict[str, float | None]:
        values = self._per_request(key)
        return {f"p{q}": _percentile(values, q) for q in (50, 90, 99)}

    def ttft_percentiles(self) -> dict[str, float | None]:
        return self._percentiles("ttft")

    def tpot_percentiles(self) -> dict[str, float | None]:
        return self._percentiles("tpot")

    @property
    def throughput(self) -> float | None:
        """Generated tokens per second of step time."""
        return _ratio(self.total_generated_tokens, self.total_step_time)

    @property
    def e2e_throughput(self) -> float | None:
        """Generated tokens per second of wall time, construction to last step."""
        return _ratio(self.total_generated_tokens, self.wall_time)

    @property
    def prefill_throughput(self) -> float | None:
        return _ratio(self.prefill_tokens, self.prefill_time)

    @property
    def decode_throughput(self) -> float | None:
        return _ratio(self.decode_tokens, self.decode_time)

    @property
    def avg_e2e_tps(self) -> float | None:
        return _mean(self._per_request("e2e_tps"))

    @property
    def avg_decode_tps(self) -> float | None:
        return _mean(self._per_request("decode_tps"))

    def metrics(self) -> dict[str, Any]:
        """Every aggregate metric in one dict (JSON-ready)."""
        return {
            "num_prompts": self.num_prompts, "num_steps": self.num_steps,
            "generated_tokens": self.total_generated_tokens, "step_time": self.total_step_time,
            "wall_time": self.wall_time, "tpf": self.tpf, "ttft": self.ttft, "tpot": self.tpot,
            "ttft_percentiles": self.ttft_percentiles(), "tpot_percentiles": self.tpot_percentiles(),
            "throughput": self.throughput, "e2e_throughput": self.e2e_throughput,
            "prefill_throughput": self.prefill_throughput, "decode_throughput": self.decode_throughput,
            "avg_e2e_tps": self.avg_e2e_tps, "avg_decode_tps": self.avg_decode_tps,
        }

    def summary(self) -> str:
        """One line for logs."""
        m = self.metrics()
        fmt = lambda v, unit="", scale=1.0: "n/a" if v is None else f"{v * scale:.2f}{unit}"  # noqa: E731
        return (
            f"{m['num_prompts']} prompts, {m['generated_tokens']} tokens in {m['num_steps']} steps: "
            f"TPF {fmt(m['tpf'])}, TTFT {fmt(m['ttft'], ' ms', 1e3)} (p99 {fmt(m['ttft_percentiles']['p99'], ' ms', 1e3)}), "
            f"TPOT {fmt(m['tpot'], ' ms', 1e3)}, throughput {fmt(m['throughput'], ' tok/s')}, "
            f"decode {fmt(m['decode_throughput'], ' tok/s')}, prefill {fmt(m['prefill_throughput'], ' tok/s')}"
        )

    # ------------------------------------------------------------------ export

    def to_benchmark_format(self) -> list[dict[str, Any]]:
        """One dict per prompt: ``text``, ``full_text``, ``token_ids``, ``nfe``."""
        return [{"text": t.text, "full_text": t.full_text, "token_ids": t.token_ids, "nfe": t.nfe}
                for t in self.trajectories]

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics(),
                "requests": [self.request_metrics(i) for i in range(self.num_prompts)],
                "trajectories": [t.to_dict() for t in self.trajectories]}

    def write_jsonl(self, path: str | os.PathLike) -> None:
        """One JSON line per prompt: its trajectory and its request metrics."""
        with open(path, "w", encoding="utf-8") as f:
            for i, traj in enumerate(self.trajectories):
                f.write(json.dumps({**traj.to_dict(), "metrics": self.request_metrics(i)}) + "\n")
