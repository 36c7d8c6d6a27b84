"""Diffulex's own ``test/python/engine/test_generation_outputs.py`` (commit 184ba97), scenario by
scenario, against ``diffulex_core.output``; then TPF as Diffulex defines it, on its edge cases.

Requests are built as that test builds them: ``SimpleNamespace`` objects with the attributes of
Diffulex's ``DllmReq`` (no ``_last_execution_*`` attributes unless a test says so).

Diffulex's TPF (``diffulex.utils.output``): per request, the tokens of its decode steps / its
decode steps (a prefill step counts in neither); ``tpf`` is the mean of that over requests with at
least one decode step, kept as a running sum; ``fast_postfix()["tpf"]`` is that same ``tpf``.
"""

from __future__ import annotations

from types import SimpleNamespace

from diffulex_core.output import GenerationOutputs
from engine_request import Req


def dllm_req(req_id: int, *, is_prefilling: bool, new_tokens: int, running_sequence=(), block_size: int = 4,
             dllm_block_buffer=None, truncated_response=(), full_response=(), **flags) -> SimpleNamespace:
    """A request shaped like Diffulex's ``DllmReq``, as Diffulex's test writes them out in full."""
    fields = dict(is_truncated=False, max_new_tokens_reached=False, max_model_len_reached=False,
                  max_nfe_reached=False, max_repetition_run_reached=False, eos_token_generated=False,
                  completion_reason=None)
    fields.update(flags)
    return SimpleNamespace(req_id=req_id, is_prefilling=is_prefilling, new_tokens=new_tokens,
                           running_sequence=list(running_sequence), block_size=block_size,
                           dllm_block_buffer=dllm_block_buffer or SimpleNamespace(dllm_blocks=[]),
                           truncated_response=list(truncated_response), full_response=list(full_response), **fields)


# --------------------------------------------------------------------------- Diffulex's test, scenario by scenario


def test_empty_prefill_suffix():
    outputs = GenerationOutputs(1)
    outputs.record_step([dllm_req(0, is_prefilling=True, new_tokens=0, running_sequence=[])], step_time=1.0)
    assert outputs.prefill_throughput == 0
    assert outputs.postfix()["ptps"] == "0.00tok/s"


def test_decode_throughput_uses_batch_time():
    outputs = GenerationOutputs(2)
    shared = SimpleNamespace(dllm_blocks=[])
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=1, running_sequence=[1, 2, 3, 4],
                                  dllm_block_buffer=shared),
                         dllm_req(1, is_prefilling=False, new_tokens=1, running_sequence=[5, 6, 7, 8],
                                  dllm_block_buffer=shared)], step_time=1.0)
    assert outputs.decode_throughput == 2.0
    assert outputs.tpf == 1.0
    assert outputs.throughput == 2.0
    assert outputs.total_time == 1.0
    assert outputs.postfix()["tpf"] == "1.00tok/step"
    assert outputs.postfix()["dtps"] == "2.00tok/s"
    # was "2.00": 2 tokens of the batch / 1 step; Diffulex's is tpf, the mean of 1/1 and 1/1
    assert outputs.fast_postfix()["tpf"] == "1.00tok/step"
    assert outputs.fast_postfix()["dtps"] == "2.00tok/s"


def test_prefill_throughput_uses_batch_time():
    # Diffulex's own code fails this at 184ba97 (it reads only _last_execution_prefill_tokens,
    # which these requests lack); ours counts len(running_sequence) then, as its test expects
    outputs = GenerationOutputs(2)
    shared = SimpleNamespace(dllm_blocks=[])
    outputs.record_step([dllm_req(0, is_prefilling=True, new_tokens=0, running_sequence=[1, 2, 3, 4],
                                  dllm_block_buffer=shared),
                         dllm_req(1, is_prefilling=True, new_tokens=0, running_sequence=[5, 6, 7, 8],
                                  dllm_block_buffer=shared)], step_time=2.0)
    assert outputs.prefill_throughput == 4.0  # 8 tokens / 2 s
    assert outputs.total_time == 2.0
    assert outputs.postfix()["ptps"] == "4.00tok/s"


def test_latency_metrics_are_per_request_means():
    outputs = GenerationOutputs(2)
    shared = SimpleNamespace(dllm_blocks=[])
    outputs.record_step([dllm_req(0, is_prefilling=True, new_tokens=0, running_sequence=[1, 2], block_size=2,
                                  dllm_block_buffer=shared),
                         dllm_req(1, is_prefilling=True, new_tokens=0, running_sequence=[3, 4], block_size=2,
                                  dllm_block_buffer=shared)], step_time=0.5)
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=2, running_sequence=[1, 2], block_size=2,
                                  dllm_block_buffer=shared, truncated_response=[10, 11], full_response=[10, 11]),
                         dllm_req(1, is_prefilling=False, new_tokens=4, running_sequence=[3, 4], block_size=2,
                                  dllm_block_buffer=shared, truncated_response=[12, 13, 14, 15],
                                  full_response=[12, 13, 14, 15])], step_time=1.0)
    # per request 2/1 and 4/1 (the prefill step counts in neither): mean 3; was (2/2 + 4/2) / 2 = 1.5
    assert outputs.tpf == 3.0
    assert outputs.ttft == 1.5
    assert outputs.throughput == 4.0  # 6 tokens / 1.5 s
    assert outputs.postfix()["tpf"] == "3.00tok/step"
    assert outputs.postfix()["ttft"] == "1.50s"
    assert outputs.postfix()["dtps"] == "6.00tok/s"
    assert outputs.fast_postfix()["tpf"] == "3.00tok/step"  # was "2.00": 6 tokens / 3 steps
    assert outputs.fast_postfix()["dtps"] == "6.00tok/s"


def test_benchmark_format_uses_nfe():
    outputs = GenerationOutputs(1)
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=1, running_sequence=[1, 2, 3, 4],
                                  truncated_response=[42], full_response=[42], is_truncated=True,
                                  max_nfe_reached=True, completion_reason="max_nfe_reached")], step_time=1.0)
    assert outputs.to_benchmark_format() == [{"text": "", "full_text": "", "token_ids": [42], "nfe": 1}]


# --------------------------------------------------------------------------- TPF: Diffulex's definition


def test_prefill_step_counts_in_neither_tokens_nor_steps():
    outputs = GenerationOutputs(1)
    outputs.record_step([dllm_req(0, is_prefilling=True, new_tokens=0, running_sequence=[1, 2, 3])], 0.1)
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=2, running_sequence=[1, 2, 3])], 0.1)
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=2, running_sequence=[1, 2, 3])], 0.1)
    r = outputs.request_metrics(0)
    assert (r["decode_tokens"], r["decode_steps"], r["nfe"]) == (4, 2, 3)
    assert r["tpf"] == 2.0 and outputs.tpf == 2.0  # was 4 / 3 = 1.33
    assert outputs.postfix()["tpf"] == outputs.fast_postfix()["tpf"] == "2.00tok/step"


def test_tokens_finalized_in_a_prefill_step_are_not_in_tpf_but_are_in_decode_tpf():
    outputs = GenerationOutputs(1)
    # prefill by _last_execution_is_prefill (is_prefilling has moved on), 3 tokens finalized in it
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=3, running_sequence=[1, 2],
                                  _last_execution_is_prefill=True, _last_execution_prefill_tokens=2)], 0.1)
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=1, running_sequence=[1, 2])], 0.1)
    r = outputs.request_metrics(0)
    assert r["tpf"] == 1.0 and outputs.tpf == 1.0  # Diffulex's: 1 decode token / 1 decode step (was 4 / 2)
    assert r["decode_tpf"] == 4.0 and outputs.decode_tpf == 4.0  # ours: every generated token / decode steps


def test_requests_without_a_decode_step_are_left_out_of_the_mean():
    outputs = GenerationOutputs(3)
    outputs.record_step([dllm_req(0, is_prefilling=True, new_tokens=0, running_sequence=[1]),
                         dllm_req(1, is_prefilling=True, new_tokens=2, running_sequence=[1])], 0.1)
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=3, running_sequence=[1]),
                         dllm_req(1, is_prefilling=True, new_tokens=0, running_sequence=[1])], 0.1)
    # request 0: 3 / 1; request 1 only prefilled (its tokens came in prefill steps); request 2 never ran
    assert [outputs.request_metrics(i)["tpf"] for i in range(3)] == [3.0, 0.0, 0.0]
    assert outputs.tpf == 3.0  # not (3 + 0 + 0) / 3, nor (3/2 + 2/2) / 2 as before
    assert outputs.fast_postfix()["tpf"] == "3.00tok/step"


def test_decode_step_without_new_tokens_still_counts_as_a_step():
    outputs = GenerationOutputs(1)
    outputs.record_step([dllm_req(0, is_prefilling=True, new_tokens=0, running_sequence=[1])], 0.1)
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=3, running_sequence=[1])], 0.1)
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=0, running_sequence=[1])], 0.1)
    assert outputs.request_metrics(0)["tpf"] == 1.5 and outputs.tpf == 1.5  # 3 / 2 (was 3 / 3)


def test_skipped_requests_do_not_count_in_tpf():
    outputs = GenerationOutputs(1)
    # request 5 maps to no prompt: Diffulex counts it in the batch counters, never in TPF
    outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=2, running_sequence=[1]),
                         dllm_req(5, is_prefilling=False, new_tokens=8, running_sequence=[1])], 0.1)
    assert outputs.skipped_requests == 1 and outputs.batch_generated_tokens == 10
    assert outputs.tpf == 2.0
    assert outputs.fast_postfix()["tpf"] == "2.00tok/step"  # was 10 tokens / 1 step


def test_tpf_is_diffulex_running_sum_to_the_last_bit():
    # Diffulex keeps sum(per-request TPF) by adding (new TPF - old TPF) at each decode step.
    # Request 0 decodes 4, 1, 3 and request 1 decodes 4, 4, 3, in one batch: 8/3 and 11/3, whose
    # plain mean is 3.1666666666666665; the running sum ends one bit lower, and Diffulex's
    # GenerationOutputs (184ba97) gives 3.166666666666666 on this very script.
    outputs = GenerationOutputs(2)
    for a, b in ((4, 4), (1, 4), (3, 3)):
        outputs.record_step([dllm_req(0, is_prefilling=False, new_tokens=a, running_sequence=[1]),
                             dllm_req(1, is_prefilling=False, new_tokens=b, running_sequence=[1])], 0.1)
    assert outputs.tpf == 3.166666666666666
    assert outputs.tpf != (8 / 3 + 11 / 3) / 2


def test_engine_requests_follow_the_same_definition():
    outputs = GenerationOutputs(1)
    outputs.record_step([Req(0, is_prefill=True, num_generated_tokens=1)], 0.1)
    outputs.record_step([Req(0, num_generated_tokens=2)], 0.1)
    outputs.record_step([Req(0, num_generated_tokens=4)], 0.1)
    assert outputs.request_metrics(0)["tpf"] == 3.0 and outputs.tpf == 3.0  # 6 / 2 (was 7 / 3)
    assert outputs.decode_tpf == 3.5  # 7 / 2


def test_only_prefill_steps_give_zero():
    outputs = GenerationOutputs(2)
    outputs.record_step([dllm_req(0, is_prefilling=True, new_tokens=2, running_sequence=[1])], 0.1)
    # no request has a decode step: 0.0, as Diffulex (it was 2 / 1); zero prompts: tests/test_output.py
    assert outputs.tpf == 0.0 and isinstance(outputs.tpf, float)
    assert outputs.request_metrics(0)["tpf"] == 0.0
    assert outputs.fast_postfix()["tpf"] == outputs.postfix()["tpf"] == "0.00tok/step"
