"""``diffulex check PLUGIN``: the bundled plugins pass, broken ones (real pip-installed distributions
under tests/plugin_dists, see conftest.py) fail with the plugin, family and problem named."""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

import pluggy
import pytest

from diffulex_core import hookspecs
from diffulex_core.conformance import CheckResult, FamilyExample, check_plugin
from diffulex_core.tools.check_results import NO_EXAMPLE
from diffulex_core.tools.cli import cmd_check

quiet_discovery = pytest.mark.filterwarnings("ignore::diffulex_core.errors.PluginWarning")  # the checks report them

BUNDLED = {"llada": ("diffulex-llada", ["llada"]), "dream": ("diffulex-dream", ["dream"]),
           "sdar": ("diffulex-sdar", ["sdar", "sdar_moe"])}
FAMILY_CHECKS = ["factory", "example", "build (meta)", "round trip", "outputs"]


def statuses(result: CheckResult, family: str | None = None) -> dict[str, str]:
    return {c.name: c.status for c in result.checks if c.family == family}


def detail(result: CheckResult, family: str | None, name: str) -> str:
    [found] = [c for c in result.checks if c.family == family and c.name == name]
    return found.detail


def run_cmd(capsys, plugin: str, as_json: bool) -> tuple[int, str]:
    code = cmd_check(argparse.Namespace(plugin=plugin, json=as_json))
    return code, capsys.readouterr().out


@pytest.fixture(autouse=True)
def fresh_discovery(use_plugins):
    """Every test discovers anew (the bundled plugins are installed in the environment)."""
    use_plugins()


# --------------------------------------------------------------------------- the bundled plugins


@pytest.mark.parametrize("plugin", sorted(BUNDLED))
def test_bundled_plugin_passes_every_check(plugin):
    distribution, families = BUNDLED[plugin]
    result = check_plugin(plugin)
    assert result.ok, result.problems
    assert (result.plugin, result.distribution, result.version) == (plugin, distribution, "0.1.0")
    assert statuses(result) == {"import": "pass", "hooks": "pass", "discovery": "pass"}
    assert "diffulex_family_examples" in detail(result, None, "hooks")
    assert sorted({c.family for c in result.checks} - {None}) == families
    for family in families:  # nothing skipped: every family builds, round-trips and reproduces its outputs
        assert statuses(result, family) == dict.fromkeys(FAMILY_CHECKS, "pass"), family
        assert "in 2 shard(s)" in detail(result, family, "round trip")
        assert "torch.equal" in detail(result, family, "outputs")
    assert result.problems == []
    data = result.to_dict()
    assert data["ok"] is True and data["plugin"] == plugin and data["distribution"] == distribution
    assert {(c["family"], c["check"]) for c in data["checks"]} >= {(f, "outputs") for f in families}


def test_a_plugin_is_found_by_its_distribution_name_normalised():
    result = check_plugin("Diffulex_Dream")
    assert (result.plugin, result.distribution) == ("dream", "diffulex-dream")
    assert result.ok, result.problems


def test_unknown_plugin_fails_listing_the_installed_ones(capsys):
    result = check_plugin("no-such-plugin")
    assert not result.ok
    [problem] = result.problems
    assert "no plugin named 'no-such-plugin' is installed" in problem
    for name, (distribution, _) in BUNDLED.items():
        assert f"{name} ({distribution} 0.1.0)" in problem
    code, out = run_cmd(capsys, "no-such-plugin", as_json=False)
    assert code == 1 and "FAIL" in out and "installed plugins:" in out


# --------------------------------------------------------------------------- the command, in process and as a CLI


def test_cmd_check_prints_json_and_exits_0_for_a_passing_plugin(capsys):
    code, out = run_cmd(capsys, "sdar", as_json=True)
    assert code == 0
    data = json.loads(out)
    assert data["ok"] is True and data["problems"] == [] and data["distribution"] == "diffulex-sdar"
    assert {c["status"] for c in data["checks"]} == {"pass"}
    assert {c["family"] for c in data["checks"]} == {None, "sdar", "sdar_moe"}


def test_cmd_check_prints_a_table(capsys):
    code, out = run_cmd(capsys, "llada", as_json=False)
    assert code == 0
    lines = out.splitlines()
    assert lines[0] == "diffulex check llada (diffulex-llada 0.1.0)"
    assert any(line.split()[:3] == ["llada", "round", "trip"] and "PASS" in line for line in lines)
    assert lines[-1].startswith("OK: 8 passed, 0 failed, 0 skipped")


def test_the_cli_runs_check_as_a_subprocess():
    """``python -m diffulex_core check llada --json``: needs ``check`` wired into diffulex_core/cli.py."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("DIFFULEX_")}
    result = subprocess.run([sys.executable, "-m", "diffulex_core", "check", "llada", "--json"],
                            capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    data = json.loads(result.stdout)
    assert data["ok"] is True and data["plugin"] == "llada"
    assert ("llada", "outputs", "pass") in {(c["family"], c["check"], c["status"]) for c in data["checks"]}


# --------------------------------------------------------------------------- (a) hooks


@quiet_discovery
def test_hookimpl_with_an_argument_its_spec_lacks_fails_the_hooks_check(use_plugins, capsys):
    use_plugins("check_badhook")
    result = check_plugin("check_badhook")
    assert not result.ok
    assert statuses(result) == {"import": "pass", "hooks": "fail", "families": "skip"}
    [problem] = result.problems
    assert problem.startswith("plugin 'check_badhook' (diffulex-test-check-badhook 0.1.0): hooks: ")
    assert "diffulex_family_examples" in problem and "{'config'}" in problem and "hookspec" in problem
    code, out = run_cmd(capsys, "check_badhook", as_json=True)
    assert code == 1 and json.loads(out)["ok"] is False


@quiet_discovery
def test_misspelt_hook_name_fails_the_hooks_check_with_a_suggestion(use_plugins, capsys):
    use_plugins("typo")
    result = check_plugin("diffulex-test-typo")
    [problem] = result.problems
    assert problem.startswith("plugin 'typo' (diffulex-test-typo 0.1.0): hooks: ")
    assert "unknown hook 'diffulex_register_familes'" in problem
    assert "did you mean 'diffulex_register_families'?" in problem
    assert run_cmd(capsys, "typo", as_json=False)[0] == 1


@quiet_discovery
def test_unmarked_hook_function_fails_the_hooks_check(use_plugins):
    use_plugins("unmarked")
    [problem] = check_plugin("unmarked").problems
    assert "hooks: diffulex_register_families() in diffulex_test_unmarked is not marked" in problem


@quiet_discovery
def test_failure_in_discovery_is_reported(use_plugins):
    use_plugins("register_error")
    result = check_plugin("register_error")
    assert statuses(result) == {"import": "pass", "hooks": "pass", "discovery": "fail", "families": "skip"}
    [problem] = result.problems
    assert "plugin 'register_error'" in problem and "discovery: failed at register_families" in problem


def test_disabled_plugin_fails_and_says_why(use_plugins):
    use_plugins("check_noexample", DIFFULEX_DISABLE_PLUGINS="check-noexample")
    result = check_plugin("check_noexample")
    assert statuses(result)["discovery"] == "fail"
    assert "DIFFULEX_DISABLE_PLUGINS" in detail(result, None, "discovery")


@quiet_discovery
def test_strict_mode_failures_of_other_plugins_do_not_stop_the_check(use_plugins):
    use_plugins("check_noexample", "typo", DIFFULEX_STRICT_PLUGINS="1")
    result = check_plugin("check_noexample")
    assert result.ok, result.problems
    assert statuses(result, "noexample-attr")["outputs"] == "pass"


# --------------------------------------------------------------------------- (b) round trip


def test_broken_exports_and_mappings_fail_the_round_trip_naming_family_and_tensor(use_plugins, capsys):
    use_plugins("check_roundtrip")
    result = check_plugin("check_roundtrip")
    assert not result.ok
    assert statuses(result, "rt-good") == dict.fromkeys(FAMILY_CHECKS, "pass")  # inputs from FamilyExample.inputs
    assert "forward on inputs [1, 4]" in detail(result, "rt-good", "outputs")
    for family in ("rt-missing", "rt-extra", "rt-swapped"):
        assert statuses(result, family) == {"factory": "pass", "example": "pass", "build (meta)": "pass",
                                            "round trip": "fail"}, family
    label = "plugin 'check_roundtrip' (diffulex-test-check-roundtrip 0.1.0)"
    problems = {p.split(":", 1)[0]: p for p in result.problems}
    assert set(problems) == {f"{label}, family 'rt-{f}'" for f in ("missing", "extra", "swapped")}
    assert "final_scale is missing (no checkpoint tensor writes it)" in problems[f"{label}, family 'rt-missing'"]
    assert "checkpoint tensor extra_head.weight is unexpected" in problems[f"{label}, family 'rt-extra'"]
    swapped = problems[f"{label}, family 'rt-swapped'"]
    assert "kv_proj.weight does not hold the source's values" in swapped
    assert "k_proj.weight (shard 'v'), v_proj.weight (shard 'k')" in swapped
    code, out = run_cmd(capsys, "check_roundtrip", as_json=False)
    assert code == 1
    assert "FAILED: " in out and f"  - {label}, family 'rt-swapped': round trip: " in out


# --------------------------------------------------------------------------- (c) no example


def test_family_without_example_is_skipped_with_the_reason_and_exit_0(use_plugins, capsys):
    use_plugins("check_noexample")
    result = check_plugin("check_noexample")
    assert result.ok and result.problems == []
    assert statuses(result, "noexample-plain") == {"factory": "pass", "example": "skip"}
    assert detail(result, "noexample-plain", "example") == NO_EXAMPLE
    assert NO_EXAMPLE.startswith("no example config: build, round trip not tested; add diffulex_family_examples")
    # the documented attribute: a (lazy) factory's example_config
    assert statuses(result, "noexample-attr") == dict.fromkeys(FAMILY_CHECKS, "pass")
    assert detail(result, "noexample-attr", "example") == "from factory.example_config"
    code, out = run_cmd(capsys, "check_noexample", as_json=False)
    assert code == 0
    assert f"SKIP    {NO_EXAMPLE}" in out and "OK: 9 passed, 0 failed, 1 skipped" in out
    code, out = run_cmd(capsys, "check_noexample", as_json=True)
    assert code == 0 and {"family": "noexample-plain", "check": "example", "status": "skip",
                          "detail": NO_EXAMPLE} in json.loads(out)["checks"]


# --------------------------------------------------------------------------- (d) factories that do not build


def test_factories_that_cannot_build_on_meta_fail_naming_the_family(use_plugins, capsys):
    use_plugins("check_build")
    result = check_plugin("check_build")
    label = "plugin 'check_build' (diffulex-test-check-build 0.1.0)"
    problems = {p.split(":", 1)[0]: p.split(": ", 1)[1] for p in result.problems}
    assert problems[f"{label}, family 'build-item'"] == (
        "build (meta): factory(config) on the meta device raised RuntimeError: "
        "Tensor.item() cannot be called on meta tensors")
    assert problems[f"{label}, family 'build-cpu'"].startswith(
        "build (meta): factory(config) ignores the meta device: weight, bias not on meta")
    assert problems[f"{label}, family 'build-not-module'"] == (
        "build (meta): factory(config) returned dict, not a torch.nn.Module")
    assert problems[f"{label}, family 'build-ghost'"].startswith("factory: model family 'build-ghost'")
    assert "cannot be imported: ModuleNotFoundError" in problems[f"{label}, family 'build-ghost'"]
    # examples for families the plugin does not own
    assert "which plugin 'llada' (diffulex-llada 0.1.0) registers" in problems[f"{label}, family 'llada'"]
    assert "which no plugin registers" in problems[f"{label}, family 'build-nonexistent'"]
    assert len(result.problems) == 6
    assert run_cmd(capsys, "check_build", as_json=True)[0] == 1
    # another plugin's answer for llada is that plugin's problem, not llada's
    assert check_plugin("llada").ok


# --------------------------------------------------------------------------- the hook and FamilyExample


def test_the_examples_hook_is_a_documented_spec():
    spec = hookspecs.diffulex_family_examples
    assert spec.__doc__ and "FamilyExample" in spec.__doc__ and ":return:" in spec.__doc__
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    assert manager.hook.diffulex_family_examples.spec.argnames == ()


def test_family_example_is_frozen_and_checked():
    example = FamilyExample({"vocab_size": 8})
    assert (example.to_checkpoint, example.inputs) == (None, None)
    with pytest.raises(AttributeError):
        example.config = {}
    with pytest.raises(TypeError, match="config must be a mapping"):
        FamilyExample([("vocab_size", 8)])
    with pytest.raises(TypeError, match="to_checkpoint must be callable"):
        FamilyExample({}, to_checkpoint="model.safetensors")


def test_conformance_imports_without_torch():
    code = "import sys, diffulex_core.conformance, diffulex_llada; print('torch' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "False"


@quiet_discovery
@pytest.mark.parametrize("plugin", ["duplicate", "healthy"])
def test_family_conflict_fails_both_plugins_naming_the_family(use_plugins, plugin):
    use_plugins("healthy", "duplicate")
    result = check_plugin(plugin)
    [problem] = [p for p in result.problems if ", family 'toy':" in p]  # healthy's toy-ghost fails too
    assert problem.startswith(f"plugin '{plugin}' (diffulex-test-{plugin} ")
    assert ", family 'toy': registration: model family 'toy' is registered by plugin " in problem
    assert "plugin 'duplicate'" in problem and "plugin 'healthy'" in problem
    assert statuses(result)["discovery"] == "pass"
