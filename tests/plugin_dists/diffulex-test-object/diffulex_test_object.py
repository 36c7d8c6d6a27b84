"""An entry point that names an object (an instance with hookimpl methods), not a module."""

import functools

from diffulex_core import hookimpl


def _traced(func):
    @functools.wraps(func)
    def wrapper(*args, **kwargs):
        return func(*args, **kwargs)

    return wrapper


@_traced
def build_scaled(config=None, *, scale=1):
    return {"scale": scale, "config": config}


class ObjectPlugin:
    @hookimpl
    def diffulex_register_families(self, register):
        register("scaled", functools.partial(build_scaled, scale=2))

    @hookimpl
    def diffulex_packed_modules_mapping(self, model, config):
        return {"w_in": ("gate_up_proj", 0)}


plugin = ObjectPlugin()
