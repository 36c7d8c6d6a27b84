"""Model code that still imports ``ResolvedWeight``/``LoadContext`` from Diffulex (installed beside
us): its answers are converted, and the report says so; a class that cannot be converted is a
``WeightSpecError`` naming its module and the import to change.

Diffulex is stood in for by a package ``diffulex.utils.checkpoint`` written into a temporary
directory with Diffulex's own value objects (the text of Diffulex 184ba97).
"""

from __future__ import annotations

import sys
import textwrap

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffulex_core import hookimpl
from diffulex_core.checkpoint import ResolvedWeight
from diffulex_core.errors import WeightSpecError
from diffulex_core.loader import apply_resolved_weight, load_checkpoint, plan_checkpoint, resolve_weight_spec
from diffulex_core.testing import isolated_plugins

DIFFULEX_CHECKPOINT = '''
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch
import torch.nn as nn


@dataclass(frozen=True)
class LoadContext:
    config: Any
    full_name: str


@dataclass(frozen=True)
class ResolvedWeight:
    param: nn.Parameter | None = None
    buffer: torch.Tensor | None = None
    shard_id: int | str | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    loader: Callable[[torch.Tensor], None] | None = None
    skip: bool = False


__all__ = [
    "LoadContext",
    "ResolvedWeight",
]
'''

# Another class named ResolvedWeight, with a field ours does not have: it cannot be converted.
OTHER_WEIGHTS = '''
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class ResolvedWeight:
    param: Any = None
    device: str = "cpu"
'''

CONVERTED = ("converted from diffulex.utils.checkpoint.ResolvedWeight; "
             "import ResolvedWeight from diffulex_core.checkpoint instead")


@pytest.fixture
def diffulex(tmp_path, monkeypatch):
    """``diffulex.utils.checkpoint`` (Diffulex's value objects) and ``diffulex.engine.weights``, importable."""
    root = tmp_path / "site"
    for package in ("diffulex", "diffulex/utils", "diffulex/engine"):
        (root / package).mkdir(parents=True)
        (root / package / "__init__.py").write_text("")
    (root / "diffulex/utils/checkpoint.py").write_text(textwrap.dedent(DIFFULEX_CHECKPOINT))
    (root / "diffulex/engine/weights.py").write_text(textwrap.dedent(OTHER_WEIGHTS))
    monkeypatch.syspath_prepend(str(root))
    import diffulex.engine.weights
    import diffulex.utils.checkpoint

    yield diffulex.utils.checkpoint, diffulex.engine.weights
    for name in [n for n in sys.modules if n == "diffulex" or n.startswith("diffulex.")]:
        del sys.modules[name]


class SeedFamily(nn.Module):
    """Resolves as a Diffulex family does (objects, a one-argument loader, skip), with Diffulex's class."""

    def __init__(self, value_class):
        super().__init__()
        self.proj = nn.Linear(2, 2, bias=False)
        self.norm = nn.Linear(2, 2, bias=False)
        self.value_class = value_class

    def resolve_checkpoint_weight(self, suffix, ctx):
        if suffix == "legacy.weight":
            return self.value_class(param=self.proj.weight)
        if suffix == "norm_legacy.weight":
            return self.value_class(loader=lambda tensor: self.norm.weight.data.copy_(tensor * 2))
        if suffix == "rotary.inv_freq":
            return self.value_class(skip=True)
        return None


def write(tmp_path, names):
    tensors = {name: torch.full((2, 2), float(i + 1)) for i, name in enumerate(names)}
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path, tensors


def test_diffulex_resolved_weight_from_a_module_resolver_is_converted_and_noted(diffulex, tmp_path):
    theirs, _ = diffulex
    model = SeedFamily(theirs.ResolvedWeight)
    path, tensors = write(tmp_path, ["legacy.weight", "norm_legacy.weight", "rotary.inv_freq"])
    report = load_checkpoint(model, path)
    got = {p.name: (p.kind, p.target, p.rule, p.note) for p in report.placements}
    assert got == {
        "legacy.weight": ("param", "proj.weight", "module:<root>", CONVERTED),
        "norm_legacy.weight": ("loader", None, "module:<root>", CONVERTED),
        "rotary.inv_freq": ("skip", None, "module:<root>", f"skipped by module:<root> (no reason given); {CONVERTED}"),
    }
    assert torch.equal(model.proj.weight, tensors["legacy.weight"])
    assert torch.equal(model.norm.weight, tensors["norm_legacy.weight"] * 2)


def test_diffulex_resolved_weight_from_a_plugin_hook_is_converted_and_noted(diffulex, tmp_path):
    theirs, _ = diffulex

    class SeedPlugin:
        @hookimpl
        def diffulex_resolve_weight(self, model, name):
            return theirs.ResolvedWeight(param=model.proj.weight) if name == "from_plugin.weight" else None

    model = SeedFamily(theirs.ResolvedWeight)
    model.norm = None
    path, tensors = write(tmp_path, ["from_plugin.weight"])
    with isolated_plugins(seed=SeedPlugin()):
        report = load_checkpoint(model, path)
    [placement] = report.placements
    assert (placement.kind, placement.target, placement.rule, placement.note) == (
        "param", "proj.weight", "plugin:seed", CONVERTED)
    assert torch.equal(model.proj.weight, tensors["from_plugin.weight"])


def test_seed_helpers_take_diffulex_load_context_and_give_our_resolved_weight(diffulex):
    theirs, _ = diffulex
    model = SeedFamily(theirs.ResolvedWeight)
    spec = resolve_weight_spec(model, "legacy.weight", ctx=theirs.LoadContext({"k": 1}, "legacy.weight"))
    assert isinstance(spec, ResolvedWeight) and spec.param is model.proj.weight
    apply_resolved_weight(spec, torch.full((2, 2), 7.0))
    assert torch.equal(model.proj.weight, torch.full((2, 2), 7.0))


def test_a_class_with_other_fields_is_refused_naming_its_module_and_the_import_to_change(diffulex, tmp_path):
    _, other = diffulex
    path, _ = write(tmp_path, ["legacy.weight"])
    fix = ("that class has fields ours lacks: device, so it cannot be converted; import it from "
           "diffulex_core.checkpoint (`from diffulex_core.checkpoint import ResolvedWeight`), not from "
           "diffulex.engine.weights")
    with pytest.raises(WeightSpecError) as excinfo:
        plan_checkpoint(SeedFamily(other.ResolvedWeight), path)
    assert str(excinfo.value) == (f"resolve_checkpoint_weight of module '<root>' returned diffulex.engine.weights."
                                  f"ResolvedWeight for 'legacy.weight'; expected ResolvedWeight or None: {fix}")

    class OtherPlugin:
        @hookimpl
        def diffulex_resolve_weight(self, name):
            return other.ResolvedWeight(param="proj.weight")

    with isolated_plugins(other=OtherPlugin()), pytest.raises(WeightSpecError) as excinfo:
        plan_checkpoint(SeedFamily(None), path)
    assert str(excinfo.value) == (f"plugin 'other' (no distribution): diffulex_resolve_weight returned "
                                  f"diffulex.engine.weights.ResolvedWeight for 'legacy.weight'; expected "
                                  f"ResolvedWeight or None: {fix}")
