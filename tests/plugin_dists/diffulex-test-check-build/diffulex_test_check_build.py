"""Factories ``diffulex check`` must fail, each for its own reason, and examples for families this
plugin does not own."""

from diffulex_core import hookimpl


def build_item(config=None):
    import torch

    model = torch.nn.Linear(4, 4)
    model.scale = float(model.weight.detach().abs().max())  # reads a value: impossible on the meta device
    return model


def build_cpu(config=None):
    import torch

    return torch.nn.Linear(4, 4, device="cpu")  # ignores the default device an engine builds on


def build_not_module(config=None):
    return {"weight": None}


@hookimpl
def diffulex_register_families(register):
    register("build-item", build_item)
    register("build-cpu", build_cpu)
    register("build-not-module", build_not_module)
    register("build-ghost", "diffulex_test_check_build_no_such_module:build")


@hookimpl
def diffulex_family_examples():
    return {
        "build-item": {}, "build-cpu": {}, "build-not-module": {}, "build-ghost": {},
        "llada": {"d_model": 8},  # registered by the llada plugin, not this one
        "build-nonexistent": {},  # registered by nobody
    }
