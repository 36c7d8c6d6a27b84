"""Registers one family, then raises: the whole plugin must be withdrawn."""

from diffulex_core import hookimpl


@hookimpl
def diffulex_register_families(register):
    register("half-registered", "builtins:dict")
    raise RuntimeError("registration exploded")


@hookimpl
def diffulex_resolve_weight(model, name, ctx):
    return "register_error must never be asked"
