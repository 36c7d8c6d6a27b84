"""Calling hooks through pluggy's own hook calling (ordering, wrappers, tracing) while knowing which
plugin answered: each hookimpl is registered behind a wrapper that names its plugin in errors and
notes its answer."""

from __future__ import annotations

import functools
import inspect
import threading
from typing import TYPE_CHECKING, Any

import pluggy

from diffulex_core import hookspecs
from diffulex_core.errors import DiffulexError, PluginError, PluginHookError

if TYPE_CHECKING:
    from diffulex_core.plugins.outcome import PluginInfo

__all__ = ["PluginHooks", "collect_results", "first_result", "plugin_answers", "plugin_label"]


class _Answers(threading.local):
    given: list[tuple[str, str, Any]] | None = None  # (hook, plugin, answer) of the call in progress


_ANSWERS = _Answers()


def answering(function: Any, hook: str, info: PluginInfo) -> Any:
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


class PluginHooks:
    """What the hook manager holds for one plugin: each of its hookimpls (as pluggy found them on a
    scratch manager: bound, with their options) behind ``answering``. ``plugin`` is the plugin."""

    def __init__(self, plugin: Any, info: PluginInfo, scratch: pluggy.PluginManager) -> None:
        self.plugin, self.info = plugin, info
        for caller in scratch.get_hookcallers(plugin) or ():
            for n, impl in enumerate(caller.get_hookimpls()):
                wrapped = answering(impl.function, caller.name, info)
                setattr(wrapped, f"{hookspecs.PROJECT_NAME}_impl", {**impl.opts, "specname": caller.name})
                setattr(self, f"{caller.name}_{n}", wrapped)

    def __repr__(self) -> str:
        return f"<hooks of {self.info.label}: {self.plugin!r}>"


def _call(hook: Any, kwargs: dict[str, Any], error: type[DiffulexError], context: str) -> tuple[Any, list]:
    """``hook(**kwargs)``, pluggy's own call (ordering, wrappers, tracing), with the answers noted
    by ``answering``; a plugin's exception is re-raised as ``error``, naming plugin and hook."""
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
    another one. ``answering`` cannot see an old-style ``hookwrapper`` force a result
    (``outcome.force_result``), nor a plugin registered on the manager by hand: such an answer is
    put down to those plugins, joined by ``+``.
    """
    answer, given = _call(hook, kwargs, error, context)
    if answer is None:
        return None, None
    if given and given[-1][2] is answer:
        return given[-1][1], answer
    unseen = {i.plugin_name for i in hook.get_hookimpls() if i.hookwrapper or not isinstance(i.plugin, PluginHooks)}
    return "+".join(sorted(unseen)), answer


def plugin_label(manager: pluggy.PluginManager, name: str) -> str:
    """``plugin 'name' (distribution version)`` for a plugin registered under ``name``."""
    hooks_of = manager.get_plugin(name)
    return hooks_of.info.label if isinstance(hooks_of, PluginHooks) else f"plugin {name!r}"


def plugin_answers(manager: pluggy.PluginManager, hook_name: str, plugin: str, **kwargs: Any) -> list[Any]:
    """The answers (not None) of one plugin's implementations of a hook: pluggy's call on a
    subset of the manager holding only that plugin."""
    mine = manager.get_plugin(plugin)
    others = [p for p in manager.get_plugins() if p is not mine]
    return manager.subset_hook_caller(hook_name, others)(**kwargs)
