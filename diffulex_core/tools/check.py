"""``diffulex check PLUGIN``: does an installed plugin work with diffulex-core?

For the plugin named (entry-point or distribution name, normalised as ``DIFFULEX_PLUGINS`` is):

1. hooks: the plugin imports, its hookimpls fit the hook specs (names and arguments, as in
   discovery), no ``diffulex_*`` function lacks its marker, and discovery reported nothing for it;
2. families: each family it registers has a factory that imports and builds a
   ``torch.nn.Module`` on the meta device from the family's example config;
3. round trip, per family, on the CPU: a seeded model with random-normal weights is written as a
   two-shard safetensors checkpoint through the family's export, planned into a meta-built twin
   (nothing unexpected, missing or rejected), loaded, and must then hold exactly the source's
   weights and give exactly its outputs (``torch.equal``) on the example inputs.

Example configs come from the ``diffulex_family_examples`` hook (a config mapping or a
:class:`FamilyExample` per family) or from a factory's ``example_config`` attribute (and
optionally ``to_checkpoint``). A family without one is reported as skipped, with the reason:
that is not a failure.

The per-family checks are in ``family_checks``; the command's printing is in ``cli``.
Importing this module is cheap (no torch).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffulex_core.tools.check_results import FAIL, PASS, SKIP, CheckResult, describe_error
from diffulex_core.tools.family_checks import check_family

if TYPE_CHECKING:
    from diffulex_core.plugins import PluginInfo, Plugins

__all__ = ["check_plugin"]


def _find(name: str) -> tuple[list[tuple[PluginInfo, Any]], list[PluginInfo]]:
    """(entry points matching ``name``, every installed plugin). An exact entry-point name wins over
    a distribution name, so a distribution holding several plugins can still name each."""
    from diffulex_core.plugins.discovery import installed_plugins, matches, normalize_name

    found = installed_plugins()
    wanted = normalize_name(name)
    exact = [pair for pair in found if normalize_name(pair[0].name) == wanted]
    return exact or [pair for pair in found if matches(pair[0], {wanted})], [info for info, _ in found]


def _discover() -> Plugins:
    """The process-wide outcome; under ``DIFFULEX_STRICT_PLUGINS=1`` with failures (which would raise
    on every use), a lenient discovery of the same plugins that the check installs for its duration."""
    from diffulex_core.errors import PluginLoadError
    from diffulex_core.plugins.discovery import discover, get_plugins

    try:
        return get_plugins()
    except PluginLoadError:
        return discover(strict=False)


def _conflict(plugins: Plugins, family: str) -> str:
    try:
        plugins.registry.entry(family)
    except Exception as exc:  # DuplicateFamilyError, naming every plugin that registers it
        return str(exc)
    return f"family {family!r} is registered by several plugins"


# --------------------------------------------------------------------------- plugin-level checks


def _check_hooks(result: CheckResult, info: PluginInfo, ep: Any) -> bool:
    """import and hooks; True when both pass."""
    import pluggy

    from diffulex_core.plugins.validation import hook_names, validate_plugin

    try:
        obj = ep.load()
    except Exception as exc:
        result.add(None, "import", FAIL, f"cannot import {info.value!r}: {describe_error(exc)}")
        result.add(None, "hooks", SKIP, "not checked: the plugin does not import")
        return False
    result.add(None, "import", PASS, f"imported {info.value!r}")
    try:
        validate_plugin(obj, info)
    except pluggy.PluginValidationError as exc:
        result.add(None, "hooks", FAIL, str(exc))
        return False
    except Exception as exc:  # an object pluggy cannot even inspect
        result.add(None, "hooks", FAIL, f"registering {info.value!r} with pluggy raised {describe_error(exc)}")
        return False
    names = hook_names(obj)
    result.add(None, "hooks", PASS, f"hookimpls fit the specs: {', '.join(names) or 'none'}")
    return True


def _check_discovery(result: CheckResult, info: PluginInfo, plugins: Plugins, hooks_ok: bool) -> bool:
    """What discovery said about this plugin; True when it is loaded (its families can be checked)."""
    from diffulex_core.plugins import ENV_ALLOW, ENV_BLOCK

    same = lambda other: (other.name, other.distribution) == (info.name, info.distribution)  # noqa: E731
    if any(same(p) for p in plugins.disabled):
        result.add(None, "discovery", FAIL, f"disabled in this environment by {ENV_ALLOW}/{ENV_BLOCK}: "
                                            f"nothing it provides is used; its families are not checked")
        return False
    # a family conflict is reported per family (for every plugin in it), below
    failures = [f for f in plugins.failures if same(f.plugin) and f.stage != "family_conflict"]
    if not hooks_ok:  # the import or hooks check above already says why discovery refused it
        failures = [f for f in failures if f.stage not in ("import", "validate")]
    for failure in failures:
        result.add(None, "discovery", FAIL, f"failed at {failure.stage}: {failure.message}")
    loaded = next((p for p in plugins.loaded if same(p)), None)
    if loaded is None:
        if not failures and hooks_ok:
            result.add(None, "discovery", FAIL, "discovery did not load it")
        result.add(None, "families", SKIP, "not checked: the plugin is not loaded (see the failure above)")
        return False
    if not failures:
        families = ", ".join(loaded.families) or "none"
        result.add(None, "discovery", PASS, f"loaded; usable families: {families}")
    return True


def _examples(result: CheckResult, info: PluginInfo, plugins: Plugins) -> dict[str, tuple[str, Any]]:
    """This plugin's own examples ``{family: (source, example)}``; its answers for families it does
    not own are problems. Other plugins' answers for its families are their problems, not used here."""
    from diffulex_core.plugins.hook_calls import plugin_answers

    owners = {e.name: e for e in plugins.registry.entries()}
    mine: dict[str, tuple[str, Any]] = {}
    try:
        answers = plugin_answers(plugins.manager, "diffulex_family_examples", info.name)
    except Exception as exc:
        result.add(None, "examples", FAIL, f"diffulex_family_examples failed: {exc}")
        answers = []
    for answer in answers:
        if not isinstance(answer, Mapping):
            result.add(None, "examples", FAIL, f"diffulex_family_examples returned {type(answer).__name__}, "
                                               f"expected a mapping {{family: config or FamilyExample}}")
            continue
        for family, example in answer.items():
            entry = owners.get(family)
            if entry is None and family in plugins.registry.conflicts():
                result.add(family, "examples", SKIP, f"family {family!r} is registered by several plugins and "
                                                     f"unusable (see its registration check); its example is not used")
            elif entry is None:
                known = ", ".join(sorted(owners)) or "(none)"
                result.add(family, "examples", FAIL, f"diffulex_family_examples answers for family {family!r}, "
                                                     f"which no plugin registers; known families: {known}")
            elif entry.owner != info.label:
                if entry.override:
                    result.add(family, "examples", SKIP, f"family {family!r} is overridden by {entry.owner}; "
                                                         f"this plugin's example for it is not used")
                else:
                    result.add(family, "examples", FAIL, f"diffulex_family_examples answers for family {family!r}, "
                                                         f"which {entry.owner} registers; answer for this "
                                                         f"plugin's own families only")
            else:
                mine[family] = ("diffulex_family_examples", example)
    return mine


def check_plugin(name: str, *, seed: int = 0) -> CheckResult:
    """Check the installed plugin ``name`` (entry-point or distribution name): its hooks, the
    families it registers and a checkpoint round trip per family. Never raises for what the plugin
    does wrong: every problem is a failed check in the result (``.ok``, ``.problems``)."""
    from diffulex_core.plugins import using_plugins

    matches, installed = _find(name)
    if len(matches) != 1:
        result = CheckResult(name, None, None)
        if not matches:
            listed = ", ".join(f"{i.name} ({i.distribution or 'no distribution'} {i.version or ''})".replace(" )", ")")
                               for i in installed) or "(none)"
            result.add(None, "installed", FAIL, f"no plugin named {name!r} is installed; installed plugins: {listed}")
        else:
            listed = ", ".join(i.name for i, _ in matches)
            result.add(None, "installed", FAIL, f"distribution {name!r} provides several plugins ({listed}); "
                                                f"check each by its entry-point name")
        return result
    info, ep = matches[0]
    result = CheckResult(info.name, info.distribution, info.version)
    hooks_ok = _check_hooks(result, info, ep)
    plugins = _discover()
    with using_plugins(plugins):  # the loads below see the very outcome checked here
        if not _check_discovery(result, info, plugins, hooks_ok):
            return result
        families = [e.name for e in plugins.registry.entries() if e.owner == info.label]
        for family, entries in sorted(plugins.registry.conflicts().items()):
            if any(e.owner == info.label for e in entries):
                result.add(family, "registration", FAIL, _conflict(plugins, family))
        examples = _examples(result, info, plugins)
        if not families and not any(c.name == "registration" for c in result.checks):
            result.add(None, "families", SKIP, "the plugin registers no model family: nothing to build")
        for family in families:
            try:
                check_family(result, family, plugins, examples.get(family), seed)
            except Exception as exc:  # a bug of ours, or plugin code failing where we did not expect it
                result.add(family, "family", FAIL, f"checking the family raised {describe_error(exc)}")
    return result
