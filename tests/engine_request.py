"""A minimal engine request for the output tests: the attributes ``record_step`` reads
(``diffulex_core.output.EngineRequest``), with defaults a test overrides as needed."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class Req:
    req_id: int
    is_prefill: bool = False
    num_prompt_tokens: int = 10
    num_generated_tokens: int = 0
    running_token_ids: list = field(default_factory=list)
    block_size: int = 4
    buffer_block_ids: list = field(default_factory=lambda: [0])
    is_finished: bool = False
    completion_reason: str | None = None
    response_token_ids: list = field(default_factory=list)
    eos_token_ids: tuple = (2,)
    block_trace: list | None = None
