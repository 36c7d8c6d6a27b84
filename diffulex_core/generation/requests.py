"""The two request shapes ``GenerationOutputs.record_step`` accepts, read into one ``StepInput``.

A request is recognised per request, by its attributes:

1. It has ``new_tokens`` and ``dllm_block_buffer``: a Diffulex request (``DiffulexRequest``, the
   shape ``diffulex.utils.output`` reads), so engine code written for Diffulex works unchanged.
2. Otherwise it must have the attributes of ``EngineRequest``, this package's documented protocol.

Anything else is a ``TypeError`` naming the attributes missing for either shape. Everything a
step needs from a request is read here, before ``record_step`` changes any state, so a request
that cannot be read leaves the outputs as they were.
"""

from __future__ import annotations

from typing import Any, Callable, Collection, Iterable, Mapping, Protocol, Sequence, runtime_checkable

__all__ = [
    "EngineRequest",
    "DiffulexRequest",
    "StepInput",
    "TraceSink",
    "Outcome",
    "read_request",
    "trace_rows_from_mappings",
    "DIFFULEX_MARKERS",
    "ENGINE_REQUEST_ATTRS",
    "DIFFULEX_REQUEST_ATTRS",
    "DIFFULEX_BLOCK_ATTRS",
    "OUTCOME_FLAGS",
]

# What tells a Diffulex request apart: ``EngineRequest`` has neither.
DIFFULEX_MARKERS = ("new_tokens", "dllm_block_buffer")
ENGINE_REQUEST_ATTRS = ("req_id", "is_prefill", "num_prompt_tokens", "num_generated_tokens", "running_token_ids",
                        "block_size", "buffer_block_ids", "is_finished", "completion_reason")
ENGINE_FINISH_ATTRS = ("response_token_ids", "eos_token_ids")  # read only once finished
OUTCOME_FLAGS = ("is_truncated", "max_new_tokens_reached", "max_model_len_reached", "max_nfe_reached",
                 "max_repetition_run_reached", "eos_token_generated")
_OPTIONAL_FLAGS = ("max_nfe_reached", "max_repetition_run_reached")
DIFFULEX_REQUEST_ATTRS = ("req_id", "new_tokens", "is_prefilling", "running_sequence", "block_size",
                          "dllm_block_buffer", "truncated_response", "full_response",
                          *(f for f in OUTCOME_FLAGS if f not in _OPTIONAL_FLAGS))
DIFFULEX_BLOCK_ATTRS = ("block_id", "is_active", "is_dummy", "num_mask_tokens", "block_size", "progress")
_MISSING = object()


@runtime_checkable
class EngineRequest(Protocol):
    """This package's request protocol: what ``record_step`` reads from each request of a step.

    Any object with these attributes works (Diffulex's own requests are read as
    ``DiffulexRequest`` instead; see the module docstring for how the two are told apart).

    - ``req_id``: int; the prompt index, unless ``req_id_to_prompt_id`` maps it (it must, if
      given, and the index must be in range: this shape is strict, unlike Diffulex's).
    - ``is_prefill``: bool; this step processed the prompt (prefill) rather than decoding.
    - ``num_prompt_tokens``: int; the prompt's length, counted once, at the first prefill step.
    - ``num_generated_tokens``: int; tokens this step finalized (committed, no longer masked).
    - ``running_token_ids``: sequence of int; the response region as it stands after this step,
      mask tokens included.
    - ``block_size``: int; tokens per diffusion block.
    - ``buffer_block_ids``: sequence of int; the blocks in the request's working buffer.
    - ``is_finished``: bool; the request completed in this step.
    - ``completion_reason``: str or None; why it finished (``"eos"``, ``"max_tokens"``, ...).
    - ``response_token_ids``: sequence of int; read once finished: the whole response,
      including anything generated after the first EOS.
    - ``eos_token_ids``: collection of int; read once finished, to cut the response at EOS.
    - ``block_trace`` (optional): sequence of mappings with ``TRACE_FIELDS``; read only while
      traces are on (``DIFFULEX_SAVE_TRACE``).
    - ``is_truncated``, ``eos_token_generated``, ``max_new_tokens_reached``,
      ``max_model_len_reached``, ``max_nfe_reached``, ``max_repetition_run_reached`` (optional,
      read once finished): copied to the trajectory. Without them, the first two say whether the
      response held an EOS and the others are False.
    """

    req_id: int
    is_prefill: bool
    num_prompt_tokens: int
    num_generated_tokens: int
    running_token_ids: Sequence[int]
    block_size: int
    buffer_block_ids: Sequence[int]
    is_finished: bool
    completion_reason: str | None
    response_token_ids: Sequence[int]
    eos_token_ids: Collection[int]


class DiffulexRequest(Protocol):
    """A Diffulex ``DllmReq`` as ``record_step`` reads it, every step (names are Diffulex's).

    ``req_id``, ``new_tokens`` (tokens finalized this step), ``is_prefilling``,
    ``running_sequence`` (list or None), ``block_size``, ``dllm_block_buffer.dllm_blocks`` (each
    with ``block_id``, ``is_active``, ``is_dummy``, ``num_mask_tokens``, ``block_size``,
    ``progress`` and optionally ``status``), ``truncated_response``, ``full_response``,
    ``is_truncated``, ``max_new_tokens_reached``, ``max_model_len_reached``, ``max_nfe_reached``,
    ``max_repetition_run_reached``, ``eos_token_generated``, ``completion_reason`` (the last three
    may be absent, as in older Diffulex versions: False, False, None).

    Newer engines set ``_last_execution_is_prefill`` and ``_last_execution_prefill_tokens`` before
    the step runs; when present they are used instead of ``is_prefilling`` and
    ``len(running_sequence)``, because the request's state may have moved on during the step.
    An unmapped ``req_id`` is its own prompt index, as in Diffulex.
    """

    req_id: int
    new_tokens: int
    is_prefilling: bool
    running_sequence: Sequence[int] | None
    block_size: int
    dllm_block_buffer: Any


class Outcome:
    """What a request says about its result: copied to its trajectory when the step is recorded."""

    __slots__ = ("token_ids", "full_token_ids", "truncated_at_eos", "finished", "completion_reason", *OUTCOME_FLAGS)

    def __init__(self, token_ids: list[int], full_token_ids: list[int], truncated_at_eos: bool, finished: bool,
                 completion_reason: str | None, flags: Sequence[bool]) -> None:
        self.token_ids = token_ids
        self.full_token_ids = full_token_ids
        self.truncated_at_eos = truncated_at_eos
        self.finished = finished
        self.completion_reason = completion_reason
        for name, value in zip(OUTCOME_FLAGS, flags, strict=False):
            setattr(self, name, bool(value))


class StepInput:
    """One request in one step, whichever shape it came in.

    ``prefill_tokens`` is what the request adds to the prefill-token count if this step was a
    prefill: the running sequence's length (Diffulex), or the prompt's length (``EngineRequest``,
    counted once per request by the caller). ``trace`` is the packed block trace or None.
    ``outcome`` is None for an ``EngineRequest`` that has not finished.
    """

    __slots__ = ("diffulex", "req_id", "is_prefill", "prefill_tokens", "new_tokens", "running", "block_size",
                 "buffer_block_ids", "trace", "outcome")

    def __init__(self, diffulex: bool, req_id: Any, is_prefill: bool, prefill_tokens: int, new_tokens: int,
                 running: Any, block_size: int, buffer_block_ids: list[int], trace: Any,
                 outcome: Outcome | None) -> None:
        self.diffulex = diffulex
        self.req_id = req_id
        self.is_prefill = is_prefill
        self.prefill_tokens = prefill_tokens
        self.new_tokens = new_tokens
        self.running = running
        self.block_size = block_size
        self.buffer_block_ids = buffer_block_ids
        self.trace = trace
        self.outcome = outcome


def _ids(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    return [int(t) for t in token_ids]


def _copy_ids(token_ids: Any) -> list:
    """A list copy, as Diffulex makes one (no per-element conversion: this runs every step)."""
    return token_ids.tolist() if hasattr(token_ids, "tolist") else list(token_ids)


def trace_rows_from_mappings(blocks: Iterable[Mapping[str, Any]], status_code: Callable[[Any], int]) -> list[tuple]:
    """``EngineRequest.block_trace`` mappings (``TRACE_FIELDS``) as ``TRACE_DTYPE`` tuples."""
    return [(b.get("block_id", -1), bool(b.get("active")), bool(b.get("dummy")), b.get("masked_count", 0),
             b.get("mask_ratio", 0.0), b.get("progress", 0.0), status_code(b.get("status"))) for b in blocks]


def _diffulex_trace_rows(blocks: Sequence[Any], status_code: Callable[[Any], int]) -> list[tuple]:
    """Diffulex blocks as ``TRACE_DTYPE`` tuples: the values Diffulex's own trace dicts hold
    (``status_code`` stores ``str(status)``, as Diffulex writes it)."""
    rows = []
    for block in blocks:
        masked = block.num_mask_tokens  # a property that scans the block: read it once
        status = getattr(block, "status", "?")
        if status is None:
            status = "None"  # str(None), as Diffulex writes it; None means "no status" to status_code
        rows.append((block.block_id, bool(block.is_active), bool(block.is_dummy), masked,
                     masked / max(block.block_size, 1), block.progress, status_code(status)))
    return rows


def _missing(req: Any, names: Iterable[str]) -> list[str]:
    return [name for name in names if not hasattr(req, name)]


def _shape_error(req: Any, error: AttributeError, diffulex: bool) -> Exception:
    """A ``TypeError`` naming what is missing, or the original error if nothing is (a property
    of the request raised ``AttributeError`` itself: that is the engine's bug, not ours)."""
    ours = _missing(req, ENGINE_REQUEST_ATTRS)
    theirs = _missing(req, DIFFULEX_REQUEST_ATTRS)
    blocks = []
    if diffulex and not theirs:
        buffer = getattr(req.dllm_block_buffer, "dllm_blocks", _MISSING)
        if buffer is _MISSING:
            blocks = ["dllm_block_buffer.dllm_blocks"]
        else:
            blocks = sorted({f"dllm_blocks[].{n}" for block in buffer for n in _missing(block, DIFFULEX_BLOCK_ATTRS)})
    if not diffulex and not ours:
        ours = _missing(req, ENGINE_FINISH_ATTRS)
    if diffulex and (theirs or blocks):
        return TypeError(f"record_step: request {getattr(req, 'req_id', '?')!r} ({type(req).__name__}) looks like a "
                         f"Diffulex request (it has {' and '.join(DIFFULEX_MARKERS)}) but lacks "
                         f"{', '.join(theirs + blocks)}")
    if not diffulex and ours:
        markers = _missing(req, DIFFULEX_MARKERS)
        return TypeError(f"record_step: request {getattr(req, 'req_id', '?')!r} ({type(req).__name__}) is neither a "
                         f"Diffulex request (missing {', '.join(markers)}) nor an EngineRequest (missing "
                         f"{', '.join(ours)})")
    return error


class TraceSink(Protocol):
    """Where block traces go (``trajectory.TraceStatuses``): status codes, and rows packed into records."""

    def code(self, status: Any) -> int: ...

    def pack_rows(self, rows: list[tuple]) -> Any: ...


def _read_diffulex(req: Any, traces: TraceSink | None) -> StepInput:
    running = req.running_sequence
    is_prefill = getattr(req, "_last_execution_is_prefill", None)
    if is_prefill is None:
        is_prefill = bool(req.is_prefilling)
        prefill_tokens = len(running or ()) if is_prefill else 0
    else:
        is_prefill = bool(is_prefill)
        prefill_tokens = getattr(req, "_last_execution_prefill_tokens", None)
        if prefill_tokens is None:
            prefill_tokens = len(running or ()) if is_prefill else 0
    blocks = req.dllm_block_buffer.dllm_blocks
    truncated = req.truncated_response
    full = req.full_response
    # older Diffulex requests may lack these two and completion_reason; Diffulex read them with these defaults
    flags = [getattr(req, name, False) if name in _OPTIONAL_FLAGS else getattr(req, name) for name in OUTCOME_FLAGS]
    reason = getattr(req, "completion_reason", None)
    outcome = Outcome(token_ids=_copy_ids(truncated) if truncated is not None and len(truncated) else [],
                      full_token_ids=[] if full is None else _copy_ids(full), truncated_at_eos=bool(flags[-1]),
                      finished=reason is not None, completion_reason=reason, flags=flags)
    return StepInput(True, req.req_id, is_prefill, int(prefill_tokens), int(req.new_tokens),
                     () if running is None else running, int(req.block_size), [int(b.block_id) for b in blocks],
                     None if traces is None else traces.pack_rows(_diffulex_trace_rows(blocks, traces.code)), outcome)


def _engine_outcome(req: Any) -> Outcome:
    full = _ids(req.response_token_ids)
    eos = set(_ids(req.eos_token_ids)) if req.eos_token_ids is not None else set()
    cut = next((i for i, t in enumerate(full) if t in eos), None)
    at_eos = cut is not None
    defaults = (at_eos, False, False, False, False, at_eos)
    flags = [getattr(req, name, default) for name, default in zip(OUTCOME_FLAGS, defaults, strict=False)]
    return Outcome(token_ids=full[:cut] if at_eos else list(full), full_token_ids=full, truncated_at_eos=at_eos,
                   finished=True, completion_reason=req.completion_reason, flags=flags)


def _read_engine(req: Any, traces: TraceSink | None) -> StepInput:
    trace = None
    if traces is not None:
        raw = getattr(req, "block_trace", None)
        if raw is not None:
            trace = traces.pack_rows(trace_rows_from_mappings(raw, traces.code))
    return StepInput(False, req.req_id, bool(req.is_prefill), int(req.num_prompt_tokens),
                     int(req.num_generated_tokens), req.running_token_ids, int(req.block_size),
                     [int(b) for b in req.buffer_block_ids], trace,
                     _engine_outcome(req) if req.is_finished else None)


def read_request(req: Any, traces: TraceSink | None) -> StepInput:
    """Everything one step records about ``req``. Block traces are packed at once (so a step's
    rows never pile up); ``traces=None`` means traces are off and no block is read for them."""
    diffulex = hasattr(req, "new_tokens") and hasattr(req, "dllm_block_buffer")
    try:
        return _read_diffulex(req, traces) if diffulex else _read_engine(req, traces)
    except AttributeError as error:
        raised = _shape_error(req, error, diffulex)
        if raised is error:
            raise
        raise raised from error
