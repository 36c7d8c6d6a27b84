"""LoRA adapters against PEFT itself: base checkpoints written by transformers, adapters by PEFT.

A tiny random Qwen2 is saved with ``save_pretrained``; PEFT wraps a copy with non-zero B
(``init_lora_weights=False``) and saves the adapter. ``load_model`` loads both into the bundled
``dream`` family (Qwen2's layout, bidirectional): its logits must equal PEFT's forward with full
attention, unmerged and pre-merged, and its merged weights ``merge_and_unload()``'s. Bad adapters
must raise a typed error naming what is wrong, with the model unchanged.
"""

from __future__ import annotations

import copy
import json
import math
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

from diffulex_core.errors import CheckpointNotFoundError, LoraAdapterError, LoraConfigError, LoraWarning
from diffulex_core.loader import enable_lora_for_model, load_checkpoint, load_lora_config, load_lora_weights, load_model

transformers = pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

QWEN2 = dict(vocab_size=96, hidden_size=32, num_attention_heads=4, num_key_value_heads=2, intermediate_size=48,
             num_hidden_layers=2, rms_norm_eps=1e-6, tie_word_embeddings=False, rope_theta=10000.0)
IDS = torch.tensor([[1, 5, 90, 33, 2, 71, 8], [60, 4, 4, 12, 95, 0, 17]])
ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def randomized(model: nn.Module, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0, 0.3 if param.dim() > 1 else 1.0)
    return model.eval()


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> tuple[nn.Module, Path]:
    """A random Qwen2 saved by transformers in several shards."""
    reference = randomized(transformers.Qwen2ForCausalLM(transformers.Qwen2Config(**QWEN2)), seed=0)
    directory = tmp_path_factory.mktemp("qwen2")
    reference.save_pretrained(directory, max_shard_size="60KB")
    assert len(list(directory.glob("*.safetensors"))) >= 2
    return reference, directory


def write_adapter(reference: nn.Module, directory: Path, seed: int = 1, **lora) -> nn.Module:
    """PEFT's adapter on a copy of ``reference``, with random (non-zero) A and B; returns the PEFT model."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(copy.deepcopy(reference), peft.LoraConfig(init_lora_weights=False, **lora))
    with torch.no_grad():  # PEFT's init is small; make every adapter matter
        for name, param in model.named_parameters():
            if "lora_" in name:
                param.normal_(0, 0.2)
    model.save_pretrained(directory)
    return model.eval()


def full_attention(model: nn.Module) -> torch.Tensor:
    """The reference's logits with full (bidirectional) attention, as the diffusion families attend."""
    mask = torch.zeros(IDS.shape[0], 1, IDS.shape[1], IDS.shape[1])
    with torch.no_grad():
        return model(input_ids=IDS, attention_mask=mask).logits


def dream(directory: Path, adapter: Path | None, merge: bool = False) -> nn.Module:
    from diffulex_dream.model import build_dream

    model = build_dream(json.loads((directory / "config.json").read_text())).eval()
    seed_config = SimpleNamespace(model=str(directory), model_name="dream", use_lora=adapter is not None,
                                  lora_path=str(adapter) if adapter else None, pre_merge_lora=merge)
    return load_model(model, seed_config)


def logits(model: nn.Module) -> torch.Tensor:
    with torch.no_grad():
        return model(IDS)


def hf_weights(model: nn.Module) -> dict[str, torch.Tensor]:
    from diffulex_dream.model import to_hf_state_dict

    return to_hf_state_dict(model)


def check_against_peft(base, tmp_path, **lora) -> None:
    reference, directory = base
    peft_model = write_adapter(reference, tmp_path / "adapter", **lora)
    expected = full_attention(peft_model)
    assert not torch.allclose(expected, full_attention(reference), atol=1e-3)  # the adapter matters
    unmerged = dream(directory, tmp_path / "adapter")
    torch.testing.assert_close(logits(unmerged), expected, rtol=1e-4, atol=1e-4)
    merged = dream(directory, tmp_path / "adapter", merge=True)
    torch.testing.assert_close(logits(merged), expected, rtol=1e-4, atol=1e-4)
    assert merged.diffulex_load_report.lora.merged and not unmerged.diffulex_load_report.lora.merged
    reference_merged = peft_model.merge_and_unload().state_dict()
    ours = hf_weights(merged)
    for name, tensor in reference_merged.items():
        if name in ours:
            torch.testing.assert_close(ours[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    return unmerged


# --------------------------------------------------------------------------- equal to PEFT


def test_every_projection_unmerged_and_merged_equals_peft(base, tmp_path):
    model = check_against_peft(base, tmp_path, r=4, lora_alpha=8, target_modules=ALL)
    report = model.diffulex_load_report.lora
    qkv = report.modules["model.layers.0.self_attn.qkv_proj"]
    assert sorted((a["adapter"], a["shard_id"], a["r"]) for a in qkv) == [
        (f"model.layers.0.self_attn.{p}_proj", p, 4) for p in "kqv"]
    assert report.tensors == 2 * 7 * 2 and not report.base_weights
    assert model.diffulex_load_report.ok  # the adapter parameters are not "missing" from the base checkpoint


def test_rslora_with_rank_and_alpha_patterns_on_packed_shards(base, tmp_path):
    model = check_against_peft(base, tmp_path, r=4, lora_alpha=8, use_rslora=True, target_modules=ALL,
                               rank_pattern={"v_proj": 2, "layers.1.mlp.up_proj": 6},
                               alpha_pattern={"layers.1.self_attn.q_proj": 3, "down_proj": 5})
    by_adapter = {a["adapter"]: a for adapters in model.diffulex_load_report.lora.modules.values() for a in adapters}
    v0, up1, q1 = (by_adapter[f"model.layers.{n}"]
                   for n in ("0.self_attn.v_proj", "1.mlp.up_proj", "1.self_attn.q_proj"))
    assert (v0["r"], v0["scaling"]) == (2, 8 / math.sqrt(2))
    assert (up1["r"], q1["lora_alpha"], q1["scaling"]) == (6, 3, 3 / 2)


def test_regex_target_modules(base, tmp_path):
    model = check_against_peft(base, tmp_path, r=3, lora_alpha=5, target_modules=r".*\.(q_proj|down_proj)")
    assert sorted(model.diffulex_load_report.lora.modules) == sorted(
        f"model.layers.{i}.{m}" for i in range(2) for m in ("self_attn.qkv_proj", "mlp.down_proj"))


def test_all_linear_saved_expanded_and_written_as_the_shorthand(base, tmp_path):
    check_against_peft(base, tmp_path, r=2, lora_alpha=4, target_modules="all-linear")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert isinstance(config["target_modules"], list)  # PEFT saves the expanded list ...
    config["target_modules"] = "all-linear"  # ... a hand-written config says the shorthand: same modules
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(config))
    expected = logits(dream(base[1], tmp_path / "adapter"))
    model = dream(base[1], tmp_path / "adapter")
    torch.testing.assert_close(logits(model), expected)
    assert "lm_head" not in model.diffulex_load_report.lora.modules  # PEFT's all-linear leaves the output layer


def test_embedding_and_lm_head_adapters_with_their_saved_base_layers(base, tmp_path):
    model = check_against_peft(base, tmp_path, r=4, lora_alpha=8, target_modules=["embed_tokens", "lm_head", "q_proj"])
    report = model.diffulex_load_report.lora
    assert report.modules["model.embed_tokens"][0]["kind"] == "embedding"
    assert sorted(report.base_weights) == ["lm_head.weight", "model.embed_tokens.weight"]


def test_exclude_modules_and_layers_to_transform(base, tmp_path):
    model = check_against_peft(base, tmp_path, r=2, lora_alpha=2, target_modules=["q_proj", "o_proj", "down_proj"],
                               exclude_modules=["model.layers.1.self_attn.o_proj"], layers_to_transform=[1])
    assert sorted(model.diffulex_load_report.lora.modules) == [
        "model.layers.1.mlp.down_proj", "model.layers.1.self_attn.qkv_proj"]


def test_enable_then_load_lora_weights_the_seed_way(base, tmp_path):
    reference, directory = base
    peft_model = write_adapter(reference, tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    from diffulex_dream.model import build_dream

    with torch.device("meta"):
        model = build_dream(json.loads((directory / "config.json").read_text()))
    enable_lora_for_model(model, load_lora_config(tmp_path / "adapter"))
    assert load_checkpoint(model, directory, device="cpu").ok  # adapters are not missing base weights
    load_lora_weights(model, tmp_path / "adapter", pre_merge_lora=True)
    torch.testing.assert_close(logits(model.eval()), full_attention(peft_model), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("merge", [False, True])
def test_checked_on_a_meta_model_then_written_after_the_base_load(base, tmp_path, merge):
    """The order of ``diffulex load --lora``: the adapter is checked (and its adapters added) on the
    meta device, the base load materializes the model, then the tensors land on the live parameters."""
    from diffulex_core.errors import LoraError
    from diffulex_core.lora.adapters import prepare_lora
    from diffulex_dream.model import build_dream

    reference, directory = base
    peft_model = write_adapter(reference, tmp_path / "adapter", r=4, lora_alpha=8,
                               target_modules=["q_proj", "down_proj"])
    with torch.device("meta"):
        model = build_dream(json.loads((directory / "config.json").read_text())).eval()
    prepared = prepare_lora(model, tmp_path / "adapter", merge=merge)
    with pytest.raises(LoraError, match="still on the meta device"):
        prepared.apply()
    assert load_checkpoint(model, directory, device="cpu").ok
    assert prepared.apply().merged == merge
    torch.testing.assert_close(logits(model), full_attention(peft_model), rtol=1e-4, atol=1e-4)


# --------------------------------------------------------------------------- bad adapters


def snapshot(model: nn.Module) -> dict[str, torch.Tensor]:
    return {name: t.detach().clone() for name, t in model.state_dict().items()}


def assert_unchanged(model: nn.Module, before: dict[str, torch.Tensor]) -> None:
    after = model.state_dict()
    assert sorted(after) == sorted(before)  # no adapter parameter left behind
    for name, tensor in before.items():
        assert torch.equal(after[name], tensor), name


@pytest.fixture
def adapter(base, tmp_path) -> Path:
    write_adapter(base[0], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "v_proj", "down_proj"])
    return tmp_path / "adapter"


def edit_config(adapter: Path, **changes) -> None:
    path = adapter / "adapter_config.json"
    path.write_text(json.dumps({**json.loads(path.read_text()), **changes}))


def edit_tensors(adapter: Path, edit) -> None:
    path = adapter / "adapter_model.safetensors"
    tensors = load_file(path)
    edit(tensors)
    save_file(tensors, path)


@pytest.mark.parametrize("field, value", [
    ("use_dora", True), ("bias", "all"), ("modules_to_save", ["lm_head"]), ("peft_type", "IA3"),
    ("some_future_switch", True), ("r", 0), ("lora_dropout", 1.5), ("target_modules", 3),
    ("rank_pattern", {"q_proj": "big"}),
])  # fmt: skip
def test_config_fields_we_cannot_honour_are_named(base, adapter, field, value):
    edit_config(adapter, **{field: value})
    model = dream(base[1], None)
    before = snapshot(model)
    with pytest.raises(LoraConfigError, match=field):
        dream_into(model, base[1], adapter)
    assert_unchanged(model, before)


def dream_into(model: nn.Module, directory: Path, adapter: Path, merge: bool = False) -> nn.Module:
    return load_model(model, SimpleNamespace(model=str(directory), model_name="dream", use_lora=True,
                                             lora_path=str(adapter), pre_merge_lora=merge))


def rename(old: str, new: str):
    return lambda tensors: tensors.__setitem__(new, tensors.pop(old))


A0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_A.weight"
B0 = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"


@pytest.mark.parametrize("edit, message", [
    (rename(A0, A0.replace("q_proj", "qq_proj")), r"qq_proj\.lora_A\.weight.*matches no module"),
    (lambda t: (t.pop(A0), t.pop(B0)), r"layers\.0\.self_attn\.q_proj.*selected by target_modules.*no tensors"),
    (lambda t: t.pop(B0), r"has lora_A .*but no lora_B"),
    (lambda t: t.__setitem__(A0, torch.zeros(8, 32)), r"q_proj\.lora_A\.weight.*shape \[8, 32\].*r=4"),
    (lambda t: t.__setitem__(B0, torch.zeros(16, 4)),
     r"q_proj\.lora_B\.weight.*does not fit module model\.layers\.0\.self_attn\.qkv_proj"),
    (lambda t: t.__setitem__("base_model.model.model.layers.0.mlp.gate_proj.lora_A.weight", torch.zeros(4, 32)),
     r"gate_proj.*not selected by target_modules"),
    (lambda t: t.__setitem__("base_model.model.model.norm.lora_A.weight", torch.zeros(4, 32)),
     r"model\.norm \(RMSNorm\) does not support LoRA"),
    (lambda t: t.__setitem__("base_model.model.model.layers.0.self_attn.q_proj.magnitude", torch.zeros(4)),
     r"q_proj\.magnitude.*is not a LoRA tensor"),
])  # fmt: skip
def test_adapters_that_do_not_fit_are_refused_before_anything_changes(base, adapter, edit, message):
    edit_tensors(adapter, edit)
    model = dream(base[1], None)
    before = snapshot(model)
    with pytest.raises(LoraAdapterError, match=message) as caught:
        dream_into(model, base[1], adapter)
    assert "adapter_model.safetensors" in str(caught.value) or "target_modules" in str(caught.value)
    assert_unchanged(model, before)


def test_rank_in_config_disagreeing_with_the_tensors(base, adapter):
    edit_config(adapter, r=8)
    model = dream(base[1], None)
    before = snapshot(model)
    with pytest.raises(LoraAdapterError, match=r"shape \[4, 32\], but .*adapter_config\.json gives .*q_proj rank r=8"):
        dream_into(model, base[1], adapter)
    assert_unchanged(model, before)


def test_pickle_only_adapter_and_missing_directory(base, adapter, tmp_path):
    model = dream(base[1], None)
    (adapter / "adapter_model.safetensors").rename(adapter / "adapter_model.bin")
    with pytest.raises(CheckpointNotFoundError, match="only pickle"):
        dream_into(model, base[1], adapter)
    with pytest.raises(LoraConfigError, match="does not exist"):
        dream_into(model, base[1], tmp_path / "nowhere")


def test_no_config_file_uses_the_seed_defaults_with_a_warning(base, tmp_path):
    write_adapter(base[0], tmp_path / "a16", r=16, lora_alpha=32, target_modules=["q_proj"])
    expected = logits(dream(base[1], tmp_path / "a16"))
    (tmp_path / "a16" / "adapter_config.json").unlink()
    with pytest.warns(LoraWarning, match="r=16, lora_alpha=32"):
        model = dream(base[1], tmp_path / "a16")
    torch.testing.assert_close(logits(model), expected)
    write_adapter(base[0], tmp_path / "a4", r=4, lora_alpha=8, target_modules=["q_proj"])
    (tmp_path / "a4" / "adapter_config.json").unlink()
    with pytest.warns(LoraWarning), pytest.raises(LoraAdapterError, match="r=16"):
        dream(base[1], tmp_path / "a4")


def test_use_lora_with_an_empty_path_loads_the_base_model_with_a_warning(base):
    model = dream(base[1], None)
    with pytest.warns(LoraWarning, match="base model only"):
        load_model(model, SimpleNamespace(model=str(base[1]), model_name="dream", use_lora=True, lora_path="",
                                          pre_merge_lora=False))
    torch.testing.assert_close(logits(model), full_attention(base[0]), rtol=1e-4, atol=1e-4)


def test_pre_merging_into_tied_weights_is_refused(tmp_path):
    tied = transformers.Qwen2Config(**{**QWEN2, "tie_word_embeddings": True})
    reference = randomized(transformers.Qwen2ForCausalLM(tied), 0)
    reference.save_pretrained(tmp_path / "base")
    write_adapter(reference, tmp_path / "adapter", r=2, lora_alpha=2, target_modules=["lm_head", "q_proj"])
    model = dream(tmp_path / "base", None)
    before = snapshot(model)
    with pytest.raises(LoraAdapterError,
                       match=r"pre-merging into lm_head\.weight would change model\.embed_tokens\.weight"):
        dream_into(model, tmp_path / "base", tmp_path / "adapter", merge=True)
    assert_unchanged(model, before)


# --------------------------------------------------------------------------- the seed's module protocol


class SeedLinear(nn.Linear):
    """A third-party layer written to Diffulex's LoRAMixin contract (whole-module adapters only)."""

    def __init_lora__(self, r, lora_alpha, lora_dropout):
        self.r, self.scaling, self.merged = r, lora_alpha / r, False
        self.lora_A = nn.Parameter(torch.zeros(r, self.in_features))
        self.lora_B = nn.Parameter(torch.zeros(self.out_features, r))

    def merge_lora(self):
        self.weight.data += self.scaling * self.lora_B @ self.lora_A
        self.merged = True

    def forward(self, x):
        out = super().forward(x)
        if getattr(self, "r", 0) and not self.merged:
            out = out + (x @ self.lora_A.T @ self.lora_B.T) * self.scaling
        return out


class TwoLayers(nn.Module):
    def __init__(self, linear=nn.Linear):
        super().__init__()
        self.up, self.down = linear(6, 10), linear(10, 6)

    def forward(self, x):
        return self.down(torch.tanh(self.up(x)))


@pytest.mark.parametrize("merge", [False, True])
def test_a_seed_protocol_module_with_rslora(tmp_path, merge):
    torch.manual_seed(0)
    source = TwoLayers()
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, tmp_path / "model.safetensors")
    peft_model = write_adapter(source, tmp_path / "adapter", r=3, lora_alpha=6, use_rslora=True,
                               target_modules=["up", "down"])
    model = TwoLayers(SeedLinear)
    load_model(model, SimpleNamespace(model=str(tmp_path), use_lora=True, lora_path=str(tmp_path / "adapter"),
                                      pre_merge_lora=merge))
    assert model.up.scaling == pytest.approx(6 / math.sqrt(3))  # rsLoRA set on the seed's attribute
    x = torch.randn(4, 6)
    with torch.no_grad():
        torch.testing.assert_close(model(x), peft_model(x), rtol=1e-5, atol=1e-5)
    assert model.diffulex_load_report.ok


def test_a_seed_protocol_module_cannot_take_a_shard_adapter(tmp_path):
    model = TwoLayers(SeedLinear)
    model.packed_modules_mapping = {"left": ("up", 0)}
    save_file({"base_model.model.left.lora_A.weight": torch.zeros(2, 6),
               "base_model.model.left.lora_B.weight": torch.zeros(5, 2)}, tmp_path / "adapter_model.safetensors")
    (tmp_path / "adapter_config.json").write_text(json.dumps({"r": 2, "lora_alpha": 2, "target_modules": ["left"]}))
    with pytest.raises(LoraAdapterError, match=r"shard 0 of packed module up \(SeedLinear\).*whole module"):
        load_lora_weights(model, tmp_path)
    assert not hasattr(model.up, "lora_A")


def test_load_lora_config_keeps_the_seed_dict_view(adapter):
    config = load_lora_config(adapter)
    assert config["r"] == config.r == 4 and config.get("lora_alpha") == 8
    assert dict(config)["target_modules"] == json.loads((adapter / "adapter_config.json").read_text())["target_modules"]
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 2.0
    shutil.rmtree(adapter)


# --------------------------------------------------------------------------- command line and tensor parallelism


def test_diffulex_load_with_lora_and_merge(base, tmp_path, capsys):
    from diffulex_core.tools.cli import main

    write_adapter(base[0], tmp_path / "adapter", r=4, lora_alpha=8, target_modules=["q_proj", "down_proj"])
    adapter = str(tmp_path / "adapter")
    assert main(["load", str(base[1]), "--family", "dream", "--lora", adapter, "--merge", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["ok"] and report["lora"]["merged"] and len(report["lora"]["modules"]) == 4
    assert main(["load", str(base[1]), "--family", "dream", "--lora", str(tmp_path / "adapter")]) == 0
    expected = "lora model.layers.1.self_attn.q_proj -> model.layers.1.self_attn.qkv_proj [shard 'q']  r=4"
    assert expected in capsys.readouterr().out
    edit_config(tmp_path / "adapter", target_modules=["q_proj"])
    assert main(["load", str(base[1]), "--family", "dream", "--lora", str(tmp_path / "adapter")]) == 1
    assert "down_proj.lora_A.weight" in capsys.readouterr().err


@pytest.fixture(scope="module")
def two_tensor_parallel_ranks(base, tmp_path_factory):
    """One adapter on the base, loaded unmerged and merged over 2 gloo ranks, both in one launch:
    (the PEFT model, the launch; ``launched.get(f"merge={merge}")``)."""
    from rank_launcher import launch_many

    reference, directory = base
    root = tmp_path_factory.mktemp("tp-lora")
    peft_model = write_adapter(reference, root / "adapter", r=4, lora_alpha=8, target_modules=[*ALL, "embed_tokens",
                               "lm_head"], rank_pattern={"k_proj": 2, "up_proj": 6})
    config = json.loads((directory / "config.json").read_text())
    scenarios = {f"merge={merge}": {"kind": "dream", "config": config, "checkpoint": str(directory),
                                    "lora": str(root / "adapter"), "merge": merge, "input_ids": IDS.tolist()}
                 for merge in (False, True)}
    return peft_model, launch_many(scenarios, 2, root)


@pytest.mark.parametrize("merge", [False, True])
def test_two_tensor_parallel_ranks_equal_peft(two_tensor_parallel_ranks, merge):
    """Column (q/k/v shards of different ranks, gate/up), row (o, down), vocabulary (embedding, LM
    head) adapters over 2 gloo ranks: logits equal PEFT's; merged weights are each rank's slice."""
    peft_model, launched = two_tensor_parallel_ranks
    results, out = launched.get(f"merge={merge}")
    assert all(r["ok"] for r in results), results
    expected = full_attention(peft_model)
    torch.testing.assert_close(load_file(out / "rank0.safetensors")["logits"], expected, rtol=1e-4, atol=1e-4)
    if merge:  # each rank merged its own rows (q) and columns (o): the slices of the single-process merge
        merged = copy.deepcopy(peft_model).merge_and_unload().state_dict()
        q, o = merged["model.layers.0.self_attn.q_proj.weight"], merged["model.layers.0.self_attn.o_proj.weight"]
        for rank in range(2):
            tensors = load_file(out / f"rank{rank}.safetensors")
            torch.testing.assert_close(tensors["param.model.layers.0.self_attn.qkv_proj.weight"][:16],
                                       q[16 * rank:16 * (rank + 1)])
            torch.testing.assert_close(tensors["param.model.layers.0.self_attn.o_proj.weight"],
                                       o[:, 16 * rank:16 * (rank + 1)])


# --------------------------------------------------------------------------- names through packed mappings


class RecordingLora(nn.Module):
    def __init_lora__(self, r, lora_alpha, lora_dropout):
        self.lora_args = (r, lora_alpha, lora_dropout)


class SeedTestModel(nn.Module):
    """The model of Diffulex's own enable_lora_for_model tests."""

    def __init__(self):
        super().__init__()
        self.q_proj = RecordingLora()
        self.self_attn = nn.Module()
        self.self_attn.o_proj = RecordingLora()


def test_enable_matches_a_regex_string_and_packed_checkpoint_names_as_the_seed_tests_do():
    model = enable_lora_for_model(SeedTestModel(), {"target_modules": "q_proj"})
    assert model.q_proj.lora_args == (16, 32.0, 0.0) and not hasattr(model.self_attn.o_proj, "lora_args")
    model = enable_lora_for_model(SeedTestModel(), {"target_modules": ["attn_out"], "r": 4, "lora_alpha": 8},
                                  packed_modules_mapping={"attn_out": ("self_attn.o_proj", None)})
    assert model.self_attn.o_proj.lora_args == (4, 8, 0.0) and not hasattr(model.q_proj, "lora_args")
    with pytest.raises(LoraAdapterError, match=r"target_modules=\['nothing'\] select no module"):
        enable_lora_for_model(SeedTestModel(), {"target_modules": ["nothing"]})


def test_llada_names_reach_packed_shards_the_output_projection_and_the_head(tmp_path):
    """LLaDA's checkpoint names (``transformer.blocks.N.attn_out``, ``ff_out`` in a block and as the
    head) through its packed mapping; merged weights equal W + scaling * B @ A, computed here."""
    from diffulex_layers.testing import seeded
    from diffulex_llada.model import build_llada, to_hf_state_dict

    config = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 48, "vocab_size": 64,
              "weight_tying": False}
    base_weights = to_hf_state_dict(seeded(build_llada, config, 0))
    save_file(base_weights, tmp_path / "model.safetensors")
    torch.manual_seed(3)
    r, alpha, adapter = 4, 6, {}
    names = ["model.transformer.blocks.1.q_proj", "model.transformer.ff_out",
             *(f"model.transformer.blocks.{i}.{m}" for i in range(2) for m in ("attn_out", "ff_out"))]
    for name in names:
        out_features, in_features = base_weights[f"{name}.weight"].shape
        adapter[f"base_model.model.{name}.lora_A.weight"] = torch.randn(r, in_features) * 0.3
        adapter[f"base_model.model.{name}.lora_B.weight"] = torch.randn(out_features, r) * 0.3
    (tmp_path / "adapter").mkdir()
    save_file(adapter, tmp_path / "adapter" / "adapter_model.safetensors")
    (tmp_path / "adapter" / "adapter_config.json").write_text(json.dumps(
        {"r": r, "lora_alpha": alpha, "target_modules": ["ff_out", "attn_out", "q_proj"], "layers_to_transform": None}))
    # q_proj is targeted in both blocks, but the adapter has it only for block 1
    loaded = {}
    for merge in (False, True):
        model = build_llada(config).eval()
        with pytest.raises(LoraAdapterError, match=r"blocks\.0\.q_proj \(-> model\.layers\.0\.self_attn\.qkv_proj\) is "
                                                   r"selected by target_modules.*no tensors"):
            load_model(model, SimpleNamespace(model=str(tmp_path), model_name="llada", use_lora=True,
                                              lora_path=str(tmp_path / "adapter"), pre_merge_lora=merge))
        edit_config(tmp_path / "adapter", exclude_modules=["model.transformer.blocks.0.q_proj"])
        loaded[merge] = load_model(model, SimpleNamespace(model=str(tmp_path), model_name="llada", use_lora=True,
                                                          lora_path=str(tmp_path / "adapter"), pre_merge_lora=merge))
        edit_config(tmp_path / "adapter", exclude_modules=None)
    modules = loaded[True].diffulex_load_report.lora.modules
    assert sorted(modules) == ["lm_head", *(f"model.layers.{i}.{m}" for i in range(2)
                                            for m in ("mlp.down_proj", "self_attn.o_proj")),
                               "model.layers.1.self_attn.qkv_proj"]
    assert modules["model.layers.1.self_attn.qkv_proj"][0]["shard_id"] == "q"
    merged = to_hf_state_dict(loaded[True])
    for name in names:
        A, B = adapter[f"base_model.model.{name}.lora_A.weight"], adapter[f"base_model.model.{name}.lora_B.weight"]
        torch.testing.assert_close(merged[f"{name}.weight"], base_weights[f"{name}.weight"] + alpha / r * B @ A)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(logits_of(loaded[False], ids), logits_of(loaded[True], ids), rtol=1e-5, atol=1e-5)


def logits_of(model: nn.Module, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(ids)
