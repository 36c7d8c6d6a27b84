"""``diffulex check`` for code that imports it from here: ``FamilyExample`` (a plugin's example,
see ``diffulex_core.plugin_api``) and ``check_plugin`` (``diffulex_core.tools.check``).

Plugins that still import ``FamilyExample`` from here do so while being discovered: the check's
own modules are imported only when ``check_plugin`` or ``CheckResult`` is first used."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from diffulex_core.plugin_api import FamilyExample

if TYPE_CHECKING:
    from diffulex_core.tools.check import check_plugin
    from diffulex_core.tools.check_results import CheckResult

__all__ = ["CheckResult", "FamilyExample", "check_plugin"]


def __getattr__(name: str) -> Any:
    if name == "check_plugin":
        from diffulex_core.tools.check import check_plugin

        return check_plugin
    if name == "CheckResult":
        from diffulex_core.tools.check_results import CheckResult

        return CheckResult
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
