"""Weight-resolution hooks, active only for models that set ``uses_test_resolver = True``."""

from diffulex_core import hookimpl
from diffulex_core.checkpoint import ResolvedWeight

SEEN_CONTEXTS = []


@hookimpl
def diffulex_resolve_weight(model, name, ctx):
    if not getattr(model, "uses_test_resolver", False):
        return None
    SEEN_CONTEXTS.append(ctx)
    if name == "everyone.weight":
        return ResolvedWeight(param="by_plugin.weight")
    if name == "optimizer_state":
        return ResolvedWeight(skip=True, reason="training-only state")
    if name == "broken.weight":
        return "not a ResolvedWeight"
    return None


@hookimpl
def diffulex_packed_modules_mapping(model, config):
    if getattr(model, "uses_test_resolver", False):
        return getattr(model, "plugin_mapping", {"w_in": ("by_mapping", None)})
    return None


@hookimpl
def diffulex_expected_missing(model):
    return ["*.plugin_expected"] if getattr(model, "uses_test_resolver", False) else None
