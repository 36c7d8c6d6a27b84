"""The shared blocks, tested once through a toy family (the real families test their keys)."""

import copy
import dataclasses

import pytest
import torch

from diffulex_layers import DiffusionLM, PackedLinear, RotaryEmbedding, TransformerConfig, hf_name, hf_state_dict
from diffulex_layers.testing import check_gated_mlp, check_round_trip, load_hf, seeded

TINY = {"hidden": 32, "heads": 4, "kv_heads": 2, "head_dim": 8, "layers": 2, "inter": 48, "vocab": 100, "eps": 1e-6}
ALL_ON = {**TINY, "head_dim": 16, "qkv_bias": True, "o_bias": True, "mlp_bias": True, "qk_norm": True, "tie": True}


class ToyLM(DiffusionLM):
    """Config keys are TransformerConfig's fields; checkpoint names overlap like LLaDA's."""

    diffulex_family = "toy"
    packed_modules_mapping = {
        "trunk.embed": ("embed_tokens", None),
        "trunk.blocks": ("layers", None),
        "wq": ("self_attn.qkv_proj", "q"),
        "wk": ("self_attn.qkv_proj", "k"),
        "wv": ("self_attn.qkv_proj", "v"),
        "w_gate": ("mlp.gate_up_proj", 0),
        "w_up": ("mlp.gate_up_proj", 1),
        "out": ("mlp.down_proj", None),
        "model.trunk.out": ("lm_head", None),
    }

    @classmethod
    def resolve_config(cls, config):
        return TransformerConfig(**{**TINY, **config})


def toy(config=None, seed=None):
    return ToyLM(config) if seed is None else seeded(ToyLM, config, seed)


def loaders_bound(model):
    """Every packed parameter's weight_loader is bound to the PackedLinear that owns it now."""
    packed = [m for m in model.modules() if isinstance(m, PackedLinear)]
    return packed and all(p.weight_loader.__self__ is m for m in packed for p in m.parameters(recurse=False))


def test_resolve_config_is_required():
    with pytest.raises(NotImplementedError):
        DiffusionLM({})


@pytest.mark.parametrize("config", [TINY, ALL_ON])
def test_builds_on_meta_without_storage(config):
    with torch.device("meta"):
        model = toy(config)
    assert model.config_dict == config and model.diffulex_family == "toy"
    assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
    assert "rotary_emb.cos_sin_cache" in dict(model.named_buffers())
    assert "rotary_emb.cos_sin_cache" not in model.state_dict()
    attn = model.model.layers[0].self_attn
    hd = config["head_dim"]
    assert attn.qkv_proj.weight.shape == ((4 + 2 * 2) * hd, 32) and attn.o_proj.weight.shape == (32, 4 * hd)
    assert attn.qkv_proj.shard_slices == {"q": (0, 4 * hd), "k": (4 * hd, 2 * hd), "v": (6 * hd, 2 * hd)}
    assert model.model.layers[0].mlp.gate_up_proj.shard_slices == {0: (0, 48), 1: (48, 48)}


@pytest.mark.parametrize("switch", ["qkv_bias", "o_bias", "mlp_bias", "qk_norm", None])
def test_each_switch_adds_exactly_its_parameters(switch):
    names = set(dict(toy(TINY).named_parameters()))
    extra = set(dict(toy({**TINY, switch: True} if switch else TINY).named_parameters())) - names
    expected = {
        "qkv_bias": {"self_attn.qkv_proj.bias"},
        "o_bias": {"self_attn.o_proj.bias"},
        "mlp_bias": {"mlp.gate_up_proj.bias", "mlp.down_proj.bias"},
        "qk_norm": {"self_attn.q_norm.weight", "self_attn.k_norm.weight"},
        None: set(),
    }[switch]
    assert extra == {f"model.layers.{i}.{n}" for i in range(2) for n in expected}
    assert len(names) == 3 + 2 * 6  # embed, final norm, lm_head; per layer 2 norms, qkv, o, gate_up, down


def test_weight_loader_places_each_shard():
    layer = PackedLinear(4, {"q": 3, "k": 2, "v": 2}, bias=True)
    for i, (shard, n) in enumerate([("q", 3), ("k", 2), ("v", 2)]):
        layer.weight.weight_loader(layer.weight, torch.full((n, 4), float(i + 1)), shard)
        layer.bias.weight_loader(layer.bias, torch.full((n,), -float(i + 1)), shard)
    rows = torch.tensor([1.0, 1, 1, 2, 2, 3, 3])
    assert torch.equal(layer.weight, rows[:, None].expand(7, 4)) and torch.equal(layer.bias, -rows)


def test_weight_loader_rejects_wrong_shape_and_unknown_shard():
    attn = toy(TINY).model.layers[0].self_attn
    with pytest.raises(ValueError, match=r"'k'.*\(16, 32\).*\(16, 31\)"):
        attn.qkv_proj.weight.weight_loader(attn.qkv_proj.weight, torch.zeros(16, 31), "k")
    attn = toy({**TINY, "qkv_bias": True}).model.layers[0].self_attn
    with pytest.raises(ValueError, match=r"'q'.*\(32,\).*\(16,\)"):
        attn.qkv_proj.bias.weight_loader(attn.qkv_proj.bias, torch.zeros(16), "q")
    gate_up = toy(TINY).model.layers[0].mlp.gate_up_proj.weight
    with pytest.raises(ValueError, match=r"1.*\(48, 32\).*\(32, 48\)"):
        gate_up.weight_loader(gate_up, torch.zeros(32, 48), 1)
    with pytest.raises(ValueError, match="shard id"):
        gate_up.weight_loader(gate_up, torch.zeros(48, 32), "up")


def test_rotary_cache_is_rebuilt_after_to_empty_and_grows():
    with torch.device("meta"):
        rotary = RotaryEmbedding(8, 4, 10000.0)
    rotary.to_empty(device="cpu")  # garbage memory: the cache must be recomputed, not trusted
    reference = RotaryEmbedding(8, 16, 10000.0)
    cos, sin = rotary(3)
    assert torch.equal(cos, reference(3)[0]) and torch.equal(sin, reference(3)[1])
    cos, sin = rotary(16)  # longer than max_positions
    assert rotary.cos_sin_cache.shape == (16, 8) and torch.equal(cos, reference(16)[0])


@pytest.mark.parametrize("tie", [False, True])
def test_meta_build_then_to_empty_and_load(tie):
    config = {**ALL_ON, "tie": tie}
    source = toy(config, seed=4)
    with torch.device("meta"):
        model = toy(config)
    model.to_empty(device="cpu")  # makes new Parameter objects
    assert loaders_bound(model)
    assert (model.lm_head.weight is model.model.embed_tokens.weight) is tie
    assert load_hf(model, hf_state_dict(source)) == set(dict(model.named_parameters()))
    ids = torch.randint(0, 100, (2, 6))
    torch.testing.assert_close(model(ids), source(ids))  # rotary cache was rebuilt off meta


def test_tied_weights_share_one_parameter_after_to_empty_and_deepcopy():
    model = toy({**TINY, "tie": True, "qkv_bias": True}, seed=0)
    for m in (model, copy.deepcopy(model), toy({**TINY, "tie": True}).to_empty(device="cpu")):
        assert m.lm_head.weight is m.model.embed_tokens.weight
        assert len(list(m.parameters())) == len(dict(m.named_parameters(remove_duplicate=False))) - 1
        assert loaders_bound(m)
    clone = copy.deepcopy(model)
    assert clone.model.layers[0].self_attn.qkv_proj.weight is not model.model.layers[0].self_attn.qkv_proj.weight
    ids = torch.randint(0, 100, (1, 5))
    torch.testing.assert_close(clone(ids), model(ids))
    assert toy(TINY).lm_head.weight is not toy(TINY).model.embed_tokens.weight


def test_forward_shape_is_bidirectional_and_outgrows_max_positions():
    model = toy(TINY, seed=0)
    ids = torch.randint(0, 100, (2, 7))
    logits = model(ids)
    assert logits.shape == (2, 7, 100) and torch.isfinite(logits).all()
    changed = ids.clone()
    changed[:, -1] = (changed[:, -1] + 1) % 100
    assert not torch.allclose(model(changed)[:, 0], logits[:, 0])  # first token sees the last
    short = toy({**TINY, "max_positions": 4}, seed=0)  # same weights, tiny rotary cache
    torch.testing.assert_close(short(ids), logits)


def test_q_norm_and_k_norm_act_per_head():
    model = toy(ALL_ON, seed=5)
    assert model.model.layers[0].self_attn.q_norm.weight.shape == (16,)  # head_dim, not hidden // heads
    ids = torch.randint(0, 100, (1, 4))
    before = model(ids)
    with torch.no_grad():
        model.model.layers[0].self_attn.k_norm.weight.mul_(3)
    assert not torch.allclose(model(ids), before)


def test_mlp_is_silu_gated_with_shard_0_as_gate():
    model = toy(TINY, seed=1)
    sd = hf_state_dict(model)
    gate, up, down = (sd[f"model.trunk.blocks.0.{n}.weight"] for n in ("w_gate", "w_up", "out"))
    check_gated_mlp(model.model.layers[0].mlp, gate, up, down)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_state_dict_inverts_the_mapping(tie):
    source, target = toy({**ALL_ON, "tie": tie}, seed=2), toy({**ALL_ON, "tie": tie}, seed=3)
    sd = hf_state_dict(source)
    block = "model.trunk.blocks.1"
    assert {"model.trunk.embed.weight", "model.norm.weight", f"{block}.w_gate.weight", f"{block}.w_up.bias",
            f"{block}.out.weight", f"{block}.self_attn.o_proj.bias", f"{block}.self_attn.q_norm.weight",
            *(f"{block}.w{p}.{w}" for p in "qkv" for w in ("weight", "bias"))} <= set(sd)  # fmt: skip
    assert ("model.trunk.out.weight" in sd) is not tie  # the longest key wins: lm_head, not a down_proj
    assert len(sd) == 2 + (not tie) + 2 * (4 + 6 + 2 + 4 + 2)  # 4 norms; q, k, v, o, gate, up, down w+b
    assert sd[f"{block}.wk.weight"].shape == (2 * 16, 32)
    check_round_trip(source, target, sd)


def test_hf_name_replaces_whole_segments_longest_first():
    mapping = ToyLM.packed_modules_mapping
    assert hf_name("lm_head.weight", None, mapping) == "model.trunk.out.weight"
    assert hf_name("model.layers.3.mlp.down_proj.weight", None, mapping) == "model.trunk.blocks.3.out.weight"
    assert hf_name("model.layers.0.mlp.gate_up_proj.bias", 1, mapping) == "model.trunk.blocks.0.w_up.bias"
    assert hf_name("model.layers.0.self_attn.qkv_proj.weight", "v", mapping) == "model.trunk.blocks.0.wv.weight"
    assert hf_name("model.layers_x.norm", None, mapping) == "model.layers_x.norm"  # never part of a segment


def test_config_is_frozen_with_family_neutral_defaults():
    c = ToyLM.resolve_config({})
    assert (c.qkv_bias, c.o_bias, c.mlp_bias, c.qk_norm, c.tie) == (False,) * 5
    assert (c.rope_theta, c.max_positions) == (10000.0, 2048)
    with pytest.raises(dataclasses.FrozenInstanceError):
        c.hidden = 1
