"""The family registry and fetch_factory_name, used directly (no discovery involved)."""

from __future__ import annotations

import functools
from unittest import mock

import pytest

from diffulex_core.errors import DuplicateFamilyError, UnknownFamilyError
from diffulex_core.registry import FamilyRegistry, fetch_factory_name


class Builder:
    def build(self, config=None):
        return config

    @classmethod
    def from_config(cls, config=None):
        return cls()

    @staticmethod
    def static(config=None):
        return config

    def __call__(self, config=None):
        return config


def plain(config=None):
    return config


def decorate(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@decorate
@decorate
def twice_decorated(config=None):
    return config


def make_local():
    def local(config=None):
        return config

    return local


HERE = __name__


@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        (Builder, f"{HERE}.Builder"),
        (plain, f"{HERE}.plain"),
        (Builder().build, f"{HERE}.Builder.build"),
        (Builder.from_config, f"{HERE}.Builder.from_config"),
        (Builder.static, f"{HERE}.Builder.static"),
        (Builder(), f"{HERE}.Builder"),
        (functools.partial(plain, 1), f"{HERE}.plain"),
        (functools.partial(functools.partial(Builder().build, 1)), f"{HERE}.Builder.build"),
        (functools.partial(twice_decorated), f"{HERE}.twice_decorated"),
        (twice_decorated, f"{HERE}.twice_decorated"),
        (make_local(), f"{HERE}.make_local.<locals>.local"),
        (len, "builtins.len"),
        (dict, "builtins.dict"),
        ("pkg.models:build_llada", "pkg.models.build_llada"),
        ("pkg.models:Builder.build", "pkg.models.Builder.build"),
        (None, "builtins.NoneType"),
        (42, "builtins.int"),
    ],
)
def test_fetch_factory_name(factory, expected):
    assert fetch_factory_name(factory) == expected


class Hostile:
    """Every attribute access raises, and so does repr."""

    def __getattribute__(self, name):
        raise RuntimeError(f"no {name} for you")

    def __repr__(self):
        raise RuntimeError("no repr either")


def cyclic():
    return None


cyclic.__wrapped__ = cyclic


def test_fetch_factory_name_never_raises():
    odd = [Hostile(), mock.Mock(), mock.MagicMock(), cyclic, "not a lazy factory", object(), type("Anon", (), {})]
    names = [fetch_factory_name(x) for x in odd]
    assert all(isinstance(n, str) and n for n in names)
    assert names[3] == f"{HERE}.cyclic"
    assert names[4] == "'not a lazy factory'"


def test_fetch_factory_name_is_stable_for_lazy_and_imported_forms():
    assert fetch_factory_name(f"{HERE}:plain") == fetch_factory_name(plain)


def test_registry_register_get_and_conflicts():
    registry = FamilyRegistry()
    registry.register("a", plain)
    registry.register("b", f"{HERE}:Builder")
    assert registry.names() == ["a", "b"]
    assert registry.get("b") is Builder
    with pytest.raises(DuplicateFamilyError, match="'a' is registered by user code and user code"):
        registry.register("a", Builder)
    with pytest.raises(DuplicateFamilyError):  # the name stays unusable: nobody wins silently
        registry.get("a")
    with pytest.raises(UnknownFamilyError, match="known families: b"):
        registry.get("c")


def test_registry_override_wins_in_either_order():
    first = FamilyRegistry()
    first.register("x", plain)
    first.register("x", Builder, override=True)
    second = FamilyRegistry()
    second.register("x", Builder, override=True)
    second.register("x", plain)
    assert first.get("x") is Builder and second.get("x") is Builder


@pytest.mark.parametrize(
    ("name", "factory", "override", "error"),
    [
        ("", plain, False, ValueError),
        (" padded ", plain, False, ValueError),
        (3, plain, False, ValueError),
        ("x", 3, False, TypeError),
        ("x", "no_colon_here", False, ValueError),
        ("x", "pkg:attr:extra", False, ValueError),
        ("x", plain, "yes", TypeError),
    ],
)
def test_registry_rejects_malformed_registrations(name, factory, override, error):
    with pytest.raises(error):
        FamilyRegistry().register(name, factory, override=override)
