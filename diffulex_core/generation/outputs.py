"""Generation trajectories and metrics (TPF, TTFT, TPOT, throughput) recorded step by step.

Engines call ``GenerationOutputs.record_step`` after every step. It takes requests in either of
two shapes, recognised per request (``diffulex_core.generation.requests``): a Diffulex request (it
has ``new_tokens`` and ``dllm_block_buffer``), read exactly as Diffulex's
``diffulex.utils.output`` reads it, or this package's ``EngineRequest`` protocol. So this module
is a drop-in for engine code written against Diffulex's: under Diffulex's names, attributes and
metrics mean what they mean there (``tpf``, ``ttft``, ``postfix()``, ``ReqTrajectory.trajectory``,
...; ``seed_metrics``); this package's own metric definitions live under their own names
(``decode_tpf``, ``batch_ttft``, ``wall_throughput``, ...; ``metrics``). Exact definitions, side by
side: ``docs/metrics.md``.

Memory stays bounded: a step keeps only the positions of the running sequence that changed since
the request's previous step (full snapshots are opt-in; ``ReqStep.running_token_ids`` rebuilds a
step's sequence on access), and per-block traces are packed records, kept only while
``DIFFULEX_SAVE_TRACE`` is not ``0``. The storage classes (``ReqStep``, ``ReqTrajectory``, the
trace packing) live in ``diffulex_core.generation.trajectory``.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from diffulex_core.environment import env_flag
from diffulex_core.generation.decoding import decode_token_ids_robust
from diffulex_core.generation.metrics import OwnMetrics
from diffulex_core.generation.requests import DiffulexRequest, EngineRequest, StepInput, read_request
from diffulex_core.generation.seed_metrics import SeedMetrics
from diffulex_core.generation.trajectory import ReqStep, ReqTrajectory, TraceStatuses

__all__ = ["GenerationOutputs", "save_trace_enabled"]

logger = logging.getLogger("diffulex_core.output")  # the public module's name, which engines filter on

ENV_SAVE_TRACE = "DIFFULEX_SAVE_TRACE"


def save_trace_enabled() -> bool:
    """Per-block traces are recorded unless ``DIFFULEX_SAVE_TRACE=0`` (or false/no/off)."""
    return env_flag(ENV_SAVE_TRACE, True)


class GenerationOutputs(SeedMetrics, OwnMetrics):
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
        for inp, traj in zip(inputs, targets, strict=True):
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
        running, length, positions, values, log, index = traj.note_running(running)
        trace = inp.trace
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
                traj.forget_running()  # no further diffs: free it

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
