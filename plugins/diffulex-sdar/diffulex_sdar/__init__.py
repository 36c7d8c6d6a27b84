"""diffulex plugin for the SDAR family.

Cheap to import on purpose: no torch here. The model lives in ``diffulex_sdar.model`` and is
imported by diffulex-core only when a ``sdar`` model is built (lazy "module:attr" factory).
"""

from diffulex_core import hookimpl

FAMILY = "sdar"
FACTORY = "diffulex_sdar.model:build_sdar"


@hookimpl
def diffulex_register_families(register):
    register(FAMILY, FACTORY)


__all__ = ["FACTORY", "FAMILY", "diffulex_register_families"]
