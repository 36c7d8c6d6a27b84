"""SDAR specifics: config keys, checkpoint-name mapping, plugin import. The shared blocks are
tested in plugins/diffulex-layers/tests."""

import os
import subprocess
import sys

import pytest
import torch
from diffulex_layers.testing import check_gated_mlp, check_round_trip, seeded

from diffulex_sdar.model import PackedLinear, SDARForDiffusionLM, build_sdar, to_hf_state_dict

# head_dim 16 with 4 heads: q is 64 wide while hidden is 32, as in Qwen3 models where they differ.
TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 48, "vocab_size": 100, "rms_norm_eps": 1e-6,
        "tie_word_embeddings": True}  # fmt: skip
SDAR_1_7B = {"hidden_size": 2048, "num_hidden_layers": 28, "num_attention_heads": 16, "num_key_value_heads": 8,
             "head_dim": 128, "intermediate_size": 6144, "vocab_size": 151936, "rms_norm_eps": 1e-6,
             "rope_theta": 1000000.0, "max_position_embeddings": 32768, "attention_bias": False,
             "tie_word_embeddings": True}  # fmt: skip


@pytest.mark.parametrize("config", [None, TINY, SDAR_1_7B])
def test_builds_on_meta_without_storage(config):
    with torch.device("meta"):
        model = build_sdar(config)
    assert model.diffulex_family == "sdar"
    assert model.config_dict == dict(config or {})
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if config is SDAR_1_7B:
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.qkv_proj.weight.shape == ((16 + 2 * 8) * 128, 2048) and attn.qkv_proj.bias is None
        assert attn.q_norm.weight.shape == attn.k_norm.weight.shape == (128,)
        assert mlp.gate_up_proj.weight.shape == (2 * 6144, 2048)
        assert model.lm_head.weight is model.model.embed_tokens.weight
        assert 1.6e9 < sum(p.numel() for p in model.parameters()) < 1.8e9


def test_defaults_are_small():
    model = build_sdar()
    layer = model.model.layers[0]
    assert len(model.model.layers) == 2
    assert layer.self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert layer.self_attn.q_norm.weight.shape == (16,) and layer.self_attn.qkv_proj.bias is None
    assert layer.mlp.gate_up_proj.weight.shape == (256, 64)
    assert model.lm_head.weight is not model.model.embed_tokens.weight
    assert model(torch.randint(0, 256, (1, 5))).shape == (1, 5, 256)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, {"kv_heads": 2, "head_dim": 16, "inter": 128, "vocab": 256, "eps": 1e-6, "rope_theta": 10000.0,
              "max_positions": 2048, "qkv_bias": False, "o_bias": False, "mlp_bias": False, "qk_norm": True,
              "tie": False}),
        ({"num_key_value_heads": None, "num_attention_heads": 8}, {"kv_heads": 8, "head_dim": 8}),  # null: = heads
        ({"head_dim": 128, "hidden_size": 32}, {"head_dim": 128}),  # need not be hidden_size // heads
        ({"attention_bias": True}, {"qkv_bias": True, "o_bias": True, "mlp_bias": False}),
        ({"tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 4096, "rms_norm_eps": None},
         {"tie": True, "rope_theta": 1e6, "max_positions": 4096, "eps": 1e-6}),
    ],
)  # fmt: skip
def test_config_keys(config, expected):
    c = SDARForDiffusionLM.resolve_config(config)
    assert {key: getattr(c, key) for key in expected} == expected


@pytest.mark.parametrize("block_size", [0, -1, 2.5, "4", True])
def test_a_bad_block_size_names_the_key(block_size):
    with pytest.raises(ValueError, match="block_size"):
        SDARForDiffusionLM.resolve_config({"block_size": block_size})


def test_block_size_and_moe_keys():
    from diffulex_sdar.model import SDARMoeForDiffusionLM

    assert SDARForDiffusionLM.resolve_config({"block_size": 4}).block_size == 4
    assert SDARForDiffusionLM.resolve_config({}).block_size is None and SDARForDiffusionLM.resolve_config({}).moe is None
    moe = SDARMoeForDiffusionLM.resolve_config({"num_hidden_layers": 6, "num_local_experts": 16, "num_experts_per_tok": 4,
                                                "moe_intermediate_size": 24, "decoder_sparse_step": 2,
                                                "mlp_only_layers": [3], "norm_topk_prob": True}).moe
    assert (moe.experts, moe.top_k, moe.inter, moe.norm_topk_prob) == (16, 4, 24, True)
    assert moe.sparse_layers == {1, 5}  # every 2nd layer, but layer 3 stays dense


def test_heads_not_a_multiple_of_kv_heads_are_rejected():
    build_sdar({"hidden_size": 30, "head_dim": 8})  # hidden_size need not divide: head_dim is explicit
    with pytest.raises(ValueError, match="num_attention_heads=4 is not a multiple of num_key_value_heads=3"):
        build_sdar({"num_attention_heads": 4, "num_key_value_heads": 3})


def test_forward_shape_and_max_position_embeddings():
    model = seeded(build_sdar, TINY, 0)
    ids = torch.randint(0, 100, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 100) and torch.isfinite(logits).all()
    short = seeded(build_sdar, {**TINY, "max_position_embeddings": 4}, 0)  # same weights, tiny rotary cache
    torch.testing.assert_close(short(ids), logits)  # the cache grows past max_position_embeddings


def test_gate_proj_is_gated():
    model = seeded(build_sdar, TINY, 1)
    sd = to_hf_state_dict(model)
    gate, up, down = (sd[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    check_gated_mlp(model.model.layers[0].mlp, gate, up, down)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip(tie, bias):
    config = {**TINY, "tie_word_embeddings": tie, "attention_bias": bias}
    source, target = seeded(build_sdar, config, 2), seeded(build_sdar, config, 3)
    assert (target.lm_head.weight is target.model.embed_tokens.weight) is tie
    sd = to_hf_state_dict(source)
    layer = "model.layers.1"
    assert {"model.embed_tokens.weight", "model.norm.weight", f"{layer}.input_layernorm.weight",
            f"{layer}.post_attention_layernorm.weight", f"{layer}.self_attn.o_proj.weight",
            f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight", f"{layer}.mlp.down_proj.weight",
            f"{layer}.self_attn.q_norm.weight", f"{layer}.self_attn.k_norm.weight",
            *(f"{layer}.self_attn.{p}_proj.weight" for p in "qkv")} <= set(sd)  # fmt: skip
    assert ("lm_head.weight" in sd) is not tie
    assert len(sd) == 2 + (not tie) + 2 * (11 + 4 * bias)  # per layer: 4 norms, q, k, v, o, gate, up, down
    assert ("model.layers.0.self_attn.o_proj.bias" in sd) is bias
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 16, 32)
    check_round_trip(source, target, sd)


def test_plugin_registers_lazy_factory_without_importing_torch():
    pytest.importorskip("diffulex_core")
    import pluggy

    import diffulex_sdar

    pm = pluggy.PluginManager("diffulex")
    pm.register(diffulex_sdar)
    calls = []
    pm.hook.diffulex_register_families(register=lambda *a, **k: calls.append((a, k)))
    assert calls == [(("sdar", "diffulex_sdar.model:build_sdar"), {}), (("sdar_moe", "diffulex_sdar.model:build_sdar_moe"), {})]
    code = "import sys, diffulex_sdar; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert SDARForDiffusionLM.diffulex_family == "sdar"
    assert isinstance(build_sdar(TINY).model.layers[0].self_attn.qkv_proj, PackedLinear)  # re-exported
