"""The ``diffulex`` command line: one real subprocess per command (``plugins``, ``plan``, ``load``
here; ``check`` in test_check.py, ``demo`` in test_demo.py) and the import-cost check in a fresh
interpreter; every other case runs ``diffulex_core.tools.cli.main(argv)`` in this process (the
``diffulex_cli`` fixture, conftest.py), with the same environment, output and exit status."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

BUNDLED = {"llada": "diffulex-llada", "dream": "diffulex-dream", "sdar": "diffulex-sdar"}


def diffulex(*args: str, pythonpath: str = "", **env: str) -> subprocess.CompletedProcess:
    """``python -m diffulex_core ARGS`` in a subprocess."""
    environ = {k: v for k, v in os.environ.items() if not k.startswith("DIFFULEX_")}
    environ.update(env)
    environ["PYTHONPATH"] = pythonpath
    return subprocess.run([sys.executable, "-m", "diffulex_core", *args], capture_output=True, text=True,
                          env=environ, timeout=300)


def test_plugins_json_lists_bundled_plugins_and_their_families(diffulex_cli):
    result = diffulex_cli("plugins", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    plugins = {p["name"]: p for p in data["plugins"]}
    for name, dist in BUNDLED.items():
        assert plugins[name]["distribution"] == dist
        assert plugins[name]["families"] == ([name, f"{name}_moe"] if name == "sdar" else [name])
        assert data["families"][name]["factory"] == f"diffulex_{name}.model.build_{name}"
    assert data["families"]["sdar_moe"]["factory"] == "diffulex_sdar.model.build_sdar_moe"
    assert data["failures"] == []


def test_broken_plugin_beside_a_healthy_one(plugin_path):
    """The ``plugins`` command as a real subprocess."""
    result = diffulex("plugins", "--json", pythonpath=plugin_path("healthy", "import_error"))
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert "toy" in data["families"] and "toy" in next(p for p in data["plugins"] if p["name"] == "healthy")["families"]
    [failure] = data["failures"]
    assert (failure["plugin"], failure["distribution"], failure["version"], failure["stage"]) == (
        "import_error", "diffulex-test-import-error", "0.1.0", "import")
    assert failure["exception_type"] == "ModuleNotFoundError"
    assert "PluginWarning" in result.stderr and "import_error" in result.stderr


def test_plugins_text_output_names_factories_and_failures(diffulex_cli):
    result = diffulex_cli("plugins", plugins=("healthy", "typo"))
    assert result.returncode == 0
    assert "family toy-lazy -> diffulex_test_healthy.build_toy" in result.stdout
    assert "FAILED plugin 'typo' (diffulex-test-typo 0.1.0) failed at validate" in result.stdout


def test_strict_failure_exits_non_zero_and_names_the_plugin(diffulex_cli):
    result = diffulex_cli("plugins", plugins=("healthy", "register_error"), DIFFULEX_STRICT_PLUGINS="1")
    assert result.returncode == 1
    assert "PluginLoadError" in result.stderr
    assert "plugin 'register_error' (diffulex-test-register-error 0.1.0)" in result.stderr


@pytest.mark.parametrize("family", sorted(BUNDLED))
def test_demo_builds_and_runs_each_bundled_family(diffulex_cli, family):
    result = diffulex_cli("demo", "--family", family, "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["family"] == family and data["parameters"] > 0
    assert data["logits_shape"][:2] == [1, 8]
    assert data["identical_to_source"] is True  # the checkpoint has the family's own names
    assert data["load_report"]["ok"] and data["load_report"]["unexpected"] == data["load_report"]["missing"] == []


def test_demo_with_an_unknown_family_lists_the_known_ones(diffulex_cli):
    result = diffulex_cli("demo", "--family", "lladaa")
    assert result.returncode == 1
    assert "UnknownFamilyError" in result.stderr and "Did you mean 'llada'?" in result.stderr


def test_import_is_cheap():
    """No entry-point scan, no plugin, no transformers (nor torch) at ``import diffulex_core``."""
    code = (
        "import sys, importlib.metadata as md\n"
        "calls = []\n"
        "real = md.entry_points\n"
        "md.entry_points = lambda *a, **k: calls.append(1) or real(*a, **k)\n"
        "import diffulex_core\n"
        "from diffulex_core import hookimpl\n"
        "bad = sorted(m for m in sys.modules if m.split('.')[0] in "
        "{'transformers', 'torch', 'safetensors', 'diffulex_llada', 'diffulex_dream', 'diffulex_sdar',"
        " 'diffulex_core.plugins'}"
        " or m == 'diffulex_core.plugins')\n"
        "print(len(calls), bad)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.stdout.strip() == "0 []", result.stdout + result.stderr
    importtime = subprocess.run([sys.executable, "-X", "importtime", "-c", "import diffulex_core"],
                                capture_output=True, text=True, timeout=60)
    imported = {line.split("|")[-1].strip().split(".")[0] for line in importtime.stderr.splitlines()[1:]}
    assert imported.isdisjoint({"transformers", "torch", "diffulex_llada", "diffulex_dream", "diffulex_sdar"})


@pytest.fixture
def llada_checkpoint(tmp_path):
    import torch
    from safetensors.torch import save_file

    from diffulex_llada.model import build_llada, to_hf_state_dict

    torch.manual_seed(0)
    save_file(to_hf_state_dict(build_llada({})), str(tmp_path / "model.safetensors"))
    (tmp_path / "config.json").write_text(json.dumps({"d_model": 64, "n_layers": 2}))
    return tmp_path


def test_plan_shows_every_tensor_destination_and_rule(llada_checkpoint, diffulex_cli):
    """The ``plan`` command as a real subprocess (its text output in this process)."""
    result = diffulex("plan", str(llada_checkpoint), "--family", "llada", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    tensors = {t["name"]: t for t in data["tensors"]}
    assert len(tensors) == 21 and data["ok"] and not data["applied"] and data["bytes_read"] == 0
    assert tensors["model.transformer.ff_out.weight"]["target"] == "lm_head.weight"
    assert tensors["model.transformer.blocks.0.k_proj.weight"]["shard_id"] == "k"
    assert {t["rule"] for t in tensors.values()} == {"packed_mapping"}
    text = diffulex_cli("plan", str(llada_checkpoint), "--family", "llada")
    assert "model.transformer.ff_out.weight  float32[256, 64]  -> param lm_head.weight" in text.stdout
    assert "21 tensors planned" in text.stdout


def test_plan_exits_non_zero_when_the_load_would_fail(llada_checkpoint, diffulex_cli):
    import torch
    from safetensors.torch import save_file

    save_file({"stray.weight": torch.ones(2)}, str(llada_checkpoint / "extra.safetensors"))
    result = diffulex_cli("plan", str(llada_checkpoint), "--family", "llada")
    assert result.returncode == 1
    assert "problem: unexpected tensor 'stray.weight' in extra.safetensors" in result.stdout


def test_load_prints_the_report(llada_checkpoint):
    """The ``load`` command as a real subprocess."""
    result = diffulex("load", str(llada_checkpoint), "--family", "llada", "--dtype", "bfloat16", "--json")
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["applied"] and data["ok"] and data["bytes_read"] == data["bytes_total"] > 0
    assert data["loaded_by_source"] == {"packed_mapping": 21}


def test_load_of_a_bad_file_names_it(tmp_path, diffulex_cli):
    (tmp_path / "model.safetensors").write_text("version https://git-lfs.github.com/spec/v1\noid sha256:00\nsize 9\n")
    result = diffulex_cli("load", str(tmp_path), "--family", "llada")
    assert result.returncode == 1
    assert "CheckpointFormatError: model.safetensors is a Git LFS pointer" in result.stderr


@pytest.fixture
def bf16_llada(tmp_path):
    import torch
    from safetensors.torch import save_file

    from diffulex_llada.model import build_llada, to_hf_state_dict

    tensors = {k: v.to(torch.bfloat16) for k, v in to_hf_state_dict(build_llada({})).items()}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


@pytest.mark.parametrize("config, dtype, expected, source", [
    ({}, None, "bfloat16", "the checkpoint's tensors"),
    ({"torch_dtype": "float16"}, None, "float16", "config.json torch_dtype"),
    ({"dtype": "bfloat16", "torch_dtype": "float32"}, None, "bfloat16", "config.json dtype"),
    ({"dtype": "auto"}, None, "bfloat16", "the checkpoint's tensors"),
    ({"torch_dtype": "float16"}, "float32", "float32", "--dtype"),
])  # fmt: skip
def test_models_are_built_in_the_checkpoints_dtype_by_default(bf16_llada, config, dtype, expected, source):
    import torch

    from diffulex_core.family_models import build_for_checkpoint

    (bf16_llada / "config.json").write_text(json.dumps(config))
    model, note = build_for_checkpoint("llada", bf16_llada, "meta", dtype)
    assert {p.dtype for p in model.parameters()} == {getattr(torch, expected)}
    assert note == f"{expected} (from {source})"


def test_a_dtype_that_is_not_one_is_named(bf16_llada):
    from diffulex_core.errors import DiffulexError
    from diffulex_core.family_models import build_for_checkpoint

    (bf16_llada / "config.json").write_text(json.dumps({"torch_dtype": "int8"}))
    with pytest.raises(DiffulexError, match="config.json torch_dtype 'int8' is not a floating-point torch dtype"):
        build_for_checkpoint("llada", bf16_llada)


def test_load_builds_a_bf16_checkpoint_in_bf16(bf16_llada, diffulex_cli):
    result = diffulex_cli("load", str(bf16_llada), "--family", "llada")
    assert result.returncode == 0, result.stderr
    assert "llada model built on cpu in bfloat16 (from the checkpoint's tensors)" in result.stdout


# --------------------------------------------------------------------------- --json on failure


def failure(result) -> dict:
    """The one JSON object a failed ``--json`` command printed on stdout."""
    assert result.returncode == 1, (result.stdout, result.stderr)
    data = json.loads(result.stdout)  # one object, nothing else on stdout
    assert data["ok"] is False and data["error"]["type"] and data["error"]["message"], data
    return data


def test_json_failures_are_one_object_on_stdout(llada_checkpoint, tmp_path, diffulex_cli):
    missing = str(tmp_path / "no-such-checkpoint")
    for command in ("plan", "load"):
        data = failure(diffulex_cli(command, missing, "--family", "llada", "--json"))
        assert data["command"] == command and data["error"]["type"] == "CheckpointNotFoundError"
        assert missing in data["error"]["message"]
    data = failure(diffulex_cli("load", str(llada_checkpoint), "--family", "lladaa", "--json"))
    assert data["error"]["type"] == "UnknownFamilyError" and "Did you mean 'llada'?" in data["error"]["message"]
    data = failure(diffulex_cli("demo", "--family", "lladaa", "--json"))
    assert data["command"] == "demo" and data["error"]["type"] == "UnknownFamilyError"


@pytest.mark.parametrize("command, device", [("load", "nope"), ("load", "cuda"), ("load", "xla"), ("demo", "nope"),
                                             ("demo", "cuda")])
def test_a_bad_device_is_a_json_failure_whatever_raised(llada_checkpoint, diffulex_cli, command, device):
    """"nope" is not a device at all; "cuda" without CUDA and "xla" without its backend fail when
    the model is materialized (whatever raises there, --json still gets one object)."""
    import torch

    if device == "cuda" and torch.cuda.is_available():
        pytest.skip("CUDA is available here")
    args = ("load", str(llada_checkpoint), "--family", "llada") if command == "load" else ("demo", "--family", "llada")
    data = failure(diffulex_cli(*args, "--device", device, "--json"))
    assert device in data["error"]["message"].lower(), data
    if device == "nope":
        assert data["error"]["type"] == "LoadError"
        assert data["error"]["message"].startswith("device 'nope' is not a torch device")


def test_without_json_a_bad_device_is_one_line_not_a_traceback(llada_checkpoint, diffulex_cli):
    result = diffulex_cli("load", str(llada_checkpoint), "--family", "llada", "--device", "nope")
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.strip().startswith("diffulex: LoadError: device 'nope' is not a torch device (Expected one")
    assert len(result.stderr.strip().splitlines()) == 1


def test_plan_problems_in_json_carry_the_error_a_load_raises(llada_checkpoint, diffulex_cli):
    import torch
    from safetensors.torch import save_file

    save_file({"stray.weight": torch.ones(2)}, str(llada_checkpoint / "extra.safetensors"))
    plan = failure(diffulex_cli("plan", str(llada_checkpoint), "--family", "llada", "--json"))
    load = failure(diffulex_cli("load", str(llada_checkpoint), "--family", "llada", "--json"))
    for data in (plan, load):
        assert data["error"]["type"] == "LoadPlanError" and "stray.weight" in data["error"]["message"]
        assert data["unexpected"] == ["stray.weight"] and data["model"]["class"] == "LLaDAForDiffusionLM"
    assert "a load would fail" in plan["error"]["message"] and "nothing was loaded" in load["error"]["message"]


def test_plan_and_load_json_say_the_dtype_and_where_it_came_from(bf16_llada, diffulex_cli):
    plan = json.loads(diffulex_cli("plan", str(bf16_llada), "--family", "llada", "--json").stdout)
    assert plan["model"] == {"family": "llada", "class": "LLaDAForDiffusionLM", "device": "meta",
                             "dtype": "bfloat16", "dtype_source": "the checkpoint's tensors"}
    result = diffulex_cli("load", str(bf16_llada), "--family", "llada", "--dtype", "float16", "--json")
    assert result.returncode == 0, result.stderr
    load = json.loads(result.stdout)
    assert load["ok"] and load["model"]["device"] == "cpu"
    assert (load["model"]["dtype"], load["model"]["dtype_source"]) == ("float16", "--dtype")
    text = diffulex_cli("plan", str(bf16_llada), "--family", "llada")
    assert "(LLaDAForDiffusionLM, meta device, bfloat16 (from the checkpoint's tensors)):" in text.stdout


# --------------------------------------------------------------------------- transforms in the plan


def test_plan_shows_each_transform_so_it_is_not_a_plain_copy(use_plugins, diffulex_cli, tmp_path):
    """The GPT-2-shaped test family transposes its Conv1D weights: c_attn through a function named
    ``transpose``, c_proj through a lambda; its biases are plain copies."""
    use_plugins("gpt2")
    from diffulex_test_gpt2.model import ToyGPT2, to_checkpoint

    from diffulex_core.testing import write_checkpoint

    config = {"n_embd": 8, "n_layer": 1, "n_positions": 16, "vocab_size": 32}
    write_checkpoint(tmp_path, ToyGPT2(config), config=config, to_checkpoint=to_checkpoint)
    result = diffulex_cli("plan", str(tmp_path), "--family", "toygpt2", "--json", plugins=("gpt2",))
    assert result.returncode == 0, result.stderr
    transforms = {t["name"]: t["transform"] for t in json.loads(result.stdout)["tensors"]}
    assert transforms["h.0.attn.c_attn.weight"] == "transpose" and transforms["h.0.attn.c_proj.weight"] == "<lambda>"
    assert transforms["h.0.attn.c_attn.bias"] is None and transforms["wte.weight"] is None
    text = diffulex_cli("plan", str(tmp_path), "--family", "toygpt2", plugins=("gpt2",)).stdout
    assert ("h.0.attn.c_attn.weight  float32[8, 24]  -> param h.0.attn.c_attn.weight [transform: transpose]  "
            "(module:h.0.attn)") in text
    assert ("h.0.attn.c_proj.weight  float32[8, 8]  -> param h.0.attn.c_proj.weight [transform]  "
            "(module:h.0.attn)") in text
    assert "h.0.attn.c_attn.bias  float32[24]  -> param h.0.attn.c_attn.bias  (exact)" in text
