"""The demo's engine: masked-diffusion decoding with confidence-based unmasking, every step recorded in
``GenerationOutputs`` through requests on the ``EngineRequest`` protocol."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from diffulex_core.errors import DiffulexError

__all__ = ["GEN_LENGTH", "PROMPTS", "TOKENS_PER_STEP", "DemoRequest", "decode", "find_eos_ids", "find_mask_token",
           "first_embedding_rows"]

PROMPTS = ("the quick brown fox", "a diffusion model writes")
GEN_LENGTH = 8  # mask tokens appended to each prompt: one block
TOKENS_PER_STEP = 2  # the most confident masked positions unmasked per step (so 4 steps)


def first_embedding_rows(model: Any) -> int:
    """Rows of the model's first ``nn.Embedding``: the vocabulary the model can read."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return module.num_embeddings
    raise DiffulexError(f"{type(model).__qualname__} has no nn.Embedding; the demo cannot make a prompt for it")


@dataclass
class DemoRequest:
    """One prompt's request, on this package's ``EngineRequest`` protocol (what ``record_step``
    reads), updated in place by the decoding loop before each step is recorded."""

    req_id: int
    num_prompt_tokens: int
    running_token_ids: list[int]  # the response region after the step, mask tokens included
    eos_token_ids: tuple[int, ...]
    block_size: int = GEN_LENGTH
    buffer_block_ids: list[int] = field(default_factory=lambda: [0])
    is_prefill: bool = True
    num_generated_tokens: int = 0
    is_finished: bool = False
    completion_reason: str | None = None
    mask_token_id: int = -1

    @property
    def response_token_ids(self) -> list[int]:  # read once finished
        return list(self.running_token_ids)

    @property
    def block_trace(self) -> list[dict[str, Any]]:  # optional: the one block's state, per step
        masked = sum(1 for t in self.running_token_ids if t == self.mask_token_id)
        return [{"block_id": 0, "active": not self.is_finished, "dummy": False, "masked_count": masked,
                 "mask_ratio": masked / self.block_size, "progress": 1 - masked / self.block_size,
                 "status": "finished" if self.is_finished else "active"}]


def find_mask_token(tokenizer: Any, config: dict, rows: int) -> tuple[int, str]:
    """(id, where it came from): the tokenizer's mask token, else config ``mask_token_id``, else the
    last id of the model's vocabulary (``rows - 1``); an id the model has no row for does not count."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if isinstance(mask_id, int) and 0 <= mask_id < rows:
        return mask_id, f"the tokenizer's mask token {tokenizer.mask_token!r}"
    mask_id = config.get("mask_token_id")
    if isinstance(mask_id, int) and not isinstance(mask_id, bool) and 0 <= mask_id < rows:
        return mask_id, "config.json mask_token_id"
    return rows - 1, "the last vocabulary id (neither the tokenizer nor config.json names a mask token the model has)"


def find_eos_ids(tokenizer: Any, config: dict) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(int(e) for e in eos if isinstance(e, int) and not isinstance(e, bool))


def _token_texts(tokenizer: Any, ids: list[int], mask_id: int) -> list[str]:
    from diffulex_core.generation.decoding import decode_token_ids_robust

    shown = []
    for t in ids:
        text = "[MASK]" if t == mask_id else decode_token_ids_robust(tokenizer, [t])
        shown.append(text.strip() if text.strip().isprintable() and text.strip() else ascii(text) if text else f"<{t}>")
    return shown


def decode(model: Any, tokenizer: Any, prompts: tuple[str, ...], *, mask_id: int, eos_ids: tuple[int, ...],
           vocab_limit: int, device: Any, gen_length: int = GEN_LENGTH,
           per_step: int = TOKENS_PER_STEP) -> tuple[Any, list[dict[str, Any]]]:
    """Masked-diffusion decoding with confidence-based unmasking: each prompt gets ``gen_length``
    mask tokens; each step runs the model on each sequence, and unmasks the ``per_step`` masked
    positions whose argmax is most confident (softmax). Every step is recorded in a
    ``GenerationOutputs`` (returned with a per-request log of the steps)."""
    import torch

    from diffulex_core.generation.outputs import GenerationOutputs

    outputs = GenerationOutputs(len(prompts))
    prompt_ids = []
    for prompt in prompts:
        ids = [int(t) for t in tokenizer(prompt)["input_ids"]]
        if not ids:
            raise DiffulexError(f"the tokenizer encodes the prompt {prompt!r} as no tokens")
        if max(ids) >= vocab_limit:
            raise DiffulexError(f"the tokenizer encodes {prompt!r} with id {max(ids)}, beyond the model's "
                                f"{vocab_limit} embedding rows")
        prompt_ids.append(ids)
    reqs = [DemoRequest(req_id=i, num_prompt_tokens=len(ids), running_token_ids=[mask_id] * gen_length,
                        eos_token_ids=eos_ids, mask_token_id=mask_id) for i, ids in enumerate(prompt_ids)]
    log = [{"prompt": p, "prompt_token_ids": ids, "steps": []} for p, ids in zip(prompts, prompt_ids, strict=True)]
    step = 0
    with torch.no_grad():
        while not all(r.is_finished for r in reqs):
            running = [r for r in reqs if not r.is_finished]
            start = time.perf_counter()
            for req in running:
                ids = torch.tensor([prompt_ids[req.req_id] + req.running_token_ids], device=device)
                logits = model(ids)[0, -gen_length:].float()
                logits[:, mask_id] = float("-inf")  # never "predict" the mask itself
                logits[:, vocab_limit:] = float("-inf")  # nor a padding row the tokenizer cannot decode
                confidence, predicted = logits.softmax(-1).max(-1)
                response = torch.tensor(req.running_token_ids, device=device)
                masked = response == mask_id
                chosen = confidence.masked_fill(~masked, float("-inf")).topk(min(per_step, int(masked.sum()))).indices
                response[chosen] = predicted[chosen]
                req.running_token_ids = response.tolist()
                req.num_generated_tokens = len(chosen)
                req.is_finished = mask_id not in req.running_token_ids
                if req.is_finished:
                    req.completion_reason = "eos" if any(t in eos_ids for t in req.running_token_ids) else "max_tokens"
            step_time = time.perf_counter() - start
            outputs.record_step(running, step_time)
            for req in running:
                log[req.req_id]["steps"].append({
                    "step": step, "prefill": req.is_prefill, "step_time": step_time,
                    "unmasked": req.num_generated_tokens, "running_token_ids": list(req.running_token_ids),
                    "tokens": _token_texts(tokenizer, req.running_token_ids, mask_id)})
                req.is_prefill = False  # the first step read the prompt: the rest decode
            step += 1
    return outputs, log
