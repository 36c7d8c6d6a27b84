"""Generation trajectories and metrics (TPF, TTFT, TPOT, throughput) recorded step by step.

Engines call ``GenerationOutputs.record_step`` after every step. It takes requests in either of
two shapes, recognised per request (``diffulex_core.generation.requests``): a Diffulex request (it
has ``new_tokens`` and ``dllm_block_buffer``), read exactly as Diffulex's
``diffulex.utils.output`` reads it, or this package's ``EngineRequest`` protocol. So this module
is a drop-in for engine code written against Diffulex's: under Diffulex's names, attributes and
metrics mean what they mean there (``tpf``, ``ttft``, ``postfix()``, ``ReqTrajectory.trajectory``,
...); this package's own metric definitions live under their own names (``decode_tpf``,
``batch_ttft``, ``wall_throughput``, ...). Exact definitions, side by side: ``docs/metrics.md``.

Memory stays bounded: a step keeps only the positions of the running sequence that changed since
the request's previous step (full snapshots are opt-in; ``ReqStep.running_token_ids`` rebuilds a
step's sequence on access), and per-block traces are packed records, kept only while
``DIFFULEX_SAVE_TRACE`` is not ``0``. The storage classes (``ReqStep``, ``ReqTrajectory``, the
trace packing) live in ``diffulex_core.generation.trajectory`` and are re-exported here.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from typing import Any, Callable, Iterable, Mapping, Sequence

import numpy as np

from diffulex_core.generation.requests import DiffulexRequest, EngineRequest, StepInput, read_request
# Storage lives in .trajectory; re-exported here, so ``from diffulex_core.generation.outputs import ReqStep`` keeps working.
from diffulex_core.generation.trajectory import SEED_TRACE_FIELDS, TRACE_DTYPE, TRACE_FIELDS, ReqStep, ReqTrajectory, TraceStatuses, _ChangeLog

__all__ = [
    "EngineRequest",
    "DiffulexRequest",
    "ReqStep",
    "ReqTrajectory",
    "GenerationOutputs",
    "decode_token_ids_robust",
    "save_trace_enabled",
    "TRACE_DTYPE",
    "TRACE_FIELDS",
    "SEED_TRACE_FIELDS",
]

logger = logging.getLogger("diffulex_core.output")  # the public module's name, which engines filter on

ENV_SAVE_TRACE = "DIFFULEX_SAVE_TRACE"


def save_trace_enabled() -> bool:
    """Per-block traces are recorded unless ``DIFFULEX_SAVE_TRACE=0`` (or false/no/off)."""
    return os.environ.get(ENV_SAVE_TRACE, "1").strip().lower() not in ("0", "false", "no", "off")


def _ids(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    return [int(t) for t in token_ids]


def decode_token_ids_robust(tokenizer: Any, token_ids: Iterable[int] | None, *,
                            skip_special_tokens: bool = False) -> str:
    """Decode with ``tokenizer.decode``; if its signature rejects our arguments (``TypeError``),
    convert the whole id list to tokens (``None`` becomes empty) and join them, as Diffulex does;
    if the tokenizer converts only one id at a time, go id by id (unknown ids become empty).
    ``None`` or no ids give ``""``.
    """
    if token_ids is None:
        return ""
    ids = _ids(token_ids)
    if not ids:
        return ""
    try:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    except TypeError:
        pass  # a stricter decode signature; other errors are real and propagate
    try:
        converted = tokenizer.convert_ids_to_tokens(ids)
    except (TypeError, IndexError, KeyError, ValueError, OverflowError):
        converted = None  # takes one id at a time, or choked on one id: the per-id path below handles both
    if converted is None or isinstance(converted, str):
        converted = []
        for token_id in ids:
            try:
                converted.append(tokenizer.convert_ids_to_tokens(token_id))
            except (IndexError, KeyError, ValueError, OverflowError):
                converted.append(None)
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ()) if skip_special_tokens else set()
    tokens = ["" if t is None else t for t in converted if t is None or t not in special]
    join = getattr(tokenizer, "convert_tokens_to_string", None)
    return join(tokens) if callable(join) else "".join(tokens)


def _percentile(values: list[float], q: float) -> float | None:
    """Linear-interpolation percentile (numpy's default); None for no values."""
    return float(np.percentile(values, q)) if values else None


def _mean(values: list[float]) -> float | None:
    return math.fsum(values) / len(values) if values else None


def _ratio(numerator: float, denominator: float) -> float | None:
    return numerator / denominator if denominator > 0 else None


def _seed_mean(values: list[float]) -> float:
    """Diffulex's mean: plain ``sum`` (so values match its to the last bit), 0.0 for none."""
    return sum(values) / len(values) if values else 0.0


def _seed_ratio(numerator: float, denominator: float) -> float:
    return numerator / denominator if denominator > 0 else 0.0


class GenerationOutputs:
    """Accumulates one batch's trajectories and computes its metrics (see ``docs/metrics.md``).

    Under Diffulex's names (``tpf``, ``ttft``, ``tpot``, ``throughput``, ``e2e_throughput``,
    ``prefill_throughput``, ``decode_throughput``, ``avg_e2e_tps``, ``avg_decode_tps``,
    ``batch_step_count``, ``total_time``, ``e2e_total_time``, ``prefill_time``, ...) metrics follow
    Diffulex's definitions and are 0.0 without data. This package's definitions have their own
    names (``decode_tpf``, ``batch_ttft``, ``batch_tpot``, ``wall_throughput``,
    ``split_prefill_throughput``, ...) and are None without data.

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
        # batch counters (Diffulex's): a step with no request adds nothing to any of them
        self.num_steps = 0
        self.total_step_time = 0.0
        self.batch_generated_tokens = 0
        self.prefill_tokens = 0
        self.decode_tokens = 0
        self.prefill_time = 0.0  # a step with any prefill request counts whole here ...
        self.decode_time = 0.0  # ... and, if it also had a decode request, whole here too
        self.split_prefill_time = 0.0  # a step's time split by its share of requests in each phase
        self.split_decode_time = 0.0
        self.skipped_requests = 0  # Diffulex requests whose prompt index was out of range
        # Diffulex's TPF: a running sum of per-request decode TPFs, over requests with a decode step
        self._tpf_sum = 0.0
        self._tpf_requests = 0
        self._ints: list[int] = []  # one int object per step index, shared by all trajectories' steps

    # ------------------------------------------------------------------ recording

    def record_step(self, reqs: Sequence[EngineRequest | DiffulexRequest], step_time: float,
                    req_id_to_prompt_id: Mapping[int, int] | None = None) -> None:
        """Record one engine step of ``step_time`` seconds for the requests it ran.

        Every request is read before anything is recorded, so a request that cannot be read
        (``TypeError`` naming what it lacks) or an ``EngineRequest`` that maps to no prompt
        (``KeyError``, ``IndexError``) leaves the outputs unchanged. A Diffulex request whose
        ``req_id`` is not in ``req_id_to_prompt_id`` is its own prompt index; one whose index is
        out of range is counted in the batch counters but recorded in no trajectory (logged once
        per ``GenerationOutputs``, counted in ``skipped_requests``), as Diffulex does.
        """
        if step_time < 0 or not math.isfinite(step_time):
            raise ValueError(f"step_time must be a finite, non-negative number of seconds, got {step_time!r}")
        if not reqs:
            return
        traces, mapping = (self.statuses if self.save_trace else None), req_id_to_prompt_id
        inputs, targets = [], []
        n_prefill = generated = prefill_tokens = decode_tokens = 0
        for req in reqs:  # read everything first: nothing below may fail halfway through a step
            inp = read_request(req, traces)
            inputs.append(inp)
            targets.append(self._target(inp, mapping))
            generated += inp.new_tokens
            if not inp.is_prefill:
                decode_tokens += inp.new_tokens
            else:
                n_prefill += 1
                if inp.diffulex:  # an EngineRequest's prompt counts once, in _record
                    prefill_tokens += inp.prefill_tokens
        if None in targets:
            self._skip(inputs, targets, mapping)

        batch_step = self.num_steps
        self.num_steps += 1
        self.total_step_time += step_time
        elapsed = self.total_step_time
        self.end_time = self._clock()
        self.batch_generated_tokens += generated
        self.prefill_tokens += prefill_tokens
        self.decode_tokens += decode_tokens
        n = len(inputs)
        if n_prefill:
            self.prefill_time += step_time
        if n_prefill < n:
            self.decode_time += step_time
        self.split_prefill_time += step_time * n_prefill / n
        self.split_decode_time += step_time * (n - n_prefill) / n
        for inp, traj in zip(inputs, targets):
            if traj is not None:
                self._record(traj, inp, step_time, elapsed, batch_step)

    def _target(self, inp: StepInput, mapping: Mapping[int, int] | None) -> ReqTrajectory | None:
        """The request's trajectory. Diffulex's rule for its requests (unmapped: its own
        ``req_id``; out of range: None, skipped); this package's is strict."""
        if inp.diffulex:
            prompt_id = mapping.get(inp.req_id, inp.req_id) if mapping else inp.req_id
            return self.trajectories[prompt_id] if 0 <= prompt_id < self.num_prompts else None
        prompt_id = mapping[inp.req_id] if mapping is not None else inp.req_id
        if not 0 <= prompt_id < self.num_prompts:
            raise IndexError(f"request {inp.req_id!r} maps to prompt {prompt_id!r}, outside 0..{self.num_prompts - 1}")
        return self.trajectories[prompt_id]

    def _skip(self, inputs: list[StepInput], targets: list[ReqTrajectory | None],
              mapping: Mapping[int, int] | None) -> None:
        """Count the step's skipped requests; log the first of this ``GenerationOutputs``."""
        if self.skipped_requests == 0:
            inp = inputs[targets.index(None)]
            logger.warning("record_step: request %r maps to prompt %r, not one of the %d prompts: not recorded "
                           "(further ones are counted in GenerationOutputs.skipped_requests, not logged)",
                           inp.req_id, mapping.get(inp.req_id, inp.req_id) if mapping else inp.req_id,
                           self.num_prompts)
        self.skipped_requests += targets.count(None)

    def _record(self, traj: ReqTrajectory, inp: StepInput, step_time: float, elapsed: float, batch_step: int) -> None:
        running = inp.running
        if isinstance(running, (list, tuple)):  # fromiter: about 20% faster than asarray on a list of ints
            running = np.fromiter(running, dtype=np.int64, count=len(running))
        else:  # an array or tensor: copy, as it may be the engine's own memory
            running = np.asarray(running, dtype=np.int64).ravel().copy()
        previous = traj._last_running
        if previous is None:
            changed = np.arange(running.size)
        else:
            common = min(previous.size, running.size)
            changed = np.flatnonzero(previous[:common] != running[:common])
            if running.size > common:
                changed = np.concatenate([changed, np.arange(common, running.size)])
        traj._last_running = running
        positions, values = changed.tolist(), running[changed].tolist()
        trace = inp.trace
        log = traj._log
        if log is None:
            log = traj._log = _ChangeLog()
        length = int(running.size)
        index = log.append(length, positions, values)
        ints, step_id = self._ints, len(traj.steps)
        if max(step_id, index) >= len(ints):
            ints.extend(range(len(ints), max(step_id, index) + 64))
        # an int above 256 is a new 28-byte object each time: all steps share one per value
        step = ReqStep._recorded(ints[step_id], step_time, inp.is_prefill, inp.new_tokens, inp.block_size,
                                 inp.buffer_block_ids, length, positions, values,
                                 running if self.keep_snapshots else None, trace,
                                 self.statuses if trace is not None else None, batch_step, log, ints[index])
        traj.steps.append(step)
        if not inp.is_prefill:  # before _count: the request's TPF so far leaves the sum
            self._count_tpf(traj, inp.new_tokens)
        traj._count(step, elapsed)
        if inp.is_prefill:
            if inp.diffulex:
                traj.prompt_tokens += inp.prefill_tokens
            elif traj.prompt_tokens == 0:  # a prompt counts once, however many steps prefill it
                traj.prompt_tokens = inp.prefill_tokens
                self.prefill_tokens += inp.prefill_tokens
        outcome = inp.outcome
        if outcome is not None and (inp.diffulex or not traj.finished):  # Diffulex: copied every step
            traj._apply(outcome)
            if outcome.finished:
                traj._last_running = None  # no further diffs: free it

    def _count_tpf(self, traj: ReqTrajectory, new_tokens: int) -> None:
        """Replace the request's decode TPF in the running sum by its new one, with Diffulex's
        arithmetic and in its order (so ``tpf`` is O(1) and equals Diffulex's to the last bit)."""
        steps, tokens = traj.decode_steps, traj.decode_tokens
        old = tokens / steps if steps > 0 else 0.0
        if steps == 0:
            self._tpf_requests += 1
        self._tpf_sum += (tokens + new_tokens) / (steps + 1) - old

    def convert_to_text(self, tokenizer: Any) -> None:
        """Decode every trajectory as Diffulex does: ``full_text`` from ``full_token_ids`` (or
        ``token_ids`` when empty), ``text`` from ``token_ids`` cut at the tokenizer's EOS text;
        special tokens are kept in both."""
        eos = getattr(tokenizer, "eos_token", None)
        eos = str(eos) if eos else ""
        for traj in self.trajectories:
            traj.full_text = decode_token_ids_robust(tokenizer, traj.full_token_ids or traj.token_ids)
            text = decode_token_ids_robust(tokenizer, traj.token_ids)
            traj.text = text.split(eos)[0] if eos else text

    # ------------------------------------------------------------------ Diffulex's metrics

    @property
    def batch_step_count(self) -> int:
        """Steps that ran at least one request."""
        return self.num_steps

    @property
    def total_time(self) -> float:
        """Sum of those steps' times."""
        return float(self.total_step_time)

    @property
    def e2e_total_time(self) -> float:
        """Sum over requests of their own steps' times."""
        return float(sum(t.total_step_time for t in self.trajectories))

    @property
    def tpf(self) -> float:
        """Mean over requests with a decode step of their decode tokens / decode steps (a prefill
        step counts in neither); 0.0 with none."""
        return self._tpf_sum / self._tpf_requests if self._tpf_requests > 0 else 0.0

    @property
    def ttft(self) -> float:
        """Mean over requests of their own steps' time up to their first step with a token."""
        return _seed_mean([t.first_token_step_time for t in self.trajectories if t.first_token_step_time is not None])

    @property
    def tpot(self) -> float:
        """Mean over requests with more than one token of (own time - TTFT) / (tokens - 1)."""
        return _seed_mean([(t.total_step_time - t.first_token_step_time) / (t.generated_tokens - 1)
                           for t in self.trajectories
                           if t.generated_tokens > 1 and t.first_token_step_time is not None])

    @property
    def throughput(self) -> float:
        """Tokens generated in the batch (recorded or not) / ``total_time``."""
        return _seed_ratio(self.batch_generated_tokens, self.total_step_time)

    @property
    def e2e_throughput(self) -> float:
        """Final tokens (``len(token_ids)``) over requests / ``total_time`` (at least 1 ms)."""
        return sum(len(t.token_ids) for t in self.trajectories) / max(self.total_step_time, 0.001)

    @property
    def prefill_throughput(self) -> float:
        return _seed_ratio(self.prefill_tokens, self.prefill_time)

    @property
    def decode_throughput(self) -> float:
        return _seed_ratio(self.decode_tokens, self.decode_time)

    @property
    def avg_e2e_tps(self) -> float:
        """Mean over requests of final tokens / own time."""
        return _seed_mean([len(t.token_ids) / t.total_step_time for t in self.trajectories
                           if t.total_step_time > 0 and len(t.token_ids) > 0])

    @property
    def avg_decode_tps(self) -> float:
        """Mean over requests of own decode-step tokens / own decode time."""
        return _seed_mean([t.decode_tokens / t.decode_time for t in self.trajectories
                           if t.decode_time > 0 and t.decode_tokens > 0])

    def postfix(self) -> dict[str, str]:
        """Diffulex's progress-bar fields."""
        return dict(tpf=f"{self.tpf:.2f}tok/step", ttft=f"{self.ttft:.2f}s", tpot=f"{self.tpot:.2f}s",
                    e2eps=f"{self.e2e_throughput:.2f}tok/s", ptps=f"{self.prefill_throughput:.2f}tok/s",
                    dtps=f"{self.decode_throughput:.2f}tok/s")

    def fast_postfix(self) -> dict[str, str]:
        """Diffulex's O(1) progress-bar fields, from the batch counters alone."""
        elapsed = max(self.total_step_time, 0.001)
        decode_elapsed = max(self.decode_time, 0.001)
        return dict(tpf=f"{self.tpf:.2f}tok/step",
                    dtps=f"{self.decode_tokens / decode_elapsed:.2f}tok/s",
                    e2eps=f"{self.batch_generated_tokens / elapsed:.2f}tok/s")

    def log_summary(self) -> None:
        """Diffulex's summary, line for line, to this module's logger at INFO."""
        rule = "--------------------------------"
        for line in (
            rule, "Generation Outputs Summary:", rule,
            f"Total Tokens: {sum(len(t.token_ids) for t in self.trajectories)} toks",
            f"Total NFEs: {self.batch_step_count} nfes (steps)",
            f"Total Time: {self.total_time} sec",
            f"E2E Time: {self.e2e_total_time} sec",
            f"TPF: {self.tpf:.2f} tok/step",
            f"TTFT: {self.ttft:.2f} sec",
            f"TPOT: {self.tpot:.2f} sec",
            f"E2E Throughput: {self.e2e_throughput:.2f} tok/sec",
            f"Prefill Throughput: {self.prefill_throughput:.2f} tok/sec",
            f"Decode Throughput: {self.decode_throughput:.2f} tok/sec",
            f"Avg E2E TPS (per-sample mean): {self.avg_e2e_tps:.2f} tok/sec",
            f"Avg Decode TPS (per-sample mean): {self.avg_decode_tps:.2f} tok/sec",
            rule,
        ):
            logger.info(line)

    # ------------------------------------------------------------------ this package's metrics

    @property
    def total_generated_tokens(self) -> int:
        """Tokens generated by recorded requests."""
        return sum(t.generated_tokens for t in self.trajectories)

    @property
    def wall_time(self) -> float:
        return self.end_time - self.start_time

    def request_metrics(self, i: int) -> dict[str, Any]:
        """Per-request figures. Diffulex's keys (``tokens``, ``decode_tokens``, ``decode_steps``,
        ``tpf``, ``e2e_tps``, ``decode_tps``) are 0.0 without data; the others are None."""
        t = self.trajectories[i]
        generated, tokens = t.generated_tokens, len(t.token_ids)
        tpot = batch_tpot = None
        if generated > 1:
            if t.first_token_step_time is not None:
                tpot = (t.total_step_time - t.first_token_step_time) / (generated - 1)
            if t.first_token_time is not None:
                batch_tpot = (t.finish_time - t.first_token_time) / (generated - 1)
        return {
            "prompt_id": t.prompt_id, "tokens": tokens, "generated_tokens": generated,
            "prompt_tokens": t.prompt_tokens, "nfe": t.nfe, "decode_steps": t.decode_steps,
            "decode_tokens": t.decode_tokens, "step_time": t.total_step_time, "decode_time": t.decode_time,
            "tpf": _seed_ratio(t.decode_tokens, t.decode_steps), "e2e_tps": _seed_ratio(tokens, t.total_step_time),
            "decode_tps": _seed_ratio(t.decode_tokens, t.decode_time),
            "ttft": t.first_token_step_time, "tpot": tpot,
            "decode_tpf": _ratio(generated, t.decode_steps), "batch_ttft": t.first_token_time,
            "batch_tpot": batch_tpot, "latency": t.finish_time,
            "batch_e2e_tps": _ratio(generated, t.finish_time or 0.0),
            "generated_decode_tps": _ratio(generated, t.decode_time),
            "finished": t.finished, "completion_reason": t.completion_reason,
        }

    def _per_request(self, key: str) -> list[float]:
        values = (self.request_metrics(i)[key] for i in range(self.num_prompts))
        return [v for v in values if v is not None]

    def _percentiles(self, key: str) -> dict[str, float | None]:
        values = self._per_request(key)
        return {f"p{q}": _percentile(values, q) for q in (50, 90, 99)}

    def ttft_percentiles(self) -> dict[str, float | None]:
        """p50/p90/p99 of the per-request TTFTs that ``ttft`` averages."""
        return self._percentiles("ttft")

    def tpot_percentiles(self) -> dict[str, float | None]:
        """p50/p90/p99 of the per-request TPOTs that ``tpot`` averages."""
        return self._percentiles("tpot")

    @property
    def decode_tpf(self) -> float | None:
        """Token-weighted tokens per forward: all generated tokens / all decode steps."""
        return _ratio(self.total_generated_tokens, sum(t.decode_steps for t in self.trajectories))

    @property
    def batch_ttft(self) -> float | None:
        """Mean TTFT on the batch clock (every prompt arrives at 0, so waiting counts)."""
        return _mean(self._per_request("batch_ttft"))

    @property
    def batch_tpot(self) -> float | None:
        return _mean(self._per_request("batch_tpot"))

    def batch_ttft_percentiles(self) -> dict[str, float | None]:
        return self._percentiles("batch_ttft")

    def batch_tpot_percentiles(self) -> dict[str, float | None]:
        return self._percentiles("batch_tpot")

    @property
    def wall_throughput(self) -> float | None:
        """Generated tokens per second of wall time, construction to last step."""
        return _ratio(self.total_generated_tokens, self.wall_time)

    @property
    def split_prefill_throughput(self) -> float | None:
        """Prefill tokens / prefill time with mixed steps split by their share of requests."""
        return _ratio(self.prefill_tokens, self.split_prefill_time)

    @property
    def split_decode_throughput(self) -> float | None:
        return _ratio(self.decode_tokens, self.split_decode_time)

    @property
    def avg_batch_e2e_tps(self) -> float | None:
        """Mean over requests of generated tokens / batch-clock latency."""
        return _mean(self._per_request("batch_e2e_tps"))

    @property
    def avg_generated_decode_tps(self) -> float | None:
        """Mean over requests of all generated tokens / own decode time."""
        return _mean(self._per_request("generated_decode_tps"))

    def metrics(self) -> dict[str, Any]:
        """Every aggregate metric in one dict (JSON-ready): Diffulex's names, then this package's."""
        return {
            "num_prompts": self.num_prompts, "num_steps": self.num_steps,
            "generated_tokens": self.total_generated_tokens, "step_time": self.total_step_time,
            "wall_time": self.wall_time,
            "batch_step_count": self.batch_step_count, "total_time": self.total_time,
            "e2e_total_time": self.e2e_total_time, "batch_generated_tokens": self.batch_generated_tokens,
            "prefill_tokens": self.prefill_tokens, "prefill_time": self.prefill_time,
            "decode_tokens": self.decode_tokens, "decode_time": self.decode_time,
            "tpf": self.tpf, "ttft": self.ttft, "tpot": self.tpot, "throughput": self.throughput,
            "e2e_throughput": self.e2e_throughput, "prefill_throughput": self.prefill_throughput,
            "decode_throughput": self.decode_throughput, "avg_e2e_tps": self.avg_e2e_tps,
            "avg_decode_tps": self.avg_decode_tps,
            "ttft_percentiles": self.ttft_percentiles(), "tpot_percentiles": self.tpot_percentiles(),
            "decode_tpf": self.decode_tpf, "batch_ttft": self.batch_ttft, "batch_tpot": self.batch_tpot,
            "batch_ttft_percentiles": self.batch_ttft_percentiles(),
            "batch_tpot_percentiles": self.batch_tpot_percentiles(),
            "wall_throughput": self.wall_throughput, "split_prefill_time": self.split_prefill_time,
            "split_decode_time": self.split_decode_time, "split_prefill_throughput": self.split_prefill_throughput,
            "split_decode_throughput": self.split_decode_throughput, "avg_batch_e2e_tps": self.avg_batch_e2e_tps,
            "avg_generated_decode_tps": self.avg_generated_decode_tps, "skipped_requests": self.skipped_requests,
        }

    def summary(self) -> str:
        """One line for logs: Diffulex's figures, this package's in parentheses."""
        m = self.metrics()
        fmt = lambda v, unit="", scale=1.0: "n/a" if v is None else f"{v * scale:.2f}{unit}"  # noqa: E731
        return (
            f"{m['num_prompts']} prompts, {m['generated_tokens']} tokens in {m['num_steps']} steps: "
            f"TPF {fmt(m['tpf'])} (decode {fmt(m['decode_tpf'])}), "
            f"TTFT {fmt(m['ttft'], ' ms', 1e3)} (p99 {fmt(m['ttft_percentiles']['p99'], ' ms', 1e3)}, "
            f"batch clock {fmt(m['batch_ttft'], ' ms', 1e3)}), "
            f"TPOT {fmt(m['tpot'], ' ms', 1e3)} (batch clock {fmt(m['batch_tpot'], ' ms', 1e3)}), "
            f"throughput {fmt(m['throughput'], ' tok/s')} (wall {fmt(m['wall_throughput'], ' tok/s')}), "
            f"decode {fmt(m['decode_throughput'], ' tok/s')} (split {fmt(m['split_decode_throughput'], ' tok/s')}), "
            f"prefill {fmt(m['prefill_throughput'], ' tok/s')} (split {fmt(m['split_prefill_throughput'], ' tok/s')})"
        )

    # ------------------------------------------------------------------ export

    def to_benchmark_format(self) -> list[dict[str, Any]]:
        """One dict per prompt, as Diffulex's: ``text`` ("" until converted), ``full_text``,
        ``token_ids``, ``nfe``."""
        return [{"text": t.text or "", "full_text": t.full_text if t.full_text is not None else (t.text or ""),
                 "token_ids": t.token_ids or [], "nfe": t.nfe} for t in self.trajectories]

    def to_dict(self) -> dict[str, Any]:
        return {"metrics": self.metrics(),
                "requests": [self.request_metrics(i) for i in range(self.num_prompts)],
                "trajectories": [t.to_dict() for t in self.trajectories]}

    def write_jsonl(self, path: str | os.PathLike) -> None:
        """One JSON line per prompt: its trajectory and its request metrics."""
        with open(path, "w", encoding="utf-8") as f:
            for i, traj in enumerate(self.trajectories):
                f.write(json.dumps({**traj.to_dict(), "metrics": self.request_metrics(i)}) + "\n")
