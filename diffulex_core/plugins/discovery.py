"""Plugin discovery: entry points of group ``diffulex``, each loaded in isolation.

Discovery runs once, on first use (``get_plugins()``), never at ``import diffulex_core``.
A plugin that fails to import, whose hookimpls do not fit the specs, or whose family
registration raises is reported (with its entry-point name, distribution and version) and
contributes nothing; the others still load. ``DIFFULEX_STRICT_PLUGINS=1`` makes any such
failure fatal.
"""

from __future__ import annotations

import contextlib
import difflib
import functools
import inspect
import os
import re
import threading
import warnings
from dataclasses import dataclass, field, replace
from importlib.metadata import EntryPoint, entry_points
from collections.abc import Iterator
from typing import Any

import pluggy

from diffulex_core import hookspecs
from diffulex_core.errors import ConfigurationError, DiffulexError, PluginError, PluginHookError, PluginLoadError, PluginWarning
from diffulex_core.plugins.family_registry import FamilyEntry, FamilyRegistry, validate_registration

__all__ = [
    "PluginInfo",
    "PluginFailure",
    "Plugins",
    "get_plugins",
    "get_plugin_manager",
    "reset_plugins",
    "PluginHookError",
    "collect_results",
    "first_result",
    "plugin_answers",
    "plugin_label",
]

ENV_ALLOW = "DIFFULEX_PLUGINS"
ENV_BLOCK = "DIFFULEX_DISABLE_PLUGINS"
ENV_STRICT = "DIFFULEX_STRICT_PLUGINS"

_TRUE = {"1", "true", "yes", "on"}
_FALSE = {"", "0", "false", "no", "off"}


@dataclass(frozen=True)
class PluginInfo:
    """One entry point of group ``diffulex``, and what it contributed once loaded."""

    name: str
    value: str
    distribution: str | None
    version: str | None
    hooks: tuple[str, ...] = ()
    families: tuple[str, ...] = ()

    @property
    def label(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"plugin {self.name!r} ({dist})"

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "value": self.value,
            "distribution": self.distribution,
            "version": self.version,
            "hooks": list(self.hooks),
            "families": list(self.families),
        }


@dataclass(frozen=True)
class PluginFailure:
    """Why a plugin (or a family it registered) is unusable."""

    plugin: PluginInfo
    stage: str  # "import", "validate", "register_families", "family_conflict", "not_installed"
    message: str
    exception: BaseException | None = field(default=None, compare=False, repr=False)

    def describe(self) -> str:
        return f"{self.plugin.label} failed at {self.stage}: {self.message}"

    def to_dict(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin.name,
            "distribution": self.plugin.distribution,
            "version": self.plugin.version,
            "stage": self.stage,
            "message": self.message,
            "exception_type": type(self.exception).__name__ if self.exception else None,
        }


@dataclass(frozen=True)
class Plugins:
    """The outcome of one discovery: a hook manager, the registry, and every failure."""

    manager: pluggy.PluginManager
    registry: FamilyRegistry
    loaded: tuple[PluginInfo, ...]
    disabled: tuple[PluginInfo, ...]
    failures: tuple[PluginFailure, ...]
    strict: bool

    @property
    def hook(self) -> Any:
        return self.manager.hook

    def to_dict(self) -> dict[str, Any]:
        return {
            "strict": self.strict,
            "plugins": [p.to_dict() for p in self.loaded],
            "disabled": [p.to_dict() for p in self.disabled],
            "failures": [f.to_dict() for f in self.failures],
            "families": {
                e.name: {"factory": e.factory_name, "owner": e.owner, "override": e.override}
                for e in self.registry.entries()
            },
        }


def _flag(name: str) -> bool:
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if value in _TRUE:
        return True
    if value in _FALSE:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use 1 or 0")


def _name_list(name: str) -> set[str] | None:
    raw = os.environ.get(name)
    if raw is None:
        return None
    return {_normalize(part) for part in raw.split(",") if part.strip()}


def _normalize(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name.strip()).lower()


def _info(ep: EntryPoint) -> PluginInfo:
    dist = ep.dist
    return PluginInfo(
        name=ep.name,
        value=ep.value,
        distribution=dist.metadata["Name"] if dist is not None else None,
        version=dist.version if dist is not None else None,
    )


def _matches(info: PluginInfo, names: set[str]) -> bool:
    return _normalize(info.name) in names or (
        info.distribution is not None and _normalize(info.distribution) in names
    )


def _new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


_SPEC_NAMES = tuple(n for n in dir(hookspecs) if n.startswith("diffulex_"))
# Hook wrappers make sense where pluggy hands on one answer (firstresult); see hookspecs.py.
WRAPPABLE_HOOKS = tuple(n for n in _SPEC_NAMES
                        if (getattr(getattr(hookspecs, n), f"{hookspecs.PROJECT_NAME}_spec", None) or {}).get("firstresult"))


def _validate(obj: Any, info: PluginInfo) -> pluggy.PluginManager:
    """Register ``obj`` on a scratch manager so a bad plugin never half-registers on the real one;
    the scratch manager holds its hookimpls as pluggy found them."""
    scratch = _scratch(obj, info.name)
    try:
        scratch.check_pending()
    except pluggy.PluginValidationError as exc:
        typo = re.search(r"unknown hook '(\w+)'", str(exc))
        close = difflib.get_close_matches(typo.group(1), _SPEC_NAMES, n=1) if typo else []
        hint = f"; did you mean {close[0]!r}?" if close else f"; known hooks: {', '.join(_SPEC_NAMES)}"
        raise pluggy.PluginValidationError(exc.plugin, f"{exc}{hint}") from None
    for caller in scratch.get_hookcallers(obj) or ():
        wrapper = next((i for i in caller.get_hookimpls() if i.wrapper or i.hookwrapper), None)
        if wrapper is not None and caller.name in _SPEC_NAMES and caller.name not in WRAPPABLE_HOOKS:
            why = ("is called once per plugin, alone" if caller.name == "diffulex_register_families"
                   else "keeps each plugin's answer apart, attributed to that plugin")
            raise pluggy.PluginValidationError(
                obj, f"{wrapper.function.__name__}() is a hook wrapper of {caller.name}, which {why}: wrappers "
                     f"are accepted only on the hooks with one answer ({', '.join(WRAPPABLE_HOOKS)}); "
                     f"make it a plain @diffulex_core.hookimpl")
    if inspect.ismodule(obj):
        marked = {impl.function for caller in scratch.get_hookcallers(obj) or () for impl in caller.get_hookimpls()}
        for attr, value in vars(obj).items():
            if (
                attr.startswith("diffulex_")
                and inspect.isfunction(value)
                and value.__module__ == obj.__name__
                and value not in marked
            ):
                raise pluggy.PluginValidationError(
                    obj, f"{attr}() in {obj.__name__} is not marked with @diffulex_core.hookimpl and would never be called"
                )
    return scratch


class _Answers(threading.local):
    given: list[tuple[str, str, Any]] | None = None  # (hook, plugin, answer) of the call in progress


_ANSWERS = _Answers()


def _answering(function: Any, hook: str, info: PluginInfo) -> Any:
    """``function`` (one hookimpl) as pluggy will call it: an exception becomes a ``PluginHookError``
    naming the plugin, its distribution and the hook, and an answer other than None is noted for
    ``collect_results``/``first_result`` (pluggy's result does not say which plugin gave it).

    A hook wrapper stays a generator, so pluggy drives it as it documents; it is noted as the
    answerer only where it returns something other than the answer it was given.
    """
    if inspect.isgeneratorfunction(function):
        @functools.wraps(function)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                answer = yield from function(*args, **kwargs)
            except DiffulexError:  # ours, or an inner implementation's, already named
                raise
            except Exception as exc:
                raise PluginHookError(info, hook, exc) from exc
            given = _ANSWERS.given
            if answer is not None and given is not None and not (given and given[-1][2] is answer):
                given.append((hook, info.name, answer))
            return answer

        return wrapper

    @functools.wraps(function)
    def implementation(*args: Any, **kwargs: Any) -> Any:
        try:
            answer = function(*args, **kwargs)
        except DiffulexError:
            raise
        except Exception as exc:
            raise PluginHookError(info, hook, exc) from exc
        if answer is not None:
            given = _ANSWERS.given
            if given is not None:
                given.append((hook, info.name, answer))
        return answer

    return implementation


class _PluginHooks:
    """What the hook manager holds for one plugin: each of its hookimpls (as pluggy found them on a
    scratch manager: bound, with their options) behind ``_answering``. ``plugin`` is the plugin."""

    def __init__(self, plugin: Any, info: PluginInfo, scratch: pluggy.PluginManager) -> None:
        self.plugin, self.info = plugin, info
        for caller in scratch.get_hookcallers(plugin) or ():
            for n, impl in enumerate(caller.get_hookimpls()):
                answering = _answering(impl.function, caller.name, info)
                setattr(answering, f"{hookspecs.PROJECT_NAME}_impl", {**impl.opts, "specname": caller.name})
                setattr(self, f"{caller.name}_{n}", answering)

    def __repr__(self) -> str:
        return f"<hooks of {self.info.label}: {self.plugin!r}>"


def _scratch(obj: Any, name: str) -> pluggy.PluginManager:
    scratch = _new_manager()
    scratch.register(obj, name=name)
    return scratch


class _Discovery:
    """Loads every entry point of the group into one manager and one registry."""

    def __init__(self) -> None:
        from diffulex_core import __version__
        from diffulex_core.plugins import builtin_fixups

        self.manager = _new_manager()
        core = PluginInfo(builtin_fixups.PLUGIN_NAME, builtin_fixups.__name__, "diffulex-core", __version__)
        self._register(builtin_fixups, core, _scratch(builtin_fixups, core.name))  # not an entry point: always on
        self.registry = FamilyRegistry()
        self.loaded: list[PluginInfo] = []
        self.disabled: list[PluginInfo] = []
        self.failures: list[PluginFailure] = []

    def run(self, strict: bool, allow: set[str] | None, block: set[str], entry_points_too: bool = True) -> Plugins:
        found = sorted(
            ((_info(ep), ep) for ep in entry_points(group=hookspecs.ENTRY_POINT_GROUP) if entry_points_too),
            key=lambda pair: (pair[0].name, pair[0].distribution or ""),
        )
        if allow is not None:
            for missing in sorted(n for n in allow if not any(_matches(info, {n}) for info, _ in found)):
                info = PluginInfo(name=missing, value="", distribution=None, version=None)
                installed = ", ".join(i.name for i, _ in found) or "(none)"
                self._fail(info, "not_installed", f"{ENV_ALLOW} names {missing!r}, which is not installed; installed: {installed}")
        for info, ep in found:
            if (allow is not None and not _matches(info, allow)) or _matches(info, block):
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
            scratch = _validate(obj, info)
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
            self._fail(info, "register_families", f"diffulex_register_families raised {type(cause).__name__}: {cause}", exc)
            return
        hooks = tuple(sorted(c.name for c in self.manager.get_hookcallers(hooks_of) or ()))
        self.loaded.append(replace(info, hooks=hooks))
        for entry in pending:
            conflict = self.registry.add(entry)
            if conflict is not None:
                self._fail(info, "family_conflict", str(conflict), conflict)

    def _register(self, obj: Any, info: PluginInfo, scratch: pluggy.PluginManager) -> _PluginHooks:
        """Register ``obj``'s hookimpls (found on ``scratch``) under ``info.name``, each behind ``_answering``."""
        hooks_of = _PluginHooks(obj, info, scratch)
        self.manager.register(hooks_of, name=info.name)
        return hooks_of

    def _call_register_families(self, hooks_of: _PluginHooks, info: PluginInfo) -> list[FamilyEntry]:
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
            strict = _flag(ENV_STRICT)
            allow, block = _name_list(ENV_ALLOW), _name_list(ENV_BLOCK) or set()
            plugins = _Discovery().run(strict, allow, block)
            if not strict:
                for failure in plugins.failures:
                    warnings.warn(f"{failure.describe()}; other plugins still loaded", PluginWarning, stacklevel=3)
            _plugins = plugins
    if plugins.strict and plugins.failures:  # the local snapshot, never the global again
        raise PluginLoadError(plugins.failures)
    return plugins


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


def _call(hook: Any, kwargs: dict[str, Any], error: type[DiffulexError], context: str) -> tuple[Any, list]:
    """``hook(**kwargs)``, pluggy's own call (ordering, wrappers, tracing), with the answers noted
    by ``_answering``; a plugin's exception is re-raised as ``error``, naming plugin and hook."""
    given: list = []
    saved, _ANSWERS.given = _ANSWERS.given, given
    try:
        return hook(**kwargs), given
    except PluginHookError as exc:
        if isinstance(exc, error):
            raise
        raise error(f"{exc}{context}") from exc
    except DiffulexError:
        raise
    except Exception as exc:  # pluggy's own complaint (a wrapper that did not yield, or yielded twice)
        wrappers = sorted({i.plugin_name for i in hook.get_hookimpls() if i.wrapper or i.hookwrapper})
        who = f"the hook wrappers of plugin(s) {', '.join(wrappers)}" if wrappers else "pluggy"
        raise error(f"{hook.name}: {who} failed{context}: {type(exc).__name__}: {exc}") from exc
    finally:
        _ANSWERS.given = saved


def collect_results(hook: Any, kwargs: dict[str, Any], *, error: type[DiffulexError] = PluginError,
                    context: str = "") -> list[tuple[str, Any]]:
    """(plugin name, answer) of every implementation of ``hook`` that answered (not None), in
    pluggy's call order. For the hooks that combine answers (discovery refuses wrappers on them)."""
    _, given = _call(hook, kwargs, error, context)
    return [(plugin, answer) for name, plugin, answer in given if name == hook.name]


def first_result(hook: Any, kwargs: dict[str, Any], *, error: type[DiffulexError] = PluginError,
                 context: str = "") -> tuple[str | None, Any]:
    """(name of the plugin that answered, answer) of a ``firstresult`` hook, or (None, None).

    The plugin is the one whose implementation returned the answer, or the wrapper that returned
    another one. ``_answering`` cannot see an old-style ``hookwrapper`` force a result
    (``outcome.force_result``), nor a plugin registered on the manager by hand: such an answer is
    put down to those plugins, joined by ``+``.
    """
    answer, given = _call(hook, kwargs, error, context)
    if answer is None:
        return None, None
    if given and given[-1][2] is answer:
        return given[-1][1], answer
    unseen = {i.plugin_name for i in hook.get_hookimpls() if i.hookwrapper or not isinstance(i.plugin, _PluginHooks)}
    return "+".join(sorted(unseen)), answer


def plugin_label(manager: pluggy.PluginManager, name: str) -> str:
    """``plugin 'name' (distribution version)`` for a plugin registered under ``name``."""
    hooks_of = manager.get_plugin(name)
    return hooks_of.info.label if isinstance(hooks_of, _PluginHooks) else f"plugin {name!r}"


def plugin_answers(manager: pluggy.PluginManager, hook_name: str, plugin: str, **kwargs: Any) -> list[Any]:
    """The answers (not None) of one plugin's implementations of a hook: pluggy's call on a
    subset of the manager holding only that plugin."""
    mine = manager.get_plugin(plugin)
    others = [p for p in manager.get_plugins() if p is not mine]
    return manager.subset_hook_caller(hook_name, others)(**kwargs)
