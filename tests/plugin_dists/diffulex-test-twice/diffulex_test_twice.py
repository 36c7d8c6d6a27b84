"""Registers a family; exposed through two entry points (and a clashing third)."""

from diffulex_core import hookimpl


@hookimpl
def diffulex_register_families(register):
    register("twice", "builtins:dict")


class Other:
    pass
