"""Moving tensor bytes from files onto a CUDA device at close to PCIe speed.

Reading each tensor into a CPU temporary and ``copy_``-ing it runs at 5 GiB/s on an H200, where a
pinned host-to-device copy runs at 51 GiB/s. Two ways past that, behind one shape of call
(``reads``, open descriptors, options -> ``StagingStats``):

* ``copy_to_device`` (``ring``): a ring of a few reusable pinned host buffers that reader threads
  fill while earlier buffers are copied; staging is bounded.
* ``copy_registered`` (``registered``): the files' page-cache pages registered with CUDA and
  copied from directly, no CPU copy at all.

``choose_path`` maps the user's option to one of them; ``backend`` holds what both share.
"""

from __future__ import annotations

from typing import Callable

from diffulex_core.errors import ConfigurationError
from diffulex_core.io.staging.backend import (
    CudaBackend,
    DeviceRead,
    StagingBackend,
    StagingMisuseError,
    StagingStats,
)
from diffulex_core.io.staging.registered import copy_registered
from diffulex_core.io.staging.ring import copy_to_device

__all__ = [
    "CudaBackend",
    "DeviceRead",
    "StagingBackend",
    "StagingMisuseError",
    "StagingStats",
    "choose_path",
    "copy_registered",
    "copy_to_device",
]

PATHS = {"ring": copy_to_device, "registered": copy_registered}


def choose_path(option: str | None = "auto") -> Callable[..., StagingStats]:
    """The copy function for ``option``: ``"auto"`` (or ``None``), ``"ring"`` or ``"registered"``.

    Both take ``(reads, fds, *, threads=None, on_progress=None)``. ``"auto"`` is the ring for
    now: it needs no driver support beyond pinned memory and its staging is bounded. The GPU
    benchmark (``benchmarks/bench_load.py --device cuda``) decides the default later; the
    registered path is the one that can reach the PCIe limit.
    """
    key = "ring" if option in (None, "auto") else option
    if key not in PATHS:
        raise ConfigurationError(f"unknown device copy path {option!r}; expected 'auto', 'ring' or 'registered'")
    return PATHS[key]
