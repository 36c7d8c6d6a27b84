"""A family's example (``FamilyExample``) as its plugin declares it, through the
``diffulex_family_examples`` hook or its factory's ``example_config``: ``diffulex check`` builds and
round-trips it, ``diffulex demo`` builds its tiny model from it."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffulex_core.plugin_api import FamilyExample

if TYPE_CHECKING:
    pass

__all__ = ["as_example", "factory_example", "family_example"]


def as_example(source: str, example: Any) -> FamilyExample:
    if isinstance(example, FamilyExample):
        return example
    if isinstance(example, Mapping):
        return FamilyExample(dict(example))
    raise TypeError(f"{source} gave {type(example).__name__}, expected a config mapping or a FamilyExample")


def factory_example(factory: Any) -> tuple[str, Any] | None:
    config = getattr(factory, "example_config", None)
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise TypeError(f"factory.example_config is {type(config).__name__}, expected a mapping")
    return "factory.example_config", FamilyExample(config, to_checkpoint=getattr(factory, "to_checkpoint", None))


def family_example(name: str) -> tuple[str, FamilyExample] | None:
    """Family ``name``'s example as its plugin declares it for this check (its own
    ``diffulex_family_examples`` answer, else ``factory.example_config``) and where it came from;
    None when it has none. ``diffulex demo`` builds its tiny model from it."""
    from diffulex_core.errors import FamilyError
    from diffulex_core.plugins import get_plugins
    from diffulex_core.plugins.hook_calls import plugin_answers

    plugins = get_plugins()
    entry = plugins.registry.entry(name)
    owner = next((p.name for p in plugins.loaded if p.label == entry.owner), None)
    try:
        for answer in plugin_answers(plugins.manager, "diffulex_family_examples", owner) if owner else ():
            if name in answer:
                source = f"the diffulex_family_examples answer of {entry.owner}"
                return source, as_example("diffulex_family_examples", answer[name])
        found = factory_example(plugins.registry.get(name))
    except TypeError as exc:  # an answer of the wrong type: a plugin bug, named
        raise FamilyError(f"family {name!r} of {entry.owner}: its example is unusable: {exc}") from None
    return None if found is None else (f"{entry.factory_name}.example_config", found[1])
