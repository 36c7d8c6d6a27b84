"""Replaces the 'toy' family on purpose."""

from diffulex_core import hookimpl


def build_better_toy(config=None):
    return ("better", config)


@hookimpl
def diffulex_register_families(register):
    register("toy", build_better_toy, override=True)
