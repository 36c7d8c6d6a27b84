"""Generation outputs: ``GenerationOutputs.record_step`` time and memory on a long diffusion-decoding batch.

Scenario (the output issue's): ``--requests`` 256 requests x ``--steps`` 1,000 steps, running
sequences that end at ``--length`` 2,048 tokens. A synthetic engine keeps one running sequence
per request and mutates it in place between steps (untimed): each decode step replaces
``--unmask`` 4 positions of the active 32-token block (mask -> token id; once no mask is left,
4 decoded tokens are redecoded to new ids), and every ``--grow-every`` 32 steps the sequence
grows by a ``--block-size`` 32-token block of masks. Sequences start at
``length - block_size * (number of growths)`` (1,056 for the defaults) so they end at ``length``.
Step 0 is the prefill (0 tokens generated); every later step generates ``--unmask`` tokens; the
last step finishes every request. With traces on, each request carries a ``block_trace`` of one
dict per block (33 -> 64 blocks), built fresh every step (fresh float objects, as an engine would).

Requests are one persistent ``Req`` dataclass per request exposing the ``EngineRequest``
attributes, updated in place between steps. ``running_token_ids`` is the engine's own Python
list, mutated in place (what most engines hold); variants also pass a numpy int64 array or a
torch int64 tensor instead. Only the ``record_step`` call is timed (``time.perf_counter`` around
each call, summed); building inputs is not. The cyclic garbage collector stays on; its pauses
are timed with ``gc.callbacks`` and reported (inside record_step and in the whole run).

Variants, each in a fresh subprocess (``--worker``), so peak memory is clean:

* ``changes+trace``: default (change sets), ``DIFFULEX_SAVE_TRACE=1``, list input.
* ``changes``:       default, ``DIFFULEX_SAVE_TRACE=0``, list input.
* ``changes/numpy``: default, traces off, numpy int64 array input.
* ``changes/torch``: default, traces off, torch int64 tensor input.
* ``snapshots``:     ``keep_snapshots=True``, traces off, list input (a full int64 copy per step).
* ``naive``:         the baseline the issue warns about: ``history[i].append(list(running_token_ids))``
  per request-step (a full Python list copy; int objects shared with the live list, its best case).
* ``diffulex+trace`` / ``diffulex``: the same engine, its requests shaped like Diffulex's ``DllmReq``
  (``new_tokens``, ``is_prefilling``, ``running_sequence``, ``dllm_block_buffer.dllm_blocks`` of
  block objects with an Enum ``status``, ``truncated_response``/``full_response``: the sequence
  itself), traces on / off. As Diffulex does, the response is copied every step, not once at the end.

``snapshots`` and ``naive`` hold a whole sequence per request-step (~3.2 GiB each for the full
scenario; ``changes+trace`` peaks at ~4.3 GiB). On a smaller machine, ``--reduced-requests N`` runs
those two with N requests over all the steps (the same length schedule) and extrapolates their
totals linearly to ``--requests`` (marked ``*``). Memory extrapolates well that way (within 0.1%
from 32 requests on the reference VM), time does not: fewer live sequences are warmer in cache,
and the naive baseline's cyclic-GC cost grows with the number of retained lists (32 requests
understated it 5.8x). Peak RSS growth = VmHWM at the end minus VmRSS just
before ``GenerationOutputs`` is built (VmHWM reset there via ``/proc/self/clear_refs``), after
the engine state exists and every import is done. Bytes per request-step = that growth / request-steps.
After each run, ``traj.running_token_ids(k)`` is compared with copies of the sequences passed at
a few (request, step) pairs, and one stored block trace with its input.

If a variant costs more than ``--profile-above`` microseconds per request-step, a smaller run of
it (``--profile-requests`` x ``--profile-steps``) is profiled with cProfile (record_step only) and
the top entries are printed.

    python benchmarks/bench_output.py [--requests 256] [--steps 1000] [--variants all]
    python benchmarks/bench_output.py --requests 16 --steps 50   # quick
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import random
import subprocess
import sys
import time
from dataclasses import dataclass, field
from enum import Enum
from pathlib import Path
from typing import Any

VARIANTS = {
    # name: (recorder, save_trace, input kind)
    "changes+trace": ("outputs", True, "list"),
    "changes": ("outputs", False, "list"),
    "changes/numpy": ("outputs", False, "numpy"),
    "changes/torch": ("outputs", False, "torch"),
    "snapshots": ("snapshots", False, "list"),
    "naive": ("naive", False, "list"),
    "diffulex+trace": ("outputs", True, "diffulex"),
    "diffulex": ("outputs", False, "diffulex"),
}
LISTS = ("list", "diffulex")  # input kinds whose running sequence is a Python list
REDUCED = {"snapshots", "naive"}
VOCAB = 126_464
MASK = 126_336  # a large id, as in LLaDA: not one of CPython's cached small ints
EOS = 126_081
MIB = 1024**2


# --------------------------------------------------------------------------- synthetic engine


@dataclass(slots=True)
class Req:
    """One engine request: the attributes ``record_step`` reads (``EngineRequest``)."""

    req_id: int
    is_prefill: bool = True
    num_prompt_tokens: int = 512
    num_generated_tokens: int = 0
    running_token_ids: Any = None
    block_size: int = 32
    buffer_block_ids: list = field(default_factory=list)
    is_finished: bool = False
    completion_reason: str | None = None
    response_token_ids: Any = ()
    eos_token_ids: tuple = (EOS,)
    block_trace: list | None = None


class BlockStatus(Enum):
    ACTIVE = 1
    DONE = 2
    PENDING = 3


@dataclass(slots=True)
class DiffulexBlock:
    block_id: int
    block_size: int
    num_mask_tokens: int
    status: BlockStatus
    is_active: bool
    is_dummy: bool
    progress: float


@dataclass(slots=True)
class DiffulexBuffer:
    dllm_blocks: list


@dataclass(slots=True)
class DiffulexReq:
    """One engine request shaped like Diffulex's ``DllmReq`` (what its ``record_step`` reads)."""

    req_id: int
    block_size: int = 32
    new_tokens: int = 0
    is_prefilling: bool = True
    running_sequence: Any = None
    dllm_block_buffer: Any = None
    truncated_response: Any = ()
    full_response: Any = ()
    is_truncated: bool = False
    max_new_tokens_reached: bool = False
    max_model_len_reached: bool = False
    max_nfe_reached: bool = False
    max_repetition_run_reached: bool = False
    eos_token_generated: bool = False
    completion_reason: str | None = None


class Engine:
    """Per-request running sequences, mutated in place step by step (nothing here is timed)."""

    def __init__(self, requests: int, steps: int, length: int, block_size: int, unmask: int,
                 grow_every: int, kind: str, traces: bool, seed: int = 0) -> None:
        self.rng = random.Random(seed)
        self.steps, self.block_size, self.unmask, self.grow_every = steps, block_size, unmask, grow_every
        self.kind, self.traces = kind, traces
        growths = (steps - 1) // grow_every if grow_every > 0 else 0
        self.start_length = length - block_size * growths
        if self.start_length < block_size:
            raise SystemExit(f"--length {length} is too short for {growths} growths of {block_size} tokens")
        if kind == "torch":
            import torch

            self.torch = torch
        if kind != "list":
            import numpy as np

            self.np = np
        self.seqs: list[Any] = []
        self.pools: list[list[int]] = []  # masked positions, ascending
        self.masked: list[list[int]] = []  # masked count per block
        request = DiffulexReq if kind == "diffulex" else Req
        self.reqs = [request(req_id=i, block_size=block_size) for i in range(requests)]
        for _ in range(requests):
            self.seqs.append(self._container([MASK] * self.start_length))
            self.pools.append(list(range(self.start_length)))
            self.masked.append(self._block_counts(self.start_length))

    def _block_counts(self, n: int) -> list[int]:
        full, rest = divmod(n, self.block_size)
        return [self.block_size] * full + ([rest] if rest else [])

    def _container(self, values: list[int]) -> Any:
        if self.kind == "numpy":
            return self.np.array(values, dtype=self.np.int64)
        if self.kind == "torch":
            return self.torch.tensor(values, dtype=self.torch.int64)
        return values

    def _grow(self, i: int) -> Any:
        """Append one block of masks to request ``i``'s sequence; the sequence (a new object for arrays)."""
        bs, seq = self.block_size, self.seqs[i]
        start = len(seq)
        if self.kind in LISTS:
            seq.extend([MASK] * bs)
        elif self.kind == "numpy":
            seq = self.np.concatenate([seq, self.np.full(bs, MASK, dtype=self.np.int64)])
        else:
            seq = self.torch.cat([seq, self.torch.full((bs,), MASK, dtype=self.torch.int64)])
        self.seqs[i] = seq
        self.pools[i].extend(range(start, start + bs))
        self.masked[i].extend(self._block_counts(bs))
        return seq

    def _unmask(self, seq: Any, pool: list[int], masked: list[int]) -> int:
        """One decode step on one sequence: ``unmask`` positions change; how many were generated."""
        rng, bs = self.rng, self.block_size
        positions, values = [], []
        window = min(len(pool), bs)  # the active block: the first masked positions
        for j in sorted(rng.sample(range(window), min(self.unmask, window)), reverse=True):
            positions.append(pool.pop(j))
        while len(positions) < self.unmask:  # no mask left: redecode decoded tokens
            p = rng.randrange(len(seq))
            if p not in positions:
                positions.append(p)
        for p in positions:
            old = int(seq[p])
            new = rng.randrange(VOCAB)
            while new == MASK or new == old:  # a token id, and a change
                new = rng.randrange(VOCAB)
            values.append(new)
            if old == MASK:
                masked[p // bs] -= 1
        if self.kind in LISTS:
            for p, v in zip(positions, values, strict=True):
                seq[p] = v
        else:
            seq[positions] = self._container(values)
        return len(positions)

    def advance(self, step: int) -> list[Req]:
        """Mutate every request's sequence for ``step`` and return the requests to record."""
        bs = self.block_size
        last = step == self.steps - 1
        for i, req in enumerate(self.reqs):
            seq, pool, masked = self.seqs[i], self.pools[i], self.masked[i]
            if step > 0 and self.grow_every > 0 and step % self.grow_every == 0:
                seq = self._grow(i)
            generated = self._unmask(seq, pool, masked) if step > 0 else 0
            active = pool[0] // bs if pool else len(masked) - 1
            if self.kind == "diffulex":
                self._set_diffulex(req, step, generated, seq, masked, active, last)
                continue
            req.is_prefill = step == 0
            req.num_generated_tokens = generated
            req.running_token_ids = seq
            req.buffer_block_ids = [active, active + 1]
            if last:
                req.is_finished, req.completion_reason = True, "max_tokens"
                req.response_token_ids = seq
            if self.traces:
                req.block_trace = [
                    {"block_id": b, "active": b == active, "dummy": False, "masked_count": m,
                     "mask_ratio": m / bs, "progress": 1.0 - m / bs,
                     "status": "active" if b == active else ("done" if m == 0 else "pending")}
                    for b, m in enumerate(masked)
                ]
        return self.reqs

    def _set_diffulex(self, req: DiffulexReq, step: int, generated: int, seq: list, masked: list, active: int,
                      last: bool) -> None:
        bs = self.block_size
        req.is_prefilling = step == 0
        req.new_tokens = generated
        req.running_sequence = seq
        req.truncated_response = req.full_response = seq
        blocks = []
        for b, m in enumerate(masked):
            status = BlockStatus.ACTIVE if b == active else BlockStatus.DONE if m == 0 else BlockStatus.PENDING
            blocks.append(DiffulexBlock(b, bs, m, status, b == active, False, 1.0 - m / bs))
        req.dllm_block_buffer = DiffulexBuffer(blocks)
        if last:
            req.max_new_tokens_reached = req.is_truncated = True
            req.completion_reason = "max_new_tokens_reached"

    def snapshot(self, i: int) -> list[int]:
        seq = self.seqs[i]
        return list(seq) if self.kind in LISTS else seq.tolist()


class NaiveRecorder:
    """The baseline: keep a full Python list copy of every request's running sequence every step."""

    def __init__(self, num_prompts: int) -> None:
        self.history: list[list[list[int]]] = [[] for _ in range(num_prompts)]

    def record_step(self, reqs, step_time: float) -> None:
        for req in reqs:
            self.history[req.req_id].append(list(req.running_token_ids))


# --------------------------------------------------------------------------- worker (one variant)


def _status_kib(name: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(name + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"{name} not in /proc/self/status")


class GcTimer:
    """Sums the cyclic collector's pauses, and the part of them inside record_step."""

    def __init__(self) -> None:
        self.total = self.inside = 0.0
        self.collections = 0
        self.recording = False
        self._start = 0.0
        gc.callbacks.append(self)

    def __call__(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            pause = time.perf_counter() - self._start
            self.total += pause
            self.collections += 1
            if self.recording:
                self.inside += pause


def expected_block_trace(req: Any) -> list[dict]:
    """The trace a request's step should store, as ``ReqStep.block_trace`` (Diffulex) or
    ``ReqStep.trace_dicts()`` (``EngineRequest``) gives it back."""
    if isinstance(req, DiffulexReq):
        return [{"block_id": b.block_id, "is_active": b.is_active, "is_dummy": b.is_dummy,
                 "num_mask_tokens": b.num_mask_tokens, "mask_ratio": b.num_mask_tokens / max(b.block_size, 1),
                 "progress": b.progress, "block_status": str(b.status)} for b in req.dllm_block_buffer.dllm_blocks]
    keys = ("block_id", "active", "dummy", "masked_count", "mask_ratio", "progress", "status")
    return [{k: d[k] for k in keys} for d in req.block_trace]


def _verify(variant: str, recorder: Any, expected: dict, expected_trace: Any, trace_check: tuple[int, int],
            traces: bool, kind: str, want_tokens: int) -> tuple[list[str], int, int]:
    """The record must rebuild the sequences (and the trace) that were passed and count every token:
    what was verified, and the changed positions and sequence lengths stored."""
    naive = isinstance(recorder, NaiveRecorder)
    changed = lengths = 0
    verified = []
    for (r, s), want in sorted(expected.items()):
        if naive:
            got = recorder.history[r][s]
        else:
            got = recorder.trajectories[r].running_token_ids(s)
        if got != want:
            raise SystemExit(f"{variant}: request {r} step {s}: recorded sequence differs from the one passed")
        verified.append(f"r{r}/s{s}")
    if not naive:
        trajs = recorder.trajectories
        step_rec = trajs[trace_check[0]].steps[trace_check[1]]
        if traces:
            stored = step_rec.block_trace if kind == "diffulex" else step_rec.trace_dicts()
            if stored != expected_trace:
                raise SystemExit(f"{variant}: stored block trace differs from the one passed")
            verified.append("trace")
        elif step_rec.trace is not None:
            raise SystemExit(f"{variant}: a block trace was stored with DIFFULEX_SAVE_TRACE=0")
        if recorder.total_generated_tokens != want_tokens or not all(t.finished for t in trajs):
            raise SystemExit(f"{variant}: {recorder.total_generated_tokens} tokens recorded, expected {want_tokens}")
        verified.append("tokens")
        for t in trajs:
            for st in t.steps:
                changed += len(st.changed_positions)
                lengths += st.running_length
    else:
        lengths = sum(len(x) for h in recorder.history for x in h)
    return verified, changed, lengths


def worker(variant: str, requests: int, steps: int, args: argparse.Namespace, profile: bool) -> None:
    recorder_kind, traces, kind = VARIANTS[variant]
    os.environ["DIFFULEX_SAVE_TRACE"] = "1" if traces else "0"
    from diffulex_core.output import GenerationOutputs

    engine = Engine(requests, steps, args.length, args.block_size, args.unmask, args.grow_every, kind, traces)
    # (request, step) pairs whose sequences are copied to check the record afterwards
    first_growth = min(args.grow_every, steps - 1) if args.grow_every > 0 else steps // 3
    checks = {(0, 0), (requests // 2, steps // 2), (requests - 1, steps - 1), (min(1, requests - 1), first_growth)}
    expected: dict[tuple[int, int], list[int]] = {}
    trace_check = (requests // 2, steps // 2)
    expected_trace = None

    gc.collect()
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS
        hwm_reset = True
    except OSError:
        hwm_reset = False
    rss_before = _status_kib("VmRSS")
    if recorder_kind == "naive":
        recorder = NaiveRecorder(requests)
    else:
        recorder = GenerationOutputs(requests, keep_snapshots=recorder_kind == "snapshots")
        assert recorder.save_trace is traces, "DIFFULEX_SAVE_TRACE was not honoured"
    profiler = None
    if profile:
        import cProfile

        profiler = cProfile.Profile()
    timer = GcTimer()
    record = gen = 0.0
    step_time = 0.05
    wall = time.perf_counter()
    for step in range(steps):
        t0 = time.perf_counter()
        reqs = engine.advance(step)
        for r, s in checks:
            if s == step:
                expected[(r, s)] = engine.snapshot(r)
        if traces and trace_check[1] == step:
            expected_trace = expected_block_trace(reqs[trace_check[0]])
        gen += time.perf_counter() - t0
        timer.recording = True
        if profiler is not None:
            profiler.enable()
        t0 = time.perf_counter()
        recorder.record_step(reqs, step_time)
        record += time.perf_counter() - t0
        if profiler is not None:
            profiler.disable()
        timer.recording = False
    wall = time.perf_counter() - wall
    hwm_after = _status_kib("VmHWM")
    rss_after = _status_kib("VmRSS")
    gc.callbacks.remove(timer)

    if profiler is not None:
        import pstats

        print(f"cProfile of record_step, {variant}, {requests} requests x {steps} steps "
              f"({record / (requests * steps) * 1e6:.1f} us per request-step under the profiler)")
        pstats.Stats(profiler, stream=sys.stdout).sort_stats("tottime").print_stats(args.profile_top)
        return

    verified, changed, lengths = _verify(variant, recorder, expected, expected_trace, trace_check, traces, kind,
                                         requests * (steps - 1) * args.unmask)
    n = requests * steps
    print(json.dumps({
        "variant": variant, "requests": requests, "steps": steps, "record_s": record, "gen_s": gen,
        "wall_s": wall, "gc_inside_s": timer.inside, "gc_total_s": timer.total, "gc_collections": timer.collections,
        "rss_before_kib": rss_before, "hwm_after_kib": hwm_after, "rss_after_kib": rss_after, "hwm_reset": hwm_reset,
        "growth_bytes": (hwm_after - rss_before) * 1024, "us_per_rs": record / n * 1e6,
        "bytes_per_rs": (hwm_after - rss_before) * 1024 / n, "mean_changed": changed / n if changed else None,
        "mean_length": lengths / n, "start_length": engine.start_length, "verified": verified,
    }))


# --------------------------------------------------------------------------- driver


def run_worker(variant: str, requests: int, steps: int, args: argparse.Namespace, profile: bool = False) -> str:
    cmd = [sys.executable, __file__, "--worker", variant, "--requests", str(requests), "--steps", str(steps),
           "--length", str(args.length), "--block-size", str(args.block_size), "--unmask", str(args.unmask),
           "--grow-every", str(args.grow_every), "--profile-top", str(args.profile_top)]
    if profile:
        cmd.append("--profile-worker")
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=256)
    parser.add_argument("--steps", type=int, default=1000)
    parser.add_argument("--length", type=int, default=2048, help="running-sequence length at the last step")
    parser.add_argument("--block-size", type=int, default=32)
    parser.add_argument("--unmask", type=int, default=4, help="positions decoded per request-step")
    parser.add_argument("--grow-every", type=int, default=32, help="steps between block appends (0: never)")
    parser.add_argument("--variants", default="all", help=f"comma-separated from: {', '.join(VARIANTS)}")
    parser.add_argument("--reduced-requests", type=int, default=0,
                        help="run snapshots/naive with this many requests (all steps) and extrapolate totals "
                             "(memory only is reliable); 0: run them in full")
    parser.add_argument("--profile-above", type=float, default=50.0,
                        help="profile variants slower than this many us per request-step (0: never)")
    parser.add_argument("--profile-requests", type=int, default=32)
    parser.add_argument("--profile-steps", type=int, default=200)
    parser.add_argument("--profile-top", type=int, default=15)
    parser.add_argument("--worker", choices=sorted(VARIANTS), help=argparse.SUPPRESS)
    parser.add_argument("--profile-worker", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.requests, args.steps, args, args.profile_worker)
        return

    names = list(VARIANTS) if args.variants == "all" else [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = set(names) - set(VARIANTS)
    if unknown:
        parser.error(f"unknown variant(s): {', '.join(sorted(unknown))}")
    full = args.requests * args.steps
    rows = []
    for name in names:
        reqs = args.requests
        if name in REDUCED and 0 < args.reduced_requests < args.requests:
            reqs = args.reduced_requests
        start = time.perf_counter()
        data = json.loads(run_worker(name, reqs, args.steps, args).strip().splitlines()[-1])
        data["extrapolated"] = reqs != args.requests
        data["scale"] = full / (reqs * args.steps)
        rows.append(data)
        print(f"[{name}] {reqs} requests x {args.steps} steps in {time.perf_counter() - start:.1f} s: "
              f"record {data['record_s']:.2f} s ({data['us_per_rs']:.1f} us/request-step, gc inside "
              f"{data['gc_inside_s']:.2f} s), inputs {data['gen_s']:.2f} s, peak RSS "
              f"+{data['growth_bytes'] / MIB:.0f} MiB (VmHWM reset: {data['hwm_reset']}); verified "
              f"{', '.join(data['verified'])}", flush=True)

    naive = next((r for r in rows if r["variant"] == "naive"), None)
    import numpy

    print()
    print(f"{args.requests} requests x {args.steps} steps, sequences {rows[0]['start_length']} -> {args.length} "
          f"tokens (mean {rows[0]['mean_length']:.0f}), {args.unmask} decoded per step, +{args.block_size} every "
          f"{args.grow_every} steps (Python {sys.version.split()[0]}, numpy {numpy.__version__}, {os.cpu_count()} "
          "CPUs)")
    header = (f"{'variant':14s} {'run (req x steps)':>17s} {'us/req-step':>11s} {'record s':>9s} {'gc in rec s':>11s} "
              f"{'peak RSS MiB':>12s} {'B/req-step':>10s} {'time x naive':>12s} {'mem x naive':>11s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        mark = "*" if r["extrapolated"] else " "
        t_ratio = f"{r['us_per_rs'] / naive['us_per_rs']:.2f}x" if naive else "-"
        m_ratio = f"{r['bytes_per_rs'] / naive['bytes_per_rs']:.3f}x" if naive else "-"
        print(f"{r['variant']:14s} {r['requests']:>8,d} x {r['steps']:<6,d} {r['us_per_rs']:11.2f} "
              f"{r['record_s'] * r['scale']:8.2f}{mark} {r['gc_inside_s'] * r['scale']:10.2f}{mark} "
              f"{r['growth_bytes'] * r['scale'] / MIB:11.0f}{mark} {r['bytes_per_rs']:10,.0f} {t_ratio:>12s} "
              f"{m_ratio:>11s}")
    if any(r["extrapolated"] for r in rows):
        print(f"* extrapolated linearly from the run's requests to {args.requests} (same steps and length "
              "schedule; reliable for memory, understates time)")
    print("record s / gc in rec s / peak RSS: totals for the whole scenario; x naive = variant / naive "
          "(time: >1 slower; memory: <1 smaller)")
    changes = next((r for r in rows if r.get("mean_changed")), None)
    if changes:
        print(f"mean changed positions stored per request-step: {changes['mean_changed']:.2f}")

    if args.profile_above > 0:
        for r in rows:
            if r["us_per_rs"] > args.profile_above and r["variant"] != "naive":
                print()
                print(run_worker(r["variant"], min(args.profile_requests, args.requests),
                                 min(args.profile_steps, args.steps), args, profile=True).rstrip())


if __name__ == "__main__":
    main()
