"""diffulex plugin for the LLaDA family.

Cheap to import on purpose: no torch here. The model lives in ``diffulex_llada.model`` and is
imported by diffulex-core only when a ``llada`` model is built (lazy "module:attr" factory).
"""

from diffulex_core.plugin_api import FamilyExample, hookimpl

FAMILY = "llada"
FACTORY = "diffulex_llada.model:build_llada"


@hookimpl
def diffulex_register_families(register):
    register(FAMILY, FACTORY)


@hookimpl
def diffulex_family_examples():
    """A tiny LLaDA config for ``diffulex check llada``, exported with real LLaDA checkpoint names."""
    from diffulex_llada.model import to_hf_state_dict

    config = {"d_model": 32, "n_heads": 4, "n_kv_heads": 2, "n_layers": 2, "mlp_hidden_size": 64,
              "vocab_size": 64, "max_sequence_length": 64, "weight_tying": False}
    return {FAMILY: FamilyExample(config, to_checkpoint=to_hf_state_dict)}


__all__ = ["FACTORY", "FAMILY", "diffulex_family_examples", "diffulex_register_families"]
