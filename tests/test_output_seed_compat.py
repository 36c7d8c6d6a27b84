"""``diffulex_core.output`` as a drop-in for Diffulex's ``diffulex.utils.output`` (the seed).

Requests here are shaped like Diffulex's ``DllmReq`` (``new_tokens``, ``is_prefilling``,
``running_sequence``, ``dllm_block_buffer.dllm_blocks`` of blocks with an Enum ``status``, ...).
Every expected number is derived by hand, in the comments, from the script below.
"""

from __future__ import annotations

import logging
import pickle
from dataclasses import dataclass
from enum import Enum

import pytest

from diffulex_core.output import GenerationOutputs, ReqStep, ReqTrajectory, decode_token_ids_robust
from engine_request import Req

M = 99  # the mask token id


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


class BlockStatus(Enum):
    ACTIVE = 1
    TO_CACHE = 2
    IN_CACHE = 3
    DUMMY = 4


@dataclass
class DllmBlock:
    block_id: int
    block_size: int
    num_mask_tokens: int
    status: BlockStatus

    @property
    def is_active(self) -> bool:
        return self.status == BlockStatus.ACTIVE

    @property
    def is_dummy(self) -> bool:
        return self.status == BlockStatus.DUMMY

    @property
    def progress(self) -> float:
        return (self.block_size - self.num_mask_tokens) / self.block_size


@dataclass
class StatuslessBlock:
    """A block of an engine whose blocks carry no ``status`` (Diffulex then writes ``"?"``)."""

    block_id: int
    block_size: int
    num_mask_tokens: int
    is_active: bool = True
    is_dummy: bool = False
    progress: float = 0.0


@dataclass
class DllmBlockBuffer:
    dllm_blocks: list


class DllmReq:
    """The attributes Diffulex's ``record_step`` reads, set by the scripted engine each step."""

    def __init__(self, req_id: int, block_size: int = 4) -> None:
        self.req_id = req_id
        self.block_size = block_size
        self.new_tokens = 0
        self.is_prefilling = True
        self.running_sequence: list[int] | None = None
        self.dllm_block_buffer = DllmBlockBuffer([])
        self.truncated_response: list[int] = []
        self.full_response: list[int] = []
        self.is_truncated = False
        self.max_new_tokens_reached = False
        self.max_model_len_reached = False
        self.max_nfe_reached = False
        self.max_repetition_run_reached = False
        self.eos_token_generated = False
        self.completion_reason: str | None = None

    def set(self, **attrs) -> DllmReq:
        for name, value in attrs.items():
            setattr(self, name, value)
        return self


def blocks(*specs) -> DllmBlockBuffer:
    return DllmBlockBuffer([DllmBlock(i, 4, m, s) for i, m, s in specs])


A_S1 = [1, 2, 3, 4, 5, 6, M, M]
A_S2 = [5, 6, M, M]
A_S4 = [5, 6, 7, 8, 2, M, M, M]
B_S2 = [20, M, M, M, M, M, M, M]
B_S4 = [20, 21, 22, M]
B_S5 = [20, 21, 22, 23, 24, 25, 26, M]
C_S4 = [30, 31, 32, 33, 34]
C_S5 = [40, M, M, M]
C_S6 = [40, M, M, M]


def run_script(out: GenerationOutputs) -> dict[str, DllmReq]:
    """Three prompts; engine request ids 10 and 11 are mapped to prompts 0 and 1, id 2 is unmapped
    (so it is prompt 2), id 7 is unmapped and out of range (skipped). Steps (block size 4):

    S1 0.5 s  A prefill, running 8 tokens, 0 new
    S2 0.25 s A decode 2 new; B prefill by ``_last_execution_is_prefill`` (its ``is_prefilling``
              has already moved on to False) with ``_last_execution_prefill_tokens`` 12 (its
              running sequence is 8 long by now), 1 new token in its prefill step: a mixed step
    S3 0.125  no request
    S4 1.0 s  A decode 3 new, finishes at EOS; B decode 2 new; C prefill, running 5 tokens, 0 new;
              X (id 7) decode 4 new
    S5 0.5 s  B decode 4 new, finishes at max new tokens; C decode 1 new; X decode 2 new
    S6 0.75 s C decode 0 new, finishes at max NFE
    """
    mapping = {10: 0, 11: 1}
    a, b, c, x = DllmReq(10), DllmReq(11), DllmReq(2), DllmReq(7)
    a.set(is_prefilling=True, new_tokens=0, running_sequence=list(A_S1),
          dllm_block_buffer=blocks((0, 0, BlockStatus.IN_CACHE), (1, 2, BlockStatus.ACTIVE)))
    out.record_step([a], 0.5, mapping)

    a.set(is_prefilling=False, new_tokens=2, running_sequence=list(A_S2), truncated_response=[5, 6],
          full_response=[5, 6], dllm_block_buffer=blocks((2, 2, BlockStatus.ACTIVE), (3, 4, BlockStatus.DUMMY)))
    b.set(is_prefilling=False, _last_execution_is_prefill=True, _last_execution_prefill_tokens=12, new_tokens=1,
          running_sequence=list(B_S2), truncated_response=[20], full_response=[20],
          dllm_block_buffer=blocks((0, 3, BlockStatus.ACTIVE), (1, 4, BlockStatus.DUMMY)))
    out.record_step([a, b], 0.25, mapping)

    out.record_step([], 0.125, mapping)

    a.set(new_tokens=3, running_sequence=list(A_S4), truncated_response=[5, 6, 7, 8],
          full_response=[5, 6, 7, 8, 2], eos_token_generated=True, is_truncated=True, completion_reason="eos",
          dllm_block_buffer=blocks((2, 0, BlockStatus.TO_CACHE), (3, 3, BlockStatus.ACTIVE)))
    b.set(_last_execution_is_prefill=False, _last_execution_prefill_tokens=0, new_tokens=2,
          running_sequence=list(B_S4), truncated_response=[20, 21, 22], full_response=[20, 21, 22])
    c.set(is_prefilling=True, new_tokens=0, running_sequence=list(C_S4),
          dllm_block_buffer=DllmBlockBuffer([StatuslessBlock(5, 4, 4)]))
    x.set(is_prefilling=False, new_tokens=4, running_sequence=[M] * 4)
    out.record_step([a, b, c, x], 1.0, mapping)

    b.set(new_tokens=4, running_sequence=list(B_S5), truncated_response=[20, 21, 22, 23, 24, 25, 26],
          full_response=[20, 21, 22, 23, 24, 25, 26], max_new_tokens_reached=True, is_truncated=True,
          completion_reason="max_new_tokens_reached")
    c.set(is_prefilling=False, new_tokens=1, running_sequence=list(C_S5), truncated_response=[40],
          full_response=[40])
    x.set(new_tokens=2)
    out.record_step([b, c, x], 0.5, mapping)

    c.set(new_tokens=0, running_sequence=list(C_S6), max_nfe_reached=True, completion_reason="max_nfe_reached")
    out.record_step([c], 0.75, mapping)
    return {"a": a, "b": b, "c": c, "x": x}


def scripted(caplog=None) -> GenerationOutputs:
    # wall clock: 0 at construction, then one reading per step that ran requests (S1 S2 S4 S5 S6)
    out = GenerationOutputs(3, clock=iter([0.0, 1.0, 2.0, 3.0, 4.0, 10.0]).__next__, save_trace=True)
    run_script(out)
    return out


# Per request, own steps only (step time, phase, new tokens):
#   A (prompt 0): S1 0.5 prefill 0 | S2 0.25 decode 2 | S4 1.0 decode 3
#       own time 1.75, generated 5, 3 steps, decode tokens 5 in 2 decode steps (TPF 2.5) and 1.25 s,
#       first token at 0.5+0.25 = 0.75, TPOT (1.75 - 0.75) / (5 - 1) = 0.25, final tokens [5, 6, 7, 8]: 4
#   B (prompt 1): S2 0.25 prefill 1 | S4 1.0 decode 2 | S5 0.5 decode 4
#       own time 1.75, generated 7, 3 steps, decode tokens 6 in 2 decode steps (TPF 3: the prefill
#       step's token is in neither) and 1.5 s, first token at 0.25, TPOT (1.75 - 0.25) / (7 - 1) = 0.25,
#       final tokens 7
#   C (prompt 2): S4 1.0 prefill 0 | S5 0.5 decode 1 | S6 0.75 decode 0
#       own time 2.25, generated 1, 3 steps, decode tokens 1 in 2 decode steps (TPF 0.5) and 1.25 s,
#       first token at 1.0+0.5 = 1.5, no TPOT (1 token), final tokens [40]: 1
# Batch (every request of a step, the skipped X included; S3 adds nothing):
#   steps 5 (S1 S2 S4 S5 S6); time 0.5+0.25+1.0+0.5+0.75 = 3.0
#   generated 0 + (2+1) + (3+2+0+4) + (4+1+2) + 0 = 19
#   prefill tokens: A 8 (S1) + B 12 (S2, from _last_execution_prefill_tokens) + C 5 (S4) = 25
#   prefill time: S1 + S2 + S4 = 0.5 + 0.25 + 1.0 = 1.75 (the mixed S2 and S4 count whole)
#   decode tokens: 2 (S2) + 3+2+4 (S4) + 4+1+2 (S5) + 0 (S6) = 18 (B's prefill token is not one)
#   decode time: S2 + S4 + S5 + S6 = 0.25 + 1.0 + 0.5 + 0.75 = 2.5


def test_seed_metrics_by_hand():
    out = scripted()
    assert out.batch_step_count == 5
    assert out.total_time == 3.0
    assert out.e2e_total_time == approx(1.75 + 1.75 + 2.25)
    assert out.batch_generated_tokens == 19
    assert (out.prefill_tokens, out.prefill_time) == (25, approx(1.75))
    assert (out.decode_tokens, out.decode_time) == (18, approx(2.5))
    assert out.tpf == approx((5 / 2 + 6 / 2 + 1 / 2) / 3)  # Diffulex's: decode tokens / decode steps
    assert out.ttft == approx((0.75 + 0.25 + 1.5) / 3)
    assert out.tpot == approx((0.25 + 0.25) / 2)  # C has one token: not counted
    assert out.throughput == approx(19 / 3.0)
    assert out.e2e_throughput == approx((4 + 7 + 1) / 3.0)
    assert out.prefill_throughput == approx(25 / 1.75)
    assert out.decode_throughput == approx(18 / 2.5)
    assert out.avg_e2e_tps == approx((4 / 1.75 + 7 / 1.75 + 1 / 2.25) / 3)
    assert out.avg_decode_tps == approx((5 / 1.25 + 6 / 1.5 + 1 / 1.25) / 3)


def test_our_definitions_beside_the_seed():
    out = scripted()
    # batch clock (all prompts arrive at 0): A's first token at end of S2 = 0.75, B's also 0.75
    # (it waited through S1), C's at end of S5 = 0.5+0.25+1.0+0.5 = 2.25
    assert [out.request_metrics(i)["batch_ttft"] for i in range(3)] == [approx(0.75), approx(0.75), approx(2.25)]
    assert out.batch_ttft == approx((0.75 + 0.75 + 2.25) / 3)
    # A: latency end of S4 = 1.75 -> (1.75 - 0.75) / 4; B: end of S5 = 2.25 -> (2.25 - 0.75) / 6
    assert out.batch_tpot == approx(((1.75 - 0.75) / 4 + (2.25 - 0.75) / 6) / 2)
    # token-weighted decode TPF: recorded tokens 5 + 7 + 1 = 13 over decode steps 2 + 2 + 2
    assert out.decode_tpf == approx(13 / 6)
    # split time: S1 prefill 0.5; S2 half each 0.125; S4 1 of 4 prefill 0.25, 0.75 decode; S5, S6 decode
    assert out.split_prefill_time == approx(0.5 + 0.125 + 0.25)
    assert out.split_decode_time == approx(0.125 + 0.75 + 0.5 + 0.75)
    assert out.split_prefill_throughput == approx(25 / 0.875)
    assert out.split_decode_throughput == approx(18 / 2.125)
    # wall clock 0 -> 10 for 13 recorded tokens
    assert out.wall_time == 10.0 and out.wall_throughput == approx(13 / 10)
    # B's token from its prefill step counts here (7 / 1.5), not in Diffulex's decode_tps (6 / 1.5)
    assert out.request_metrics(1)["generated_decode_tps"] == approx(7 / 1.5)
    assert out.request_metrics(1)["decode_tps"] == approx(6 / 1.5)
    m = out.metrics()
    assert m["tpf"] == out.tpf and m["decode_tpf"] == out.decode_tpf and m["skipped_requests"] == 2
    assert m["ttft_percentiles"]["p50"] == approx(0.75) and m["batch_ttft_percentiles"]["p50"] == approx(0.75)


def test_postfix_and_fast_postfix_strings():
    out = scripted()
    # tpf (2.5 + 3 + 0.5) / 3 = 2, ttft 2.5/3 = 0.833, tpot 0.25, e2eps 12/3 = 4, ptps 25/1.75 = 14.2857,
    # dtps 18/2.5 = 7.2
    assert out.postfix() == {"tpf": "2.00tok/step", "ttft": "0.83s", "tpot": "0.25s", "e2eps": "4.00tok/s",
                             "ptps": "14.29tok/s", "dtps": "7.20tok/s"}
    # the same tpf (Diffulex keeps it as a running sum), 18 / 2.5 = 7.2, 19 / 3.0 = 6.333
    assert out.fast_postfix() == {"tpf": "2.00tok/step", "dtps": "7.20tok/s", "e2eps": "6.33tok/s"}


def test_log_summary_lines(caplog):
    out = scripted()
    caplog.clear()
    with caplog.at_level(logging.INFO, logger="diffulex_core.output"):
        out.log_summary()
    rule = "--------------------------------"
    assert [r.getMessage() for r in caplog.records] == [
        rule, "Generation Outputs Summary:", rule,
        "Total Tokens: 12 toks",  # 4 + 7 + 1
        "Total NFEs: 5 nfes (steps)",
        "Total Time: 3.0 sec",
        "E2E Time: 5.75 sec",
        "TPF: 2.00 tok/step",
        "TTFT: 0.83 sec",
        "TPOT: 0.25 sec",
        "E2E Throughput: 4.00 tok/sec",
        "Prefill Throughput: 14.29 tok/sec",
        "Decode Throughput: 7.20 tok/sec",
        "Avg E2E TPS (per-sample mean): 2.24 tok/sec",  # (2.2857 + 4 + 0.4444) / 3
        "Avg Decode TPS (per-sample mean): 2.93 tok/sec",  # (4 + 4 + 0.8) / 3
        rule,
    ]
    assert all(r.levelno == logging.INFO for r in caplog.records)


def test_request_metrics_seed_keys():
    out = scripted()
    a, b, c = (out.request_metrics(i) for i in range(3))
    pick = ("tokens", "decode_tokens", "decode_steps", "tpf", "e2e_tps", "decode_tps")
    assert [a[k] for k in pick] == [4, 5, 2, approx(5 / 2), approx(4 / 1.75), approx(5 / 1.25)]
    assert [b[k] for k in pick] == [7, 6, 2, approx(6 / 2), approx(7 / 1.75), approx(6 / 1.5)]
    assert [c[k] for k in pick] == [1, 1, 2, approx(1 / 2), approx(1 / 2.25), approx(1 / 1.25)]
    assert (a["ttft"], b["ttft"], c["ttft"]) == (approx(0.75), approx(0.25), approx(1.5))
    assert (a["tpot"], b["tpot"], c["tpot"]) == (approx(0.25), approx(0.25), None)
    assert (a["prompt_tokens"], b["prompt_tokens"], c["prompt_tokens"]) == (8, 12, 5)


def test_trajectory_fields():
    out = scripted()
    a, b, c = out.trajectories
    assert (a.req_id, b.req_id, c.req_id) == (0, 1, 2)
    assert a.trajectory is a.steps and [len(t.trajectory) for t in (a, b, c)] == [3, 3, 3]
    assert a.token_ids == [5, 6, 7, 8] and a.full_token_ids == [5, 6, 7, 8, 2]
    assert b.token_ids == [20, 21, 22, 23, 24, 25, 26] and c.token_ids == [40]
    flags = ("is_truncated", "max_new_tokens_reached", "max_model_len_reached", "max_nfe_reached",
             "max_repetition_run_reached", "eos_token_generated", "completion_reason")
    assert [getattr(a, f) for f in flags] == [True, False, False, False, False, True, "eos"]
    assert [getattr(b, f) for f in flags] == [True, True, False, False, False, False, "max_new_tokens_reached"]
    assert [getattr(c, f) for f in flags] == [False, False, False, True, False, False, "max_nfe_reached"]
    assert a.finished and b.finished and c.finished
    assert [s.step_id for s in b.trajectory] == [0, 1, 2]  # index in the trajectory, as in Diffulex
    assert [s.batch_step for s in b.trajectory] == [1, 2, 3]  # S2, S4, S5 (the empty S3 is no step)
    assert [s.is_prefill for s in b.trajectory] == [True, False, False]  # _last_execution_is_prefill
    assert [s.num_generated_tokens for s in b.trajectory] == [1, 2, 4]
    assert [s.step_time for s in c.trajectory] == [1.0, 0.5, 0.75]
    assert [s.block_size for s in a.trajectory] == [4, 4, 4]
    assert [s.buffer_bids for s in a.trajectory] == [[0, 1], [2, 3], [2, 3]]
    assert out.skipped_requests == 2


def test_token_ids_follow_the_engine_every_step():
    out = GenerationOutputs(1)
    req = DllmReq(0).set(is_prefilling=False, new_tokens=2, running_sequence=[5, 6, M, M], truncated_response=[5, 6],
                         full_response=[5, 6], dllm_block_buffer=blocks((0, 2, BlockStatus.ACTIVE)))
    out.record_step([req], 0.1)
    t = out.trajectories[0]
    assert (t.token_ids, t.eos_token_generated, t.completion_reason, t.finished) == ([5, 6], False, None, False)
    req.truncated_response.append(7)  # the engine's own list: the trajectory kept a copy
    assert t.token_ids == [5, 6]
    req.set(new_tokens=1, truncated_response=[5, 6, 7], full_response=[5, 6, 7, 2], eos_token_generated=True,
            completion_reason="eos")
    out.record_step([req], 0.1)
    assert (t.token_ids, t.full_token_ids, t.eos_token_generated, t.finished) == ([5, 6, 7], [5, 6, 7, 2], True, True)


def test_running_token_ids_are_whole_lists_per_step():
    out = scripted()
    a, b, c = out.trajectories
    assert [s.running_token_ids for s in a.trajectory] == [A_S1, A_S2, A_S4]
    assert [s.running_token_ids for s in b.trajectory] == [B_S2, B_S4, B_S5]
    assert [s.running_token_ids for s in c.trajectory] == [C_S4, C_S5, C_S6]
    assert all(type(s.running_token_ids) is list for s in a.trajectory)
    assert b.trajectory[2].running_token_ids == B_S5 and b.trajectory[0].running_token_ids == B_S2  # any order
    assert all(s.snapshot is None for s in a.trajectory)  # stored as change sets
    assert a.trajectory[2].changed_positions == [2, 3, 4, 5, 6, 7]  # 7, 8 over masks, then 4 new positions


def test_block_trace_dicts_have_the_seed_keys():
    out = scripted()
    a, _, c = out.trajectories
    assert a.trajectory[1].block_trace == [
        {"block_id": 2, "is_active": True, "is_dummy": False, "num_mask_tokens": 2, "mask_ratio": 0.5,
         "progress": 0.5, "block_status": "BlockStatus.ACTIVE"},
        {"block_id": 3, "is_active": False, "is_dummy": True, "num_mask_tokens": 4, "mask_ratio": 1.0,
         "progress": 0.0, "block_status": "BlockStatus.DUMMY"},
    ]
    assert c.trajectory[0].block_trace == [
        {"block_id": 5, "is_active": True, "is_dummy": False, "num_mask_tokens": 4, "mask_ratio": 1.0,
         "progress": 0.0, "block_status": "?"},  # a block without a status
    ]


def test_block_status_none_is_written_as_diffulex_writes_it():
    out = GenerationOutputs(1, save_trace=True)
    buffer = DllmBlockBuffer([DllmBlock(0, 4, 4, None)])
    req = DllmReq(0).set(new_tokens=0, running_sequence=[M], dllm_block_buffer=buffer)
    out.record_step([req], 0.1)
    [block] = out.trajectories[0].trajectory[0].block_trace
    assert block["block_status"] == "None"  # str(None); "?" is only for a block without the attribute


def test_both_shapes_in_one_step():
    out = GenerationOutputs(2)
    diffulex = DllmReq(0).set(is_prefilling=True, new_tokens=0, running_sequence=[1, 2, 3],
                              dllm_block_buffer=blocks((0, 3, BlockStatus.ACTIVE)))
    ours = Req(1, num_generated_tokens=2, running_token_ids=[7, 8], is_finished=True, completion_reason="eos",
               response_token_ids=[7, 8, 2, 9])
    out.record_step([diffulex, ours], 0.5)
    # prefill tokens: the Diffulex request's running sequence (3); decode tokens: ours (2); mixed step whole in both
    assert (out.prefill_tokens, out.decode_tokens, out.prefill_time, out.decode_time) == (3, 2, 0.5, 0.5)
    t = out.trajectories[1]
    # an EngineRequest's response held an EOS: the seed's flags say so unless the request has its own
    assert (t.token_ids, t.is_truncated, t.eos_token_generated, t.max_new_tokens_reached) == ([7, 8], True, True, False)
    ours.max_new_tokens_reached = True
    out2 = GenerationOutputs(2)
    out2.record_step([ours], 0.5)
    assert out2.trajectories[1].max_new_tokens_reached is True


def test_traces_off_keep_buffer_ids(monkeypatch):
    monkeypatch.setenv("DIFFULEX_SAVE_TRACE", "0")
    out = GenerationOutputs(3)
    run_script(out)
    step = out.trajectories[0].trajectory[1]
    assert step.block_trace == [] and step.buffer_bids == [2, 3]


def test_unmapped_and_out_of_range_requests(caplog):
    with caplog.at_level(logging.WARNING, logger="diffulex_core.output"):
        out = scripted()
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "request 7 maps to prompt 7, not one of the 3 prompts" in warnings[0].getMessage()
    assert out.skipped_requests == 2  # X in S4 and S5
    assert out.trajectories[2].nfe == 3  # req_id 2, not in the mapping, is prompt 2
    with caplog.at_level(logging.WARNING, logger="diffulex_core.output"):
        scripted()
    assert len([r for r in caplog.records if r.levelno == logging.WARNING]) == 2  # once per GenerationOutputs


def test_step_without_requests_adds_nothing():
    readings = []

    def clock():
        readings.append(len(readings))
        return float(len(readings))

    out = GenerationOutputs(1, clock=clock)
    req = DllmReq(0).set(new_tokens=1, running_sequence=[M], dllm_block_buffer=blocks((0, 1, BlockStatus.ACTIVE)))
    out.record_step([req], 0.5)
    before = out.metrics()
    out.record_step([], 0.25)
    assert out.metrics() == before and len(readings) == 2  # no time, no step, not even a clock reading


def test_unreadable_requests_are_a_type_error_and_change_nothing():
    out = GenerationOutputs(2)

    class Neither:
        req_id = 0
        is_prefill = False

    with pytest.raises(TypeError, match=r"neither a Diffulex request \(missing new_tokens, dllm_block_buffer\) "
                                        r"nor an EngineRequest \(missing num_prompt_tokens, num_generated_tokens"):
        out.record_step([Neither()], 0.1)
    half = DllmReq(1)
    del half.truncated_response
    good = DllmReq(0).set(running_sequence=[1, 2], dllm_block_buffer=blocks((0, 0, BlockStatus.IN_CACHE)))
    with pytest.raises(TypeError, match="looks like a Diffulex request .* lacks truncated_response"):
        out.record_step([good, half], 0.1)
    assert out.num_steps == 0 and out.total_time == 0.0 and all(t.nfe == 0 for t in out.trajectories)


def test_empty_outputs_give_zero_floats():
    out = GenerationOutputs(2)
    names = ("tpf", "ttft", "tpot", "throughput", "e2e_throughput", "prefill_throughput", "decode_throughput",
             "avg_e2e_tps", "avg_decode_tps", "total_time", "e2e_total_time", "prefill_time", "decode_time")
    for name in names:
        value = getattr(out, name)
        assert value == 0.0 and isinstance(value, float), name
        assert "%.2f" % value == "0.00"
    assert out.batch_step_count == 0 and out.prefill_tokens == 0 and out.decode_tokens == 0
    assert out.postfix() == {"tpf": "0.00tok/step", "ttft": "0.00s", "tpot": "0.00s", "e2eps": "0.00tok/s",
                             "ptps": "0.00tok/s", "dtps": "0.00tok/s"}
    assert out.fast_postfix() == {"tpf": "0.00tok/step", "dtps": "0.00tok/s", "e2eps": "0.00tok/s"}
    assert out.to_benchmark_format() == [{"text": "", "full_text": "", "token_ids": [], "nfe": 0}] * 2


def test_seed_keyword_construction():
    trace = [{"block_id": 3, "is_active": True, "is_dummy": False, "num_mask_tokens": 1, "mask_ratio": 0.25,
              "progress": 0.75, "block_status": "BlockStatus.ACTIVE"}]
    step = ReqStep(step_id=0, step_time=0.5, is_prefill=False, num_generated_tokens=3, running_token_ids=[7, 8, M],
                   block_size=4, buffer_bids=[3], block_trace=trace)
    assert step.running_token_ids == [7, 8, M] and step.buffer_bids == [3] and step.block_trace == trace
    traj = ReqTrajectory(req_id=4, token_ids=[7, 8], trajectory=[step], is_truncated=False,
                         max_new_tokens_reached=False, max_model_len_reached=False, max_nfe_reached=False,
                         max_repetition_run_reached=False, eos_token_generated=False, completion_reason=None,
                         text=None, full_token_ids=[], full_text=None)
    assert (traj.req_id, traj.prompt_id, traj.trajectory, traj.nfe) == (4, 4, [step], 1)
    assert (traj.generated_tokens, traj.first_token_step_time, traj.decode_tokens) == (3, 0.5, 3)
    with pytest.raises(TypeError, match="not both"):
        ReqTrajectory(req_id=1, prompt_id=1)


def test_outputs_survive_pickling():
    out = GenerationOutputs(3, save_trace=True)  # Diffulex's data-parallel workers send outputs through pipes
    run_script(out)
    back = pickle.loads(pickle.dumps(out))
    assert [s.running_token_ids for s in back.trajectories[1].trajectory] == [B_S2, B_S4, B_S5]
    assert back.trajectories[0].trajectory[1].block_trace == out.trajectories[0].trajectory[1].block_trace
    assert back.postfix() == out.postfix()


# --------------------------------------------------------------------------- text


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "hello": 3, "world": 4, "again": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def test_convert_to_text_has_the_seed_semantics():
    out = GenerationOutputs(4)
    buffer = blocks((0, 0, BlockStatus.IN_CACHE))
    # prompt 0: truncated response without EOS, full response with EOS and more after it
    r0 = DllmReq(0).set(new_tokens=4, running_sequence=[3], dllm_block_buffer=buffer, truncated_response=[3, 4],
                        full_response=[3, 4, 2, 5])
    # prompt 1: an EOS inside token_ids itself: text is cut at the EOS text, special tokens were kept
    r1 = DllmReq(1).set(new_tokens=3, running_sequence=[3], dllm_block_buffer=buffer, truncated_response=[3, 2, 4],
                        full_response=[])
    out.record_step([r0, r1], 0.1)
    # prompt 2: no full response at all: full_text is decoded from token_ids
    out.trajectories[2].token_ids = [5]
    # prompt 3: never ran
    before = out.to_benchmark_format()
    assert [b["text"] for b in before] == ["", "", "", ""] and [b["full_text"] for b in before] == ["", "", "", ""]
    out.convert_to_text(make_tokenizer())
    texts = [(t.text, t.full_text) for t in out.trajectories]
    assert texts == [("hello world", "hello world </s> again"), ("hello ", "hello </s> world"), ("again", "again"),
                     ("", "")]
    assert out.to_benchmark_format()[0] == {"text": "hello world", "full_text": "hello world </s> again",
                                            "token_ids": [3, 4], "nfe": 1}


class ListTokenizer:
    """``decode`` takes no keywords; ``convert_ids_to_tokens`` takes the whole list (None for unknown ids)."""

    vocab = {3: "hel", 4: "lo", 2: "</s>"}

    def __init__(self) -> None:
        self.calls = []

    def decode(self, ids):
        raise AssertionError("never reached: called with a keyword, it raises TypeError first")

    def convert_ids_to_tokens(self, ids):
        self.calls.append(ids)
        return [self.vocab.get(i) for i in ids]

    def convert_tokens_to_string(self, tokens):
        return "|".join(tokens)


class OneIdTokenizer(ListTokenizer):
    """``convert_ids_to_tokens`` takes one id (a list is unhashable: TypeError), unknown ids raise."""

    def convert_ids_to_tokens(self, token_id):
        self.calls.append(token_id)
        return self.vocab[token_id]


def test_decode_robust_converts_the_whole_list_first():
    tok = ListTokenizer()
    assert decode_token_ids_robust(tok, [3, 77, 4, 2]) == "hel||lo|</s>"  # None -> ""
    assert tok.calls == [[3, 77, 4, 2]]  # one call, with the list


def test_decode_robust_goes_id_by_id_when_the_list_call_fails():
    tok = OneIdTokenizer()
    assert decode_token_ids_robust(tok, [3, 77, 4]) == "hel||lo"  # unknown 77 -> ""
    assert tok.calls == [[3, 77, 4], 3, 77, 4]


def test_decode_robust_empty_and_none():
    assert decode_token_ids_robust(ListTokenizer(), None) == ""
    assert decode_token_ids_robust(ListTokenizer(), []) == ""
