"""A Qwen3-MoE family written the way Diffulex writes its families, to prove the drop-in.

Everything here is the seed's style, not ours: resolvers return parameter *objects*
(``ResolvedWeight(param=self.qkv_proj.weight, shard_id="q")``); stacked experts are filled by
one-argument loaders that declare nothing (``ResolvedWeight(loader=fn)``); the expert module's
resolver is assigned on the instance; the LM head is tied by sharing storage
(``lm_head.weight.data = embed_tokens.weight.data``); the final norm sits at the root and is
reached through a packed mapping whose value names a root path; the QKV weight_loader writes
``self.weight`` (not its ``param`` argument) and checks values with ``.item()``, and the k-norm
transform calls ``.item()`` too, so neither can run on meta tensors.
"""

from __future__ import annotations

from functools import partial
from typing import Any, Mapping

import torch
from torch import nn

from diffulex_core.checkpoint import ResolvedWeight


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))


class QKVLinear(nn.Module):
    def __init__(self, hidden: int, q_size: int, kv_size: int) -> None:
        super().__init__()
        self.slices = {"q": (0, q_size), "k": (q_size, kv_size), "v": (q_size + kv_size, kv_size)}
        self.weight = nn.Parameter(torch.empty(q_size + 2 * kv_size, hidden))
        self.weight.weight_loader = self.weight_loader

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: str) -> None:
        if not torch.isfinite(loaded_weight).all().item():
            raise ValueError(f"shard {shard_id!r} holds non-finite values")
        start, size = self.slices[shard_id]
        self.weight.data[start : start + size].copy_(loaded_weight)


def _checked_norm(tensor: torch.Tensor) -> torch.Tensor:
    if tensor.abs().max().item() > 1e4:
        raise ValueError("norm weight out of range")
    return tensor


class Attention(nn.Module):
    def __init__(self, c: Mapping[str, Any]) -> None:
        super().__init__()
        head_dim = c["head_dim"]
        q_size, kv_size = c["num_attention_heads"] * head_dim, c["num_key_value_heads"] * head_dim
        self.qkv_proj = QKVLinear(c["hidden_size"], q_size, kv_size)
        self.o_proj = nn.Linear(q_size, c["hidden_size"], bias=False)
        self.q_norm = RMSNorm(head_dim, c["rms_norm_eps"])
        self.k_norm = RMSNorm(head_dim, c["rms_norm_eps"])

    def resolve_checkpoint_weight(self, suffix: str, ctx) -> ResolvedWeight | None:
        for shard in ("q", "k", "v"):
            if suffix == f"{shard}_proj.weight":
                return ResolvedWeight(param=self.qkv_proj.weight, shard_id=shard)
        if suffix == "k_norm.weight":
            return ResolvedWeight(param=self.k_norm.weight, transform=_checked_norm)
        return None


class FusedMoE(nn.Module):
    """Experts stacked in two parameters, filled one expert tensor at a time by plain loaders."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.inter = inter
        self.w13_weight = nn.Parameter(torch.empty(num_experts, 2 * inter, hidden))
        self.w2_weight = nn.Parameter(torch.empty(num_experts, hidden, inter))
        self.resolve_checkpoint_weight = self._resolve  # set on the instance, as Diffulex does

    def _resolve(self, suffix: str, ctx) -> ResolvedWeight | None:
        expert, proj, _ = suffix.split(".")
        return ResolvedWeight(loader=partial(self._load_expert, int(expert), proj))

    def _load_expert(self, expert: int, proj: str, loaded_weight: torch.Tensor) -> None:
        if proj == "gate_proj":
            self.w13_weight.data[expert, : self.inter].copy_(loaded_weight)
        elif proj == "up_proj":
            self.w13_weight.data[expert, self.inter :].copy_(loaded_weight)
        else:
            self.w2_weight.data[expert].copy_(loaded_weight)


class SparseMoeBlock(nn.Module):
    def __init__(self, c: Mapping[str, Any]) -> None:
        super().__init__()
        self.gate = nn.Linear(c["hidden_size"], c.get("num_experts") or c["num_local_experts"], bias=False)
        self.experts = FusedMoE(c.get("num_experts") or c["num_local_experts"], c["hidden_size"],
                                c["moe_intermediate_size"])


class DecoderLayer(nn.Module):
    def __init__(self, c: Mapping[str, Any]) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.mlp = SparseMoeBlock(c)


class Qwen3MoeForDiffusion(nn.Module):
    seedstyle = True
    # The checkpoint's ``model.norm`` is this model's root-level ``final_norm``.
    packed_modules_mapping = {"norm": ("final_norm", None)}

    def __init__(self, config: Mapping[str, Any]) -> None:
        super().__init__()
        c = dict(config)
        self.model = nn.Module()
        self.model.embed_tokens = nn.Embedding(c["vocab_size"], c["hidden_size"])
        self.model.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c["num_hidden_layers"]))
        self.final_norm = RMSNorm(c["hidden_size"], c["rms_norm_eps"])
        self.lm_head = nn.Linear(c["hidden_size"], c["vocab_size"], bias=False)
        if c.get("tie_word_embeddings"):
            self.lm_head.weight.data = self.model.embed_tokens.weight.data
