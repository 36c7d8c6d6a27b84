"""The plugin author's kit (``diffulex_core.testing``), used as plugin authors use it."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from types import SimpleNamespace

import pytest
import torch

from diffulex_core.loader import load_model
from diffulex_core.registry import family_names
from diffulex_core.testing import assert_clean_load, isolated_plugins, write_checkpoint

LLADA = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 1, "mlp_hidden_size": 48, "vocab_size": 64,
         "weight_tying": False}


def llada_pair():
    from diffulex_layers.testing import seeded
    from diffulex_llada.model import build_llada, to_hf_state_dict

    source = seeded(build_llada, LLADA, 0)
    with torch.device("meta"):
        twin = build_llada(LLADA)
    return source, twin, to_hf_state_dict


def test_the_pytest_plugin_costs_nothing_in_a_session_that_does_not_use_it(tmp_path):
    (tmp_path / "test_plain.py").write_text(textwrap.dedent("""
        import sys

        def test_nothing_heavy_was_imported():
            assert "diffulex_core.testing" in sys.modules  # the plugin is active ...
            assert "torch" not in sys.modules and "diffulex_core.plugins" not in sys.modules  # ... and cost nothing
    """))
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tmp_path)],
                         cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert run.returncode == 0 and "1 passed" in run.stdout, run.stdout + run.stderr
    fixtures = subprocess.run([sys.executable, "-m", "pytest", "--fixtures", "-p", "no:cacheprovider", str(tmp_path)],
                              cwd=tmp_path, capture_output=True, text=True, timeout=120).stdout
    assert all(name in fixtures for name in ("diffulex_plugins", "diffulex_checkpoint", "diffulex_lora_adapter"))


def test_isolated_plugins_hold_only_the_named_plugins():
    import diffulex_llada

    assert "dream" in family_names()
    with isolated_plugins(llada=diffulex_llada) as plugins:
        assert family_names() == ["llada"] and [p.name for p in plugins.loaded] == ["llada"]
    assert "dream" in family_names()  # the discovered outcome is back


def test_a_failing_plugin_is_reported_not_raised(diffulex_plugins):
    class Typo:
        def diffulex_register_famillies(self, register):  # the typo under test
            pass

    from diffulex_core import hookimpl

    Typo.diffulex_register_famillies = hookimpl(Typo.diffulex_register_famillies)
    plugins = diffulex_plugins(typo=Typo())
    message = plugins.failures[0].message
    assert "diffulex_register_famillies" in message and "did you mean" in message


@pytest.mark.parametrize("shards", [1, 3])
def test_write_checkpoint_single_or_sharded_loads_back(tmp_path, shards):
    source, twin, to_checkpoint = llada_pair()
    path = write_checkpoint(tmp_path, source, shards=shards, config=LLADA, to_checkpoint=to_checkpoint)
    files = sorted(p.name for p in path.glob("*.safetensors"))
    assert len(files) == shards and json.loads((path / "config.json").read_text()) == LLADA
    if shards > 1:
        index = json.loads((path / "model.safetensors.index.json").read_text())
        assert sorted(set(index["weight_map"].values())) == files
    report = assert_clean_load(twin, path,
                               rules={"*.q_proj.weight": "packed_mapping", "*.wte.weight": "packed_mapping"})
    assert report.ok
    ids = torch.randint(0, 64, (2, 5))
    with torch.no_grad():
        assert torch.equal(twin(ids), source(ids))


def test_assert_clean_load_names_what_is_not_clean(diffulex_checkpoint):
    source, twin, to_checkpoint = llada_pair()
    tensors = to_checkpoint(source)
    with pytest.raises(AssertionError, match=r"q_proj\.weight was placed by rule 'packed_mapping'.*not 'exact'"):
        assert_clean_load(twin, diffulex_checkpoint(tensors), rules={"*.q_proj.weight": "exact"})
    tensors["extra.weight"] = torch.zeros(2)
    with torch.device("meta"):
        twin = type(twin)(LLADA)
    with pytest.raises(AssertionError, match=r"(?s)not clean.*extra\.weight"):
        assert_clean_load(twin, diffulex_checkpoint(tensors))
    with pytest.raises(AssertionError, match=r"'\*nothing\*' matches no tensor"):
        assert_clean_load(type(twin)(LLADA), diffulex_checkpoint(to_checkpoint(source)), rules={"*nothing*": "exact"})


def test_write_lora_adapter_is_read_by_peft_and_by_the_loader(tmp_path, diffulex_lora_adapter):
    """PEFT itself loads the kit's adapter (two ranks: a rank_pattern), and its forward equals ours."""
    transformers = pytest.importorskip("transformers")
    peft = pytest.importorskip("peft")
    config = transformers.Qwen2Config(vocab_size=64, hidden_size=32, num_attention_heads=4, num_key_value_heads=2,
                                      intermediate_size=48, num_hidden_layers=1, tie_word_embeddings=False)
    torch.manual_seed(0)
    reference = transformers.Qwen2ForCausalLM(config).eval()
    reference.save_pretrained(tmp_path / "base")
    q, down = "model.layers.0.self_attn.q_proj", "model.layers.0.mlp.down_proj"
    adapters = {q: (torch.randn(4, 32), torch.randn(32, 4)), down: (torch.randn(2, 48), torch.randn(32, 2))}
    adapter = diffulex_lora_adapter(adapters, lora_alpha=8)
    rank_pattern = json.loads((adapter / "adapter_config.json").read_text())["rank_pattern"]
    assert rank_pattern == {r"model\.layers\.0\.mlp\.down_proj": 2}
    peft_model = peft.PeftModel.from_pretrained(reference, adapter).eval()
    down_proj = peft_model.base_model.model.model.layers[0].mlp.down_proj
    assert torch.equal(down_proj.lora_B["default"].weight, adapters[down][1])
    from diffulex_dream.model import build_dream

    ours = load_model(build_dream(config.to_dict()).eval(), SimpleNamespace(
        model=str(tmp_path / "base"), model_name="dream", use_lora=True, lora_path=str(adapter), pre_merge_lora=False))
    ids = torch.randint(0, 64, (2, 6))
    with torch.no_grad():
        expected = peft_model(input_ids=ids, attention_mask=torch.zeros(2, 1, 6, 6)).logits
        torch.testing.assert_close(ours(ids), expected, rtol=1e-4, atol=1e-4)


def test_a_hook_newer_than_the_core_is_ignored_when_marked_optional(diffulex_plugins):
    """What README promises plugin authors who support older cores."""
    from diffulex_core import hookimpl

    class Future:
        @hookimpl(optionalhook=True)
        def diffulex_from_a_newer_core(self):
            return 1

        @hookimpl
        def diffulex_register_families(self, register):
            register("future", lambda config: None)

    class Unmarked:
        @hookimpl
        def diffulex_from_a_newer_core(self):
            return 1

    assert diffulex_plugins(future=Future()).registry.names() == ["future"]
    assert "unknown hook 'diffulex_from_a_newer_core'" in diffulex_plugins(unmarked=Unmarked()).failures[0].message
