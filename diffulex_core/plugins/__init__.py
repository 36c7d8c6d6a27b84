"""The plugin machinery: discovery of the ``diffulex`` entry points (``discovery``), the family
registry's data (``family_registry``) and the fixups that ship with the core (``builtin_fixups``).
The hooks themselves are specified in ``diffulex_core.hookspecs``.

Discovery runs once, on first use (``get_plugins()``); ``reset_plugins()`` forgets it (for tests).
"""

from diffulex_core.plugins.discovery import (
    ENV_ALLOW,
    ENV_BLOCK,
    ENV_STRICT,
    PluginFailure,
    PluginInfo,
    Plugins,
    get_plugin_manager,
    get_plugins,
    plugins_from,
    reset_plugins,
    using_plugins,
)

__all__ = [
    "ENV_ALLOW",
    "ENV_BLOCK",
    "ENV_STRICT",
    "PluginFailure",
    "PluginInfo",
    "Plugins",
    "get_plugin_manager",
    "get_plugins",
    "plugins_from",
    "reset_plugins",
    "using_plugins",
]
