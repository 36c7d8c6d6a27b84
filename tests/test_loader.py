"""The loader on real safetensors files: resolution order, matching rules, report, seed API."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffulex_core.checkpoint import LoadContext, ResolvedWeight
from diffulex_core.errors import LoadError, LoadPlanError, WeightSpecError
from diffulex_core.loader import (
    apply_resolved_weight,
    default_weight_loader,
    load_checkpoint,
    load_model,
    plan_checkpoint,
    resolve_weight_spec,
    try_load_direct,
    try_load_via_packed_mapping,
)
from diffulex_core.loading.packed_mapping import PackedMapping, merge_mappings


def linear(n=2, m=2):
    return nn.Linear(m, n, bias=False)


def write(tmp_path, tensors, name="model.safetensors"):
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.clone().contiguous() for k, v in tensors.items()}, str(tmp_path / name))
    return tmp_path


def placements(report):
    return {p.name: p for p in report.placements}


class Inner(nn.Module):
    def __init__(self):
        super().__init__()
        self.proj = linear()
        self.asked = []

    def resolve_checkpoint_weight(self, suffix, ctx):
        self.asked.append((suffix, ctx.full_name))
        if suffix == "legacy.weight":
            return ResolvedWeight(param="proj.weight")  # relative to this module
        return None


class Outer(nn.Module):
    def __init__(self):
        super().__init__()
        self.inner = Inner()
        self.asked = []

    def resolve_checkpoint_weight(self, suffix, ctx):
        self.asked.append(suffix)
        if suffix == "inner.legacy.weight" or suffix == "inner.outer_only.weight":
            return ResolvedWeight(param="inner.proj.weight")
        return None


class OrderModel(nn.Module):
    uses_test_resolver = True
    packed_modules_mapping = {"module_or_mapping": ("by_mapping", None), "mapped_or_exact": ("by_mapping", None)}

    def __init__(self):
        super().__init__()
        for name in ("everyone", "by_plugin", "by_module", "by_mapping", "mapped_or_exact"):
            setattr(self, name, linear())
        self.outer = Outer()

    def resolve_checkpoint_weight(self, suffix, ctx):
        if suffix in ("everyone.weight", "module_or_mapping.weight"):
            return ResolvedWeight(param="by_module.weight")
        return None


@pytest.fixture
def resolver_plugin(use_plugins):
    return use_plugins("resolver")


def test_resolution_order_plugin_then_module_then_mapping_then_exact(resolver_plugin, tmp_path):
    w = torch.ones(2, 2)
    path = write(tmp_path, {"everyone.weight": w, "module_or_mapping.weight": w, "mapped_or_exact.weight": w,
                            "by_plugin.weight": w, "w_in.weight": w})
    report = plan_checkpoint(OrderModel(), path, strict=False).report
    got = {name: (p.target, p.rule) for name, p in placements(report).items()}
    assert got["everyone.weight"] == ("by_plugin.weight", "plugin:resolver")
    assert got["module_or_mapping.weight"] == ("by_module.weight", "module:<root>")
    assert got["mapped_or_exact.weight"] == ("by_mapping.weight", "packed_mapping")
    assert got["by_plugin.weight"] == ("by_plugin.weight", "exact")
    assert got["w_in.weight"] == ("by_mapping.weight", "packed_mapping")  # the plugin's mapping, merged


def test_module_resolvers_are_asked_most_specific_prefix_first(use_plugins, tmp_path):
    use_plugins()
    model = OrderModel()
    path = write(tmp_path, {"outer.inner.legacy.weight": torch.ones(2, 2),
                            "outer.inner.outer_only.weight": torch.ones(2, 2)})
    report = plan_checkpoint(model, path, family="fam", config="cfg", strict=False).report
    got = {name: (p.target, p.rule) for name, p in placements(report).items()}
    assert got["outer.inner.legacy.weight"] == ("outer.inner.proj.weight", "module:outer.inner")
    assert got["outer.inner.outer_only.weight"] == ("outer.inner.proj.weight", "module:outer")
    assert model.outer.inner.asked == [("legacy.weight", "outer.inner.legacy.weight"),
                                       ("outer_only.weight", "outer.inner.outer_only.weight")]
    assert model.outer.asked == ["inner.outer_only.weight"]  # only asked when the inner module declined


def test_plugin_resolver_gets_a_load_context(resolver_plugin, tmp_path):
    import diffulex_test_resolver

    diffulex_test_resolver.SEEN_CONTEXTS.clear()
    path = write(tmp_path, {"by_plugin.weight": torch.ones(2, 2)})
    plan_checkpoint(OrderModel(), path, family="fam", config={"k": 1}, strict=False)
    [ctx] = diffulex_test_resolver.SEEN_CONTEXTS
    assert isinstance(ctx, LoadContext)
    assert (ctx.full_name, ctx.family, ctx.config, ctx.tp_rank, ctx.tp_size) == (
        "by_plugin.weight", "fam", {"k": 1}, 0, 1)
    assert ctx.checkpoint == str(path)


def test_plugin_skip_is_reported_with_its_reason(resolver_plugin, tmp_path):
    model = nn.Module()
    model.uses_test_resolver = True
    model.fc = linear()
    path = write(tmp_path, {"fc.weight": torch.ones(2, 2), "optimizer_state": torch.zeros(3)})
    report = load_checkpoint(model, path)
    assert report.skipped == {"optimizer_state": "training-only state"}
    assert report.bytes_read == 16  # the skipped tensor is not read
    assert torch.equal(model.fc.weight, torch.ones(2, 2))


def test_plugin_returning_a_wrong_type_is_a_clear_error(resolver_plugin, tmp_path):
    model = nn.Module()
    model.uses_test_resolver = True
    with pytest.raises(WeightSpecError, match="plugin 'resolver'.*returned str for 'broken.weight'"):
        plan_checkpoint(model, write(tmp_path, {"broken.weight": torch.ones(1)}))


def test_conflicting_packed_mappings_name_both_sources(resolver_plugin, tmp_path):
    model = OrderModel()
    model.plugin_mapping = {"mapped_or_exact": ("everyone", None)}
    with pytest.raises(WeightSpecError, match="OrderModel.packed_modules_mapping.*plugin 'resolver'"):
        plan_checkpoint(model, write(tmp_path, {"everyone.weight": torch.ones(2, 2)}))


def test_segment_matching_and_most_specific_key():
    mapping = PackedMapping(merge_mappings([("test", {
        "model.transformer.ff_out": "lm_head", "ff_out": "mlp.down_proj", "transformer.blocks": "layers",
        "q_proj": ("self_attn.qkv_proj", "q"), "transformer.wte": "embed_tokens",
    })]))
    m = mapping.map
    assert m("model.transformer.ff_out.weight").name == "lm_head.weight"
    assert m("model.transformer.blocks.3.ff_out.weight").name == "model.layers.3.mlp.down_proj.weight"
    q = m("model.transformer.blocks.0.q_proj.weight")
    assert (q.name, q.shard_id) == ("model.layers.0.self_attn.qkv_proj.weight", "q")
    assert m("model.transformer.blocks.0.ff_out2.weight").name == "model.layers.0.ff_out2.weight"  # no raw substring
    assert m("model.transformer.blocks.0.my_q_proj.weight").shard_id is None
    assert m("unrelated.weight") is None


def test_malformed_mapping_is_rejected_with_its_source():
    with pytest.raises(WeightSpecError, match="from plugin 'x'"):
        merge_mappings([("plugin 'x'", {"q_proj": ("qkv", "q", "extra")})])


def test_llada_names_load_through_the_plugin_mapping_with_no_family_in_core(tmp_path):
    from diffulex_llada.model import build_llada, to_hf_state_dict

    torch.manual_seed(0)
    source = build_llada({})
    path = write(tmp_path, to_hf_state_dict(source))
    with torch.device("meta"):
        target = build_llada({})
    report = load_checkpoint(target, path, device="cpu")
    by_name = placements(report)
    assert by_name["model.transformer.ff_out.weight"].target == "lm_head.weight"
    assert by_name["model.transformer.blocks.1.ff_out.weight"].target == "model.layers.1.mlp.down_proj.weight"
    for key, value in source.state_dict().items():
        assert torch.equal(value, target.state_dict()[key]), key
    ids = torch.arange(10).unsqueeze(0)
    assert torch.equal(source(ids), target(ids))


def test_tied_parameters_are_counted_once_and_casting_works(tmp_path):
    from diffulex_dream.model import build_dream, to_hf_state_dict

    torch.manual_seed(0)
    source = build_dream({"tie_word_embeddings": True})
    state = to_hf_state_dict(source)
    assert "lm_head.weight" not in state
    path = write(tmp_path, state)
    target = build_dream({"tie_word_embeddings": True}).to(torch.bfloat16)
    report = load_checkpoint(target, path)
    assert report.missing == [] and report.ok
    assert torch.equal(target.lm_head.weight, source.model.embed_tokens.weight.to(torch.bfloat16))


def test_transform_and_shard_shapes_are_checked_before_writing(tmp_path):
    class Transposed(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = linear(2, 3)

        def resolve_checkpoint_weight(self, suffix, ctx):
            return ResolvedWeight(param="fc.weight", transform=lambda t: t.t()) if suffix == "fc_t.weight" else None

    model = Transposed()
    before = model.fc.weight.detach().clone()
    load_checkpoint(model, write(tmp_path / "ok", {"fc_t.weight": torch.arange(6.0).view(3, 2)}))
    assert torch.equal(model.fc.weight, torch.arange(6.0).view(3, 2).t())
    model.fc.weight.data.copy_(before)
    with pytest.raises(LoadPlanError, match=r"fc_t.weight.*shape \[3, 3\] does not fit param 'fc.weight' of shape "
                                            r"\[2, 3\]"):
        load_checkpoint(model, write(tmp_path / "bad", {"fc_t.weight": torch.ones(3, 3)}))
    assert torch.equal(model.fc.weight, before)


def test_packed_shard_shape_mismatch_is_found_by_the_plan(tmp_path):
    from diffulex_dream.model import build_dream, to_hf_state_dict

    model = build_dream({})
    state = to_hf_state_dict(build_dream({}))
    state["model.layers.0.self_attn.k_proj.weight"] = torch.ones(5, 64)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadPlanError) as excinfo:
        load_checkpoint(model, write(tmp_path, state))
    message = str(excinfo.value)
    assert "model.layers.0.self_attn.k_proj.weight" in message and "model.layers.0.self_attn.qkv_proj.weight" in message
    assert "shard 'k'" in message and "(5, 64)" in message
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())


def test_custom_loader_covers_and_expected_missing(resolver_plugin, tmp_path):
    received = []

    class Custom(nn.Module):
        uses_test_resolver = True
        expected_missing_keys = ["cache.*"]

        def __init__(self):
            super().__init__()
            self.fc = linear()
            self.cache = nn.Module()
            self.cache.table = nn.Parameter(torch.zeros(3))
            self.block = nn.Module()
            self.block.plugin_expected = nn.Parameter(torch.zeros(1))
            self.register_buffer("step", torch.zeros(1))

        def resolve_checkpoint_weight(self, suffix, ctx):
            if suffix == "special":
                return ResolvedWeight(loader=received.append, covers=("step",))
            return None

    model = Custom()
    report = load_checkpoint(model, write(tmp_path, {"fc.weight": torch.ones(2, 2), "special": torch.full((4,), 7.0)}))
    assert report.missing == [] and report.loaded_by_source == {"exact": 1, "module:<root>": 1}
    assert len(received) == 1 and torch.equal(received[0], torch.full((4,), 7.0))


def test_meta_model_needs_a_device(tmp_path):
    with torch.device("meta"):
        model = nn.Sequential(linear())
    with pytest.raises(LoadError, match="meta device; pass device="):
        load_checkpoint(model, write(tmp_path, {"0.weight": torch.ones(2, 2)}))
    assert model[0].weight.is_meta


def test_report_is_json_and_counts_bytes(tmp_path):
    model = nn.Sequential(linear(4, 8))
    report = load_checkpoint(model, write(tmp_path, {"0.weight": torch.ones(4, 8)}))
    data = json.loads(json.dumps(report.to_dict()))
    assert data["bytes_read"] == data["bytes_total"] == 4 * 8 * 4
    assert data["tensors"][0]["rule"] == "exact" and data["ok"] is True and data["applied"] is True


def test_sharded_transformers_checkpoint_gives_transformers_logits(tmp_path):
    """A real Qwen2 checkpoint from transformers' save_pretrained, loaded into the Dream family."""
    transformers = pytest.importorskip("transformers")
    from diffulex_dream.model import build_dream

    config = transformers.Qwen2Config(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=256, max_position_embeddings=64,
                                      tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(config).eval()
    reference.save_pretrained(tmp_path, max_shard_size="100KB")
    assert (tmp_path / "model.safetensors.index.json").exists()
    with torch.device("meta"):
        model = build_dream(json.loads((tmp_path / "config.json").read_text()))
    report = load_checkpoint(model, tmp_path, device="cpu")
    assert len(report.files) > 1 and report.ok
    ids = torch.randint(0, 256, (2, 12))
    bidirectional = torch.zeros(2, 1, 12, 12)  # diffusion LMs attend both ways
    with torch.no_grad():
        expected = reference(input_ids=ids, attention_mask=bidirectional).logits
        got = model(ids)
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- seed-compatible helpers


def test_default_weight_loader_copies_and_checks_shape():
    param = nn.Parameter(torch.zeros(2, 2))
    default_weight_loader(param, torch.ones(2, 2, dtype=torch.float64))
    assert torch.equal(param, torch.ones(2, 2))
    with pytest.raises(ValueError, match=r"parameter \(2, 2\), checkpoint tensor \(4,\)"):
        default_weight_loader(param, torch.ones(4))


def test_seed_helpers_on_tensors_in_hand():
    model = OrderModel()
    assert try_load_direct(model, "everyone.weight", torch.full((2, 2), 3.0))
    assert torch.equal(model.everyone.weight, torch.full((2, 2), 3.0))
    assert not try_load_direct(model, "nothing.weight", torch.ones(2, 2))
    assert try_load_via_packed_mapping(model, {"alias": ("by_mapping", None)}, "alias.weight", torch.full((2, 2), 4.0))
    assert torch.equal(model.by_mapping.weight, torch.full((2, 2), 4.0))
    assert not try_load_via_packed_mapping(model, {"alias": "by_mapping"}, "other.weight", torch.ones(2, 2))
    spec = resolve_weight_spec(model, "outer.inner.legacy.weight", config=None)
    assert spec == ResolvedWeight(param="outer.inner.proj.weight")
    apply_resolved_weight(spec, torch.full((2, 2), 5.0), model=model)
    assert torch.equal(model.outer.inner.proj.weight, torch.full((2, 2), 5.0))
    assert resolve_weight_spec(model, "nobody.weight") is None
    with pytest.raises(WeightSpecError, match="does not have"):
        apply_resolved_weight(ResolvedWeight(param="ghost.weight"), torch.ones(1), model=model)
    with pytest.raises(WeightSpecError, match="pass model="):
        apply_resolved_weight(ResolvedWeight(param="outer.inner.proj.weight"), torch.ones(2, 2))


def test_load_model_seed_entry_point(tmp_path):
    model = nn.Sequential(linear())
    path = write(tmp_path, {"0.weight": torch.full((2, 2), 2.0)})
    config = SimpleNamespace(model=str(path), model_name="toy", use_lora=False, lora_path=None, pre_merge_lora=False)
    assert load_model(model, config) is model
    assert torch.equal(model[0].weight, torch.full((2, 2), 2.0))
    model[0].weight.data.zero_()
    with pytest.raises(LoadError, match="LoRA adapter directory .*no-adapter does not exist"):
        load_model(model, SimpleNamespace(**{**vars(config), "use_lora": True,
                                             "lora_path": str(tmp_path / "no-adapter")}))
    assert torch.equal(model[0].weight, torch.zeros(2, 2))


@pytest.mark.parametrize(
    "kwargs",
    [
        {"param": ""},
        {"buffer": 3},
        {"param": "a", "transform": 3},
        {"loader": "not callable"},
        {"param": "a", "covers": ("b",)},
        {"loader": print, "covers": "b"},
    ],
)
def test_resolved_weight_rejects_malformed_fields(kwargs):
    with pytest.raises(WeightSpecError):
        ResolvedWeight(**kwargs)


@pytest.mark.parametrize("threads", [1, 2])
def test_mixed_sizes_chunked_batched_and_skipped_load_exactly(tmp_path, threads, capsys):
    """A tensor larger than a read chunk, runs of small tensors, and skipped tensors between them."""

    class Mixed(nn.Module):
        def __init__(self):
            super().__init__()
            self.big = nn.Parameter(torch.zeros(5 * 1024 * 1024 + 3))  # 20 MiB + 12 bytes: several chunks
            self.small = nn.ParameterList([nn.Parameter(torch.zeros(7, dtype=torch.bfloat16)) for _ in range(300)])
            self.mid = nn.Parameter(torch.zeros(100_000, dtype=torch.float16))

        def resolve_checkpoint_weight(self, suffix, ctx):
            return ResolvedWeight(skip=True, reason="gap") if suffix.startswith("unused.") else None

    torch.manual_seed(0)
    tensors = {"big": torch.randn(5 * 1024 * 1024 + 3), "mid": torch.randn(100_000).half()}
    for i in range(300):
        tensors[f"small.{i}"] = torch.randn(7).bfloat16()
        if i % 50 == 0:
            tensors[f"unused.{i}"] = torch.randn(100)
    model = Mixed()
    report = load_checkpoint(model, write(tmp_path, tensors), threads=threads, progress=True)
    state = model.state_dict()
    for name, value in tensors.items():
        if not name.startswith("unused."):
            assert torch.equal(state[name], value), name
    assert len(report.skipped) == 6
    assert report.bytes_read == sum(v.numel() * v.element_size() for k, v in tensors.items()
                                    if not k.startswith("unused."))
    assert "loading" in capsys.readouterr().err  # the progress bar was drawn when asked for


def test_two_different_tensors_writing_one_tied_parameter_is_a_problem(tmp_path):
    from diffulex_dream.model import build_dream

    model = build_dream({"tie_word_embeddings": True})
    state = {k: v.clone() for k, v in model.state_dict().items()}
    before = model.model.embed_tokens.weight.clone()
    state["lm_head.weight"] = torch.randn_like(state["model.embed_tokens.weight"])
    with pytest.raises(LoadPlanError, match="'lm_head.weight' .* and 'model.embed_tokens.weight' .* different values"):
        load_checkpoint(model, write(tmp_path, state))
    assert torch.equal(model.model.embed_tokens.weight, before)


def test_empty_and_scalar_tensors_load(tmp_path):
    model = nn.Module()
    model.empty = nn.Parameter(torch.zeros(0, 4))
    model.none = nn.Parameter(torch.zeros(0))
    model.scalar = nn.Parameter(torch.tensor(0.0))
    model.register_buffer("count", torch.tensor(0, dtype=torch.int64))
    tensors = {"empty": torch.zeros(0, 4), "none": torch.zeros(0), "scalar": torch.tensor(2.5),
               "count": torch.tensor(7, dtype=torch.int64)}
    report = load_checkpoint(model, write(tmp_path, tensors))
    assert report.ok and model.scalar.item() == 2.5 and model.count.item() == 7
