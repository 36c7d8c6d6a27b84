"""``diffulex demo``: on its embedded default and on a checkpoint written by transformers itself.

The default run is the real command in a subprocess (the ``demo`` command's subprocess check, and
its time is what a user waits); the others run ``diffulex_core.tools.cli.main`` in this process
(the ``diffulex_cli`` fixture, conftest.py), with the same environment, output and exit status."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

WARNING = "the weights are random"
FIXUP = "plugin:diffulex-core (tokenizer_class)"  # the dangling auto_map of the demo's tokenizer
METRICS = {"TPF": r"TPF\s+([0-9.]+) tokens/forward", "TTFT": r"TTFT\s+([0-9.]+) ms", "TPOT": r"TPOT\s+([0-9.]+) ms",
           "throughput": r"throughput\s+([0-9.]+) tokens/s"}


def demo(*args: str, pythonpath: str = "", **env: str) -> tuple[subprocess.CompletedProcess, float]:
    """``python -m diffulex_core demo ARGS`` in a subprocess, and the seconds it took."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DIFFULEX_")}
    environ.update(env)
    environ["PYTHONPATH"] = pythonpath  # the installed plugins, and the test plugins named
    started = time.perf_counter()
    result = subprocess.run([sys.executable, "-m", "diffulex_core", "demo", *args], capture_output=True, text=True,
                            env=environ, timeout=300, stdin=subprocess.DEVNULL)
    return result, time.perf_counter() - started


def benchmark_block(stdout: str) -> list[dict]:
    """The JSON array printed after the ``benchmark format`` line."""
    after = stdout.split("benchmark format (GenerationOutputs.to_benchmark_format()):\n", 1)[1]
    return json.loads(after[:after.index("\n]\n") + 2])


def test_default_run_shows_the_whole_path_in_under_30_s():
    result, seconds = demo()
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert seconds < 30, f"the default demo took {seconds:.1f} s"
    assert WARNING in out and "so the decoded text is noise" in out
    # plugins, the checkpoint written under the family's real names, the plan and the load
    assert "plugins (" in out and "dream  diffulex-dream" in out and "llada  diffulex-llada" in out
    assert "2 shards under diffulex_dream.model.to_hf_state_dict names" in out
    assert re.search(r"\d+ tensors planned \(exact: \d+, packed_mapping: \d+\), 0 skipped, 0 unexpected, 0 missing",
                     out)
    assert "in float32 (from config.json dtype)" in out
    assert re.search(r"\d+ tensors loaded \(exact: \d+, packed_mapping: \d+\), .* 0 problem\(s\)", out)
    # the adapter, per module, on the packed projection's shards
    assert "4 adapter(s) on 2 module(s) from 8 tensor(s), applied per forward" in out
    for layer in (0, 1):
        for shard in ("q", "v"):
            assert (f"model.layers.{layer}.self_attn.{shard}_proj -> model.layers.{layer}.self_attn.qkv_proj "
                    f"[shard '{shard}']  r=4 alpha=8 scaling=2") in out
    assert "reproduces the source's logits (1, 8, " in out and "exactly: True" in out
    # the tokenizer needed a fixup, and the demo names it
    assert f"fixups applied by auto_tokenizer_from_pretrained: {FIXUP}" in out
    assert "mask token '<|mask|>'" in out
    # decoding: 2 prompts x 4 steps (a prefill, then decodes), 2 tokens unmasked per step
    assert out.count("step 0 (prefill, +2)") == 2 and out.count("step 3 (decode, +2)") == 2
    assert "[MASK] [MASK] [MASK] [MASK] [MASK] [MASK] [MASK] [MASK]" not in out.split("masked-diffusion decoding")[1]
    values = {name: float(re.search(pattern, out).group(1)) for name, pattern in METRICS.items()}
    assert values["TPF"] == 2.0  # 8 tokens in 4 forwards per request
    assert all(v > 0 for v in values.values()), values
    assert "(decode_tpf 2.67)" in out and "batch_ttft" in out and "batch_tpot" in out and "wall_throughput" in out
    bench = benchmark_block(out)
    assert len(bench) == 2
    for entry in bench:
        assert entry["nfe"] == 4 and 0 < len(entry["token_ids"]) <= 8 and entry["full_text"]


def test_json_has_all_of_it(diffulex_cli):
    result = diffulex_cli("demo", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["mode"] == "embedded default" and data["family"] == "dream" and WARNING in data["warning"]
    assert {p["name"] for p in data["plugins"]["plugins"]} >= {"dream", "llada", "sdar"}
    assert data["checkpoint"]["written_by_demo"] and "model.safetensors.index.json" in data["checkpoint"]["files"]
    assert data["plan"]["ok"] and data["load_report"]["ok"] and data["identical_to_source"] is True
    assert data["load"].startswith(f"{data['load'].split()[0]} tensors loaded (exact:")
    lora = data["lora"]
    assert sorted(lora["modules"]) == ["model.layers.0.self_attn.qkv_proj", "model.layers.1.self_attn.qkv_proj"]
    assert [a["shard_id"] for a in lora["modules"]["model.layers.0.self_attn.qkv_proj"]] == ["q", "v"]
    assert data["tokenizer"]["fixups"] == [FIXUP] and data["tokenizer"]["source"] == "written by the demo"
    assert data["mask_token"]["token"] == "<|mask|>"
    main = data["metrics"]["main"]
    assert main["TPF"]["tpf"] == 2.0 and main["TPF"]["decode_tpf"] == pytest.approx(8 / 3)
    for name, key in (("TTFT", "ttft"), ("TPOT", "tpot"), ("throughput", "throughput")):
        assert isinstance(main[name][key], float) and main[name][key] > 0
    assert data["metrics"]["all"]["num_steps"] == 4 and data["metrics"]["all"]["generated_tokens"] == 16
    assert len(data["benchmark"]) == 2 and all(entry["nfe"] == 4 for entry in data["benchmark"])
    for request, entry in zip(data["decoding"]["requests"], data["benchmark"], strict=True):
        assert [s["prefill"] for s in request["steps"]] == [True, False, False, False]
        assert [s["running_token_ids"].count(data["mask_token"]["id"]) for s in request["steps"]] == [6, 4, 2, 0]
        assert request["text"] == entry["text"] and request["token_ids"] == entry["token_ids"]


@pytest.mark.parametrize("family, adapted", [
    ("llada", "model.transformer.blocks.{layer}.{shard}_proj"),
    ("sdar", "model.layers.{layer}.self_attn.{shard}_proj"),
])  # fmt: skip
def test_other_families_use_their_own_checkpoint_names(diffulex_cli, family, adapted):
    result = diffulex_cli("demo", "--family", family, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["family"] == family and data["identical_to_source"] is True
    assert data["checkpoint"]["names"] == f"diffulex_{family}.model.to_hf_state_dict"
    adapters = sorted(a["adapter"] for adapters in data["lora"]["modules"].values() for a in adapters)
    assert adapters == sorted(adapted.format(layer=layer, shard=shard) for layer in (0, 1) for shard in ("q", "v"))
    names = [t["name"] for t in data["plan"]["tensors"]]
    assert f"{adapted.format(layer=0, shard='q')}.weight" in names
    assert data["tokenizer"]["fixups"] == [FIXUP] and len(data["benchmark"]) == 2


@pytest.fixture(scope="module")
def qwen2_checkpoint(tmp_path_factory) -> Path:
    """A tiny Qwen2 (Dream's architecture) saved by transformers in bfloat16, with a byte-level BPE
    tokenizer made by the ``tokenizers`` library (a Qwen2 config makes transformers load a
    Qwen2Tokenizer, which rebuilds a byte-level BPE from the vocabulary and merges)."""
    import torch
    import transformers
    from tokenizers import ByteLevelBPETokenizer

    directory = tmp_path_factory.mktemp("qwen2")
    torch.manual_seed(0)
    config = transformers.Qwen2Config(vocab_size=320, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                                      tie_word_embeddings=False, mask_token_id=319)
    transformers.Qwen2ForCausalLM(config).to(torch.bfloat16).save_pretrained(directory)
    tokenizer = ByteLevelBPETokenizer()
    tokenizer.train_from_iterator(["the quick brown fox jumps over the lazy dog", "a diffusion model writes text"] * 10,
                                  vocab_size=300, min_frequency=1, special_tokens=["<|endoftext|>"],
                                  show_progress=False)
    tokenizer.save(str(directory / "tokenizer.json"))
    (directory / "tokenizer_config.json").write_text(json.dumps(
        {"tokenizer_class": "Qwen2Tokenizer", "eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>"}))
    assert json.loads((directory / "config.json").read_text())["dtype"] == "bfloat16"
    return directory


def test_a_checkpoint_saved_by_transformers_in_bfloat16(qwen2_checkpoint, diffulex_cli):
    result = diffulex_cli("demo", "--checkpoint", str(qwen2_checkpoint), "--family", "dream")
    assert result.returncode == 0, result.stderr
    out = result.stdout
    assert f"checkpoint: {qwen2_checkpoint}" in out and "written by the demo" not in out
    assert "model built on the meta device in bfloat16 (from config.json dtype)" in out
    assert re.search(r"\d+ tensors loaded \(exact: \d+, packed_mapping: \d+\), 0 skipped, .* 0 problem\(s\)", out)
    assert "LoRA: no --lora: no adapter" in out and "LoRA adapters per module" not in out
    assert "tokenizer (the checkpoint's): Qwen2Tokenizer, 300 tokens (the model has 320 embedding rows)" in out
    assert "mask token (id 319) from config.json mask_token_id" in out
    assert out.count("step 0 (prefill, +2)") == 2 and out.count("step 3 (decode, +2)") == 2
    assert all(float(re.search(pattern, out).group(1)) > 0 for pattern in METRICS.values())
    assert len(benchmark_block(out)) == 2
    assert WARNING not in out  # the demo does not know what a user's weights are


def test_a_checkpoint_without_tokenizer_files_with_an_adapter(qwen2_checkpoint, tmp_path, diffulex_cli):
    from diffulex_core.tools.demo_files import write_demo_lora

    checkpoint = tmp_path / "bare"
    checkpoint.mkdir()
    for name in ("config.json", "model.safetensors"):
        (checkpoint / name).write_bytes((qwen2_checkpoint / name).read_bytes())
    adapter, targets = write_demo_lora(tmp_path / "adapter", checkpoint)
    assert len(targets) == 4
    result = diffulex_cli("demo", "--checkpoint", str(checkpoint), "--family", "dream", "--lora", str(adapter),
                          "--dtype", "float32", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["model"]["dtype"] == "float32 (from --dtype)"
    assert data["tokenizer"]["source"] == f"written by the demo: {checkpoint} has no tokenizer files"
    assert data["tokenizer"]["fixups"] == [FIXUP] and data["tokenizer"]["model_rows"] == 320
    assert data["mask_token"]["source"].startswith("the tokenizer's mask token")
    assert sorted(a["adapter"] for adapters in data["lora"]["modules"].values() for a in adapters) == targets
    assert data["identical_to_source"] is None and data["warning"] is None
    assert data["metrics"]["all"]["generated_tokens"] == 16 and len(data["benchmark"]) == 2


def test_a_missing_checkpoint_is_an_error_that_names_it(tmp_path, diffulex_cli):
    missing = tmp_path / "no-such-checkpoint"
    result = diffulex_cli("demo", "--checkpoint", str(missing), "--family", "dream")
    assert result.returncode == 1
    assert "CheckpointNotFoundError" in result.stderr and str(missing) in result.stderr
    assert result.stdout == ""


def test_checkpoint_needs_a_family_and_lora_needs_a_checkpoint(tmp_path, diffulex_cli):
    result = diffulex_cli("demo", "--checkpoint", str(tmp_path))
    assert result.returncode == 2 and "--checkpoint DIR needs --family NAME" in result.stderr
    result = diffulex_cli("demo", "--lora", str(tmp_path))
    assert result.returncode == 2 and "--lora needs --checkpoint DIR" in result.stderr


# --------------------------------------------------------------------------- a third-party family's size


def test_a_family_is_built_from_its_plugins_example_config(diffulex_cli):
    """The GPT-2-shaped test family's defaults are over a million parameters; its plugin's example
    (what ``diffulex check`` builds) is tiny. It has no q_proj/v_proj, so no adapter at all."""
    result = diffulex_cli("demo", "--family", "toygpt2", "--json", plugins=("gpt2",))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    ckpt = data["checkpoint"]
    assert ckpt["config_source"] == "the diffulex_family_examples answer of plugin 'gpt2' (diffulex-test-gpt2 0.1.0)"
    assert (ckpt["config"]["n_embd"], ckpt["config"]["n_layer"], ckpt["config"]["n_positions"]) == (16, 2, 32)
    assert ckpt["names"] == "diffulex_test_gpt2.model.to_checkpoint"
    assert data["parameters"] < 20_000 and data["identical_to_source"] is True and data["source_has_adapter"] is False
    assert data["lora"] is None and data["lora_note"].startswith("none: the checkpoint has no 2-D q_proj/v_proj")
    out = diffulex_cli("demo", "--family", "toygpt2", plugins=("gpt2",)).stdout
    assert ("model config from the diffulex_family_examples answer of plugin 'gpt2' (diffulex-test-gpt2 0.1.0), "
            "with the demo's vocabulary, special-token ids and dtype") in out
    assert "LoRA: none: the checkpoint has no 2-D q_proj/v_proj weight" in out and "LoRA skipped" not in out
    assert "adapter on the source" not in out and "loaded model reproduces the source's logits (1, 8, " in out


def test_a_factory_example_config_is_used_and_a_family_without_one_is_refused(diffulex_cli):
    result = diffulex_cli("demo", "--family", "noexample-attr", "--json", plugins=("check_noexample",))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["checkpoint"]["config_source"] == "diffulex_test_check_noexample.build_attr.example_config"
    assert data["checkpoint"]["config"]["hidden_size"] == 6  # the example's, not the factory's default 4
    result = diffulex_cli("demo", "--family", "noexample-plain", plugins=("check_noexample",))
    assert result.returncode == 1 and result.stdout == "" and "Traceback" not in result.stderr
    assert ("FamilyError: family 'noexample-plain' of plugin 'check_noexample' (diffulex-test-check-noexample 0.1.0) "
            "gives no example config (diffulex_family_examples or factory.example_config)") in result.stderr
    assert "diffulex demo --checkpoint DIR --family noexample-plain" in result.stderr


def test_without_family_the_first_family_with_an_example_is_chosen(diffulex_cli):
    """``toy`` and ``toy-lazy`` sort first and give no example (``toy-ghost`` cannot even import)."""
    result = diffulex_cli("demo", "--json", plugins=("healthy", "gpt2"), DIFFULEX_PLUGINS="healthy,gpt2")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["families"][0] == "toy" and data["family"] == "toygpt2"
    assert data["family_chosen_by"] == "the first installed family, alphabetically, with an example config"
