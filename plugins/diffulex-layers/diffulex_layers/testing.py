"""Test helpers for family plugins: a reference of the core loader's checkpoint-name rewrite."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch
from torch import nn

__all__ = ["check_gated_mlp", "check_round_trip", "load_hf", "seeded", "to_param_name"]


def to_param_name(hf_name: str, mapping: Mapping[str, tuple]) -> tuple[str, Any]:
    """Checkpoint name -> (parameter name, shard id): whole segments, longest key first."""
    keys = sorted(mapping, key=lambda k: -k.count("."))
    parts, out, shard, i = hf_name.split("."), [], None, 0
    while i < len(parts):
        for key in keys:
            n = key.count(".") + 1
            if parts[i : i + n] == key.split("."):
                dst, sid = mapping[key]
                out.append(dst)
                shard = sid if sid is not None else shard
                i += n
                break
        else:
            out.append(parts[i])
            i += 1
    return ".".join(out), shard


def load_hf(model: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> set[str]:
    """Load checkpoint-named tensors through the mapping and weight loaders; the names filled."""
    params = dict(model.named_parameters())
    loaded = set()
    for hf_name, tensor in state_dict.items():
        name, shard = to_param_name(hf_name, model.packed_modules_mapping)
        param = params[name]
        if shard is None:
            assert param.shape == tensor.shape, hf_name
            param.data.copy_(tensor)
        else:
            param.weight_loader(param, tensor, shard)
        loaded.add(name)
    return loaded


def seeded(build: Callable[..., nn.Module], config: Any, seed: int) -> nn.Module:
    """``build(config)`` after seeding, every parameter random (norms start at 1, biases at 0)."""
    torch.manual_seed(seed)
    model = build(config)
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0, 0.5)
    return model


def check_gated_mlp(mlp: nn.Module, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> None:
    """``mlp`` computes ``down(silu(gate(x)) * up(x))`` with these (bias-free) checkpoint weights."""
    x = torch.randn(3, gate.shape[1])
    expected = (torch.nn.functional.silu(x @ gate.T) * (x @ up.T)) @ down.T
    torch.testing.assert_close(mlp(x), expected)


def check_round_trip(source: nn.Module, target: nn.Module, state_dict: Mapping[str, torch.Tensor]) -> None:
    """Loading ``state_dict`` (taken from ``source``) fills every parameter of ``target`` and makes
    it ``source`` again, bit for bit."""
    assert all(t.is_contiguous() for t in state_dict.values())
    assert load_hf(target, state_dict) == set(dict(target.named_parameters()))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(target(ids), source(ids), rtol=0, atol=0)
