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

    class Nested:
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


class Decorated:
    @decorate
    def build(self, config=None):
        return config


def make_local():
    def local(config=None):
        return config

    return local


anonymous = lambda config=None: config  # noqa: E731


HERE = __name__  # the test module's name depends on pytest's import mode; the rest is literal


# Expected strings are Diffulex's (diffulex.utils.fetch_factory_name), worked out by hand from its
# rules: unwrap __wrapped__, then partial -> .func; classes and functions: module.__qualname__;
# anything else: module.__name__, or the class's __name__ when it has none; no "builtins." prefix.
@pytest.mark.parametrize(
    ("factory", "expected"),
    [
        # classes and functions: qualname
        (Builder, f"{HERE}.Builder"),
        (Builder.Nested, f"{HERE}.Builder.Nested"),
        (plain, f"{HERE}.plain"),
        (Builder.static, f"{HERE}.Builder.static"),
        (Builder.build, f"{HERE}.Builder.build"),  # accessed on the class: a plain function
        (anonymous, f"{HERE}.<lambda>"),
        (make_local(), f"{HERE}.make_local.<locals>.local"),
        # bound methods and classmethods: __name__, not qualname
        (Builder().build, f"{HERE}.build"),
        (Builder.from_config, f"{HERE}.from_config"),
        (Builder().from_config, f"{HERE}.from_config"),
        # decorated: the innermost function, by qualname (also through a bound method)
        (twice_decorated, f"{HERE}.twice_decorated"),
        (Decorated().build, f"{HERE}.Decorated.build"),
        # partials, nested and of every kind above
        (functools.partial(plain, 1), f"{HERE}.plain"),
        (functools.partial(functools.partial(plain, 1), 2), f"{HERE}.plain"),
        (functools.partial(functools.partial(Builder().build, 1)), f"{HERE}.build"),
        (functools.partial(twice_decorated), f"{HERE}.twice_decorated"),
        (functools.partial(Builder, 1), f"{HERE}.Builder"),
        (functools.partial(print, "x"), "print"),
        # callable instances: the class's __name__ (not qualname)
        (Builder(), f"{HERE}.Builder"),
        (Builder.Nested(), f"{HERE}.Nested"),
        (functools.partial(Builder.Nested()), f"{HERE}.Nested"),
        # builtins: no module prefix
        (print, "print"),
        (len, "len"),
        (int, "int"),
        (dict, "dict"),
        ([].append, "append"),
        (None, "NoneType"),
        (42, "int"),
        # lazy "module:attr" strings keep our form
        ("pkg.models:build_llada", "pkg.models.build_llada"),
        ("pkg.models:Builder.build", "pkg.models.Builder.build"),
    ],
)
def test_fetch_factory_name_matches_diffulex(factory, expected):
    assert fetch_factory_name(factory) == expected


class Hostile:
    """Every attribute access raises (``__class__`` too, so ``isinstance`` raises), and so does repr."""

    def __getattribute__(self, name):
        raise RuntimeError(f"no {name} for you")

    def __repr__(self):
        raise RuntimeError("no repr either")

    def __call__(self):
        return None


class Inventive:
    """Answers every attribute with a new object: an endless ``__wrapped__`` chain, non-string names."""

    def __getattr__(self, name):
        return Inventive()

    def __call__(self):
        return None


class BadPartial(functools.partial):
    @property
    def func(self):
        raise RuntimeError("no func")


def cyclic():
    return None


cyclic.__wrapped__ = cyclic


def ping():
    return None


def pong():
    return None


ping.__wrapped__, pong.__wrapped__ = pong, ping


def fronts_hostile():
    return None


fronts_hostile.__wrapped__ = Hostile()


ODD = {  # by key: pytest itself cannot make a test id from a Hostile
    "hostile": (Hostile(), f"{HERE}.Hostile"),  # Diffulex raises RuntimeError here
    "unwrapping raises": (fronts_hostile, f"{HERE}.fronts_hostile"),  # the object as given
    "invented attributes": (Inventive(), f"{HERE}.Inventive"),  # Diffulex formats the invented objects
    "partial.func raises": (BadPartial(plain), f"{HERE}.BadPartial"),
    "__wrapped__ loop": (cyclic, f"{HERE}.cyclic"),  # a cycle is not followed (as in Diffulex)
    "__wrapped__ two-cycle": (ping, f"{HERE}.ping"),
    "not a lazy string": ("not a lazy factory", "'not a lazy factory'"),
}


@pytest.mark.parametrize("key", list(ODD))
def test_fetch_factory_name_never_raises_and_falls_back_to_the_type(key):
    factory, expected = ODD[key]
    assert fetch_factory_name(factory) == expected


def test_fetch_factory_name_never_raises_on_mocks_and_odd_objects():
    odd = [mock.Mock(), mock.MagicMock(), mock.Mock(spec=plain), mock.Mock(spec=Builder), object(),
           type("Anon", (), {})]
    names = [fetch_factory_name(x) for x in odd]
    assert all(isinstance(n, str) and n and "<Mock" not in n for n in names), names
    assert names[:2] == ["unittest.mock.Mock", "unittest.mock.MagicMock"]
    assert names[4:] == ["object", f"{HERE}.Anon"]


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
