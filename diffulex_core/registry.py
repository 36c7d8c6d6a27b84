"""The model-family registry (name -> factory) and display names for factories."""

from __future__ import annotations

import difflib
import functools
import importlib
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Union

from .errors import DuplicateFamilyError, FamilyFactoryError, UnknownFamilyError

__all__ = [
    "FamilyEntry",
    "FamilyRegistry",
    "fetch_factory_name",
    "get_family",
    "family_names",
    "get_registry",
]

Factory = Union[Callable[..., Any], str]

_LAZY_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MAX_UNWRAP = 100  # guards against __wrapped__ cycles and objects that invent attributes


def _attr(obj: Any, name: str) -> Any:
    """getattr that also survives properties and __getattr__ raising anything."""
    try:
        return getattr(obj, name, None)
    except Exception:  # a display helper must never raise, whatever the object does
        return None


def _qualified(module: Any, qualname: Any) -> str | None:
    if not isinstance(qualname, str) or not qualname:
        return None
    if isinstance(module, str) and module:
        return f"{module}.{qualname}"
    return qualname


def fetch_factory_name(factory: Any) -> str:
    """Return a stable module-qualified name for a factory, for messages and listings.

    Unwraps ``functools.partial`` (nested) and decorator ``__wrapped__`` chains, names
    classes, functions, bound methods and callable instances (by their class), shows a lazy
    ``"module:attr"`` string as ``module.attr``, and never raises.
    """
    try:
        return _factory_name(factory)
    except Exception:  # the contract is "never raises"; fall back to the type's name
        return f"<unnamed {type(factory).__name__}>"


def _factory_name(factory: Any) -> str:
    if isinstance(factory, str):
        return factory.replace(":", ".", 1) if _LAZY_FACTORY.match(factory) else repr(factory)
    obj = factory
    seen: set[int] = set()
    for _ in range(_MAX_UNWRAP):
        if id(obj) in seen:
            break
        seen.add(id(obj))
        if isinstance(obj, functools.partial):
            obj = obj.func
            continue
        inner = _attr(obj, "__func__")  # bound methods, classmethod/staticmethod objects
        if inner is None:
            inner = _attr(obj, "__wrapped__")
        if inner is None or inner is obj:
            break
        obj = inner
    name = _qualified(_attr(obj, "__module__"), _attr(obj, "__qualname__"))
    if name is None:  # an instance (callable or not): name its class
        kind = type(obj)
        name = _qualified(kind.__module__, kind.__qualname__)
    return name or f"<unnamed {type(factory).__name__}>"


@dataclass(frozen=True)
class FamilyEntry:
    """One registration: which factory builds the family, and who registered it."""

    name: str
    factory: Factory
    owner: str  # e.g. "plugin 'llada' (diffulex-llada 0.1.0)", or "user code"
    override: bool = False

    @property
    def factory_name(self) -> str:
        return fetch_factory_name(self.factory)


def validate_registration(name: Any, factory: Any, override: Any) -> None:
    """Reject a malformed registration at the call site, where the plugin author sees it."""
    if not isinstance(name, str) or not name.strip() or name != name.strip():
        raise ValueError(f"family name must be a non-empty string without surrounding spaces, got {name!r}")
    if isinstance(factory, str):
        if not _LAZY_FACTORY.match(factory):
            raise ValueError(
                f"lazy factory for family {name!r} must look like 'package.module:attr', got {factory!r}"
            )
    elif not callable(factory):
        raise TypeError(f"factory for family {name!r} must be callable or a 'module:attr' string, got {factory!r}")
    if not isinstance(override, bool):
        raise TypeError(f"override for family {name!r} must be True or False, got {override!r}")


class FamilyRegistry:
    """Family name -> factory. Conflicting names stay unusable until the conflict is fixed."""

    def __init__(self) -> None:
        self._entries: dict[str, FamilyEntry] = {}
        self._conflicts: dict[str, tuple[FamilyEntry, ...]] = {}
        self._resolved: dict[str, Callable[..., Any]] = {}
        self._lock = threading.Lock()

    def register(self, name: str, factory: Factory, *, override: bool = False, owner: str = "user code") -> None:
        """Add a family. Raises ``DuplicateFamilyError`` when the name is taken (see ``add``)."""
        validate_registration(name, factory, override)
        error = self.add(FamilyEntry(name, factory, owner, override))
        if error is not None:
            raise error

    def add(self, entry: FamilyEntry) -> DuplicateFamilyError | None:
        """Add an already validated entry; return the conflict it caused, if any.

        An ``override=True`` entry replaces a plain one whatever the order; two plain (or two
        overriding) entries for one name conflict, and the name is unusable afterwards.
        """
        with self._lock:
            if entry.name in self._conflicts:
                self._conflicts[entry.name] += (entry,)
                return self._conflict_error(entry.name)
            current = self._entries.get(entry.name)
            if current is None or (entry.override and not current.override):
                self._entries[entry.name] = entry
                self._resolved.pop(entry.name, None)
                return None
            if current.override and not entry.override:
                return None
            del self._entries[entry.name]
            self._resolved.pop(entry.name, None)
            self._conflicts[entry.name] = (current, entry)
            return self._conflict_error(entry.name)

    def _conflict_error(self, name: str) -> DuplicateFamilyError:
        owners = " and ".join(e.owner for e in self._conflicts[name])
        return DuplicateFamilyError(
            f"model family {name!r} is registered by {owners}; uninstall or disable one of them "
            f"(DIFFULEX_DISABLE_PLUGINS), or have the intended one register it with override=True"
        )

    def names(self) -> list[str]:
        """The usable family names, sorted."""
        return sorted(self._entries)

    def entries(self) -> list[FamilyEntry]:
        return [self._entries[name] for name in self.names()]

    def conflicts(self) -> dict[str, tuple[FamilyEntry, ...]]:
        return dict(self._conflicts)

    def entry(self, name: str) -> FamilyEntry:
        """The registration for ``name``; raises a ``FamilyError`` that says why it is unusable."""
        if name in self._conflicts:
            raise self._conflict_error(name)
        try:
            return self._entries[name]
        except KeyError:
            raise self._unknown(name) from None

    def _unknown(self, name: str) -> UnknownFamilyError:
        known = self.names()
        message = f"unknown model family {name!r}; known families: {', '.join(known) or '(none)'}"
        close = difflib.get_close_matches(str(name), known, n=1)
        if close:
            message += f". Did you mean {close[0]!r}?"
        if not known:
            message += ". Install a family plugin (entry-point group 'diffulex') or check DIFFULEX_PLUGINS"
        return UnknownFamilyError(message)

    def get(self, name: str) -> Callable[..., Any]:
        """The callable factory for ``name``, importing a lazy ``"module:attr"`` on first use."""
        entry = self.entry(name)
        resolved = self._resolved.get(name)
        if resolved is None:
            resolved = self._import(entry) if isinstance(entry.factory, str) else entry.factory
            self._resolved[name] = resolved
        return resolved

    @staticmethod
    def _import(entry: FamilyEntry) -> Callable[..., Any]:
        module_name, _, attr_path = entry.factory.partition(":")
        where = f"model family {entry.name!r} from {entry.owner}: factory {entry.factory!r}"
        try:
            obj: Any = importlib.import_module(module_name)
            for part in attr_path.split("."):
                obj = getattr(obj, part)
        except Exception as exc:  # re-raised, typed, with the plugin named
            raise FamilyFactoryError(f"{where} cannot be imported: {type(exc).__name__}: {exc}") from exc
        if not callable(obj):
            raise FamilyFactoryError(f"{where} names {type(obj).__name__} {obj!r}, which is not callable")
        return obj


def get_registry() -> FamilyRegistry:
    """The process-wide registry, filled by the installed plugins (discovered on first call)."""
    from .plugins import get_plugins

    return get_plugins().registry


def get_family(name: str) -> Callable[..., Any]:
    """The factory bound to family ``name``; raises ``UnknownFamilyError`` listing known names."""
    return get_registry().get(name)


def family_names() -> list[str]:
    """Every usable family name, sorted."""
    return get_registry().names()
