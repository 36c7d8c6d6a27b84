"""``sdar`` and ``sdar_moe`` against transformers' Qwen3 and Qwen3-MoE, on checkpoints transformers wrote.

Tiny random models are saved with ``save_pretrained`` in several shards, loaded by diffulex-core
(strict: every tensor placed, every parameter written) into a model built on the meta device, and
their logits compared with transformers' forward given the same attention: block-causal for a
``block_size`` shorter than the sequence (passed to transformers as a 4-D additive mask),
bidirectional otherwise.
"""

from __future__ import annotations

import json

import pytest
import torch

from diffulex_core.loader import load_checkpoint, plan_checkpoint

transformers = pytest.importorskip("transformers")

ATTENTION = dict(vocab_size=100, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 intermediate_size=48, rms_norm_eps=1e-6, tie_word_embeddings=False)


def randomized(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Every weight random, norms included (so a norm loaded into the wrong place shows)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3 if param.dim() > 1 else 1.0)
    return model.eval()


def save(model, tmp_path, **config_extra) -> tuple[dict, str]:
    directory = tmp_path / "ckpt"
    model.save_pretrained(directory, max_shard_size="40KB")
    config = json.loads((directory / "config.json").read_text())
    config.update(config_extra)
    (directory / "config.json").write_text(json.dumps(config))
    assert len(list(directory.glob("*.safetensors"))) >= 2  # sharded, with an index
    return config, str(directory)


def additive_mask(seq_len: int, block_size: int | None, batch: int) -> torch.Tensor:
    """The block-causal mask, written independently of the family's: position i sees j when j's
    block is not after i's."""
    allowed = torch.tensor([[(j // block_size) <= (i // block_size) if block_size else True
                             for j in range(seq_len)] for i in range(seq_len)])
    mask = torch.zeros(seq_len, seq_len).masked_fill(~allowed, torch.finfo(torch.float32).min)
    return mask.expand(batch, 1, seq_len, seq_len)


def compare(reference, build, config: dict, directory: str, block_size: int | None) -> None:
    with torch.device("meta"):
        model = build(config)
    report = load_checkpoint(model, directory, device="cpu")
    assert report.ok and not report.skipped
    ids = torch.randint(0, config["vocab_size"], (2, 11), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=additive_mask(11, block_size, 2)).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("block_size", [4, 3, 1, None, 64])
def test_sdar_equals_qwen3_with_its_block_causal_attention(tmp_path, block_size):
    from diffulex_sdar.model import build_sdar

    hf_config = transformers.Qwen3Config(**ATTENTION, num_hidden_layers=2, rope_theta=1e6, attn_implementation="eager")
    reference = randomized(transformers.Qwen3ForCausalLM(hf_config), seed=0)
    config, directory = save(reference, tmp_path, block_size=block_size)
    compare(reference, build_sdar, config, directory, block_size if block_size and block_size < 11 else None)


@pytest.mark.parametrize("rope", [
    {"rope_type": "linear", "factor": 2.0},
    {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 8},
    {"rope_type": "dynamic", "factor": 2.0},  # max_position_embeddings 8 < 11 tokens: the dynamic base applies
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 8},
])
def test_sdar_applies_the_config_s_rope_scaling_as_transformers_does(tmp_path, rope):
    from diffulex_sdar.model import build_sdar

    hf_config = transformers.Qwen3Config(**ATTENTION, num_hidden_layers=1, max_position_embeddings=8,
                                         rope_parameters={"rope_theta": 5e4, **rope}, attn_implementation="eager")
    reference = randomized(transformers.Qwen3ForCausalLM(hf_config), seed=5)
    config, directory = save(reference, tmp_path, block_size=4)
    assert config["rope_parameters"]["rope_type"] == rope["rope_type"]  # transformers 5 writes rope_parameters
    compare(reference, build_sdar, config, directory, 4)
    legacy = {k: v for k, v in config.items() if k != "rope_parameters"}  # the transformers 4 form of the same
    legacy.update(rope_theta=5e4, rope_scaling=rope)
    compare(reference, build_sdar, legacy, directory, 4)


@pytest.mark.parametrize(("extra", "sparse"), [
    (dict(num_hidden_layers=3, decoder_sparse_step=1, mlp_only_layers=[1], norm_topk_prob=True), {0, 2}),
    (dict(num_hidden_layers=4, decoder_sparse_step=2, mlp_only_layers=[], norm_topk_prob=False), {1, 3}),
])
def test_sdar_moe_equals_qwen3_moe_with_experts_in_their_slots(tmp_path, extra, sparse):
    from diffulex_sdar.model import build_sdar_moe

    hf_config = transformers.Qwen3MoeConfig(**ATTENTION, num_experts=6, num_experts_per_tok=2,
                                            moe_intermediate_size=16, attn_implementation="eager", **extra)
    reference = randomized(transformers.Qwen3MoeForCausalLM(hf_config), seed=2)
    config, directory = save(reference, tmp_path, block_size=4)
    compare(reference, build_sdar_moe, config, directory, 4)

    with torch.device("meta"):
        model = build_sdar_moe(config)
    plan = plan_checkpoint(model, directory)
    experts = [p for p in plan.report.placements if ".mlp.experts." in p.name]
    assert len(experts) == len(sparse) * 6 * 3
    for p in experts:  # model.layers.L.mlp.experts.E.PROJ.weight -> stacked parameter, slot E
        layer, expert, proj = int(p.name.split(".")[2]), int(p.name.split(".")[5]), p.name.split(".")[6]
        assert layer in sparse and p.kind == "param" and p.rule == f"module:model.layers.{layer}.mlp.experts"
        stacked = "down_proj" if proj == "down_proj" else "gate_up_proj"
        assert p.target == f"model.layers.{layer}.mlp.experts.{stacked}"
        assert p.shard_id == (expert if proj == "down_proj" else (expert, 0 if proj == "gate_proj" else 1))


def test_diffulex_plan_shows_each_expert_tensor_in_its_slot(tmp_path, capsys):
    from diffulex_core.tools.cli import main

    hf_config = transformers.Qwen3MoeConfig(**ATTENTION, num_hidden_layers=2, num_experts=4, num_experts_per_tok=2,
                                            moe_intermediate_size=16, mlp_only_layers=[1])
    _, directory = save(randomized(transformers.Qwen3MoeForCausalLM(hf_config), seed=4), tmp_path)
    assert main(["plan", directory, "--family", "sdar_moe"]) == 0
    out = capsys.readouterr().out
    for expert in range(4):
        for proj, stacked, slot in (("gate_proj", "gate_up_proj", (expert, 0)),
                                    ("up_proj", "gate_up_proj", (expert, 1)),
                                    ("down_proj", "down_proj", expert)):
            assert (f"model.layers.0.mlp.experts.{expert}.{proj}.weight  float32[{16 if proj != 'down_proj' else 32}, "
                    f"{32 if proj != 'down_proj' else 16}]  -> param model.layers.0.mlp.experts.{stacked} "
                    f"[shard {slot!r}]  (module:model.layers.0.mlp.experts)") in out
    assert ("model.layers.1.mlp.gate_proj.weight  float32[48, 32]  "
            "-> param model.layers.1.mlp.gate_up_proj.weight [shard 0]") in out
