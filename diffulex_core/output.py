"""Generation trajectories and metrics, where Diffulex's engines import them (``diffulex.utils.output``'s
names): recording lives in ``diffulex_core.generation``; see ``docs/metrics.md`` for every figure."""

from diffulex_core.generation.decoding import decode_token_ids_robust
from diffulex_core.generation.outputs import GenerationOutputs, save_trace_enabled
from diffulex_core.generation.requests import DiffulexRequest, EngineRequest
from diffulex_core.generation.trajectory import SEED_TRACE_FIELDS, TRACE_DTYPE, TRACE_FIELDS, ReqStep, ReqTrajectory

__all__ = [
    "EngineRequest",
    "DiffulexRequest",
    "ReqStep",
    "ReqTrajectory",
    "GenerationOutputs",
    "decode_token_ids_robust",
    "save_trace_enabled",
    "TRACE_DTYPE",
    "TRACE_FIELDS",
    "SEED_TRACE_FIELDS",
]
