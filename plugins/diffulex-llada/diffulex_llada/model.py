"""LLaDA (masked-diffusion LM) with engine-style parameter names, for diffulex-core.

Checkpoint names -> parameter names (``LLaDAForDiffusionLM.packed_modules_mapping``):
LLaDA checkpoints are named ``model.transformer.wte.weight``,
``model.transformer.blocks.N.{q_proj,k_proj,v_proj,attn_out,ff_proj,up_proj,ff_out,
attn_norm,ff_norm}.weight``, ``model.transformer.ln_f.weight`` and
``model.transformer.ff_out.weight`` (the LM head). ``ff_proj`` is the GATE, ``up_proj`` the UP.
The core loader rewrites a checkpoint name by replacing whole dotted segments (a key never
matches part of a segment) and, where keys overlap, the most specific (longest) key wins:
``model.transformer.ff_out.weight`` -> ``lm_head.weight``, while
``model.transformer.blocks.N.ff_out.weight`` -> ``model.layers.N.mlp.down_proj.weight``.
A shard id (``"q"``/``"k"``/``"v"``, ``0``/``1``) says which rows of the packed parameter the
tensor fills, through that parameter's ``weight_loader(param, loaded_weight, shard_id)``.
The torch layers are shared with the other bundled families (``diffulex_layers``).
"""

from __future__ import annotations

from collections.abc import Mapping
from functools import partial
from typing import Any

import torch

from diffulex_layers import DiffusionLM, PackedLinear, TransformerConfig, config_value, hf_state_dict
from diffulex_layers.rope import rope_parameters

__all__ = ["LLaDAForDiffusionLM", "PackedLinear", "build_llada", "to_hf_state_dict"]


class LLaDAForDiffusionLM(DiffusionLM):
    diffulex_family = "llada"
    packed_modules_mapping = {
        "transformer.wte": ("embed_tokens", None),
        "transformer.blocks": ("layers", None),
        "q_proj": ("self_attn.qkv_proj", "q"),
        "k_proj": ("self_attn.qkv_proj", "k"),
        "v_proj": ("self_attn.qkv_proj", "v"),
        "attn_out": ("self_attn.o_proj", None),
        "ff_proj": ("mlp.gate_up_proj", 0),
        "up_proj": ("mlp.gate_up_proj", 1),
        "ff_out": ("mlp.down_proj", None),
        "attn_norm": ("input_layernorm", None),
        "ff_norm": ("post_attention_layernorm", None),
        "transformer.ln_f": ("norm", None),
        "model.transformer.ff_out": ("lm_head", None),
    }

    @classmethod
    def resolve_config(cls, cfg: Mapping[str, Any]) -> TransformerConfig:
        """LLaDA config.json keys -> sizes; missing keys get small test defaults."""
        get = partial(config_value, cfg)
        hidden, heads = get("d_model", 64), get("n_heads", 4)
        # Missing n_kv_heads -> 2 (small GQA default); explicit null means "same as n_heads" (as in LLaDA).
        kv_heads = cfg.get("n_kv_heads", 2) or heads
        if hidden % heads or heads % kv_heads:
            raise ValueError(f"d_model={hidden}, n_heads={heads}, n_kv_heads={kv_heads} do not divide")
        bias = bool(get("include_bias", False))
        rope = rope_parameters(cfg)  # rope_theta, and rope scaling in transformers 4 or 5 form
        return TransformerConfig(
            hidden=hidden, heads=heads, kv_heads=kv_heads, head_dim=hidden // heads,
            layers=get("n_layers", 2), inter=get("mlp_hidden_size", get("mlp_ratio", 2) * hidden),
            vocab=get("embedding_size", get("vocab_size", 256)), eps=get("rms_norm_eps", 1e-5),
            qkv_bias=bias or bool(get("include_qkv_bias", False)), o_bias=bias, mlp_bias=bias,
            tie=bool(get("weight_tying", False)), rope_theta=rope.theta, rope=rope,
            max_positions=get("max_sequence_length", 2048),
        )  # fmt: skip


def build_llada(config: Mapping[str, Any] | None = None) -> LLaDAForDiffusionLM:
    """Factory registered as family ``llada``; honours the current default device (e.g. meta)."""
    return LLaDAForDiffusionLM(config)


def to_hf_state_dict(model: LLaDAForDiffusionLM) -> dict[str, torch.Tensor]:
    """The model's weights under real LLaDA checkpoint names (packed tensors split).

    ``lm_head.weight`` becomes ``model.transformer.ff_out.weight``; with ``weight_tying`` it is
    left out (the checkpoint has only ``model.transformer.wte.weight``).
    """
    return hf_state_dict(model)
