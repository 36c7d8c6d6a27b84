"""Pluggy wrappers (new- and old-style) and a ``tryfirst`` implementation of
``diffulex_resolve_weight``, active only for models that set ``uses_test_wrapper = True``."""

from diffulex_core import hookimpl
from diffulex_core.checkpoint import ResolvedWeight

SEEN = []  # what the new-style wrapper saw, in call order


@hookimpl(wrapper=True)
def diffulex_resolve_weight(model, name):
    if not getattr(model, "uses_test_wrapper", False):
        return (yield)
    if name == "wrapper_explodes.weight":
        raise RuntimeError("wrapper exploded")
    answer = yield
    SEEN.append((name, answer))
    if name == "rewrapped.weight":
        return ResolvedWeight(param="by_new.weight")
    return answer


@hookimpl(hookwrapper=True, specname="diffulex_resolve_weight")
def old_style_wrapper(model, name):
    outcome = yield
    if getattr(model, "uses_test_wrapper", False) and name == "forced.weight":
        outcome.force_result(ResolvedWeight(param="by_old.weight"))


@hookimpl(tryfirst=True, specname="diffulex_resolve_weight")
def resolve_first(model, name):
    if not getattr(model, "uses_test_wrapper", False):
        return None
    if name == "everyone.weight":
        return ResolvedWeight(param="by_first.weight")
    if name == "plain_explodes.weight":
        raise ValueError("plain exploded")
    return None
