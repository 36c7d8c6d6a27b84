"""A hook wrapper on ``diffulex_packed_modules_mapping``, whose answers are kept per plugin:
refused at discovery, so the family below is never registered."""

from diffulex_core import hookimpl


@hookimpl
def diffulex_register_families(register):
    register("refused-family", dict)


@hookimpl(wrapper=True)
def diffulex_packed_modules_mapping(model, config):
    mappings = yield
    return mappings
