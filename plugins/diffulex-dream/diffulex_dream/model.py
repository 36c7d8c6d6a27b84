"""Dream (Qwen2-based diffusion LM) with engine-style parameter names, for diffulex-core.

Checkpoint names -> parameter names (``DreamForDiffusionLM.packed_modules_mapping``): Dream
checkpoints use Qwen2 names (``model.layers.N.self_attn.q_proj.weight``, ...), which are the
engine's but for the packed projections: ``diffulex_layers.QWEN_PACKED_MODULES_MAPPING`` (shared
with SDAR) sends q/k/v into ``qkv_proj`` and gate/up into ``gate_up_proj``.
The torch layers are shared with the other bundled families (``diffulex_layers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from diffulex_layers import (
    QWEN_PACKED_MODULES_MAPPING,
    DiffusionLM,
    PackedLinear,
    TransformerConfig,
    config_value,
    hf_state_dict,
)
from diffulex_layers.rope import rope_parameters

__all__ = ["DreamForDiffusionLM", "PackedLinear", "build_dream", "to_hf_state_dict"]


class DreamForDiffusionLM(DiffusionLM):
    diffulex_family = "dream"
    packed_modules_mapping = dict(QWEN_PACKED_MODULES_MAPPING)  # a copy: a change to it stays this family's

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any]) -> TransformerConfig:
        """Dream (Qwen2) config.json keys -> sizes; missing keys get small test defaults."""
        get = partial(config_value, cfg)
        hidden, heads = get("hidden_size", 64), get("num_attention_heads", 4)
        # Missing num_key_value_heads -> 2 (small GQA default); explicit null means "same as heads".
        kv_heads = cfg.get("num_key_value_heads", 2) or heads
        if hidden % heads or heads % kv_heads:
            raise ValueError(
                f"hidden_size={hidden}, num_attention_heads={heads}, "
                f"num_key_value_heads={kv_heads} do not divide"
            )
        rope = rope_parameters(cfg)  # rope_theta, and rope scaling in transformers 4 or 5 form
        return TransformerConfig(
            hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=hidden // heads,
            layers=get("num_hidden_layers", 2), inter=get("intermediate_size", 128),
            vocab=get("vocab_size", 256), eps=get("rms_norm_eps", 1e-6),
            qkv_bias=True,  # Qwen2: bias on q/k/v only
            tie=bool(get("tie_word_embeddings", False)), rope_theta=rope.theta, rope=rope,
            max_positions=get("max_position_embeddings", 2048),
        )  # fmt: skip


def build_dream(config: Mapping[str, Any] | None = None) -> DreamForDiffusionLM:
    """Factory registered as family ``dream``; honours the current default device (e.g. meta)."""
    return DreamForDiffusionLM(config)


def to_hf_state_dict(model: DreamForDiffusionLM) -> dict[str, torch.Tensor]:
    """The model's weights under real Dream (Qwen2) checkpoint names (packed tensors split)."""
    return hf_state_dict(model)
