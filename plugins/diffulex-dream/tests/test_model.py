import os
import subprocess
import sys

import pytest
import torch

from diffulex_dream.model import DreamForDiffusionLM, build_dream, to_hf_state_dict

TINY = {"hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2,
        "intermediate_size": 48, "vocab_size": 100, "rms_norm_eps": 1e-6, "tie_word_embeddings": False}  # fmt: skip
DREAM_7B = {"hidden_size": 3584, "num_hidden_layers": 28, "num_attention_heads": 28, "num_key_value_heads": 4,
            "intermediate_size": 18944, "vocab_size": 152064, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
            "max_position_embeddings": 131072, "tie_word_embeddings": False}  # fmt: skip


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
    model = build_dream(config)
    with torch.no_grad():  # norms start at 1 and biases at 0; randomise so the test sees them
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


@pytest.mark.parametrize("config", [None, TINY, DREAM_7B])
def test_builds_on_meta_without_storage(config):
    with torch.device("meta"):
        model = build_dream(config)
    assert model.diffulex_family == "dream"
    assert model.config_dict == dict(config or {})
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert "rotary_emb.cos_sin_cache" in dict(model.named_buffers())
    assert "rotary_emb.cos_sin_cache" not in model.state_dict()
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


def test_forward_shape_and_bidirectional():
    model = seeded(TINY, 0)
    ids = torch.randint(0, 100, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 100) and torch.isfinite(logits).all()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    assert not torch.allclose(model(changed)[:, 0], logits[:, 0])  # first token sees the last
    short = seeded({**TINY, "max_position_embeddings": 4}, 0)  # same weights, tiny rotary cache
    torch.testing.assert_close(short(ids), logits)  # the cache grows past max_position_embeddings


@pytest.mark.parametrize("tie", [False, True])
def test_hf_round_trip(tie):
    config = {**TINY, "tie_word_embeddings": tie}
    source, target = seeded(config, 2), seeded(config, 3)
    sd = to_hf_state_dict(source)
    layer = "model.layers.1"
    assert {"model.embed_tokens.weight", "model.norm.weight", f"{layer}.input_layernorm.weight",
            f"{layer}.post_attention_layernorm.weight", f"{layer}.self_attn.o_proj.weight",
            f"{layer}.mlp.gate_proj.weight", f"{layer}.mlp.up_proj.weight", f"{layer}.mlp.down_proj.weight",
            *(f"{layer}.self_attn.{p}_proj.{w}" for p in "qkv" for w in ("weight", "bias"))} <= set(sd)  # fmt: skip
    assert ("lm_head.weight" in sd) is not tie
    assert len(sd) == 2 + (not tie) + 2 * 12  # per layer: 2 norms, q/k/v weight+bias, o, gate, up, down
    assert sd["model.layers.0.self_attn.k_proj.weight"].shape == (2 * 8, 32)
    assert all(t.is_contiguous() for t in sd.values())
    loaded = load_hf(target, sd)
    assert loaded == set(dict(target.named_parameters()))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(target(ids), source(ids), rtol=0, atol=0)


def test_gate_proj_is_gated():
    model = seeded(TINY, 1)
    sd = to_hf_state_dict(model)
    x = torch.randn(3, 32)
    gate, up, down = (sd[f"model.layers.0.mlp.{n}_proj.weight"] for n in ("gate", "up", "down"))
    expected = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(model.model.layers[0].mlp(x), expected)


def test_tied_weights_share_one_parameter():
    model = build_dream({**TINY, "tie_word_embeddings": True})
    assert model.lm_head.weight is model.model.embed_tokens.weight
    assert len(list(model.parameters())) == len(dict(model.named_parameters(remove_duplicate=False))) - 1


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_to_empty_and_load(tie):
    config = {**TINY, "tie_word_embeddings": tie}
    source = seeded(config, 4)
    with torch.device("meta"):
        model = build_dream(config)
    model.to_empty(device="cpu")  # makes new Parameter objects
    attn = model.model.layers[0].self_attn
    for p in (attn.qkv_proj.weight, attn.qkv_proj.bias, model.model.layers[0].mlp.gate_up_proj.weight):
        assert p.weight_loader.__self__ is not None
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    load_hf(model, to_hf_state_dict(source))
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(model(ids), source(ids))  # rotary cache was rebuilt off meta


def test_weight_loader_rejects_wrong_shape():
    attn = build_dream(TINY).model.layers[0].self_attn
    with pytest.raises(ValueError, match=r"'k'.*\(16, 32\).*\(16, 31\)"):
        attn.qkv_proj.weight.weight_loader(attn.qkv_proj.weight, torch.zeros(16, 31), "k")
    with pytest.raises(ValueError, match=r"'q'.*\(32,\).*\(16,\)"):
        attn.qkv_proj.bias.weight_loader(attn.qkv_proj.bias, torch.zeros(16), "q")
    gate_up = build_dream(TINY).model.layers[0].mlp.gate_up_proj.weight
    with pytest.raises(ValueError, match=r"1.*\(48, 32\).*\(32, 48\)"):
        gate_up.weight_loader(gate_up, torch.zeros(32, 48), 1)
    with pytest.raises(ValueError, match="shard id"):
        gate_up.weight_loader(gate_up, torch.zeros(48, 32), "up")


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
