"""Model-family code written the way Diffulex writes it loads unchanged, strict included.

The family under test is a real plugin distribution (``tests/plugin_dists/diffulex-test-seedstyle``,
pip-installed, found through its entry point); the checkpoint is written by transformers'
``save_pretrained`` from a tiny random Qwen3-MoE, whose own parameters are the reference.
"""

from __future__ import annotations

import json
import warnings
from types import SimpleNamespace

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffulex_core.errors import LoadApplyError, LoadPlanError, LoadWarning
from diffulex_core.loader import load_checkpoint, load_model
from diffulex_core.registry import get_family

transformers = pytest.importorskip("transformers")

LAYERS, EXPERTS, INTER = 2, 4, 16


@pytest.fixture(scope="module")
def hf_checkpoint(tmp_path_factory):
    """(directory, reference state dict) of a sharded Qwen3-MoE checkpoint with a tied LM head."""
    config = transformers.Qwen3MoeConfig(
        hidden_size=32, intermediate_size=64, moe_intermediate_size=INTER, num_hidden_layers=LAYERS,
        num_attention_heads=4, num_key_value_heads=2, head_dim=8, vocab_size=64, num_experts=EXPERTS,
        num_experts_per_tok=2, tie_word_embeddings=True, max_position_embeddings=64,
    )
    torch.manual_seed(0)
    reference = transformers.Qwen3MoeForCausalLM(config)
    path = tmp_path_factory.mktemp("qwen3moe")
    reference.save_pretrained(path, max_shard_size="20KB")
    assert len(list(path.glob("*.safetensors"))) > 1
    return path, {k: v.detach().clone() for k, v in reference.state_dict().items()}


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    out = {}
    for file in sorted(path.glob("*.safetensors")):
        with safe_open(file, "pt") as f:
            out.update({name: f.get_tensor(name) for name in f.keys()})
    return out


def rewrite(tmp_path, src, change) -> str:
    """A single-file copy of checkpoint ``src`` with ``change(tensors)`` applied, and its config."""
    tensors = checkpoint_tensors(src)
    change(tensors)
    tmp_path.mkdir(parents=True, exist_ok=True)
    save_file(tensors, str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text((src / "config.json").read_text())
    return tmp_path


@pytest.fixture
def family(use_plugins):
    use_plugins("seedstyle")
    return get_family("seedstyle_moe")


def build(family, path, meta: bool):
    config = json.loads((path / "config.json").read_text())
    if meta:
        with torch.device("meta"):
            return family(config)
    model = family(config)
    with torch.no_grad():  # defined values (torch.empty may hold NaN), so "untouched" can be compared
        for tensor in model.state_dict().values():
            tensor.normal_()
    return model


def assert_equals_reference(model, ref):
    """Every parameter of the seed-style model against transformers' own parameters."""
    assert torch.equal(model.model.embed_tokens.weight, ref["model.embed_tokens.weight"])
    assert torch.equal(model.final_norm.weight, ref["model.norm.weight"])
    assert torch.equal(model.lm_head.weight, ref["model.embed_tokens.weight"])
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # still tied
    for i, layer in enumerate(model.model.layers):
        p = f"model.layers.{i}."
        qkv = torch.cat([ref[p + f"self_attn.{s}_proj.weight"] for s in "qkv"])
        assert torch.equal(layer.self_attn.qkv_proj.weight, qkv)
        for ours, theirs in (("self_attn.o_proj", "self_attn.o_proj"), ("self_attn.q_norm", "self_attn.q_norm"),
                             ("self_attn.k_norm", "self_attn.k_norm"), ("input_layernorm", "input_layernorm"),
                             ("post_attention_layernorm", "post_attention_layernorm"), ("mlp.gate", "mlp.gate")):
            assert torch.equal(layer.get_parameter(ours + ".weight"), ref[p + theirs + ".weight"]), ours
        assert torch.equal(layer.mlp.experts.w13_weight, ref[p + "mlp.experts.gate_up_proj"])
        assert torch.equal(layer.mlp.experts.w2_weight, ref[p + "mlp.experts.down_proj"])


@pytest.mark.parametrize("meta", [True, False], ids=["meta-built", "materialized"])
def test_seed_style_family_loads_strict_from_a_transformers_checkpoint(family, hf_checkpoint, meta, monkeypatch):
    from diffulex_test_seedstyle.model import QKVLinear

    calls = []
    original = QKVLinear.weight_loader
    monkeypatch.setattr(QKVLinear, "weight_loader",
                        lambda self, param, w, shard: (calls.append(w.is_meta), original(self, param, w, shard))[1])
    path, ref = hf_checkpoint
    model = build(family, path, meta)
    report = load_checkpoint(model, path, device="cpu" if meta else None)  # strict by default

    assert report.ok and report.missing == [] and report.unexpected == []
    assert_equals_reference(model, ref)
    assert calls.count(False) == 3 * LAYERS  # each weight_loader ran once per tensor for real
    by_name = {p.name: p for p in report.placements}
    assert (by_name["model.norm.weight"].target, by_name["model.norm.weight"].rule) == ("final_norm.weight",
                                                                                        "packed_mapping:root")
    q = by_name["model.layers.0.self_attn.q_proj.weight"]
    assert (q.target, q.shard_id, q.rule) == ("model.layers.0.self_attn.qkv_proj.weight", "q",
                                              "module:model.layers.0.self_attn")
    assert "checked when applied" in q.note and "item" in q.note
    assert by_name["model.layers.1.mlp.experts.3.down_proj.weight"].rule == "module:model.layers.1.mlp.experts"
    # What the undeclared loaders wrote is named, tensor by tensor.
    for i in range(LAYERS):
        w13 = report.written_by_loaders[f"model.layers.{i}.mlp.experts.w13_weight"]
        assert sorted(w13) == sorted(f"model.layers.{i}.mlp.experts.{e}.{proj}_proj.weight"
                                     for e in range(EXPERTS) for proj in ("gate", "up"))
        assert len(report.written_by_loaders[f"model.layers.{i}.mlp.experts.w2_weight"]) == EXPERTS


def test_seed_door_load_model_loads_the_same(family, hf_checkpoint):
    path, ref = hf_checkpoint
    model = build(family, path, meta=False)
    config = SimpleNamespace(model=str(path), model_name="seedstyle_moe", use_lora=False, lora_path=None,
                             pre_merge_lora=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a clean load warns about nothing
        assert load_model(model, config) is model
    assert_equals_reference(model, ref)
    assert model.diffulex_load_report.ok


@pytest.mark.parametrize("meta", [True, False], ids=["meta-built", "materialized"])
def test_an_expert_nothing_writes_is_missing_and_the_model_is_untouched(family, hf_checkpoint, tmp_path, meta):
    src, _ = hf_checkpoint
    path = rewrite(tmp_path, src, lambda t: t.pop("model.layers.0.mlp.experts.1.up_proj.weight"))
    model = build(family, path, meta)
    before = {k: v.clone() for k, v in model.state_dict().items()} if not meta else None
    with pytest.raises(LoadPlanError, match=r"model\.layers\.0\.mlp\.experts\.w13_weight .*loaders wrote only "
                                            rf"{(2 * EXPERTS - 1) * INTER * 32 * 4} of its "
                                            rf"{2 * EXPERTS * INTER * 32 * 4} bytes"):
        load_checkpoint(model, path, device="cpu" if meta else None)
    if meta:
        assert all(t.is_meta for t in model.state_dict().values())  # back where it was
    else:
        assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())

    # The seed's door loads the rest and says what is missing.
    model = build(family, path, meta=False)
    with pytest.warns(LoadWarning, match="w13_weight"):
        load_model(model, SimpleNamespace(model=str(path), model_name="seedstyle_moe", use_lora=False))
    assert model.diffulex_load_report.missing == ["model.layers.0.mlp.experts.w13_weight"]


def test_failing_model_code_undoes_what_the_loaders_wrote(family, hf_checkpoint, tmp_path):
    src, _ = hf_checkpoint

    def poison(tensors):
        tensors["model.layers.1.self_attn.k_proj.weight"][0, 0] = float("inf")

    path = rewrite(tmp_path, src, poison)
    model = build(family, path, meta=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadPlanError, match=r"model\.layers\.1\.self_attn\.k_proj\.weight.*shard 'k'.*non-finite"):
        load_checkpoint(model, path)
    # Layer 0's experts were written by their loaders before the failure; they were put back.
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    # The seed's door keeps no undo copies (as Diffulex): it refuses too, and says what was written.
    with pytest.raises(LoadApplyError, match=r"model code had already written \d+ tensor\(s\), e.g. "
                                             r"'model\.layers\.0\..*not undone(?s:.*)non-finite"):
        load_model(model, SimpleNamespace(model=str(path), model_name="seedstyle_moe", use_lora=False))
    # rollback=False on our door: the same, and nothing after the failing tensor was written.
    model = build(family, path, meta=False)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(LoadApplyError, match="not undone"):
        load_checkpoint(model, path, rollback=False)
    assert torch.equal(model.model.embed_tokens.weight, before["model.embed_tokens.weight"])  # plain copies come later


def test_unexpected_tensors_ignored_by_the_plugin_or_reported(family, hf_checkpoint, tmp_path):
    src, ref = hf_checkpoint

    def extra(tensors):
        tensors["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.arange(4.0)
        tensors["model.layers.0.mlp.shared_expert_gate.weight"] = torch.ones(1, 32)

    path = rewrite(tmp_path, src, extra)
    model = build(family, path, meta=False)
    with pytest.raises(LoadPlanError, match="unexpected tensor 'model.layers.0.mlp.shared_expert_gate.weight'") as info:
        load_checkpoint(model, path)
    skipped = info.value.report.skipped
    assert skipped == {"model.layers.0.self_attn.rotary_emb.inv_freq":
                       "ignored: matches '*.rotary_emb.inv_freq' of plugin 'seedstyle'"}
    with pytest.warns(LoadWarning, match="shared_expert_gate") as record:
        load_model(model, SimpleNamespace(model=str(path), model_name="seedstyle_moe", use_lora=False))
    assert "inv_freq" not in str(record[0].message)
    assert model.diffulex_load_report.unexpected == ["model.layers.0.mlp.shared_expert_gate.weight"]
    assert_equals_reference(model, ref)


# --------------------------------------------------------------------------- the seed's forms, one by one

from torch import nn  # noqa: E402

from diffulex_core.checkpoint import LoadContext, ResolvedWeight  # noqa: E402
from diffulex_core.errors import WeightSpecError  # noqa: E402
from diffulex_core.loader import (  # noqa: E402
    apply_resolved_weight,
    plan_checkpoint,
    resolve_weight_spec,
    try_load_via_packed_mapping,
)


def write(path, tensors):
    path.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path / "model.safetensors"))
    return path


class Resolving(nn.Module):
    """A model whose root resolver answers from a table set by the test."""

    def __init__(self, answers):
        super().__init__()
        self.fc = nn.Linear(2, 2, bias=False)
        self.other = nn.Linear(2, 2, bias=False)
        self.register_buffer("table", torch.zeros(3))
        self.answers = answers

    def resolve_checkpoint_weight(self, suffix, ctx):
        answer = self.answers.get(suffix)
        return answer(self) if callable(answer) else answer


def test_every_construction_the_seed_accepts_is_accepted_in_field_order():
    w = nn.Parameter(torch.zeros(1))
    for spec in (ResolvedWeight(), ResolvedWeight(param=w, loader=print), ResolvedWeight(loader=print, shard_id=0),
                 ResolvedWeight(skip=True), ResolvedWeight(param=w, buffer=torch.zeros(1)),
                 ResolvedWeight(w, None, 1)):
        assert isinstance(spec, ResolvedWeight)
    assert ResolvedWeight(w, None, 1).shard_id == 1  # the seed's positional order: param, buffer, shard_id, ...
    ctx = LoadContext({"cfg": 1}, "a.weight")  # the seed's positional form
    assert (ctx.config, ctx.full_name) == ({"cfg": 1}, "a.weight")


def test_parameter_and_buffer_objects_and_the_seeds_precedence(tmp_path):
    written = []
    answers = {
        "by_object": lambda m: ResolvedWeight(param=m.fc.weight),
        "by_data": lambda m: ResolvedWeight(param=m.other.weight.data),  # a tensor over its memory counts
        "table_ints": lambda m: ResolvedWeight(buffer=m.get_buffer("table")),
        "loader_wins": lambda m: ResolvedWeight(param=m.fc.weight, loader=written.append, shard_id=3),
        "skip_wins": lambda m: ResolvedWeight(skip=True, param=m.fc.weight),
    }
    model = Resolving(answers)
    tensors = {"by_object": torch.full((2, 2), 1.0), "by_data": torch.full((2, 2), 2.0),
               "table_ints": torch.tensor([1, 2, 3], dtype=torch.int64),  # integers into a float buffer, as copy_
               "loader_wins": torch.full((5,), 7.0), "skip_wins": torch.ones(9)}
    report = load_checkpoint(model, write(tmp_path, tensors))
    assert torch.equal(model.fc.weight, torch.full((2, 2), 1.0))
    assert torch.equal(model.other.weight, torch.full((2, 2), 2.0))
    assert torch.equal(model.table, torch.tensor([1.0, 2.0, 3.0]))
    assert len(written) == 1 and torch.equal(written[0], torch.full((5,), 7.0))
    by_name = {p.name: p for p in report.placements}
    assert (by_name["by_data"].kind, by_name["by_data"].target) == ("param", "other.weight")
    assert by_name["loader_wins"].note == "loader wins over param, shard_id (the seed's precedence)"
    assert report.skipped == {"skip_wins": "skipped by module:<root> (no reason given)"}


def test_an_object_that_is_not_in_the_model_names_the_tensor(tmp_path):
    stranger = nn.Parameter(torch.zeros(2, 2))
    model = Resolving({"fc.weight": ResolvedWeight(param=stranger)})
    with pytest.raises(WeightSpecError, match=r"checkpoint tensor 'fc.weight' to a Parameter of shape \[2, 2\] that is "
                                              r"not a parameter or buffer of Resolving"):
        load_checkpoint(model, write(tmp_path, {"fc.weight": torch.ones(2, 2), "other.weight": torch.ones(2, 2)}))


def test_an_empty_spec_is_a_problem_of_that_tensor(tmp_path):
    model = Resolving({"fc.weight": ResolvedWeight()})
    path = write(tmp_path, {"fc.weight": torch.ones(2, 2), "other.weight": torch.ones(2, 2)})
    with pytest.raises(LoadPlanError, match="'fc.weight'.*module:<root> returned a ResolvedWeight with no param"):
        load_checkpoint(model, path)
    with pytest.raises(LoadPlanError, match="no param, buffer, loader or skip"):
        load_model(model, SimpleNamespace(model=str(path), use_lora=False))


def test_float_into_an_integer_buffer_stays_an_error(tmp_path):
    model = nn.Module()
    model.register_buffer("count", torch.zeros(3, dtype=torch.int64))
    with pytest.raises(LoadPlanError, match="dtype torch.float32 cannot be cast to buffer 'count'"):
        load_checkpoint(model, write(tmp_path, {"count": torch.ones(3)}))


def test_instance_resolvers_and_named_modules_in_the_seed_helpers():
    model = nn.Module()
    model.block = nn.Module()
    model.block.proj = nn.Linear(2, 2, bias=False)
    model.block.resolve_checkpoint_weight = (
        lambda suffix, ctx: ResolvedWeight(param=model.block.proj.weight) if suffix == "legacy" else None)
    named = dict(model.named_modules())
    spec = resolve_weight_spec(model, "block.legacy", config={"c": 1}, named_modules=named)
    assert spec.param is model.block.proj.weight
    apply_resolved_weight(spec, torch.full((2, 2), 3.0))  # the seed's two-argument form
    assert torch.equal(model.block.proj.weight, torch.full((2, 2), 3.0))
    assert resolve_weight_spec(model, "block.other", config=None, named_modules=named) is None


def test_a_mapping_value_from_the_models_root_as_in_diffulex_llada(tmp_path):
    """Diffulex's LLaDA: ``transformer.ff_out`` -> root ``lm_head``; block ``ff_out`` -> ``mlp.down_proj``."""
    mapping = {"ff_out": ("mlp.down_proj", None), "transformer.ff_out": ("lm_head", None),
               "transformer.blocks": ("layers", None)}
    model = nn.Module()
    model.model = nn.Module()
    model.model.layers = nn.ModuleList([nn.Module()])
    model.model.layers[0].mlp = nn.Module()
    model.model.layers[0].mlp.down_proj = nn.Linear(2, 2, bias=False)
    model.lm_head = nn.Linear(2, 3, bias=False)
    assert try_load_via_packed_mapping(model, mapping, "model.transformer.ff_out.weight", torch.ones(3, 2), config=None)
    assert torch.equal(model.lm_head.weight, torch.ones(3, 2))
    assert not try_load_via_packed_mapping(model, mapping, "model.transformer.nothing.weight", torch.ones(1), None)

    model.packed_modules_mapping = mapping
    path = write(tmp_path, {"model.transformer.ff_out.weight": torch.full((3, 2), 2.0),
                            "model.transformer.blocks.0.ff_out.weight": torch.full((2, 2), 5.0)})
    report = load_checkpoint(model, path)
    rules = {p.name: (p.target, p.rule) for p in report.placements}
    assert rules == {"model.transformer.ff_out.weight": ("lm_head.weight", "packed_mapping:root"),
                     "model.transformer.blocks.0.ff_out.weight": ("model.layers.0.mlp.down_proj.weight",
                                                                  "packed_mapping")}
    assert torch.equal(model.lm_head.weight, torch.full((3, 2), 2.0))


def test_planning_never_writes_a_materialized_model(tmp_path):
    class Careless(nn.Module):
        """A weight_loader that clears its rows of ``self.weight`` before copying, ignoring its ``param`` argument."""

        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.full((4, 2), 9.0))
            self.weight.weight_loader = self.weight_loader

        def weight_loader(self, param, loaded, shard_id):
            rows = self.weight.data[shard_id * 2 : shard_id * 2 + 2]
            rows.zero_()
            rows.copy_(loaded)

    model = nn.Module()
    model.layer = Careless()
    model.packed_modules_mapping = {"a": ("layer", 0), "b": ("layer", 1)}
    path = write(tmp_path, {"a.weight": torch.ones(2, 2), "b.weight": torch.full((2, 2), 2.0)})
    plan = plan_checkpoint(model, path)
    assert torch.equal(model.layer.weight, torch.full((4, 2), 9.0))  # the dry run was stopped, not the model
    assert all("checked when applied" in p.note for p in plan.report.placements)
    load_checkpoint(model, path)
    assert torch.equal(model.layer.weight, torch.cat([torch.ones(2, 2), torch.full((2, 2), 2.0)]))


def test_a_shard_id_for_a_parameter_without_weight_loader_is_found_by_the_plan(tmp_path):
    model = Resolving({"fc.weight": lambda m: ResolvedWeight(param=m.fc.weight, shard_id=0)})
    path = write(tmp_path, {"fc.weight": torch.ones(2, 2), "other.weight": torch.ones(2, 2)})
    with pytest.raises(LoadPlanError, match="shard id 0 given but param 'fc.weight' has no weight_loader"):
        load_checkpoint(model, path)
