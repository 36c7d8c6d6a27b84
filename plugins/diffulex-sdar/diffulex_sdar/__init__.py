"""diffulex plugin for the SDAR families: ``sdar`` (dense) and ``sdar_moe`` (mixture of experts).

Cheap to import on purpose: no torch here. The model lives in ``diffulex_sdar.model`` and is
imported by diffulex-core only when a model is built (lazy "module:attr" factories).
"""

from diffulex_core.plugin_api import FamilyExample, hookimpl

FAMILY = "sdar"
FACTORY = "diffulex_sdar.model:build_sdar"
MOE_FAMILY = "sdar_moe"
MOE_FACTORY = "diffulex_sdar.model:build_sdar_moe"


@hookimpl
def diffulex_register_families(register):
    register(FAMILY, FACTORY)
    register(MOE_FAMILY, MOE_FACTORY)


@hookimpl
def diffulex_family_examples():
    """Tiny SDAR and SDAR-MoE configs for ``diffulex check sdar``, exported with real Qwen3(-MoE) names.

    Block-causal attention (``block_size`` 4 over the check's 8 tokens); the MoE example keeps layer 0
    dense (``mlp_only_layers``) so both kinds of MLP are loaded and compared.
    """
    from diffulex_sdar.model import to_hf_state_dict

    dense = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "head_dim": 8,
             "num_hidden_layers": 2, "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 64,
             "tie_word_embeddings": False, "block_size": 4}
    moe = {**dense, "num_experts": 4, "num_experts_per_tok": 2, "moe_intermediate_size": 16,
           "norm_topk_prob": True, "decoder_sparse_step": 1, "mlp_only_layers": [0]}
    return {FAMILY: FamilyExample(dense, to_checkpoint=to_hf_state_dict),
            MOE_FAMILY: FamilyExample(moe, to_checkpoint=to_hf_state_dict)}


__all__ = ["FACTORY", "FAMILY", "MOE_FACTORY", "MOE_FAMILY", "diffulex_family_examples", "diffulex_register_families"]
