import os
import subprocess
import sys

import pytest
import torch

from diffulex_llada.model import LLaDAForDiffusionLM, build_llada, to_hf_state_dict

TINY = {"d_model": 32, "n_layers": 2, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 48,
        "vocab_size": 100, "embedding_size": 128, "rms_norm_eps": 1e-5, "include_bias": False}  # fmt: skip
LLADA_8B = {"d_model": 4096, "n_layers": 32, "n_heads": 32, "n_kv_heads": 32, "mlp_hidden_size": 12288,
            "vocab_size": 126464, "embedding_size": 126464, "rms_norm_eps": 1e-5, "include_bias": False,
            "include_qkv_bias": False, "rope_theta": 500000.0, "max_sequence_length": 4096,
            "weight_tying": False}  # fmt: skip


def to_param_name(hf_name, mapping):
    """Checkpoint name -> (parameter name, shard id): whole segments, longest key first."""
    keys = sorted(mapping, key=lambda k: -k.count("."))
    parts, out, shard, i = hf_name.split("."), [], None, 0
    while i < len(parts):
        for key in keys:
            n = key.count(".") + 1
            if parts[i : i + n] == key.split("."):
                dst, sid = mapping[key]
                out.append(dst)
                shard = sid if sid is not None else shard
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out), shard


def load_hf(model, state_dict):
    params = dict(model.named_parameters())
    loaded = set()
    for hf_name, tensor in state_dict.items():
        name, shard = to_param_name(hf_name, model.packed_modules_mapping)
        param = params[name]
        if shard is None:
            assert param.shape == tensor.shape, hf_name
            param.data.copy_(tensor)
        else:
            param.weight_loader(param, tensor, shard)
        loaded.add(name)
    return loaded


def seeded(config, seed):
    torch.manual_seed(seed)
    model = build_llada(config)
    with torch.no_grad():  # norms start at 1 and biases at 0; randomise so the test sees them
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("config", [None, TINY, LLADA_8B])
def test_builds_on_meta_without_storage(config):
    with torch.device("meta"):
        model = build_llada(config)
    assert model.diffulex_family == "llada"
    assert model.config_dict == dict(config or {})
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert "rotary_emb.cos_sin_cache" in dict(model.named_buffers())
    assert "rotary_emb.cos_sin_cache" not in model.state_dict()
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


def test_forward_shape_and_bidirectional():
    model = seeded(TINY, 0)
    ids = torch.randint(0, 100, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 128) and torch.isfinite(logits).all()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    assert not torch.allclose(model(changed)[:, 0], logits[:, 0])  # first token sees the last
    short = seeded({**TINY, "max_sequence_length": 4}, 0)  # same weights, tiny rotary cache
    torch.testing.assert_close(short(ids), logits)  # the cache grows past max_sequence_length


def test_ff_proj_is_gate_and_up_proj_is_up():
    model = seeded(TINY, 1)
    sd = to_hf_state_dict(model)
    mlp = model.model.layers[0].mlp
    x = torch.randn(3, 32)
    gate, up, down = (sd[f"model.transformer.blocks.0.{n}.weight"] for n in ("ff_proj", "up_proj", "ff_out"))
    expected = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(mlp(x), expected)


@pytest.mark.parametrize("bias", [False, True])
@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip(bias, tie):
    config = {**TINY, "include_bias": bias, "weight_tying": tie}
    source, target = seeded(config, 2), seeded(config, 3)
    sd = to_hf_state_dict(source)
    assert {"model.transformer.wte.weight", "model.transformer.ln_f.weight",
            "model.transformer.blocks.1.ff_proj.weight", "model.transformer.blocks.1.attn_norm.weight",
            "model.transformer.blocks.1.q_proj.weight"} <= set(sd)  # fmt: skip
    assert ("model.transformer.ff_out.weight" in sd) is not tie
    assert ("model.transformer.blocks.0.q_proj.bias" in sd) is bias
    assert sd["model.transformer.blocks.0.k_proj.weight"].shape == (2 * 8, 32)
    assert all(t.is_contiguous() for t in sd.values())
    assert to_param_name("model.transformer.ff_out.weight", source.packed_modules_mapping) == ("lm_head.weight", None)
    loaded = load_hf(target, sd)
    assert loaded == set(dict(target.named_parameters()))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(target(ids), source(ids), rtol=0, atol=0)


def test_tied_weights_share_one_parameter():
    model = build_llada({**TINY, "weight_tying": True})
    assert model.lm_head.weight is model.model.embed_tokens.weight


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_to_empty_and_load(tie):
    config = {**TINY, "weight_tying": tie, "include_bias": True}
    source = seeded(config, 4)
    with torch.device("meta"):
        model = build_llada(config)
    model.to_empty(device="cpu")  # makes new Parameter objects
    layer = model.model.layers[0]
    for p in (layer.self_attn.qkv_proj.weight, layer.self_attn.qkv_proj.bias, layer.mlp.gate_up_proj.bias):
        assert p.weight_loader.__self__ is not None
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    load_hf(model, to_hf_state_dict(source))
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(model(ids), source(ids))  # rotary cache was rebuilt off meta


def test_weight_loader_rejects_wrong_shape():
    qkv = build_llada(TINY).model.layers[0].self_attn.qkv_proj.weight
    with pytest.raises(ValueError, match=r"'k'.*\(16, 32\).*\(16, 31\)"):
        qkv.weight_loader(qkv, torch.zeros(16, 31), "k")
    gate_up = build_llada(TINY).model.layers[0].mlp.gate_up_proj.weight
    with pytest.raises(ValueError, match=r"1.*\(48, 32\).*\(32, 48\)"):
        gate_up.weight_loader(gate_up, torch.zeros(32, 48), 1)
    with pytest.raises(ValueError, match="shard id"):
        gate_up.weight_loader(gate_up, torch.zeros(48, 32), "up")


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
