"""Dream (Qwen2-based diffusion LM) with engine-style parameter names, for diffulex-core.

Checkpoint names -> parameter names (``DreamForDiffusionLM.packed_modules_mapping``):
Dream checkpoints use Qwen2 names (``model.layers.N.self_attn.q_proj.weight``, ...). The core
loader rewrites a checkpoint name by replacing whole dotted segments (a key never matches part
of a segment; where keys overlap the most specific, longest, key wins). Only the packed
projections need entries: ``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj`` shards
``"q"``/``"k"``/``"v"`` and ``gate_proj``/``up_proj`` -> ``gate_up_proj`` shards ``0``/``1``;
every other name (``o_proj``, ``down_proj``, norms, ``embed_tokens``, ``lm_head``) already
matches. A shard id says which rows of the packed parameter the tensor fills, through that
parameter's ``weight_loader(param, loaded_weight, shard_id)``.
"""

from __future__ import annotations

from collections.abc import Mapping
from types import SimpleNamespace
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["DreamForDiffusionLM", "PackedLinear", "build_dream", "to_hf_state_dict"]


class PackedLinear(nn.Linear):
    """A Linear whose output rows stack several checkpoint tensors (``shard_slices``)."""

    def __init__(self, in_features: int, shard_sizes: dict, bias: bool) -> None:
        super().__init__(in_features, sum(shard_sizes.values()), bias=bias)
        self.shard_slices: dict = {}
        start = 0
        for shard_id, size in shard_sizes.items():
            self.shard_slices[shard_id] = (start, size)
            start += size
        self._attach_loaders()

    def _attach_loaders(self) -> None:
        for param in self.parameters(recurse=False):
            param.weight_loader = self.weight_loader

    def _apply(self, fn, *args, **kwargs):
        # to_empty() off the meta device makes new Parameter objects: re-attach the loaders.
        result = super()._apply(fn, *args, **kwargs)
        self._attach_loaders()
        return result

    def __setstate__(self, state: dict) -> None:  # deepcopy / unpickle drop Parameter attributes
        super().__setstate__(state)
        self._attach_loaders()

    def weight_loader(self, param: nn.Parameter, loaded_weight: torch.Tensor, shard_id: Any) -> None:
        if shard_id not in self.shard_slices:
            raise ValueError(f"unknown shard id {shard_id!r}; expected one of {list(self.shard_slices)}")
        start, size = self.shard_slices[shard_id]
        target = param.data.narrow(0, start, size)
        if target.shape != loaded_weight.shape:
            raise ValueError(
                f"shard {shard_id!r}: slice has shape {tuple(target.shape)} "
                f"but loaded weight has shape {tuple(loaded_weight.shape)}"
            )
        target.copy_(loaded_weight)


class RotaryEmbedding(nn.Module):
    """cos/sin cache (non-persistent); rebuilt when moved (e.g. meta -> to_empty) or too short."""

    def __init__(self, head_dim: int, max_positions: int, base: float) -> None:
        super().__init__()
        self.head_dim, self.base = head_dim, float(base)
        self.register_buffer("cos_sin_cache", self._compute(max_positions, None), persistent=False)
        self._built_on = (self.cos_sin_cache.device, self.cos_sin_cache.dtype)

    def _compute(self, n: int, device: torch.device | None) -> torch.Tensor:
        exponents = torch.arange(0, self.head_dim, 2, dtype=torch.float32, device=device) / self.head_dim
        freqs = torch.outer(torch.arange(n, dtype=torch.float32, device=device), self.base**-exponents)
        return torch.cat((freqs.cos(), freqs.sin()), dim=-1)  # [n, head_dim]

    def forward(self, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
        cache = self.cos_sin_cache
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
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = c.heads, c.kv_heads, c.head_dim
        sizes = {"q": c.heads * c.head_dim, "k": c.kv_heads * c.head_dim, "v": c.kv_heads * c.head_dim}
        self.qkv_proj = PackedLinear(c.hidden, sizes, bias=c.qkv_bias)
        self.o_proj = nn.Linear(c.heads * c.head_dim, c.hidden, bias=c.bias)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, T, _ = x.shape
        sizes = [size for _, size in self.qkv_proj.shard_slices.values()]
        q, k, v = (t.view(B, T, -1, self.head_dim) for t in self.qkv_proj(x).split(sizes, dim=-1))
        q, k = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        rep = self.n_heads // self.n_kv_heads  # GQA: repeat kv heads
        k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        out = F.scaled_dot_product_attention(q, k, v)  # no mask: bidirectional (diffusion LM)
        return self.o_proj(out.transpose(1, 2).reshape(B, T, -1))


class MLP(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.gate_up_proj = PackedLinear(c.hidden, {0: c.inter, 1: c.inter}, bias=c.bias)
        self.down_proj = nn.Linear(c.inter, c.hidden, bias=c.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = self.gate_up_proj(x).chunk(2, dim=-1)
        return self.down_proj(F.silu(gate) * up)


class DecoderLayer(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(c.hidden, eps=c.eps)
        self.self_attn = Attention(c)
        self.post_attention_layernorm = RMSNorm(c.hidden, eps=c.eps)
        self.mlp = MLP(c)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.input_layernorm(x), cos, sin)
        return x + self.mlp(self.post_attention_layernorm(x))


class DreamModel(nn.Module):
    def __init__(self, c: SimpleNamespace) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(c.vocab, c.hidden)
        self.layers = nn.ModuleList(DecoderLayer(c) for _ in range(c.layers))
        self.norm = RMSNorm(c.hidden, eps=c.eps)

    def forward(self, input_ids: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        x = self.embed_tokens(input_ids)
        for layer in self.layers:
            x = layer(x, cos, sin)
        return self.norm(x)


def _resolve(cfg: Mapping[str, Any]) -> SimpleNamespace:
    """Dream (Qwen2) config.json keys -> sizes; missing keys get small test defaults."""

    def get(key: str, default: Any) -> Any:
        value = cfg.get(key)
        return default if value is None else value

    hidden, heads = get("hidden_size", 64), get("num_attention_heads", 4)
    # Missing num_key_value_heads -> 2 (small GQA default); explicit null means "same as heads".
    kv_heads = cfg.get("num_key_value_heads", 2) or heads
    return SimpleNamespace(
        hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=hidden // heads,
        layers=get("num_hidden_layers", 2), inter=get("intermediate_size", 128),
        vocab=get("vocab_size", 256), eps=get("rms_norm_eps", 1e-6),
        bias=False, qkv_bias=True,  # Qwen2: bias on q/k/v only
        tie=bool(get("tie_word_embeddings", False)), rope_theta=get("rope_theta", 10000.0),
        max_positions=get("max_position_embeddings", 2048),
    )


class DreamForDiffusionLM(nn.Module):
    diffulex_family = "dream"
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    def __init__(self, config: Mapping[str, Any] | None = None) -> None:
        super().__init__()
        self.config_dict = dict(config or {})
        c = _resolve(self.config_dict)
        if c.hidden % c.heads or c.heads % c.kv_heads:
            raise ValueError(
                f"hidden_size={c.hidden}, num_attention_heads={c.heads}, "
                f"num_key_value_heads={c.kv_heads} do not divide"
            )
        self.model = DreamModel(c)
        self.lm_head = nn.Linear(c.hidden, c.vocab, bias=False)
        self.tie_word_embeddings = c.tie
        if c.tie:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.rotary_emb = RotaryEmbedding(c.head_dim, c.max_positions, c.rope_theta)

    def _apply(self, fn, *args, **kwargs):
        result = super()._apply(fn, *args, **kwargs)
        if self.tie_word_embeddings:  # to_empty() off the meta device unties: tie again
            self.lm_head.weight = self.model.embed_tokens.weight
        return result

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        cos, sin = self.rotary_emb(input_ids.shape[1])
        return self.lm_head(self.model(input_ids, cos, sin))


def build_dream(config: Mapping[str, Any] | None = None) -> DreamForDiffusionLM:
    """Factory registered as family ``dream``; honours the current default device (e.g. meta)."""
    return DreamForDiffusionLM(config)


def _hf_name(name: str, shard_id: Any, mapping: Mapping[str, tuple]) -> str:
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


def to_hf_state_dict(model: DreamForDiffusionLM) -> dict[str, torch.Tensor]:
    """The model's weights under real Dream (Qwen2) checkpoint names (packed tensors split)."""
    tied = model.lm_head.weight is model.model.embed_tokens.weight
    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        if tied and name == "lm_head.weight":
            continue
        owner = model.get_submodule(name.rpartition(".")[0])
        for shard_id, (start, size) in getattr(owner, "shard_slices", {None: (0, tensor.shape[0])}).items():
            piece = tensor.narrow(0, start, size)
            out[_hf_name(name, shard_id, model.packed_modules_mapping)] = piece.detach().clone().contiguous()
    return out
