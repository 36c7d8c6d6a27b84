"""SDAR (Qwen3-based block-diffusion LM) with engine-style parameter names, for diffulex-core.

Checkpoint names -> parameter names (``SDARForDiffusionLM.packed_modules_mapping``): SDAR
checkpoints use Qwen3 names (``model.layers.N.self_attn.q_proj.weight``, ...), which are the
engine's (``q_norm``/``k_norm`` included) but for the packed projections:
``diffulex_layers.QWEN_PACKED_MODULES_MAPPING`` (shared with Dream) sends q/k/v into
``qkv_proj`` and gate/up into ``gate_up_proj``.
The torch layers are shared with the other bundled families (``diffulex_layers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace
from functools import partial
from typing import Any

import torch

from diffulex_layers import (
    QWEN_PACKED_MODULES_MAPPING,
    DiffusionLM,
    MoeConfig,
    PackedLinear,
    TransformerConfig,
    config_value,
    hf_state_dict,
)
from diffulex_layers.rope import rope_parameters

__all__ = ["SDARForDiffusionLM", "SDARMoeForDiffusionLM", "PackedLinear", "build_sdar", "build_sdar_moe",
           "to_hf_state_dict"]


class SDARForDiffusionLM(DiffusionLM):
    diffulex_family = "sdar"
    packed_modules_mapping = dict(QWEN_PACKED_MODULES_MAPPING)  # a copy: a change to it stays this family's

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any]) -> TransformerConfig:
        """SDAR (Qwen3) config.json keys -> sizes; missing keys get small test defaults.

        ``block_size`` (SDAR's config key; 4 in the released models) makes attention block-causal:
        bidirectional within each block of that many tokens, causal across blocks. Without it
        attention is bidirectional over the whole sequence, as with a block covering it.
        """
        get = partial(config_value, cfg)
        hidden, heads = get("hidden_size", 64), get("num_attention_heads", 4)
        # Missing num_key_value_heads -> 2 (small GQA default); explicit null means "same as heads".
        kv_heads = cfg.get("num_key_value_heads", 2) or heads
        if heads % kv_heads:
            raise ValueError(f"num_attention_heads={heads} is not a multiple of num_key_value_heads={kv_heads}")
        attention_bias = bool(get("attention_bias", False))  # Qwen3: bias on q/k/v/o
        rope = rope_parameters(cfg)  # rope_theta, and rope scaling in transformers 4 or 5 form
        return TransformerConfig(
            hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=get("head_dim", hidden // heads),
            layers=get("num_hidden_layers", 2), inter=get("intermediate_size", 128),
            vocab=get("vocab_size", 256), eps=get("rms_norm_eps", 1e-6),
            qkv_bias=attention_bias, o_bias=attention_bias, qk_norm=True,  # Qwen3: q/k RMSNorm per head
            tie=bool(get("tie_word_embeddings", False)), rope_theta=rope.theta, rope=rope,
            max_positions=get("max_position_embeddings", 2048), block_size=_block_size(cfg),
        )  # fmt: skip


def _block_size(cfg: Mapping[str, Any]) -> int | None:
    value = cfg.get("block_size")
    if value is not None and (not isinstance(value, int) or isinstance(value, bool) or value < 1):
        raise ValueError(f"block_size = {value!r}: expected a positive integer (tokens per block) or null")
    return value


class SDARMoeForDiffusionLM(SDARForDiffusionLM):
    """SDAR-MoE (Qwen3-MoE based): SDAR's attention, and sparse MLPs in the layers the config names.

    Checkpoint names as Qwen3-MoE: router ``model.layers.N.mlp.gate.weight``, experts
    ``model.layers.N.mlp.experts.E.{gate_proj,up_proj,down_proj}.weight``. The experts are stacked
    per layer (``mlp.experts.gate_up_proj`` [E, 2I, H], ``mlp.experts.down_proj`` [E, H, I]); the
    slot of each checkpoint tensor is derived from its name by ``StackedExperts``' resolver
    (``diffulex_layers.moe``), which also skips the experts of other expert-parallel ranks.
    Layers listed in ``mlp_only_layers``, or not on the ``decoder_sparse_step`` grid, stay dense
    (``gate_proj``/``up_proj``/``down_proj`` as in SDAR).
    """

    diffulex_family = "sdar_moe"

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any]) -> TransformerConfig:
        """SDAR's keys plus ``num_experts`` (``num_local_experts`` in transformers 5),
        ``num_experts_per_tok``, ``moe_intermediate_size``, ``norm_topk_prob``,
        ``decoder_sparse_step`` and ``mlp_only_layers`` (Qwen3-MoE's names)."""
        dense = super().resolve_config(cfg)
        get = partial(config_value, cfg)
        experts = get("num_experts", get("num_local_experts", 8))  # transformers 5 writes num_local_experts
        step = get("decoder_sparse_step", 1)
        only_dense = set(get("mlp_only_layers", []))
        if step < 1:
            raise ValueError(f"decoder_sparse_step = {step!r}: expected a positive integer")
        sparse = frozenset(i for i in range(dense.layers)
                           if i not in only_dense and experts > 0 and (i + 1) % step == 0)
        moe = MoeConfig(experts=experts, top_k=get("num_experts_per_tok", 2), inter=get("moe_intermediate_size", 32),
                        norm_topk_prob=bool(get("norm_topk_prob", False)), sparse_layers=sparse)
        return replace(dense, moe=moe)


def build_sdar_moe(config: Mapping[str, Any] | None = None) -> SDARMoeForDiffusionLM:
    """Factory registered as family ``sdar_moe``; honours the current default device (e.g. meta)."""
    return SDARMoeForDiffusionLM(config)


def build_sdar(config: Mapping[str, Any] | None = None) -> SDARForDiffusionLM:
    """Factory registered as family ``sdar``; honours the current default device (e.g. meta)."""
    return SDARForDiffusionLM(config)


def to_hf_state_dict(model: SDARForDiffusionLM) -> dict[str, torch.Tensor]:
    """The model's weights under real SDAR (Qwen3) checkpoint names (packed tensors split)."""
    return hf_state_dict(model)
