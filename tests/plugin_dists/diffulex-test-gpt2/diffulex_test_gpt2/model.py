"""A GPT-2-shaped family as a third-party plugin writes one.

Its checkpoint stores the attention projections as GPT-2's ``Conv1D`` does, ``[in, out]``; the
model holds ``nn.Linear`` weights, ``[out, in]``, so its resolver transposes them: through a
named function for ``c_attn``, through a lambda for ``c_proj``. Its defaults are far larger than
a demo needs (as GPT-2's are); its example config is tiny. It has no ``q_proj``/``v_proj``.
"""

from __future__ import annotations

import torch
from torch import nn

from diffulex_core.checkpoint import ResolvedWeight

DEFAULTS = {"vocab_size": 8192, "n_embd": 256, "n_layer": 4, "n_positions": 512}


def transpose(tensor: torch.Tensor) -> torch.Tensor:
    return tensor.t()


class Attention(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.c_attn = nn.Linear(n_embd, 3 * n_embd)
        self.c_proj = nn.Linear(n_embd, n_embd)

    def resolve_checkpoint_weight(self, suffix: str, ctx) -> ResolvedWeight | None:
        if suffix == "c_attn.weight":
            return ResolvedWeight(param="c_attn.weight", transform=transpose)
        if suffix == "c_proj.weight":
            return ResolvedWeight(param="c_proj.weight", transform=lambda t: t.t())
        return None  # the biases: exact names

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q, k, v = self.c_attn(x).chunk(3, dim=-1)
        return self.c_proj(torch.tanh(q * k) * v)


class Block(nn.Module):
    def __init__(self, n_embd: int) -> None:
        super().__init__()
        self.ln_1 = nn.LayerNorm(n_embd)
        self.attn = Attention(n_embd)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.attn(self.ln_1(x))


class ToyGPT2(nn.Module):
    def __init__(self, config=None) -> None:
        super().__init__()
        c = {**DEFAULTS, **dict(config or {})}
        self.wte = nn.Embedding(c["vocab_size"], c["n_embd"])
        self.wpe = nn.Embedding(c["n_positions"], c["n_embd"])
        self.h = nn.ModuleList(Block(c["n_embd"]) for _ in range(c["n_layer"]))
        self.ln_f = nn.LayerNorm(c["n_embd"])
        self.lm_head = nn.Linear(c["n_embd"], c["vocab_size"], bias=False)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.wte(input_ids) + self.wpe(torch.arange(input_ids.shape[-1], device=input_ids.device))
        for block in self.h:
            x = block(x)
        return self.lm_head(self.ln_f(x))


def to_checkpoint(model: ToyGPT2) -> dict[str, torch.Tensor]:
    """The model's weights as GPT-2 stores them: the attention projections transposed."""
    return {name: t.t().contiguous() if name.endswith(("c_attn.weight", "c_proj.weight")) else t
            for name, t in model.state_dict().items()}
