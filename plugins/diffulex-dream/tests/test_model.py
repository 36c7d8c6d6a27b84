"""Dream specifics: config keys, checkpoint-name mapping, plugin import. The shared blocks are
tested in plugins/diffulex-layers/tests."""

import os
import subprocess
import sys

import pytest
import torch
from diffulex_layers.testing import check_gated_mlp, check_round_trip, seeded

from diffulex_dream.model import DreamForDiffusionLM, PackedLinear, build_dream, to_hf_state_dict

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 48, "vocab_size": 100, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}  # fmt: skip
DREAM_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "intermediate_size": 18944, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 131072, "tie_word_embeddings": False}  # fmt: skip


@pytest.mark.parametrize("config", [None, TINY, DREAM_7B])
def test_builds_on_meta_without_storage(config):
    with torch.device("meta"):
        model = build_dream(config)
    assert model.diffulex_family == "dream"
    assert model.config_dict == dict(config or {})
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if config is DREAM_7B:
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.qkv_proj.weight.shape == ((28 + 2 * 4) * 128, 3584)
        assert attn.qkv_proj.bias.shape == ((28 + 2 * 4) * 128,) and attn.o_proj.bias is None
        assert mlp.gate_up_proj.weight.shape == (2 * 18944, 3584) and mlp.gate_up_proj.bias is None
        assert model.lm_head.weight.shape == (152064, 3584)
        assert 7.5e9 < sum(p.numel() for p in model.parameters()) < 7.7e9


def test_defaults_are_small():
    model = build_dream()
    layer = model.model.layers[0]
    assert len(model.model.layers) == 2
    assert layer.self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert layer.mlp.gate_up_proj.weight.shape == (256, 64)
    assert model(torch.randint(0, 256, (1, 5))).shape == (1, 5, 256)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, {"kv_heads": 2, "inter": 128, "vocab": 256, "eps": 1e-6, "rope_theta": 10000.0, "max_positions": 2048,
              "qkv_bias": True, "o_bias": False, "mlp_bias": False, "qk_norm": False, "tie": False}),
        ({"num_key_value_heads": None, "num_attention_heads": 8}, {"kv_heads": 8, "head_dim": 8}),  # null: = heads
        ({"tie_word_embeddings": True, "rope_theta": 1e6, "max_position_embeddings": 4096, "rms_norm_eps": None},
         {"tie": True, "rope_theta": 1e6, "max_positions": 4096, "eps": 1e-6}),
        ({"attention_bias": False, "head_dim": 4}, {"qkv_bias": True, "head_dim": 16}),  # Qwen2: not config keys
    ],
)  # fmt: skip
def test_config_keys(config, expected):
    c = DreamForDiffusionLM.resolve_config(config)
    assert {key: getattr(c, key) for key in expected} == expected


@pytest.mark.parametrize("config", [{"hidden_size": 30}, {"num_attention_heads": 4, "num_key_value_heads": 3}])
def test_sizes_that_do_not_divide_are_rejected(config):
    with pytest.raises(ValueError, match="hidden_size=.*num_attention_heads=.*num_key_value_heads=.*do not divide"):
        build_dream(config)


def test_forward_shape_and_max_position_embeddings():
    model = seeded(build_dream, TINY, 0)
    ids = torch.randint(0, 100, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 100) and torch.isfinite(logits).all()
    short = seeded(build_dream, {**TINY, "max_position_embeddings": 4}, 0)  # same weights, tiny rotary cache
    torch.testing.assert_close(short(ids), logits)  # the cache grows past max_position_embeddings


def test_gate_proj_is_gated():
    model = seeded(build_dream, TINY, 1)
    sd = to_hf_state_dict(model)
    gate, up, down = (sd[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    check_gated_mlp(model.model.layers[0].mlp, gate, up, down)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip(tie):
    config = {**TINY, "tie_word_embeddings": tie}
    source, target = seeded(build_dream, config, 2), seeded(build_dream, config, 3)
    assert (target.lm_head.weight is target.model.embed_tokens.weight) is tie
    sd = to_hf_state_dict(source)
    layer = "model.layers.1"
    assert {"model.embed_tokens.weight", "model.norm.weight", f"{layer}.input_layernorm.weight",
            f"{layer}.post_attention_layernorm.weight", f"{layer}.self_attn.o_proj.weight",
            f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight", f"{layer}.mlp.down_proj.weight",
            *(f"{layer}.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias"))} <= set(sd)  # fmt: skip
    assert ("lm_head.weight" in sd) is not tie
    assert len(sd) == 2 + (not tie) + 2 * 12  # per layer: 2 norms, q/k/v weight+bias, o, gate, up, down
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    check_round_trip(source, target, sd)


def test_plugin_registers_lazy_factory_without_importing_torch():
    pytest.importorskip("diffulex_core")
    import pluggy

    import diffulex_dream

    pm = pluggy.PluginManager("diffulex")
    pm.register(diffulex_dream)
    calls = []
    pm.hook.diffulex_register_families(register=lambda *a, **k: calls.append((a, k)))
    assert calls == [(("dream", "diffulex_dream.model:build_dream"), {})]
    code = "import sys, diffulex_dream; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert DreamForDiffusionLM.diffulex_family == "dream"
    assert isinstance(build_dream(TINY).model.layers[0].self_attn.qkv_proj, PackedLinear)  # re-exported
