"""The model families installed: ``get_family``, ``family_names``, ``get_registry`` (discovering
plugins on first use), and the registry's data types and ``fetch_factory_name`` re-exported from
``family_registry`` (Diffulex's ``diffulex.utils.registry`` names)."""

from __future__ import annotations

from typing import Any, Callable

from diffulex_core.plugins import get_plugins
from diffulex_core.plugins.family_registry import FamilyEntry, FamilyRegistry, fetch_factory_name, validate_registration

__all__ = [
    "FamilyEntry",
    "FamilyRegistry",
    "fetch_factory_name",
    "get_family",
    "family_names",
    "get_registry",
    "validate_registration",
]


def get_registry() -> FamilyRegistry:
    """The process-wide registry, filled by the installed plugins (discovered on first call)."""
    return get_plugins().registry


def get_family(name: str) -> Callable[..., Any]:
    """The factory bound to family ``name``; raises ``UnknownFamilyError`` listing known names."""
    return get_registry().get(name)


def family_names() -> list[str]:
    """Every usable family name, sorted."""
    return get_registry().names()
