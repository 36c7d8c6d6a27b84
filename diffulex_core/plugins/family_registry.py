"""The model-family registry (name -> factory) and display names for factories, as data.

Discovery (``plugins``) fills a ``FamilyRegistry``; the public doors that discover first
(``get_family``, ``family_names``, ``get_registry``) are in ``registry``, so imports run one way:
``registry`` -> ``plugins`` -> ``family_registry``.
"""

from __future__ import annotations

import difflib
import functools
import importlib
import inspect
import re
import threading
from dataclasses import dataclass
from typing import Any, Callable, Union

from diffulex_core.errors import DuplicateFamilyError, FamilyFactoryError, UnknownFamilyError

__all__ = ["FamilyEntry", "FamilyRegistry", "fetch_factory_name", "validate_registration"]

Factory = Union[Callable[..., Any], str]

_LAZY_FACTORY = re.compile(r"^[A-Za-z_]\w*(\.[A-Za-z_]\w*)*:[A-Za-z_]\w*(\.[A-Za-z_]\w*)*$")
_MAX_UNWRAP = 100  # nested functools.partial levels followed (a partial of a partial is flattened anyway)


_MISSING = object()


def _attr(obj: Any, name: str, default: Any = None) -> Any:
    """getattr that also survives properties and __getattr__ raising anything."""
    try:
        return getattr(obj, name, default)
    except Exception:  # a display helper must never raise, whatever the object does
        return default


def _text(value: Any) -> str | None:
    """``value`` if it is a non-empty string (mocks and proxies answer with other objects)."""
    return value if isinstance(value, str) and value else None


def _joined(module: Any, name: str) -> str:
    """Diffulex's rule: ``module.name``, or the bare name for ``builtins`` and no module."""
    module = _text(module)
    return f"{module}.{name}" if module and module != "builtins" else name


def fetch_factory_name(factory: Any) -> str:
    """Return a module-qualified name for a factory, for messages, listings and comparisons.

    The string is the one Diffulex's ``diffulex.utils.fetch_factory_name`` returns, so code and
    registries that compare these strings keep working:

    - ``__wrapped__`` chains (decorators) are unwrapped (one that loops is not followed: the
      object is named as given) and ``functools.partial`` (nested) is replaced by its ``func``;
    - classes and plain functions: ``module.__qualname__`` (``pkg.Outer.Inner``,
      ``pkg.<lambda>``, ``pkg.outer.<locals>.inner``);
    - anything else: ``module.__name__`` when the object has a ``__name__`` (a bound method or a
      classmethod accessed on its class gives ``pkg.build``, not ``pkg.Builder.build``), else the
      name of its class (a callable instance gives ``pkg.Builder``; a nested class's instance
      ``pkg.Inner``);
    - the module ``builtins`` is left out: ``print`` -> ``"print"``, ``int`` -> ``"int"``,
      ``None`` -> ``"NoneType"``.

    Where it deliberately differs from Diffulex's:

    - a lazy ``"module:attr"`` string is shown as ``module.attr`` (Diffulex names any string
      ``"str"``); another string is shown as its ``repr``;
    - it never raises: an object whose attribute access (or ``isinstance`` check) raises, which
      Diffulex lets through, is named by its type (``pkg.Hostile``);
    - a ``__name__``, ``__qualname__`` or ``__module__`` that is not a string (mocks, proxies
      that invent attributes) is never formatted into the name: the class's name or module
      stands in for it.
    """
    try:
        return _factory_name(factory)
    except Exception:  # the contract is "never raises"; _factory_name already falls back
        return _type_name(type(factory))


def _type_name(kind: type) -> str:
    try:
        return _joined(kind.__module__, _text(kind.__name__) or "<unnamed>")
    except Exception:
        return "<unnamed>"


def _factory_name(factory: Any) -> str:
    if isinstance(factory, str):
        return factory.replace(":", ".", 1) if _LAZY_FACTORY.match(factory) else repr(factory)
    obj = factory
    try:
        for _ in range(_MAX_UNWRAP):  # Diffulex recurses; a loop cannot run out of stack
            try:
                obj = inspect.unwrap(obj)  # stops with ValueError on a cycle
            except Exception:
                pass  # as Diffulex does: keep the object as it is
            if not isinstance(obj, functools.partial):
                break
            obj = obj.func
        return _seed_name(obj)
    except Exception:  # an object that raises from isinstance or attribute access
        return _type_name(type(obj))


def _seed_name(obj: Any) -> str:
    if inspect.isclass(obj) or inspect.isfunction(obj):
        name = _text(_attr(obj, "__qualname__")) or _text(_attr(obj, "__name__"))
        if name is not None:
            return _joined(_attr(obj, "__module__"), name)
        return _type_name(type(obj))
    kind = _attr(obj, "__class__")
    if not isinstance(kind, type):
        kind = type(obj)
    name = _text(_attr(obj, "__name__")) or _text(_attr(kind, "__name__")) or type(obj).__name__
    module = _attr(obj, "__module__", _MISSING)
    if module is _MISSING or (module is not None and not isinstance(module, str)):
        module = _attr(kind, "__module__")
    return _joined(module, name)


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
