"""Tensor- and expert-parallel loading with real processes: gloo over TCP on CPU, as torchrun runs them.

Each test's scenario (a checkpoint written by its ``prepare_*`` function) runs on 2 or 4 ranks of
``parallel_worker.py``, and the test compares what every rank loaded with a load in this (single)
process: each rank's parameters are exactly its slice of the single-process parameters, the
tensor-parallel logits equal the single-process ones, and each rank read only about its share of
the checkpoint's bytes. The 2-rank scenarios share one launch (``two_ranks``: one process group,
the scenarios in turn); a scenario that leaves no result fails its own test, by name.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffulex_core.loader import load_checkpoint
from rank_launcher import INPUT_IDS, launch, launch_many

LLADA = {"d_model": 64, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 96,
         "vocab_size": 255, "weight_tying": False}


def write_llada_checkpoint(directory: Path, config: dict, seed: int = 0) -> tuple[torch.nn.Module, int]:
    """A random LLaDA model saved under LLaDA's names in two shards with an index; (model, bytes)."""
    from diffulex_layers.testing import seeded
    from diffulex_llada.model import build_llada, to_hf_state_dict

    model = seeded(build_llada, config, seed)
    tensors = to_hf_state_dict(model)
    directory.mkdir(parents=True)
    names = sorted(tensors)
    index = {}
    for part, chunk in enumerate((names[: len(names) // 2], names[len(names) // 2:])):
        file = f"model-{part + 1:05d}-of-00002.safetensors"
        save_file({n: tensors[n] for n in chunk}, str(directory / file))
        index.update({n: file for n in chunk})
    (directory / "model.safetensors.index.json").write_text(json.dumps({"weight_map": index}))
    return model, sum(t.numel() * t.element_size() for t in tensors.values())


def single_process_load(checkpoint: Path, config: dict) -> torch.nn.Module:
    from diffulex_llada.model import build_llada

    with torch.device("meta"):
        model = build_llada(config)
    report = load_checkpoint(model, checkpoint, device="cpu")
    assert report.ok and report.parallel == {"tp_rank": 0, "tp_size": 1, "ep_rank": 0, "ep_size": 1}
    return model


def expected_shard(name: str, full: torch.Tensor, rank: int, tp: int, config: dict) -> torch.Tensor:
    """The part of a single-process parameter that tensor-parallel rank ``rank`` of ``tp`` holds,
    written from the layout rules (not from the layers' code)."""
    heads, kv, hidden = config["n_heads"], config["n_kv_heads"], config["d_model"]
    head_dim, inter = hidden // heads, config["mlp_hidden_size"]
    if name.endswith(("embed_tokens.weight", "lm_head.weight")):  # vocabulary padded to a multiple of tp
        per = -(-full.shape[0] // tp)
        padded = torch.zeros(per * tp, full.shape[1], dtype=full.dtype)
        padded[: full.shape[0]] = full
        return padded[rank * per:(rank + 1) * per]
    if name.endswith("qkv_proj.weight"):
        q, k, v = full.split([heads * head_dim, kv * head_dim, kv * head_dim])
        q_per = heads // tp * head_dim
        if kv >= tp:
            kv_rows = slice(rank * kv // tp * head_dim, (rank + 1) * kv // tp * head_dim)
        else:  # fewer kv heads than ranks: each kv head is replicated on tp // kv ranks
            head = rank // (tp // kv)
            kv_rows = slice(head * head_dim, (head + 1) * head_dim)
        return torch.cat([q[rank * q_per:(rank + 1) * q_per], k[kv_rows], v[kv_rows]])
    if name.endswith("gate_up_proj.weight"):
        gate, up = full.split([inter, inter])
        per = inter // tp
        return torch.cat([gate[rank * per:(rank + 1) * per], up[rank * per:(rank + 1) * per]])
    if name.endswith(("o_proj.weight", "down_proj.weight")):  # row-parallel: input columns split
        per = full.shape[1] // tp
        return full[:, rank * per:(rank + 1) * per]
    return full  # norms: replicated


TWO_RANKS = {}  # scenario name -> prepare(directory) -> (scenario, what the test needs)


def two_rank_scenario(prepare):
    TWO_RANKS[prepare.__name__.removeprefix("prepare_")] = prepare
    return prepare


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory) -> dict[str, tuple[object, list[dict], Path]]:
    """Every 2-rank scenario of this module, prepared, then run in one launch of 2 ranks:
    ``two_ranks[name]()`` -> (what its prepare returned for the test, each rank's result, output directory)."""
    root = tmp_path_factory.mktemp("two-ranks")
    prepared = {}
    for name, prepare in TWO_RANKS.items():
        (root / name).mkdir()
        prepared[name] = prepare(root / name)
    launched = launch_many({name: scenario for name, (scenario, _) in prepared.items()}, 2, root)
    return {name: (lambda name=name, context=context: (context, *launched.get(name)))
            for name, (_, context) in prepared.items()}


def prepare_dense(tmp_path: Path, config: dict) -> tuple[dict, dict]:
    checkpoint = tmp_path / "ckpt"
    _, checkpoint_bytes = write_llada_checkpoint(checkpoint, config)
    scenario = {"kind": "llada", "config": config, "checkpoint": str(checkpoint)}
    return scenario, {"checkpoint": checkpoint, "bytes": checkpoint_bytes, "config": config}


def check_dense(context: dict, results: list[dict], out: Path, world: int) -> None:
    checkpoint, checkpoint_bytes, config = context["checkpoint"], context["bytes"], context["config"]
    reference = single_process_load(checkpoint, config)
    full = reference.state_dict()
    for rank, result in enumerate(results):
        assert result["ok"], result.get("traceback")
        report = result["report"]
        assert report["ok"] and report["parallel"] == {"tp_rank": rank, "tp_size": world, "ep_rank": rank,
                                                       "ep_size": world}
        assert report["bytes_total"] == checkpoint_bytes
        share = report["bytes_read"] / checkpoint_bytes
        assert share <= 1 / world + 0.05, f"rank {rank} read {share:.1%} of the checkpoint"
        loaded = load_file(str(out / f"rank{rank}.safetensors"))
        params = {k.removeprefix("param."): v for k, v in loaded.items() if k.startswith("param.")}
        assert set(params) == set(full)
        for name, tensor in params.items():
            assert torch.equal(tensor, expected_shard(name, full[name], rank, world, config)), (rank, name)
    with torch.no_grad():
        expected_logits = reference(torch.tensor(INPUT_IDS))
    logits = load_file(str(out / "rank0.safetensors"))["logits"]
    assert logits.shape == expected_logits.shape  # the real vocabulary, padding trimmed
    torch.testing.assert_close(logits, expected_logits, rtol=1e-5, atol=1e-5)


@two_rank_scenario
def prepare_dense_two(tmp_path: Path):
    return prepare_dense(tmp_path, LLADA)


def test_two_ranks_load_their_slices_and_compute_the_single_process_logits(two_ranks):
    context, results, out = two_ranks["dense_two"]()
    check_dense(context, results, out, world=2)


def test_four_ranks_with_replicated_kv_heads_and_tied_embeddings(tmp_path):
    scenario, context = prepare_dense(tmp_path, {**LLADA, "n_kv_heads": 2, "weight_tying": True})
    results, out = launch(scenario, 4, tmp_path)
    check_dense(context, results, out, world=4)


@two_rank_scenario
def prepare_missing_file(tmp_path: Path):
    checkpoint = tmp_path / "ckpt"
    write_llada_checkpoint(checkpoint, LLADA)
    broken = tmp_path / "broken"
    broken.mkdir()
    for file in checkpoint.iterdir():
        if not file.name.startswith("model-00002"):
            (broken / file.name).write_bytes(file.read_bytes())
    return {"kind": "llada", "config": LLADA, "checkpoints": [str(checkpoint), str(broken)]}, None


def test_a_rank_missing_its_file_fails_every_rank_with_the_same_error(two_ranks):
    _, results, _ = two_ranks["missing_file"]()
    for result in results:
        assert not result["ok"] and result["type"] == "ParallelLoadError", result
        assert "rank(s) 1" in result["message"] and "model-00002-of-00002.safetensors" in result["message"]
    assert results[1]["cause"] == "CheckpointFormatError" and results[0]["cause"] is None


@two_rank_scenario
def prepare_plan_problem(tmp_path: Path):
    checkpoint = tmp_path / "ckpt"
    write_llada_checkpoint(checkpoint, LLADA)
    extra = tmp_path / "extra"
    write_llada_checkpoint(extra, LLADA)
    save_file({"model.transformer.stray.weight": torch.zeros(2)}, str(extra / "stray.safetensors"))
    index = json.loads((extra / "model.safetensors.index.json").read_text())
    index["weight_map"]["model.transformer.stray.weight"] = "stray.safetensors"
    (extra / "model.safetensors.index.json").write_text(json.dumps(index))
    return {"kind": "llada", "config": LLADA, "checkpoints": [str(checkpoint), str(extra)]}, None


def test_a_plan_problem_on_one_rank_stops_every_rank_before_writing(two_ranks):
    _, results, _ = two_ranks["plan_problem"]()
    for result in results:
        assert not result["ok"] and result["type"] == "ParallelLoadError", result
        assert "rank(s) 1" in result["message"] and "stray" in result["message"]


@two_rank_scenario
def prepare_heads_not_divided(tmp_path: Path):
    config = {**LLADA, "n_heads": 3, "n_kv_heads": 3, "d_model": 48}
    return {"kind": "llada", "config": config, "checkpoint": str(tmp_path)}, None


def test_heads_the_group_does_not_divide_fail_on_every_rank(two_ranks):
    _, results, _ = two_ranks["heads_not_divided"]()
    for result in results:
        assert not result["ok"] and result["type"] == "ParallelConfigError", result
        assert "3" in result["message"] and "2" in result["message"]


MOE = {"vocab": 101, "hidden": 32, "layers": 2, "experts": 8, "top_k": 2, "inter": 16}


@two_rank_scenario
def prepare_expert_parallel(tmp_path: Path):
    from diffulex_layers.testing import TinyMoeLM, moe_checkpoint_tensors, seeded

    source = seeded(TinyMoeLM, MOE, seed=3)
    tensors = moe_checkpoint_tensors(source)
    checkpoint = tmp_path / "ckpt"
    checkpoint.mkdir()
    save_file(tensors, str(checkpoint / "model.safetensors"))
    ids = torch.tensor(INPUT_IDS) % MOE["vocab"]
    scenario = {"kind": "moe", "config": MOE, "checkpoint": str(checkpoint), "input_ids": ids.tolist()}
    return scenario, (source, tensors, ids)


def test_expert_parallel_ranks_read_only_their_experts(two_ranks):
    (source, tensors, ids), results, out = two_ranks["expert_parallel"]()
    nbytes = {name: t.numel() * t.element_size() for name, t in tensors.items()}
    full = source.state_dict()
    per_rank = MOE["experts"] // 2
    for rank, result in enumerate(results):
        assert result["ok"], result.get("traceback")
        report = result["report"]
        assert report["ok"]
        others = {e for e in range(MOE["experts"]) if e // per_rank != rank}
        skipped = report["skipped"]
        assert set(skipped) == {n for n in tensors if ".experts." in n and int(n.split(".")[5]) in others}
        assert all(f"belongs to expert-parallel rank {1 - rank} of 2" in reason for reason in skipped.values())
        never_read = sum(nbytes[n] for n in skipped)
        vocab_rows_not_mine = sum(nbytes[n] // 2 for n in ("model.embed_tokens.weight", "lm_head.weight"))
        assert report["bytes_read"] <= sum(nbytes.values()) - never_read - vocab_rows_not_mine + 2 * MOE["hidden"] * 4
        assert report["bytes_read"] / sum(nbytes.values()) <= 0.55
        loaded = load_file(str(out / f"rank{rank}.safetensors"))
        for layer in range(MOE["layers"]):
            for leaf in ("gate_up_proj", "down_proj"):
                name = f"model.layers.{layer}.mlp.experts.{leaf}"
                assert torch.equal(loaded[f"param.{name}"], full[name][rank * per_rank:(rank + 1) * per_rank]), name
            name = f"model.layers.{layer}.mlp.gate.weight"
            assert torch.equal(loaded[f"param.{name}"], full[name])
    with torch.no_grad():
        expected = source(ids)
    torch.testing.assert_close(load_file(str(out / "rank0.safetensors"))["logits"], expected, rtol=1e-5, atol=1e-5)


@two_rank_scenario
def prepare_sdar_moe(tmp_path: Path):
    import transformers

    from diffulex_sdar.model import build_sdar_moe

    torch.manual_seed(7)
    hf_config = transformers.Qwen3MoeConfig(vocab_size=101, hidden_size=32, num_attention_heads=4,
                                            num_key_value_heads=2, head_dim=16, intermediate_size=48,
                                            num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=16, mlp_only_layers=[1], norm_topk_prob=True,
                                            tie_word_embeddings=False)
    source = transformers.Qwen3MoeForCausalLM(hf_config)
    with torch.no_grad():
        for param in source.parameters():
            param.normal_(0, 0.3 if param.dim() > 1 else 1.0)
    checkpoint = tmp_path / "ckpt"
    source.save_pretrained(checkpoint, max_shard_size="40KB")
    config = {**json.loads((checkpoint / "config.json").read_text()), "block_size": 4}
    with torch.device("meta"):
        reference = build_sdar_moe(config)
    assert load_checkpoint(reference, checkpoint, device="cpu").ok
    ids = torch.tensor(INPUT_IDS) % 101
    scenario = {"kind": "sdar_moe", "config": config, "checkpoint": str(checkpoint), "input_ids": ids.tolist()}
    return scenario, (reference, ids)


def test_sdar_moe_from_a_transformers_checkpoint_on_two_ranks_equals_one(two_ranks):
    """Tensor-parallel attention, expert-parallel experts, block-causal attention, all at once."""
    (reference, ids), results, out = two_ranks["sdar_moe"]()
    for rank, result in enumerate(results):
        assert result["ok"], result.get("traceback")
        report = result["report"]
        in_files = sum(math.prod(t["shape"]) * 4 for t in report["tensors"])  # float32; skipped experts too
        assert report["ok"] and report["bytes_read"] <= 0.55 * in_files
        assert len(report["skipped"]) == 2 * 3  # the other rank's 2 experts x gate/up/down, in layer 0
        assert all(f"expert-parallel rank {1 - rank} of 2" in reason for reason in report["skipped"].values())
    with torch.no_grad():
        expected = reference(ids)
    torch.testing.assert_close(load_file(str(out / "rank0.safetensors"))["logits"], expected, rtol=1e-5, atol=1e-5)
