"""Generation outputs and metrics, on hand-computed scenarios (see docs/metrics.md)."""

from __future__ import annotations

import json

import pytest

from diffulex_core.output import EngineRequest, GenerationOutputs, decode_token_ids_robust
from engine_request import Req

MASK = 99


def approx(x):
    return pytest.approx(x, rel=1e-12, abs=1e-12)


def test_request_objects_satisfy_the_protocol():
    assert isinstance(Req(0), EngineRequest)


def single_request_outputs():
    out = GenerationOutputs(1, clock=iter([0.0, 1.0, 2.0, 3.0]).__next__)
    out.record_step([Req(0, is_prefill=True, running_token_ids=[MASK] * 8)], 0.5)
    out.record_step([Req(0, num_generated_tokens=4, running_token_ids=[5, 6, 7, 8] + [MASK] * 4)], 0.25)
    out.record_step([Req(0, num_generated_tokens=4, running_token_ids=[5, 6, 7, 8, 9, 2, 3, 3], is_finished=True,
                         completion_reason="eos", response_token_ids=[5, 6, 7, 8, 9, 2, 3, 3])], 0.25)
    return out


def test_single_request_metrics():
    out = single_request_outputs()
    r = out.request_metrics(0)
    # this package's definitions, under their own names
    assert r["batch_ttft"] == approx(0.75)  # prefill 0.5 + the first decode step 0.25
    assert r["latency"] == approx(1.0)
    assert r["batch_tpot"] == approx((1.0 - 0.75) / (8 - 1))
    assert (r["generated_tokens"], r["nfe"], r["decode_steps"], r["decode_tpf"]) == (8, 3, 2, 4.0)
    assert r["batch_e2e_tps"] == approx(8.0) and r["generated_decode_tps"] == approx(16.0)
    assert out.decode_tpf == 4.0 and out.batch_ttft == approx(0.75) and out.batch_tpot == approx(0.25 / 7)
    assert out.split_prefill_throughput == approx(10 / 0.5) and out.split_decode_throughput == approx(8 / 0.5)
    assert out.wall_throughput == approx(8 / 3.0)  # clock: 0.0 at creation, 3.0 after the last step
    assert out.avg_batch_e2e_tps == approx(8.0) and out.avg_generated_decode_tps == approx(16.0)
    # Diffulex's definitions under its names: one request that ran every step, so its own clock is
    # the batch clock; tokens are the 5 before the EOS; TPF is decode tokens / decode steps
    assert (r["tokens"], r["decode_tokens"], r["tpf"]) == (5, 8, 4.0)
    assert r["ttft"] == approx(0.75) and r["tpot"] == approx(0.25 / 7)
    assert r["e2e_tps"] == approx(5 / 1.0) and r["decode_tps"] == approx(8 / 0.5)
    assert out.tpf == 4.0 and out.ttft == approx(0.75) and out.tpot == approx(0.25 / 7)
    assert out.throughput == approx(8.0)
    assert out.prefill_throughput == approx(10 / 0.5) and out.decode_throughput == approx(8 / 0.5)
    assert out.e2e_throughput == approx(5 / 1.0)  # final tokens / step time
    assert out.avg_e2e_tps == approx(5.0) and out.avg_decode_tps == approx(16.0)


def test_eos_inside_the_response_cuts_tokens_but_keeps_the_full_response():
    t = single_request_outputs().trajectories[0]
    assert t.token_ids == [5, 6, 7, 8, 9]
    assert t.full_token_ids == [5, 6, 7, 8, 9, 2, 3, 3]
    assert t.truncated_at_eos and t.finished and t.completion_reason == "eos"
    d = t.to_dict()
    assert d["full_token_ids"] == [5, 6, 7, 8, 9, 2, 3, 3] and "full_text" in d


def test_prefill_only_steps_have_no_token_metrics():
    out = GenerationOutputs(1)
    out.record_step([Req(0, is_prefill=True, num_prompt_tokens=6)], 0.2)
    out.record_step([Req(0, is_prefill=True, num_prompt_tokens=6)], 0.3)  # chunked prefill: prompt counted once
    r = out.request_metrics(0)
    assert (r["batch_ttft"], r["batch_tpot"], r["decode_tpf"], r["generated_decode_tps"]) == (None, None, None, None)
    assert (r["ttft"], r["tpot"]) == (None, None)
    assert (r["tpf"], r["decode_tps"], r["e2e_tps"]) == (0.0, 0.0, 0.0)  # Diffulex's keys: 0.0 without data
    assert out.prefill_throughput == approx(6 / 0.5) and out.split_prefill_throughput == approx(6 / 0.5)
    assert out.split_decode_throughput is None and out.decode_throughput == 0.0 and out.throughput == 0.0
    assert out.ttft_percentiles() == {"p50": None, "p90": None, "p99": None}
    assert out.batch_ttft_percentiles() == {"p50": None, "p90": None, "p99": None}


def test_step_mixing_prefill_and_decode_splits_its_time_by_requests():
    out = GenerationOutputs(2)
    out.record_step([Req(0, is_prefill=True, num_prompt_tokens=8)], 0.1)
    out.record_step([Req(0, num_generated_tokens=3), Req(1, is_prefill=True, num_prompt_tokens=12)], 0.4)
    out.record_step([Req(1, num_generated_tokens=5)], 0.2)
    assert out.split_prefill_time == approx(0.1 + 0.2) and out.split_decode_time == approx(0.2 + 0.2)
    assert out.split_prefill_throughput == approx(20 / 0.3)
    assert out.split_decode_throughput == approx(8 / 0.4)
    assert out.request_metrics(0)["batch_ttft"] == approx(0.5)
    assert out.request_metrics(1)["batch_ttft"] == approx(0.7)  # it waited through step 1
    assert out.request_metrics(0)["generated_decode_tps"] == approx(3 / 0.4)  # its decode step lasted the whole 0.4 s
    # Diffulex's: the mixed step counts whole toward both phases; TTFT is on the request's own steps
    assert out.prefill_time == approx(0.1 + 0.4) and out.decode_time == approx(0.4 + 0.2)
    assert out.prefill_throughput == approx(20 / 0.5) and out.decode_throughput == approx(8 / 0.6)
    assert out.request_metrics(0)["ttft"] == approx(0.5)
    assert out.request_metrics(1)["ttft"] == approx(0.6)  # its own steps: 0.4 + 0.2
    assert out.ttft == approx((0.5 + 0.6) / 2) and out.batch_ttft == approx((0.5 + 0.7) / 2)
    assert out.request_metrics(0)["decode_tps"] == approx(3 / 0.4)


def test_one_token_request_has_ttft_but_no_tpot():
    out = GenerationOutputs(1)
    out.record_step([Req(0, num_generated_tokens=1, is_finished=True, response_token_ids=[7])], 0.3)
    r = out.request_metrics(0)
    assert r["ttft"] == approx(0.3) and r["tpot"] is None
    assert r["batch_ttft"] == approx(0.3) and r["batch_tpot"] is None
    assert out.batch_tpot is None and out.batch_tpot_percentiles()["p50"] is None
    assert out.tpot == 0.0 and out.tpot_percentiles()["p50"] is None


def test_prompt_id_mapping():
    out = GenerationOutputs(2)
    mapping = {100: 1, 101: 0}
    out.record_step([Req(100, num_generated_tokens=2), Req(101, num_generated_tokens=5)], 1.0, mapping)
    assert out.trajectories[1].generated_tokens == 2 and out.trajectories[0].generated_tokens == 5
    with pytest.raises(KeyError):
        out.record_step([Req(102)], 1.0, mapping)
    with pytest.raises(IndexError, match="outside 0..1"):
        out.record_step([Req(5)], 1.0)


def test_zero_requests():
    out = GenerationOutputs(0)
    out.record_step([], 0.1)
    m = out.metrics()
    assert m["generated_tokens"] == 0 and m["decode_tpf"] is None and m["batch_ttft"] is None
    assert m["tpf"] == 0.0 and m["ttft"] == 0.0 and m["throughput"] == 0.0
    assert m["num_steps"] == 0 and m["step_time"] == 0.0  # a step with no request adds nothing
    assert out.to_benchmark_format() == [] and "0 prompts" in out.summary()


def test_percentiles_and_summary():
    out = GenerationOutputs(3)
    out.record_step([Req(0, num_generated_tokens=1), Req(1), Req(2)], 1.0)
    out.record_step([Req(1, num_generated_tokens=1), Req(2)], 1.0)
    out.record_step([Req(2, num_generated_tokens=1)], 2.0)
    # every request ran from step 1, so its own clock is the batch clock: both give 1, 2, 4 s
    assert out.batch_ttft_percentiles() == {"p50": approx(2.0), "p90": approx(3.6), "p99": approx(3.96)}
    assert out.ttft_percentiles() == {"p50": approx(2.0), "p90": approx(3.6), "p99": approx(3.96)}
    assert "TTFT 2333.33 ms" in out.summary() and "batch clock 2333.33 ms" in out.summary()


def test_bad_step_time_is_refused():
    with pytest.raises(ValueError, match="step_time"):
        GenerationOutputs(1).record_step([Req(0)], -1.0)


def test_running_sequence_is_stored_as_changes_and_rebuilt_exactly():
    sequences = [[MASK] * 4, [5, MASK, MASK, MASK], [5, MASK, 7, MASK], [5, 6, 7, MASK, MASK, MASK, MASK, MASK],
                 [5, 6, 7, 8, 9, MASK, MASK, MASK], [5, 6, 7]]
    compact, full = GenerationOutputs(1), GenerationOutputs(1, keep_snapshots=True)
    for seq in sequences:
        for out in (compact, full):
            out.record_step([Req(0, running_token_ids=list(seq))], 0.1)
    steps = compact.trajectories[0].steps
    assert [s.changed_positions for s in steps[:3]] == [[0, 1, 2, 3], [0], [2]]
    assert all(s.snapshot is None for s in steps)
    for k, seq in enumerate(sequences):
        assert compact.trajectories[0].running_token_ids(k) == seq
        assert full.trajectories[0].steps[k].snapshot.tolist() == seq
        assert full.trajectories[0].steps[k].running_token_ids == seq
    # rebuilt on access, in any order (the replay cache must not leak between steps)
    for k in (5, 2, 3, 0, 4, 1, 5):
        assert steps[k].running_token_ids == sequences[k]


@pytest.mark.parametrize(("env", "kept"), [("1", True), ("0", False), (None, True)])
def test_block_traces_follow_diffulex_save_trace(monkeypatch, env, kept):
    if env is None:
        monkeypatch.delenv("DIFFULEX_SAVE_TRACE", raising=False)
    else:
        monkeypatch.setenv("DIFFULEX_SAVE_TRACE", env)
    trace = [{"block_id": 0, "active": True, "dummy": False, "masked_count": 3, "mask_ratio": 0.75,
              "progress": 0.25, "status": "decoding", "scratch": "not kept"}]
    out = GenerationOutputs(1)
    out.record_step([Req(0, block_trace=trace)], 0.1)
    step = out.trajectories[0].steps[0]
    if kept:
        assert step.trace_dicts() == [{k: v for k, v in trace[0].items() if k != "scratch"}]
        assert step.block_trace == [{"block_id": 0, "is_active": True, "is_dummy": False, "num_mask_tokens": 3,
                                     "mask_ratio": 0.75, "progress": 0.25, "block_status": "decoding"}]
    else:
        assert step.trace_dicts() is None and step.trace is None
        assert step.block_trace == []  # Diffulex's value when traces are off


def test_jsonl_and_dict_export(tmp_path):
    out = single_request_outputs()
    path = tmp_path / "out.jsonl"
    out.write_jsonl(path)
    [line] = path.read_text().splitlines()
    record = json.loads(line)
    assert record["token_ids"] == [5, 6, 7, 8, 9] and record["metrics"]["decode_tpf"] == 4.0
    assert record["metrics"]["tpf"] == 4.0
    assert len(record["steps"]) == 3 and record["steps"][1]["changed_positions"] == [0, 1, 2, 3]
    assert [s["step_id"] for s in record["steps"]] == [0, 1, 2] and record["is_truncated"] is True
    exported = json.loads(json.dumps(out.to_dict()))["metrics"]
    assert exported["decode_tpf"] == 4.0 and exported["tpf"] == 4.0


# --------------------------------------------------------------------------- decoding


def make_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<unk>": 1, "</s>": 2, "hello": 3, "world": 4, "again": 5}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##")
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", eos_token="</s>", pad_token="<pad>")


def test_convert_to_text_cuts_text_at_eos_and_keeps_full_text():
    tokenizer = make_tokenizer()
    out = GenerationOutputs(1)
    out.record_step([Req(0, num_generated_tokens=4, is_finished=True, response_token_ids=[3, 4, 2, 5])], 0.1)
    out.convert_to_text(tokenizer)
    assert out.to_benchmark_format() == [{"text": "hello world", "full_text": "hello world </s> again",
                                          "token_ids": [3, 4], "nfe": 1}]


class StrictTokenizer:
    """A tokenizer whose decode takes no keyword arguments."""

    vocab = {3: "hel", 4: "lo"}
    all_special_tokens = ["</s>"]

    def decode(self, ids):
        raise AssertionError("never reached: called with keywords, it raises TypeError first")

    def convert_ids_to_tokens(self, token_id):
        if token_id == 2:
            return "</s>"
        return self.vocab[token_id]  # KeyError for unknown ids

    def convert_tokens_to_string(self, tokens):
        return "".join(tokens)


def test_decode_falls_back_when_decode_rejects_keywords():
    tokenizer = StrictTokenizer()
    assert decode_token_ids_robust(tokenizer, [3, 4, 77, 2]) == "hello</s>"  # unknown id 77 -> ""
    assert decode_token_ids_robust(tokenizer, [3, 4, 2], skip_special_tokens=True) == "hello"
    assert decode_token_ids_robust(tokenizer, []) == ""


def test_decode_does_not_hide_other_errors():
    class Broken:
        def decode(self, ids, skip_special_tokens=False):
            raise RuntimeError("real failure")

    with pytest.raises(RuntimeError, match="real failure"):
        decode_token_ids_robust(Broken(), [1])


def test_decode_normal_path_with_a_real_tokenizer():
    import torch

    tokenizer = make_tokenizer()
    assert decode_token_ids_robust(tokenizer, torch.tensor([3, 4, 2]), skip_special_tokens=True) == "hello world"
