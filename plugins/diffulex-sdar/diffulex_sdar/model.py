"""SDAR (Qwen3-based block-diffusion LM) with engine-style parameter names, for diffulex-core.

Checkpoint names -> parameter names (``SDARForDiffusionLM.packed_modules_mapping``):
SDAR checkpoints use Qwen3 names (``model.layers.N.self_attn.q_proj.weight``, ...). The core
loader rewrites a checkpoint name by replacing whole dotted segments (a key never matches part
of a segment; where keys overlap the most specific, longest, key wins). Only the packed
projections need entries: ``q_proj``/``k_proj``/``v_proj`` -> ``qkv_proj`` shards
``"q"``/``"k"``/``"v"`` and ``gate_proj``/``up_proj`` -> ``gate_up_proj`` shards ``0``/``1``;
every other name (``o_proj``, ``down_proj``, norms including ``q_norm``/``k_norm``,
``embed_tokens``, ``lm_head``) already
matches. A shard id says which rows of the packed parameter the tensor fills, through that
parameter's ``weight_loader(param, loaded_weight, shard_id)``.
The torch layers are shared with the other bundled families (``diffulex_layers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch
from diffulex_layers import DiffusionLM, PackedLinear, TransformerConfig, config_value, hf_state_dict

__all__ = ["SDARForDiffusionLM", "PackedLinear", "build_sdar", "to_hf_state_dict"]


class SDARForDiffusionLM(DiffusionLM):
    diffulex_family = "sdar"
    packed_modules_mapping = {
        "q_proj": ("qkv_proj", "q"),
        "k_proj": ("qkv_proj", "k"),
        "v_proj": ("qkv_proj", "v"),
        "gate_proj": ("gate_up_proj", 0),
        "up_proj": ("gate_up_proj", 1),
    }

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any]) -> TransformerConfig:
        """SDAR (Qwen3) config.json keys -> sizes; missing keys get small test defaults."""
        get = partial(config_value, cfg)
        hidden, heads = get("hidden_size", 64), get("num_attention_heads", 4)
        # Missing num_key_value_heads -> 2 (small GQA default); explicit null means "same as heads".
        kv_heads = cfg.get("num_key_value_heads", 2) or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        attention_bias = bool(get("attention_bias", False))  # Qwen3: bias on q/k/v/o
        return TransformerConfig(
            hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=get("head_dim", hidden // heads),
            layers=get("num_hidden_layers", 2), inter=get("intermediate_size", 128),
            vocab=get("vocab_size", 256), eps=get("rms_norm_eps", 1e-6),
            qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True,  # Qwen3: q/k RMSNorm per head
            tie=bool(get("tie_word_embeddings", False)), rope_theta=get("rope_theta", 10000.0),
            max_positions=get("max_position_embeddings", 2048),
        )  # fmt: skip


def build_sdar(config: Mapping[str, Any] | None = None) -> SDARForDiffusionLM:
    """Factory registered as family ``sdar``; honours the current default device (e.g. meta)."""
    return SDARForDiffusionLM(config)


def to_hf_state_dict(model: SDARForDiffusionLM) -> dict[str, torch.Tensor]:
    """The model's weights under real SDAR (Qwen3) checkpoint names (packed tensors split)."""
    return hf_state_dict(model)
