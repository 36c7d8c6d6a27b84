"""What one discovery found: each plugin (``PluginInfo``), each failure (``PluginFailure``) and the
whole outcome (``Plugins``: the hook manager, the family registry, loaded, disabled, failed)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import pluggy

from diffulex_core.plugins.family_registry import FamilyRegistry

__all__ = ["PluginFailure", "PluginInfo", "Plugins", "label_of"]


def label_of(name: str, distribution: str | None, version: str | None) -> str:
    """``plugin 'name' (distribution version)``: how every message names a plugin."""
    dist = f"{distribution} {version}" if distribution else "no distribution"
    return f"plugin {name!r} ({dist})"


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
        return label_of(self.name, self.distribution, self.version)

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
