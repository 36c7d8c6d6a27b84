"""Validating a plugin before it joins the hook manager: its hookimpls are registered on a scratch
manager first (so a bad plugin never half-registers), typos get a suggestion, hook wrappers are
accepted only where pluggy hands on one answer, and unmarked ``diffulex_*`` functions are refused."""

from __future__ import annotations

import difflib
import inspect
import re
from typing import TYPE_CHECKING, Any

import pluggy

from diffulex_core import hookspecs

if TYPE_CHECKING:
    from diffulex_core.plugins.outcome import PluginInfo

__all__ = ["SPEC_NAMES", "WRAPPABLE_HOOKS", "hook_names", "new_manager", "scratch_manager", "validate_plugin"]


def new_manager() -> pluggy.PluginManager:
    manager = pluggy.PluginManager(hookspecs.PROJECT_NAME)
    manager.add_hookspecs(hookspecs)
    return manager


SPEC_NAMES = tuple(n for n in dir(hookspecs) if n.startswith("diffulex_"))
# Hook wrappers make sense where pluggy hands on one answer (firstresult); see hookspecs.py.
WRAPPABLE_HOOKS = tuple(n for n in SPEC_NAMES
                        if (getattr(getattr(hookspecs, n), f"{hookspecs.PROJECT_NAME}_spec", None) or {})
                        .get("firstresult"))


def validate_plugin(obj: Any, info: PluginInfo) -> pluggy.PluginManager:
    """Register ``obj`` on a scratch manager so a bad plugin never half-registers on the real one;
    the scratch manager holds its hookimpls as pluggy found them."""
    scratch = scratch_manager(obj, info.name)
    try:
        scratch.check_pending()
    except pluggy.PluginValidationError as exc:
        typo = re.search(r"unknown hook '(\w+)'", str(exc))
        close = difflib.get_close_matches(typo.group(1), SPEC_NAMES, n=1) if typo else []
        hint = f"; did you mean {close[0]!r}?" if close else f"; known hooks: {', '.join(SPEC_NAMES)}"
        raise pluggy.PluginValidationError(exc.plugin, f"{exc}{hint}") from None
    for caller in scratch.get_hookcallers(obj) or ():
        wrapper = next((i for i in caller.get_hookimpls() if i.wrapper or i.hookwrapper), None)
        if wrapper is not None and caller.name in SPEC_NAMES and caller.name not in WRAPPABLE_HOOKS:
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
                    obj, f"{attr}() in {obj.__name__} is not marked with @diffulex_core.hookimpl and would never be "
                         "called"
                )
    return scratch


def scratch_manager(obj: Any, name: str) -> pluggy.PluginManager:
    scratch = new_manager()
    scratch.register(obj, name=name)
    return scratch


def hook_names(obj: Any) -> list[str]:
    """The hooks ``obj`` implements, as pluggy finds them."""
    scratch = new_manager()
    scratch.register(obj)
    return sorted(c.name for c in scratch.get_hookcallers(obj) or ())
