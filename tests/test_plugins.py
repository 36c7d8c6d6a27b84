"""Plugin discovery through real pip-installed distributions (see conftest.py)."""

from __future__ import annotations

import pytest

from diffulex_core.errors import (
    ConfigurationError,
    DuplicateFamilyError,
    FamilyFactoryError,
    PluginLoadError,
    PluginWarning,
    UnknownFamilyError,
)


def failures_by_plugin(plugins):
    return {f.plugin.name: f for f in plugins.failures}


def loaded(plugins, name):
    return next(p for p in plugins.loaded if p.name == name)


def test_healthy_plugin_is_discovered_with_its_distribution_hooks_and_families(use_plugins):
    plugins = use_plugins("healthy").get_plugins()
    info = loaded(plugins, "healthy")
    assert (info.distribution, info.version) == ("diffulex-test-healthy", "1.2.3")
    assert info.hooks == ("diffulex_register_families", "diffulex_resolve_weight")
    assert info.families == ("toy", "toy-ghost", "toy-lazy")
    factory = plugins.registry.get("toy")
    assert factory({"a": 1}).config == {"a": 1}
    assert plugins.failures == ()


def test_hookimpl_with_a_subset_of_the_spec_arguments_is_called_with_keywords(use_plugins):
    hook = use_plugins("healthy").get_plugin_manager().hook
    assert hook.diffulex_resolve_weight(model=None, name="toy.weight", ctx=None) == "healthy:toy.weight"
    assert hook.diffulex_resolve_weight(model=None, name="other.weight", ctx=None) is None


def test_lazy_factory_is_imported_on_first_use_only(use_plugins):
    import sys

    plugins = use_plugins("healthy").get_plugins()
    entry = plugins.registry.entry("toy-lazy")
    assert entry.factory == "diffulex_test_healthy:build_toy"
    assert entry.factory_name == "diffulex_test_healthy.build_toy"
    sys.modules.pop("diffulex_test_healthy")
    assert "diffulex_test_healthy" not in sys.modules
    factory = plugins.registry.get("toy-lazy")
    assert "diffulex_test_healthy" in sys.modules
    assert factory.__name__ == "build_toy"
    assert plugins.registry.get("toy-lazy") is factory  # imported once


def test_lazy_factory_that_cannot_be_imported_names_family_plugin_and_target(use_plugins):
    registry = use_plugins("healthy").get_plugins().registry
    with pytest.raises(FamilyFactoryError) as excinfo:
        registry.get("toy-ghost")
    message = str(excinfo.value)
    assert "'toy-ghost'" in message
    assert "plugin 'healthy' (diffulex-test-healthy 1.2.3)" in message
    assert "diffulex_test_no_such_module.models:build" in message
    assert isinstance(excinfo.value.__cause__, ModuleNotFoundError)


@pytest.mark.parametrize(
    ("broken", "stage", "fragment"),
    [
        ("import_error", "import", "No module named 'diffulex_test_dependency_that_is_not_installed'"),
        ("register_error", "register_families", "RuntimeError: registration exploded"),
        ("bad_signature", "validate", "tensor"),
        ("typo", "validate", "did you mean 'diffulex_register_families'"),
        ("unmarked", "validate", "not marked with @diffulex_core.hookimpl"),
    ],
)
def test_broken_plugin_is_reported_and_the_healthy_one_still_works(use_plugins, broken, stage, fragment):
    dist_name = "diffulex-test-" + broken.replace("_", "-")
    discovery = use_plugins("healthy", broken)
    with pytest.warns(PluginWarning, match=rf"plugin '{broken}' \({dist_name} 0\.1\.0\)"):
        plugins = discovery.get_plugins()
    failure = failures_by_plugin(plugins)[broken]
    assert failure.stage == stage
    assert fragment in failure.message
    assert (failure.plugin.distribution, failure.plugin.version) == (dist_name, "0.1.0")
    assert broken not in {p.name for p in plugins.loaded}
    # nothing of the broken plugin is left: no families, no hookimpls
    assert set(plugins.registry.names()) >= {"toy", "toy-ghost", "toy-lazy"}
    for family in ("half-registered", "never-seen", "typo-family", "unmarked-family"):
        assert family not in plugins.registry.names()
    assert not plugins.manager.has_plugin(broken)
    assert plugins.hook.diffulex_resolve_weight(model=None, name="toy.w", ctx=None) == "healthy:toy.w"
    assert plugins.registry.get("toy")().config == {}


def test_strict_mode_makes_any_failure_fatal_and_lists_all_of_them(use_plugins):
    discovery = use_plugins("healthy", "import_error", "typo", DIFFULEX_STRICT_PLUGINS="1")
    with pytest.raises(PluginLoadError) as excinfo:
        discovery.get_plugins()
    assert {f.plugin.name for f in excinfo.value.failures} == {"import_error", "typo"}
    assert "plugin 'import_error' (diffulex-test-import-error 0.1.0)" in str(excinfo.value)
    with pytest.raises(PluginLoadError):  # every later use fails too, not just the first
        discovery.get_plugin_manager()


def test_strict_mode_with_healthy_plugins_only_loads_normally(use_plugins):
    plugins = use_plugins("healthy", "object", DIFFULEX_STRICT_PLUGINS="1").get_plugins()
    assert plugins.strict and plugins.failures == ()


def test_strict_flag_with_an_unreadable_value_is_a_clear_error(use_plugins):
    with pytest.raises(ConfigurationError, match="DIFFULEX_STRICT_PLUGINS='ture' is not a boolean"):
        use_plugins("healthy", DIFFULEX_STRICT_PLUGINS="ture").get_plugins()


def test_allow_list_loads_only_the_named_plugins_and_warns_about_missing_ones(use_plugins):
    discovery = use_plugins("healthy", "object", "import_error", DIFFULEX_PLUGINS="object_plugin, not_there")
    with pytest.warns(PluginWarning, match="DIFFULEX_PLUGINS names 'not-there', which is not installed"):
        plugins = discovery.get_plugins()
    assert [p.name for p in plugins.loaded] == ["object_plugin"]
    assert {p.name for p in plugins.disabled} >= {"healthy", "import_error"}
    assert [f.stage for f in plugins.failures] == ["not_installed"]
    assert "import_error" not in failures_by_plugin(plugins)  # a disabled plugin is never imported


def test_allow_list_matches_entry_point_or_distribution_name(use_plugins):
    plugins = use_plugins("healthy", "object", DIFFULEX_PLUGINS="object_plugin,diffulex-test-healthy").get_plugins()
    assert {p.name for p in plugins.loaded} == {"healthy", "object_plugin"}


def test_empty_allow_list_loads_no_plugin(use_plugins):
    plugins = use_plugins("healthy", DIFFULEX_PLUGINS="").get_plugins()
    assert plugins.loaded == () and plugins.registry.names() == []
    assert "healthy" in {p.name for p in plugins.disabled}
    with pytest.raises(UnknownFamilyError, match="known families: \\(none\\)"):
        plugins.registry.get("toy")


def test_block_list_disables_a_plugin_without_importing_it(use_plugins):
    plugins = use_plugins("healthy", "import_error", DIFFULEX_DISABLE_PLUGINS="import_error").get_plugins()
    assert "import_error" in {p.name for p in plugins.disabled}
    assert plugins.failures == ()
    assert "toy" in plugins.registry.names()


def test_duplicate_family_is_an_error_naming_both_distributions(use_plugins):
    discovery = use_plugins("healthy", "duplicate")
    with pytest.warns(PluginWarning, match="'toy' is registered by"):
        plugins = discovery.get_plugins()
    with pytest.raises(DuplicateFamilyError) as excinfo:
        plugins.registry.get("toy")
    assert "diffulex-test-healthy 1.2.3" in str(excinfo.value)
    assert "diffulex-test-duplicate 0.1.0" in str(excinfo.value)
    assert "toy" not in plugins.registry.names()
    # the rest of both plugins still works
    assert plugins.registry.get("duplicate-only")(1) == ("other", 1)
    assert plugins.registry.get("toy-lazy")().config == {}
    assert [f.stage for f in plugins.failures] == ["family_conflict"]
    assert {p.name for p in plugins.loaded} >= {"healthy", "duplicate"}


def test_duplicate_family_is_fatal_in_strict_mode(use_plugins):
    with pytest.raises(PluginLoadError, match="'toy' is registered by"):
        use_plugins("healthy", "duplicate", DIFFULEX_STRICT_PLUGINS="1").get_plugins()


def test_override_replaces_a_family_whatever_the_discovery_order(use_plugins):
    # "healthy" sorts before "override"; the override must win either way
    plugins = use_plugins("healthy", "override").get_plugins()
    assert plugins.failures == ()
    assert plugins.registry.get("toy")(3) == ("better", 3)
    assert plugins.registry.entry("toy").owner == "plugin 'override' (diffulex-test-override 0.1.0)"
    assert "toy" not in loaded(plugins, "healthy").families
    assert "toy" in loaded(plugins, "override").families


def test_object_entry_point_with_decorated_partial_factory(use_plugins):
    plugins = use_plugins("object").get_plugins()
    info = loaded(plugins, "object_plugin")
    assert info.value == "diffulex_test_object:plugin"
    assert info.hooks == ("diffulex_packed_modules_mapping", "diffulex_register_families")
    assert plugins.registry.entry("scaled").factory_name == "diffulex_test_object.build_scaled"
    assert plugins.registry.get("scaled")("cfg") == {"scale": 2, "config": "cfg"}
    assert plugins.hook.diffulex_packed_modules_mapping(model=None, config=None) == [{"w_in": ("gate_up_proj", 0)}]


def test_discovery_happens_once_until_reset(use_plugins):
    discovery = use_plugins("healthy")
    first = discovery.get_plugins()
    assert discovery.get_plugins() is first
    discovery.reset_plugins()
    assert discovery.get_plugins() is not first


def test_unknown_family_lists_known_names_and_suggests_the_closest(use_plugins):
    registry = use_plugins("healthy").get_plugins().registry
    with pytest.raises(UnknownFamilyError) as excinfo:
        registry.get("toyy")
    assert "known families:" in str(excinfo.value) and "toy-lazy" in str(excinfo.value)
    assert "Did you mean 'toy'?" in str(excinfo.value)


def test_one_module_behind_two_entry_points_and_a_name_clash_with_the_core(use_plugins):
    discovery = use_plugins("healthy", "twice")
    with pytest.warns(PluginWarning):
        plugins = discovery.get_plugins()
    stages = {f.plugin.name: (f.stage, f.message) for f in plugins.failures}
    assert stages["twice_b"][0] == "validate" and "already registered" in stages["twice_b"][1]
    assert stages["diffulex-core"] == ("validate", "entry-point name 'diffulex-core' is already used by "
                                                   "diffulex-core's built-in hooks")
    assert plugins.registry.get("twice") is dict and "toy" in plugins.registry.names()


def test_get_plugins_is_safe_while_another_thread_resets(use_plugins):
    """get_plugins() once read the global after releasing its lock: a reset in between made it
    raise AttributeError ('NoneType' object has no attribute 'strict'). Forced thread switches
    make that window wide; every call must still return one complete discovery outcome."""
    import sys
    import threading

    module = use_plugins("healthy")
    readers, calls, deadline = 8, 300, 5.0
    errors: list[BaseException] = []
    results: list[object] = []
    stop = threading.Event()
    start = threading.Barrier(readers + 1)

    def read() -> None:
        start.wait()
        try:
            for _ in range(calls):
                plugins = module.get_plugins()
                manager = module.get_plugin_manager()
                results.append((plugins, manager))
        except BaseException as exc:  # reported below, with the thread's traceback
            errors.append(exc)

    def reset() -> None:
        start.wait()
        while not stop.is_set():
            module.reset_plugins()

    previous = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        threads = [threading.Thread(target=read) for _ in range(readers)]
        resetter = threading.Thread(target=reset)
        for thread in [*threads, resetter]:
            thread.start()
        for thread in threads:
            thread.join(deadline)
        stop.set()
        resetter.join(deadline)
    finally:
        sys.setswitchinterval(previous)
    assert not any(t.is_alive() for t in [*threads, resetter]), "threads still running"
    assert errors == []
    assert len(results) == readers * calls
    for plugins, manager in results:
        assert isinstance(plugins, module.Plugins)
        assert "toy" in plugins.registry.names()
        assert loaded(plugins, "healthy").families == ("toy", "toy-ghost", "toy-lazy")
        assert manager.has_plugin("healthy") and manager.has_plugin("diffulex-core")


# --------------------------------------------------------------------------- hook wrappers (pluggy's own calling)


def _wrapper_model_and_checkpoint(tmp_path, names):
    import torch
    from safetensors.torch import save_file
    from torch import nn

    class WrapperModel(nn.Module):
        uses_test_wrapper = True
        uses_test_resolver = True  # the "resolver" plugin answers too

        def __init__(self):
            super().__init__()
            for dest in ("by_first", "by_new", "by_old", "plain"):
                setattr(self, dest, nn.Linear(2, 2, bias=False))

    tensors = {name: torch.full((2, 2), float(i + 1)) for i, name in enumerate(names)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return WrapperModel(), tmp_path, tensors


def test_hook_wrappers_and_tryfirst_run_as_pluggy_documents_and_the_report_names_who_answered(use_plugins, tmp_path):
    """A wrapper hookimpl once made every load fail ("returned generator"): hooks were called one
    implementation at a time, outside pluggy. Now pluggy calls them; the rule still names the plugin."""
    import torch

    from diffulex_core.loader import load_checkpoint

    use_plugins("resolver", "wrapper")
    import diffulex_test_wrapper

    diffulex_test_wrapper.SEEN.clear()
    names = ["everyone.weight", "optimizer_state", "rewrapped.weight", "forced.weight", "plain.weight"]
    model, path, tensors = _wrapper_model_and_checkpoint(tmp_path, names)
    report = load_checkpoint(model, path)
    got = {p.name: (p.kind, p.target, p.rule) for p in report.placements}
    assert got == {
        "everyone.weight": ("param", "by_first.weight", "plugin:wrapper"),  # tryfirst beats the resolver plugin
        "optimizer_state": ("skip", None, "plugin:resolver"),  # passed through the wrapper: still the resolver's
        "rewrapped.weight": ("param", "by_new.weight", "plugin:wrapper"),  # a new-style wrapper's own answer
        "forced.weight": ("param", "by_old.weight", "plugin:wrapper"),  # an old-style hookwrapper's force_result
        "plain.weight": ("param", "plain.weight", "exact"),
    }
    assert torch.equal(model.by_first.weight, tensors["everyone.weight"])
    assert torch.equal(model.by_new.weight, tensors["rewrapped.weight"])
    assert torch.equal(model.by_old.weight, tensors["forced.weight"])
    seen = dict(diffulex_test_wrapper.SEEN)
    assert seen["optimizer_state"].reason == "training-only state"  # the wrapper saw the inner answer
    assert seen["rewrapped.weight"] is None and seen["plain.weight"] is None


@pytest.mark.parametrize(("tensor", "raised"), [("wrapper_explodes.weight", "RuntimeError: wrapper exploded"),
                                                ("plain_explodes.weight", "ValueError: plain exploded")])
def test_an_exception_in_a_wrapper_or_an_implementation_names_plugin_distribution_and_hook(use_plugins, tmp_path,
                                                                                          tensor, raised):
    from diffulex_core.errors import LoadError
    from diffulex_core.loader import plan_checkpoint

    use_plugins("resolver", "wrapper")
    model, path, _ = _wrapper_model_and_checkpoint(tmp_path, [tensor])
    with pytest.raises(LoadError) as excinfo:
        plan_checkpoint(model, path)
    assert str(excinfo.value) == (f"plugin 'wrapper' (diffulex-test-wrapper 0.1.0): diffulex_resolve_weight "
                                  f"raised {raised} (tensor {tensor!r})")
    assert type(excinfo.value.__cause__.__cause__).__name__ == raised.split(":")[0]


def test_hook_calls_show_in_pluggys_tracing(use_plugins, tmp_path):
    from diffulex_core.loader import plan_checkpoint

    manager = use_plugins("wrapper").get_plugin_manager()
    model, path, _ = _wrapper_model_and_checkpoint(tmp_path, ["everyone.weight"])
    lines: list[str] = []
    manager.trace.root.setwriter(lines.append)
    undo = manager.enable_tracing()
    try:
        plan_checkpoint(model, path, strict=False)
    finally:
        undo()
        manager.trace.root.setwriter(None)
    traced = "".join(lines)
    assert "diffulex_resolve_weight [hook]" in traced and "name: everyone.weight" in traced
    assert "finish diffulex_resolve_weight --> ResolvedWeight(param='by_first.weight'" in traced


def test_a_wrapper_on_a_hook_that_keeps_answers_per_plugin_is_refused_at_discovery(use_plugins):
    discovery = use_plugins("healthy", "wrapper_refused")
    with pytest.warns(PluginWarning, match=r"plugin 'wrapper_refused' \(diffulex-test-wrapper-refused 0\.1\.0\)"):
        plugins = discovery.get_plugins()
    failure = failures_by_plugin(plugins)["wrapper_refused"]
    assert failure.stage == "validate"
    assert failure.message == (
        "diffulex_packed_modules_mapping() is a hook wrapper of diffulex_packed_modules_mapping, which keeps each "
        "plugin's answer apart, attributed to that plugin: wrappers are accepted only on the hooks with one answer "
        "(diffulex_fix_tokenizer, diffulex_resolve_weight); make it a plain @diffulex_core.hookimpl")
    assert "refused-family" not in plugins.registry.names() and not plugins.manager.has_plugin("wrapper_refused")
    assert plugins.hook.diffulex_resolve_weight(model=None, name="toy.w", ctx=None) == "healthy:toy.w"
