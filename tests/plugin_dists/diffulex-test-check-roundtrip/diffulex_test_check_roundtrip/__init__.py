"""Families whose checkpoint round trip ``diffulex check`` must fail, beside one that passes.

``rt-good``: a tiny LM with a packed k/v projection, exported under checkpoint names
(``k_proj.weight``, ``v_proj.weight``) that its ``packed_modules_mapping`` packs back.
``rt-missing``: its export leaves ``final_scale`` out. ``rt-extra``: its export adds a tensor
nothing takes. ``rt-swapped``: its mapping sends ``k_proj`` into the ``v`` rows and ``v_proj``
into the ``k`` rows (same shapes: the plan is clean, the weights are not).
"""

from diffulex_core import hookimpl


@hookimpl
def diffulex_register_families(register):
    register("rt-good", "diffulex_test_check_roundtrip.model:build_good")
    register("rt-missing", "diffulex_test_check_roundtrip.model:build_good")
    register("rt-extra", "diffulex_test_check_roundtrip.model:build_good")
    register("rt-swapped", "diffulex_test_check_roundtrip.model:build_swapped")


@hookimpl
def diffulex_family_examples():
    import torch

    from diffulex_core.conformance import FamilyExample

    from .model import to_checkpoint, to_checkpoint_extra, to_checkpoint_missing

    config = {"vocab_size": 32, "hidden_size": 8}
    return {
        "rt-good": FamilyExample(config, to_checkpoint, inputs=lambda model: (torch.tensor([[1, 2, 3, 31]]),)),
        "rt-missing": FamilyExample(config, to_checkpoint_missing),
        "rt-extra": FamilyExample(config, to_checkpoint_extra),
        "rt-swapped": FamilyExample(config, to_checkpoint),
    }
