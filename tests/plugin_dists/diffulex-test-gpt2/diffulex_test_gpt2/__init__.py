"""Registers ``toygpt2`` and its small example config; no torch here, so discovery stays cheap."""

from diffulex_core import hookimpl


@hookimpl
def diffulex_register_families(register):
    register("toygpt2", "diffulex_test_gpt2.model:ToyGPT2")


@hookimpl
def diffulex_family_examples():
    from diffulex_core.conformance import FamilyExample

    from .model import to_checkpoint

    return {"toygpt2": FamilyExample({"n_embd": 16, "n_layer": 2, "n_positions": 32, "vocab_size": 64},
                                     to_checkpoint=to_checkpoint)}
