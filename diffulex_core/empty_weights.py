"""Building a model with its parameters on the meta device and its buffers real.

``with torch.device("meta")`` puts everything on meta, buffers included: a rotary cos/sin cache
or a mask-id tensor computed in ``__init__`` and never stored in checkpoints then has no values,
and materializing it later makes zeros (or garbage) that no load fills. Building under
``init_empty_weights()`` keeps such buffers as computed (on the current default device) while
parameters, the weight memory, stay on meta; ``load_checkpoint(..., device=...)`` or
``load_model`` then materializes and fills the parameters. This is accelerate's
``init_empty_weights(include_buffers=False)``, without the dependency.
"""

from __future__ import annotations

import contextlib
import threading
from typing import Iterator

import torch
from torch import nn

__all__ = ["init_empty_weights", "REBUILT_BUFFERS"]

# A module may list buffers it recomputes itself when moved off the meta device (by name, local
# to the module): the plan then lets them be materialized without values.
REBUILT_BUFFERS = "diffulex_rebuilt_buffers"

_lock = threading.RLock()  # the patch is process-wide: one build at a time changes it (nesting allowed)


@contextlib.contextmanager
def init_empty_weights(include_buffers: bool = False) -> Iterator[None]:
    """Parameters registered in the block go to the meta device (object identity, subclass and
    attributes such as ``weight_loader`` kept); buffers stay real unless ``include_buffers``.

    A parameter is created where torch's default device says and moved at registration, as
    accelerate does: ``torch.empty`` reserves no pages, and layers' random init then runs on meta.
    """
    if include_buffers:
        with torch.device("meta"):
            yield
        return
    with _lock:
        register = nn.Module.register_parameter

        def register_on_meta(module: nn.Module, name: str, param: nn.Parameter | None) -> None:
            register(module, name, param)
            if param is None or param.is_meta:
                return  # an already-meta parameter is kept as it is: ties by object stay ties
            moved = _meta_twin(param)
            module._parameters[name] = moved

        nn.Module.register_parameter = register_on_meta
        try:
            yield
        finally:
            nn.Module.register_parameter = register


def _meta_twin(param: nn.Parameter) -> nn.Parameter:
    meta = torch.empty_like(param, device="meta")
    try:
        twin = type(param)(meta, requires_grad=param.requires_grad)
    except TypeError:  # a Parameter subclass with its own constructor
        twin = nn.Parameter(meta, requires_grad=param.requires_grad)
    twin.__dict__.update(param.__dict__)
    return twin
