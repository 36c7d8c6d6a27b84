"""A small bidirectional transformer with engine-style parameter names, shared by the families.

Parameter names (``model.embed_tokens``, ``model.layers.N.self_attn.qkv_proj``,
``model.layers.N.mlp.gate_up_proj``, ``model.norm``, ``lm_head``, ...) are what the diffulex-core
loader writes into; a family maps its checkpoint names onto them with ``packed_modules_mapping``
(checkpoint segment(s) -> (parameter segment(s), shard id)). A shard id (``"q"``/``"k"``/``"v"``,
``0``/``1``) says which rows of a packed parameter a checkpoint tensor fills, through that
parameter's ``weight_loader(param, loaded_weight, shard_id)``.

The projections, embedding and LM head are the tensor-parallel layers of
``diffulex_layers.parallel``: a model built under ``diffulex_core.parallel.use_parallel_state``
(or with ``torch.distributed`` initialised) holds only its rank's heads, MLP columns and
vocabulary rows, and its ``weight_loader``s take their part of each full checkpoint tensor.
With a single process it is the plain model.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import nn

from diffulex_core.plugin_api import current_parallel_state, divide

from .lora import LoRAAdapter
from .moe import SparseMoeBlock, StackedExperts, per_expert_tensors
from .parallel import (
    MergedColumnParallelLinear,
    PackedLinear,
    ParallelLMHead,
    QKVParallelLinear,
    RowParallelLinear,
    VocabParallelEmbedding,
)
from .rope import RopeParameters, inv_freq_and_scale

__all__ = [
    "MLP",
    "Attention",
    "DecoderLayer",
    "DiffusionLM",
    "MoeConfig",
    "PackedLinear",
    "QWEN_PACKED_MODULES_MAPPING",
    "RMSNorm",
    "RotaryEmbedding",
    "TransformerConfig",
    "TransformerModel",
    "apply_rotary",
    "block_causal_mask",
    "config_value",
    "hf_name",
    "hf_state_dict",
]


@dataclass(frozen=True)
class TransformerConfig:
    """Sizes and the switches where the families differ."""

    hidden: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int
    inter: int
    vocab: int
    eps: float
    qkv_bias: bool = False  # bias on the packed q/k/v projection
    o_bias: bool = False  # bias on o_proj
    mlp_bias: bool = False  # bias on gate_up_proj and down_proj
    qk_norm: bool = False  # RMSNorm over head_dim on q and k before rotary (Qwen3 / SDAR)
    tie: bool = False  # lm_head shares the embedding weight
    rope_theta: float = 10000.0
    max_positions: int = 2048
    rope: RopeParameters | None = None  # rope scaling from the config; None: plain rotary with rope_theta
    block_size: int | None = None  # block-causal attention in blocks of this many tokens; None: bidirectional
    moe: MoeConfig | None = None  # sparse MLPs in the layers it names


@dataclass(frozen=True)
class MoeConfig:
    """Mixture-of-experts MLPs (Qwen3-MoE): ``sparse_layers`` use them, the other layers stay dense."""

    experts: int
    top_k: int
    inter: int  # each expert's intermediate size
    norm_topk_prob: bool
    sparse_layers: frozenset[int]


def block_causal_mask(seq_len: int, block_size: int | None, device: torch.device | None = None) -> torch.Tensor | None:
    """``mask[i, j]``: may position ``i`` attend to ``j``; within a block every position sees every
    other, across blocks only earlier blocks are seen (SDAR). None (attend to all) when one block
    covers the sequence."""
    if block_size is None or block_size >= seq_len:
        return None
    block = torch.arange(seq_len, device=device) // block_size
    return block[None, :] <= block[:, None]


def config_value(cfg: Mapping[str, Any], key: str, default: Any) -> Any:
    """``cfg[key]``, or ``default`` where the key is missing or null."""
    value = cfg.get(key)
    return default if value is None else value


class RotaryEmbedding(nn.Module):
    """cos/sin cache (non-persistent); rebuilt when moved (e.g. meta -> to_empty) or too short.

    ``rope`` is a ``RopeParameters`` (the config's rope scaling, computed as transformers does;
    ``diffulex_layers.rope``) or a plain base (theta). With ``"dynamic"`` scaling the frequencies
    depend on the sequence length once it passes ``max_positions``, so those are not cached.
    The cache is rebuilt whenever it moved (``forward`` compares device and dtype), so a meta copy
    is fine: ``diffulex_rebuilt_buffers`` tells the loader so.
    """

    diffulex_rebuilt_buffers = ("cos_sin_cache",)

    def __init__(self, head_dim: int, max_positions: int, rope: RopeParameters | float) -> None:
        super().__init__()
        self.rope = rope if isinstance(rope, RopeParameters) else RopeParameters("default", float(rope))
        self.head_dim, self.max_positions = head_dim, max_positions
        self.register_buffer("cos_sin_cache", self._compute(max_positions, None), persistent=False)
        self._built_on = (self.cos_sin_cache.device, self.cos_sin_cache.dtype)

    def _compute(self, n: int, device: torch.device | None, seq_len: int | None = None) -> torch.Tensor:
        inv_freq, scale = inv_freq_and_scale(self.rope, self.head_dim, self.max_positions, seq_len)
        freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), inv_freq.to(device))
        return torch.cat((freqs.cos() * scale, freqs.sin() * scale), dim=-1)  # [n, head_dim]

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cos_sin_cache
        if self.rope.rope_type == "dynamic" and seq_len > self.max_positions:
            return self._compute(seq_len, cache.device, seq_len).chunk(2, dim=-1)
        if (cache.device, cache.dtype) != self._built_on or seq_len > cache.shape[0]:
            self.cos_sin_cache = self._compute(max(seq_len, cache.shape[0]), cache.device)
            self._built_on = (cache.device, torch.float32)
        return self.cos_sin_cache[:seq_len].chunk(2, dim=-1)


class RMSNorm(nn.Module):
    """RMS norm computed in float32 (torch.nn.RMSNorm needs torch >= 2.4)."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps, self.weight = eps, nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(x.dtype)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.float().chunk(2, dim=-1)  # x: [B, T, H, D]; cos/sin: [T, D/2]
    cos, sin = cos[:, None, :], sin[:, None, :]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class Attention(nn.Module):
    """GQA attention over this rank's heads (``n_heads``/``n_kv_heads`` are local)."""

    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.qkv_proj = QKVParallelLinear(c.hidden, c.head_dim, c.heads, c.kv_heads, bias=c.qkv_bias)
        self.o_proj = RowParallelLinear(c.heads * c.head_dim, c.hidden, bias=c.o_bias)
        self.n_heads, self.n_kv_heads, self.head_dim = self.qkv_proj.num_heads, self.qkv_proj.num_kv_heads, c.head_dim
        if c.qk_norm:  # per-head norm before rotary
            self.q_norm = RMSNorm(c.head_dim, eps=c.eps)
            self.k_norm = RMSNorm(c.head_dim, eps=c.eps)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        """``mask`` [T, T] (True: may attend), or None for bidirectional attention."""
        B, T, _ = x.shape
        sizes = [size for _, size in self.qkv_proj.shard_slices.values()]
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in self.qkv_proj(x).split(sizes, dim=-1))
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = self.n_heads // self.n_kv_heads  # GQA: repeat kv heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)  # None: bidirectional (diffusion LM)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        divide(c.inter, current_parallel_state().tp_size, "intermediate size (MLP)")
        self.gate_up_proj = MergedColumnParallelLinear(c.hidden, [c.inter, c.inter], bias=c.mlp_bias)
        self.down_proj = RowParallelLinear(c.inter, c.hidden, bias=c.mlp_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


# Qwen2/Qwen3 checkpoints (Dream, SDAR) name every tensor as these layers do but for the packed
# projections: their q/k/v fill ``Attention.qkv_proj``'s shards and gate/up ``MLP.gate_up_proj``'s.
QWEN_PACKED_MODULES_MAPPING: dict[str, tuple[str, Any]] = {
    "q_proj": ("qkv_proj", "q"),
    "k_proj": ("qkv_proj", "k"),
    "v_proj": ("qkv_proj", "v"),
    "gate_proj": ("gate_up_proj", 0),
    "up_proj": ("gate_up_proj", 1),
}


class DecoderLayer(nn.Module):
    def __init__(self, c: TransformerConfig, index: int = 0) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, eps=c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden, eps=c.eps)
        if c.moe is not None and index in c.moe.sparse_layers:
            m = c.moe
            self.mlp = SparseMoeBlock(c.hidden, m.experts, m.top_k, m.inter, norm_topk_prob=m.norm_topk_prob)
        else:
            self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, mask)
        return x + self.mlp(self.post_attention_layernorm(x))


class TransformerModel(nn.Module):
    def __init__(self, c: TransformerConfig) -> None:
        super().__init__()
        self.embed_tokens = VocabParallelEmbedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(DecoderLayer(c, i) for i in range(c.layers))
        self.norm = RMSNorm(c.hidden, eps=c.eps)

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                mask: torch.Tensor | None = None) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin, mask)
        return self.norm(x)


class DiffusionLM(nn.Module):
    """``model`` + ``lm_head`` + ``rotary_emb``; a family sets the class attributes and
    ``resolve_config``. Honours the current default device (e.g. meta)."""

    diffulex_family: ClassVar[str]
    packed_modules_mapping: ClassVar[dict[str, tuple[str, Any]]] = {}

    @classmethod
    def resolve_config(cls, config: Mapping[str, Any]) -> TransformerConfig:
        """The family's config.json keys -> a TransformerConfig (raise ValueError if invalid)."""
        raise NotImplementedError

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config_dict = dict(config or {})
        c = self.resolve_config(self.config_dict)
        self.block_size = c.block_size
        self.model = TransformerModel(c)
        self.lm_head = ParallelLMHead(c.vocab, c.hidden)
        self.tie_word_embeddings = c.tie
        if c.tie:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.max_positions, c.rope or c.rope_theta)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if self.tie_word_embeddings:  # to_empty() off the meta device unties: tie again
            self.lm_head.weight = self.model.embed_tokens.weight
        return result

    def get_output_embeddings(self) -> nn.Module:
        """The LM head, as in transformers: PEFT's ``"all-linear"`` target leaves it out (so does the core)."""
        return self.lm_head

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits [B, T, vocab]: bidirectional attention, or block-causal where the config sets a block size."""
        seq_len = input_ids.shape[1]
        cos, sin = self.rotary_emb(seq_len)
        mask = block_causal_mask(seq_len, self.block_size, input_ids.device)
        return self.lm_head(self.model(input_ids, cos, sin, mask))


def hf_name(name: str, shard_id: Any, mapping: Mapping[str, tuple]) -> str:
    """Inverse of the mapping: replace whole segments, longest match first, left to right."""
    inverse = {(dst, sid): src for src, (dst, sid) in mapping.items()}
    longest = max(dst.count(".") + 1 for dst, _ in inverse)
    parts, out, i = name.split("."), [], 0
    while i < len(parts):
        for n in range(min(longest, len(parts) - i), 0, -1):
            seg = ".".join(parts[i : i + n])
            src = inverse.get((seg, shard_id)) or inverse.get((seg, None))
            if src:
                out.append(src)
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out)


def hf_state_dict(model: DiffusionLM) -> dict[str, torch.Tensor]:
    """The model's weights under checkpoint names (packed tensors split, stacked experts one by one,
    a tied lm_head left out). LoRA adapter tensors are not base weights and are left out too
    (``merge_lora`` first to export merged weights).

    Meant for single-process models: with ``tp_size > 1`` the tensors are this rank's parts."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        prefix = name.rpartition(".")[0]
        owner = model.get_submodule(prefix)
        if isinstance(owner, LoRAAdapter):
            continue
        if isinstance(owner, StackedExperts):
            if name.endswith(".gate_up_proj"):  # once per module
                out.update(per_expert_tensors(prefix, owner))
            continue
        for shard_id, (start, size) in getattr(owner, "shard_slices", {None: (0, tensor.shape[0])}).items():
            piece = tensor.narrow(0, start, size)
            out[hf_name(name, shard_id, model.packed_modules_mapping)] = piece.detach().clone().contiguous()
    return out
