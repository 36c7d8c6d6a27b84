"""Registers ``seedstyle_moe``; no torch here, so discovery stays cheap."""

from diffulex_core import hookimpl


@hookimpl
def diffulex_register_families(register):
    register("seedstyle_moe", "diffulex_test_seedstyle.model:Qwen3MoeForDiffusion")


@hookimpl
def diffulex_ignored_checkpoint_keys(model):
    # Old checkpoints carry the rotary table; this family computes it.
    return ["*.rotary_emb.inv_freq"] if getattr(model, "seedstyle", False) else None
