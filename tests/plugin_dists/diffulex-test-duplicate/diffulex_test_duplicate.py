"""Registers 'toy', which diffulex-test-healthy also registers, without override."""

from diffulex_core import hookimpl


def build_other_toy(config=None):
    return ("other", config)


@hookimpl
def diffulex_register_families(register):
    register("toy", build_other_toy)
    register("duplicate-only", build_other_toy)
