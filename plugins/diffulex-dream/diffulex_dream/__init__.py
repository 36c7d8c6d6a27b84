"""diffulex plugin for the Dream family.

Cheap to import on purpose: no torch here. The model lives in ``diffulex_dream.model`` and is
imported by diffulex-core only when a ``dream`` model is built (lazy "module:attr" factory).
"""

from diffulex_core.plugin_api import FamilyExample, hookimpl

FAMILY = "dream"
FACTORY = "diffulex_dream.model:build_dream"


@hookimpl
def diffulex_register_families(register):
    register(FAMILY, FACTORY)


@hookimpl
def diffulex_family_examples():
    """A tiny Dream config for ``diffulex check dream``, exported with real Dream (Qwen2) checkpoint names."""
    from diffulex_dream.model import to_hf_state_dict

    config = {"hidden_size": 32, "num_attention_heads": 4, "num_key_value_heads": 2, "num_hidden_layers": 2,
              "intermediate_size": 64, "vocab_size": 64, "max_position_embeddings": 64, "tie_word_embeddings": False}
    return {FAMILY: FamilyExample(config, to_checkpoint=to_hf_state_dict)}


__all__ = ["FACTORY", "FAMILY", "diffulex_family_examples", "diffulex_register_families"]
