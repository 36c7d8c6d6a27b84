"""diffulex plugin for the LLaDA family.

Cheap to import on purpose: no torch here. The model lives in ``diffulex_llada.model`` and is
imported by diffulex-core only when a ``llada`` model is built (lazy "module:attr" factory).
"""

from diffulex_core import hookimpl

FAMILY = "llada"
FACTORY = "diffulex_llada.model:build_llada"


@hookimpl
def diffulex_register_families(register):
    register(FAMILY, FACTORY)


__all__ = ["FACTORY", "FAMILY", "diffulex_register_families"]
