"""diffulex plugin for the SDAR families: ``sdar`` (dense) and ``sdar_moe`` (mixture of experts).

Cheap to import on purpose: no torch here. The model lives in ``diffulex_sdar.model`` and is
imported by diffulex-core only when a model is built (lazy "module:attr" factories).
"""

from diffulex_core import hookimpl

FAMILY = "sdar"
FACTORY = "diffulex_sdar.model:build_sdar"
MOE_FAMILY = "sdar_moe"
MOE_FACTORY = "diffulex_sdar.model:build_sdar_moe"


@hookimpl
def diffulex_register_families(register):
    register(FAMILY, FACTORY)
    register(MOE_FAMILY, MOE_FACTORY)


__all__ = ["FACTORY", "FAMILY", "MOE_FACTORY", "MOE_FAMILY", "diffulex_register_families"]
