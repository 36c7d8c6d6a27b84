"""diffulex plugin for the Dream family.

Cheap to import on purpose: no torch here. The model lives in ``diffulex_dream.model`` and is
imported by diffulex-core only when a ``dream`` model is built (lazy "module:attr" factory).
"""

from diffulex_core import hookimpl

FAMILY = "dream"
FACTORY = "diffulex_dream.model:build_dream"


@hookimpl
def diffulex_register_families(register):
    register(FAMILY, FACTORY)


__all__ = ["FACTORY", "FAMILY", "diffulex_register_families"]
