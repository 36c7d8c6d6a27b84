"""Plugin discovery: entry points of group ``diffulex``, each loaded in isolation.

Discovery runs once, on first use (``get_plugins()``), never at ``import diffulex_core``.
A plugin that fails to import, whose hookimpls do not fit the specs, or whose family
registration raises is reported (with its entry-point name, distribution and version) and
contributes nothing; the others still load. ``DIFFULEX_STRICT_PLUGINS=1`` makes any such
failure fatal.
"""

from __future__ import annotations

import contextlib
import os
import re
import threading
import warnings
from collections.abc import Iterator
from dataclasses import replace
from importlib.metadata import EntryPoint, entry_points
from typing import Any

import pluggy

from diffulex_core import hookspecs
from diffulex_core.environment import env_flag
from diffulex_core.errors import PluginHookError, PluginLoadError, PluginWarning
from diffulex_core.plugins.family_registry import FamilyEntry, FamilyRegistry, validate_registration
from diffulex_core.plugins.hook_calls import PluginHooks
from diffulex_core.plugins.outcome import PluginFailure, PluginInfo, Plugins
from diffulex_core.plugins.validation import new_manager, scratch_manager, validate_plugin

__all__ = [
    "ENV_ALLOW",
    "ENV_BLOCK",
    "ENV_STRICT",
    "PluginFailure",
    "PluginInfo",
    "Plugins",
    "discover",
    "get_plugin_manager",
    "get_plugins",
    "installed_plugins",
    "matches",
    "normalize_name",
    "plugins_from",
    "reset_plugins",
    "using_plugins",
]

ENV_ALLOW = "DIFFULEX_PLUGINS"
ENV_BLOCK = "DIFFULEX_DISABLE_PLUGINS"
ENV_STRICT = "DIFFULEX_STRICT_PLUGINS"

def _name_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {normalize_name(part) for part in raw.split(",") if part.strip()}


def normalize_name(name: str) -> str:
    """An entry-point or distribution name as the allow and block lists compare it."""
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def installed_plugins() -> list[tuple[PluginInfo, EntryPoint]]:
    """Every entry point of group ``diffulex``, with what its distribution says, in a stable order."""
    found = ((_info(ep), ep) for ep in entry_points(group=hookspecs.ENTRY_POINT_GROUP))
    return sorted(found, key=lambda pair: (pair[0].name, pair[0].distribution or ""))


def _info(ep: EntryPoint) -> PluginInfo:
    dist = ep.dist
    return PluginInfo(
        name=ep.name,
        value=ep.value,
        distribution=dist.metadata["Name"] if dist is not None else None,
        version=dist.version if dist is not None else None,
    )


def matches(info: PluginInfo, names: set[str]) -> bool:
    """True when the plugin's entry-point or distribution name is among ``names`` (normalized)."""
    return normalize_name(info.name) in names or (
        info.distribution is not None and normalize_name(info.distribution) in names
    )


class _Discovery:
    """Loads every entry point of the group into one manager and one registry."""

    def __init__(self) -> None:
        from diffulex_core import __version__
        from diffulex_core.plugins import builtin_fixups

        self.manager = new_manager()
        core = PluginInfo(builtin_fixups.PLUGIN_NAME, builtin_fixups.__name__, "diffulex-core", __version__)
        # not an entry point: always on
        self._register(builtin_fixups, core, scratch_manager(builtin_fixups, core.name))
        self.registry = FamilyRegistry()
        self.loaded: list[PluginInfo] = []
        self.disabled: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []

    def run(self, strict: bool, allow: set[str] | None, block: set[str], entry_points_too: bool = True) -> Plugins:
        found = installed_plugins() if entry_points_too else []
        if allow is not None:
            for missing in sorted(n for n in allow if not any(matches(info, {n}) for info, _ in found)):
                info = PluginInfo(name=missing, value="", distribution=None, version=None)
                installed = ", ".join(i.name for i, _ in found) or "(none)"
                self._fail(info, "not_installed", f"{ENV_ALLOW} names {missing!r}, which is not installed; installed: "
                                                  f"{installed}")
        for info, ep in found:
            if (allow is not None and not matches(info, allow)) or matches(info, block):
                self.disabled.append(info)
            else:
                self._load(info, ep.load)
        owners = {}
        for entry in self.registry.entries():
            owners.setdefault(entry.owner, []).append(entry.name)
        self.loaded = [replace(p, families=tuple(owners.get(p.label, ()))) for p in self.loaded]
        return Plugins(self.manager, self.registry, tuple(self.loaded), tuple(self.disabled),
                       tuple(self.failures), strict)

    def _fail(self, info: PluginInfo, stage: str, message: str, exc: BaseException | None = None) -> None:
        self.failures.append(PluginFailure(info, stage, message, exc))

    def run_objects(self, plugins: dict[str, Any]) -> Plugins:
        """The outcome for exactly these plugin objects (name -> module or object), no entry points."""
        for name, obj in plugins.items():
            value = getattr(obj, "__name__", None) or type(obj).__qualname__
            self._load(PluginInfo(name=name, value=value, distribution=None, version=None), lambda obj=obj: obj)
        return self.run(False, set(), set(), entry_points_too=False)

    def _load(self, info: PluginInfo, load: Any) -> None:
        if self.manager.has_plugin(info.name):
            other = next((p.label for p in self.loaded if p.name == info.name), "diffulex-core's built-in hooks")
            self._fail(info, "validate", f"entry-point name {info.name!r} is already used by {other}")
            return
        try:
            obj = load()
        except Exception as exc:  # isolated: reported with the plugin named, others go on
            self._fail(info, "import", f"cannot import {info.value!r}: {type(exc).__name__}: {exc}", exc)
            return
        try:
            scratch = validate_plugin(obj, info)
        except pluggy.PluginValidationError as exc:
            self._fail(info, "validate", str(exc), exc)
            return
        other = next((h.info for h in self.manager.get_plugins() if h.plugin is obj), None)
        if other is not None:  # the same object behind two entry points
            self._fail(info, "validate", f"{info.value!r} is already registered, as {other.label}")
            return
        hooks_of = self._register(obj, info, scratch)
        try:
            pending = self._call_register_families(hooks_of, info)
        except Exception as exc:  # the plugin is withdrawn whole, its families with it
            self.manager.unregister(name=info.name)
            cause = exc.__cause__ if isinstance(exc, PluginHookError) else exc
            self._fail(info, "register_families",
                       f"diffulex_register_families raised {type(cause).__name__}: {cause}", exc)
            return
        hooks = tuple(sorted(c.name for c in self.manager.get_hookcallers(hooks_of) or ()))
        self.loaded.append(replace(info, hooks=hooks))
        for entry in pending:
            conflict = self.registry.add(entry)
            if conflict is not None:
                self._fail(info, "family_conflict", str(conflict), conflict)

    def _register(self, obj: Any, info: PluginInfo, scratch: pluggy.PluginManager) -> PluginHooks:
        """Register ``obj``'s hookimpls (found on ``scratch``) under ``info.name``, each behind ``answering``."""
        hooks_of = PluginHooks(obj, info, scratch)
        self.manager.register(hooks_of, name=info.name)
        return hooks_of

    def _call_register_families(self, hooks_of: PluginHooks, info: PluginInfo) -> list[FamilyEntry]:
        """Call this plugin's registration hook alone (pluggy's call, on a subset holding only this
        plugin); keep its families until it returns."""
        pending: list[FamilyEntry] = []

        def register(name: str, factory: Any, *, override: bool = False) -> None:
            validate_registration(name, factory, override)
            if any(e.name == name for e in pending):
                raise ValueError(f"family {name!r} registered twice by the same plugin")
            pending.append(FamilyEntry(name, factory, info.label, override))

        others = [p for p in self.manager.get_plugins() if p is not hooks_of]
        self.manager.subset_hook_caller("diffulex_register_families", others)(register=register)
        return pending


_lock = threading.Lock()
_plugins: Plugins | None = None


def get_plugins() -> Plugins:
    """Discover plugins on first call (thread-safe) and return the cached outcome.

    The outcome returned is the one read under the lock, so a concurrent ``reset_plugins()``
    never makes a caller see ``None`` or a half-set state.

    Warns (``PluginWarning``) once per failure; raises ``PluginLoadError`` on every call
    when ``DIFFULEX_STRICT_PLUGINS=1`` and anything failed.
    """
    global _plugins
    with _lock:
        plugins = _plugins  # read under the lock: reset_plugins() may clear the global once it is released
        if plugins is None:
            plugins = discover(strict=env_flag(ENV_STRICT, False))
            if not plugins.strict:
                for failure in plugins.failures:
                    warnings.warn(f"{failure.describe()}; other plugins still loaded", PluginWarning, stacklevel=3)
            _plugins = plugins
    if plugins.strict and plugins.failures:  # the local snapshot, never the global again
        raise PluginLoadError(plugins.failures)
    return plugins


def discover(*, strict: bool) -> Plugins:
    """A fresh discovery of the installed plugins, honouring the allow and block lists (not cached)."""
    return _Discovery().run(strict, _name_list(ENV_ALLOW), _name_list(ENV_BLOCK) or set())


def get_plugin_manager() -> pluggy.PluginManager:
    """The pluggy manager holding every healthy plugin's hookimpls."""
    return get_plugins().manager


def reset_plugins() -> None:
    """Forget the discovery outcome, so the next use discovers again (for tests)."""
    global _plugins
    with _lock:
        _plugins = None


def plugins_from(plugins: dict[str, Any]) -> Plugins:
    """A discovery outcome holding only ``plugins`` (name -> plugin module or object) and
    diffulex-core's built-in hooks: no entry point is read. Failures are in ``.failures``."""
    return _Discovery().run_objects(dict(plugins))


@contextlib.contextmanager
def using_plugins(plugins: Plugins) -> Iterator[Plugins]:
    """Make ``plugins`` the process-wide outcome (what loads, families and tokenizers use) for the
    ``with`` block, then put the previous one back (or none, so the next use discovers)."""
    global _plugins
    with _lock:
        previous, _plugins = _plugins, plugins
    try:
        yield plugins
    finally:
        with _lock:
            _plugins = previous


