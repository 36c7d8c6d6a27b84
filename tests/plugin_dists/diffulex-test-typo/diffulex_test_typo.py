"""A misspelled hook name: pluggy would never call it."""

from diffulex_core import hookimpl


@hookimpl
def diffulex_register_familes(register):
    register("typo-family", "builtins:dict")
