"""A hook function that forgot its @hookimpl marker."""


def diffulex_register_families(register):
    register("unmarked-family", "builtins:dict")
