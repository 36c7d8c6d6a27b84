"""The request shapes ``GenerationOutputs.record_step`` reads: the ``EngineRequest`` protocol (and
Diffulex's own requests). The reading itself lives in ``diffulex_core.generation.requests``."""

from diffulex_core.generation.requests import (
    DIFFULEX_BLOCK_ATTRS,
    DIFFULEX_REQUEST_ATTRS,
    ENGINE_REQUEST_ATTRS,
    OUTCOME_FLAGS,
    DiffulexRequest,
    EngineRequest,
)

__all__ = ["EngineRequest", "DiffulexRequest", "ENGINE_REQUEST_ATTRS", "DIFFULEX_REQUEST_ATTRS", "DIFFULEX_BLOCK_ATTRS",
           "OUTCOME_FLAGS"]
