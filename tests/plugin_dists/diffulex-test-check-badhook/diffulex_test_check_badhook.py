"""``diffulex_family_examples`` asking for an argument its spec does not have (it takes none)."""

from diffulex_core import hookimpl


@hookimpl
def diffulex_register_families(register):
    register("badhook-family", "builtins:dict")


@hookimpl
def diffulex_family_examples(config):
    return {"badhook-family": config}
