"""LLaDA specifics: config keys, checkpoint-name mapping, plugin import. The shared blocks are
tested in plugins/diffulex-layers/tests."""

import os
import subprocess
import sys

import pytest
import torch
from diffulex_layers.testing import check_gated_mlp, check_round_trip, seeded, to_param_name

from diffulex_llada.model import LLaDAForDiffusionLM, PackedLinear, build_llada, to_hf_state_dict

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 48,
        "vocab_size": 100, "embedding_size": 128, "rms_norm_eps": 1e-5, "include_bias": False}  # fmt: skip
LLADA_8B = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
            "vocab_size": 126464, "embedding_size": 126464, "rms_norm_eps": 1e-5, "include_bias": False,
            "include_qkv_bias": False, "rope_theta": 500000.0, "max_sequence_length": 4096,
            "weight_tying": False}  # fmt: skip


@pytest.mark.parametrize("config", [None, TINY, LLADA_8B])
def test_builds_on_meta_without_storage(config):
    with torch.device("meta"):
        model = build_llada(config)
    assert model.diffulex_family == "llada"
    assert model.config_dict == dict(config or {})
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    if config is LLADA_8B:
        attn, mlp = model.model.layers[0].self_attn, model.model.layers[0].mlp
        assert attn.qkv_proj.weight.shape == (3 * 4096, 4096) and attn.qkv_proj.bias is None
        assert mlp.gate_up_proj.weight.shape == (2 * 12288, 4096)
        assert model.lm_head.weight.shape == (126464, 4096)
        assert 7.9e9 < sum(p.numel() for p in model.parameters()) < 8.1e9


def test_defaults_are_small():
    model = build_llada()
    layer = model.model.layers[0]
    assert len(model.model.layers) == 2
    assert layer.self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
    assert layer.mlp.gate_up_proj.weight.shape == (256, 64)
    assert model(torch.randint(0, 256, (1, 5))).shape == (1, 5, 256)


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        ({}, {"kv_heads": 2, "inter": 128, "vocab": 256, "eps": 1e-5, "rope_theta": 10000.0, "max_positions": 2048}),
        ({"n_kv_heads": None, "n_heads": 8}, {"kv_heads": 8, "head_dim": 8}),  # null: as many as n_heads
        ({"mlp_ratio": 3, "d_model": 32}, {"inter": 96}),
        ({"mlp_ratio": 3, "mlp_hidden_size": 40}, {"inter": 40}),
        ({"vocab_size": 100}, {"vocab": 100}),
        ({"vocab_size": 100, "embedding_size": 128}, {"vocab": 128}),  # the padded embedding wins
        ({"include_bias": True}, {"qkv_bias": True, "o_bias": True, "mlp_bias": True}),
        ({"include_qkv_bias": True}, {"qkv_bias": True, "o_bias": False, "mlp_bias": False}),
        ({"weight_tying": True, "rope_theta": 5e5, "max_sequence_length": 4096, "rms_norm_eps": None},
         {"tie": True, "rope_theta": 5e5, "max_positions": 4096, "eps": 1e-5, "qk_norm": False}),
    ],
)  # fmt: skip
def test_config_keys(config, expected):
    c = LLaDAForDiffusionLM.resolve_config(config)
    assert {key: getattr(c, key) for key in expected} == expected


@pytest.mark.parametrize("config", [{"d_model": 30}, {"n_heads": 4, "n_kv_heads": 3}])
def test_sizes_that_do_not_divide_are_rejected(config):
    with pytest.raises(ValueError, match="d_model=.*n_heads=.*n_kv_heads=.*do not divide"):
        build_llada(config)


def test_forward_shape_and_max_sequence_length():
    model = seeded(build_llada, TINY, 0)
    ids = torch.randint(0, 100, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 128) and torch.isfinite(logits).all()
    short = seeded(build_llada, {**TINY, "max_sequence_length": 4}, 0)  # same weights, tiny rotary cache
    torch.testing.assert_close(short(ids), logits)  # the cache grows past max_sequence_length


def test_ff_proj_is_gate_and_up_proj_is_up():
    model = seeded(build_llada, TINY, 1)
    sd = to_hf_state_dict(model)
    gate, up, down = (sd[f"model.transformer.blocks.0.{n}.weight"] for n in ("ff_proj", "up_proj", "ff_out"))
    check_gated_mlp(model.model.layers[0].mlp, gate, up, down)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip(bias, tie):
    config = {**TINY, "include_bias": bias, "weight_tying": tie}
    source, target = seeded(build_llada, config, 2), seeded(build_llada, config, 3)
    assert (target.lm_head.weight is target.model.embed_tokens.weight) is tie
    sd = to_hf_state_dict(source)
    block = "model.transformer.blocks.1"
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight",
            *(f"{block}.{n}.weight" for n in ("q_proj", "k_proj", "v_proj", "attn_out", "ff_proj", "up_proj",
                                              "ff_out", "attn_norm", "ff_norm"))} <= set(sd)  # fmt: skip
    assert ("model.transformer.ff_out.weight" in sd) is not tie
    # per layer: 2 norms; q, k, v, attn_out, ff_proj, up_proj, ff_out (each with a bias if include_bias)
    assert len(sd) == 2 + (not tie) + 2 * (9 + 7 * bias)
    assert ("model.transformer.blocks.0.q_proj.bias" in sd) is bias
    assert ("model.transformer.blocks.0.attn_out.bias" in sd) is bias
    assert sd["model.transformer.blocks.0.k_proj.weight"].shape == (2 * 8, 32)
    assert to_param_name("model.transformer.ff_out.weight", source.packed_modules_mapping) == ("lm_head.weight", None)
    check_round_trip(source, target, sd)


def test_plugin_registers_lazy_factory_without_importing_torch():
    pytest.importorskip("diffulex_core")
    import pluggy

    import diffulex_llada

    pm = pluggy.PluginManager("diffulex")
    pm.register(diffulex_llada)
    calls = []
    pm.hook.diffulex_register_families(register=lambda *a, **k: calls.append((a, k)))
    assert calls == [(("llada", "diffulex_llada.model:build_llada"), {})]
    code = "import sys, diffulex_llada; assert 'torch' not in sys.modules, 'torch imported'"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env)
    assert LLaDAForDiffusionLM.diffulex_family == "llada"
    assert isinstance(build_llada(TINY).model.layers[0].self_attn.qkv_proj, PackedLinear)  # re-exported
