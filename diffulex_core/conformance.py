"""``diffulex check`` for code that imports it from here: ``FamilyExample`` (a plugin's example,
see ``diffulex_core.plugin_api``) and ``check_plugin`` (``diffulex_core.tools.check``)."""

from diffulex_core.plugin_api import FamilyExample
from diffulex_core.tools.check import CheckResult, check_plugin

__all__ = ["CheckResult", "FamilyExample", "check_plugin"]
