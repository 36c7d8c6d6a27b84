"""A well-behaved plugin: eager and lazy factories, and hookimpls taking a subset of the spec's arguments."""

from diffulex_core import hookimpl


class ToyModel:
    def __init__(self, config=None):
        self.config = dict(config or {})


def build_toy(config=None):
    return ToyModel(config)


@hookimpl
def diffulex_register_families(register):
    register("toy", build_toy)
    register("toy-lazy", "diffulex_test_healthy:build_toy")
    register("toy-ghost", "diffulex_test_no_such_module.models:build")


@hookimpl
def diffulex_resolve_weight(name):  # a subset of (model, name, ctx): still valid
    return f"healthy:{name}" if name.startswith("toy.") else None
