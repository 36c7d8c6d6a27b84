"""SDAR specifics: config keys (block size and MoE ones too), checkpoint names, released sizes;
``FamilySuite`` runs the checks every family passes with them. The shared blocks are tested in
plugins/diffulex-layers/tests."""

import pytest

from diffulex_layers.testing import FamilySuite
from diffulex_sdar.model import SDARForDiffusionLM, SDARMoeForDiffusionLM, build_sdar, to_hf_state_dict


class TestSDAR(FamilySuite):
    family = "sdar"
    plugin = "diffulex_sdar"
    registered = [("sdar", "diffulex_sdar.model:build_sdar"), ("sdar_moe", "diffulex_sdar.model:build_sdar_moe")]
    model_class = SDARForDiffusionLM
    build = staticmethod(build_sdar)
    export = staticmethod(to_hf_state_dict)
    # head_dim 16 with 4 heads: q is 64 wide while hidden is 32, as in Qwen3 models where they differ.
    tiny = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
            "head_dim": 16, "intermediate_size": 48, "vocab_size": 100, "rms_norm_eps": 1e-6,
            "tie_word_embeddings": True}  # fmt: skip
    # SDAR-1.7B
    released = {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
                "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936, "rms_norm_eps": 1e-6,
                "rope_theta": 1000000.0, "max_position_embeddings": 32768, "attention_bias": False,
                "tie_word_embeddings": True}  # fmt: skip
    config_cases = [
        ({}, {"kv_heads": 2, "head_dim": 16, "inter": 128, "vocab": 256, "eps": 1e-6, "rope_theta": 10000.0,
              "max_positions": 2048, "qkv_bias": False, "o_bias": False, "mlp_bias": False, "qk_norm": True,
              "tie": False}),
        ({"num_key_value_heads": None, "num_attention_heads": 8}, {"kv_heads": 8, "head_dim": 8}),  # null: = heads
        ({"head_dim": 128, "hidden_size": 32}, {"head_dim": 128}),  # need not be hidden_size // heads
        ({"attention_bias": True}, {"qkv_bias": True, "o_bias": True, "mlp_bias": False}),
        ({"tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 4096, "rms_norm_eps": None},
         {"tie": True, "rope_theta": 1e6, "max_positions": 4096, "eps": 1e-6}),
    ]  # fmt: skip
    rejected = [({"num_attention_heads": 4, "num_key_value_heads": 3},
                 "num_attention_heads=4 is not a multiple of num_key_value_heads=3")]
    max_positions_key = "max_position_embeddings"
    tiny_logits = 100
    mlp_weights = tuple(f"model.layers.0.mlp.{n}_proj.weight" for n in ("gate", "up", "down"))
    tie_key, bias_key = "tie_word_embeddings", "attention_bias"

    def check_released(self, model):
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.qkv_proj.weight.shape == ((16 + 2 * 8) * 128, 2048) and attn.qkv_proj.bias is None
        assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (128,)
        assert mlp.gate_up_proj.weight.shape == (2 * 6144, 2048)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert 1.6e9 < sum(p.numel() for p in model.parameters()) < 1.8e9

    def check_defaults(self, model):
        layer = model.model.layers[0]
        assert layer.self_attn.q_norm.weight.shape == (16,) and layer.self_attn.qkv_proj.bias is None
        assert model.lm_head.weight is not model.model.embed_tokens.weight

    def check_checkpoint(self, state_dict, tie, bias):
        layer = "model.layers.1"
        assert {"model.embed_tokens.weight", "model.norm.weight", f"{layer}.input_layernorm.weight",
                f"{layer}.post_attention_layernorm.weight", f"{layer}.self_attn.o_proj.weight",
                f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight", f"{layer}.mlp.down_proj.weight",
                f"{layer}.self_attn.q_norm.weight", f"{layer}.self_attn.k_norm.weight",
                *(f"{layer}.self_attn.{p}_proj.weight" for p in "qkv")} <= set(state_dict)  # fmt: skip
        # per layer: 4 norms, q, k, v, o, gate, up, down
        assert len(state_dict) == 2 + (not tie) + 2 * (11 + 4 * bias)
        assert ("model.layers.0.self_attn.o_proj.bias" in state_dict) is bias
        assert state_dict["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 32)


@pytest.mark.parametrize("block_size", [0, -1, 2.5, "4", True])
def test_a_bad_block_size_names_the_key(block_size):
    with pytest.raises(ValueError, match="block_size"):
        SDARForDiffusionLM.resolve_config({"block_size": block_size})


def test_block_size_and_moe_keys():
    assert SDARForDiffusionLM.resolve_config({"block_size": 4}).block_size == 4
    dense = SDARForDiffusionLM.resolve_config({})
    assert dense.block_size is None and dense.moe is None
    moe = SDARMoeForDiffusionLM.resolve_config({"num_hidden_layers": 6, "num_local_experts": 16,
                                                "num_experts_per_tok": 4, "moe_intermediate_size": 24,
                                                "decoder_sparse_step": 2, "mlp_only_layers": [3],
                                                "norm_topk_prob": True}).moe
    assert (moe.experts, moe.top_k, moe.inter, moe.norm_topk_prob) == (16, 4, 24, True)
    assert moe.sparse_layers == {1, 5}  # every 2nd layer, but layer 3 stays dense


def test_hidden_size_need_not_divide_when_head_dim_is_given():
    build_sdar({"hidden_size": 30, "head_dim": 8})
