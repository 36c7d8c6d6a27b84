"""The fast path: runs of tensors in one ``preadv``, casts in bounded chunks, declared destinations."""

from __future__ import annotations

import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffulex_core.checkpoint import ResolvedWeight, WeightDestination
from diffulex_core.errors import LoadPlanError
from diffulex_core.io import reader
from diffulex_core.loader import load_checkpoint


def write(tmp_path, tensors):
    save_file(tensors, str(tmp_path / "model.safetensors"))
    return tmp_path


class Flat(nn.Module):
    def __init__(self, shapes: dict, dtype: torch.dtype, requires_grad: bool = False) -> None:
        super().__init__()
        for name, shape in shapes.items():
            self.register_parameter(name, nn.Parameter(torch.zeros(shape, dtype=dtype), requires_grad=requires_grad))


@pytest.fixture
def preadv_calls(monkeypatch):
    """Counts the system calls the reader makes (the real ``os.preadv`` still does the reading)."""
    calls = []
    real = os.preadv

    def counting(fd, buffers, offset):
        calls.append(len(buffers))
        return real(fd, buffers, offset)

    monkeypatch.setattr(reader.os, "preadv", counting)
    return calls


def test_a_run_of_small_tensors_costs_one_call_per_iov_max_buffers(tmp_path, preadv_calls):
    torch.manual_seed(0)
    tensors = {f"t{i:04d}": torch.randn(3) for i in range(2500)}
    model = Flat({name: (3,) for name in tensors}, torch.float32)
    load_checkpoint(model, write(tmp_path, tensors), threads=1)
    assert all(torch.equal(getattr(model, name), value) for name, value in tensors.items())
    data_calls = [n for n in preadv_calls if n > 1]
    assert sum(data_calls) == 2500 and max(data_calls) <= reader.IOV_MAX
    assert len(data_calls) == -(-2500 // reader.IOV_MAX)  # 3 calls for 2,500 tensors (IOV_MAX 1024)


def test_skipped_tensors_between_are_read_into_scratch_not_split_on(tmp_path, preadv_calls):
    tensors = {f"t{i:03d}": torch.full((4,), float(i)) for i in range(100)}

    class Skipping(Flat):
        def resolve_checkpoint_weight(self, suffix, ctx):
            return ResolvedWeight(skip=True, reason="odd") if int(suffix[1:]) % 2 else None

    model = Skipping({name: (4,) for i, name in enumerate(tensors) if i % 2 == 0}, torch.float32)
    report = load_checkpoint(model, write(tmp_path, tensors), threads=1)
    assert all(torch.equal(getattr(model, f"t{i:03d}"), torch.full((4,), float(i))) for i in range(0, 100, 2))
    assert [n for n in preadv_calls if n > 1] == [99]  # 50 tensors and the 49 gaps between them, one call
    assert report.bytes_read == 50 * 16


@pytest.mark.parametrize("threads", [1, 3])
def test_casts_are_exact_and_bounded(tmp_path, monkeypatch, threads):
    monkeypatch.setattr(reader, "CAST_CHUNK_BYTES", 1000)  # many chunks per tensor,
    monkeypatch.setattr(reader, "TASK_BYTES", 4000)  # spread over threads
    torch.manual_seed(1)
    tensors = {"big": torch.randn(3001, 7).bfloat16(), "odd": torch.randn(333).bfloat16(),
               "empty": torch.zeros(0).bfloat16()}
    model = Flat({name: t.shape for name, t in tensors.items()}, torch.float32, requires_grad=True)  # as nn.Linear
    report = load_checkpoint(model, write(tmp_path, tensors), threads=threads)  # casts run on reader threads
    for name, value in tensors.items():
        assert torch.equal(getattr(model, name), value.float()), name
    assert report.bytes_read == sum(t.numel() * 2 for t in tensors.values())


class Declared(nn.Module):
    """A packed parameter that declares where each shard lands (rows ``2*s .. 2*s+2`` of ``w``,
    from rows 1..3 of the checkpoint tensor), and counts its weight_loader calls."""

    def __init__(self, dtype=torch.float32, declare=None) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(6, 5, dtype=dtype), requires_grad=False)
        self.w.weight_destination = declare or self.destination
        self.w.weight_loader = self.load
        self.loader_calls = 0

    def destination(self, param, loaded_shape, shard_id):
        if tuple(loaded_shape) != (4, 5):
            raise ValueError(f"expected (4, 5), got {tuple(loaded_shape)}")
        return WeightDestination(param.data.narrow(0, 2 * shard_id, 2), ((0, 1, 2),))

    def load(self, param, loaded, shard_id):
        self.loader_calls += 1
        self.destination(param, loaded.shape, shard_id).apply(loaded)

    def resolve_checkpoint_weight(self, suffix, ctx):
        return ResolvedWeight(param=self.w, shard_id=int(suffix[1:]))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_declared_destinations_are_read_without_calling_code(tmp_path, dtype):
    torch.manual_seed(2)
    tensors = {f"s{i}": torch.randn(4, 5).to(torch.bfloat16) for i in range(3)}
    model = Declared(dtype)
    load_checkpoint(model, write(tmp_path, tensors))
    expected = torch.cat([tensors[f"s{i}"][1:3] for i in range(3)]).to(dtype)
    assert torch.equal(model.w, expected) and model.loader_calls == 0


def test_a_declaration_that_does_not_fit_is_a_plan_problem_naming_the_parameter(tmp_path):
    model = Declared()
    with pytest.raises(LoadPlanError, match=r"weight_destination of param 'w' \(shard 1\) raised ValueError: expected"):
        load_checkpoint(model, write(tmp_path, {"s1": torch.ones(3, 5)}))
    bad = Declared(declare=lambda param, shape, shard: WeightDestination(param.data.narrow(0, 0, 2), ((0, 3, 2),)))
    with pytest.raises(LoadPlanError, match=r"narrows \(0, 3, 2\) outside shape \[4, 5\]"):
        load_checkpoint(bad, write(tmp_path, {"s1": torch.ones(4, 5)}))
    assert not model.w.any() and not bad.w.any()


def test_a_declaration_into_scattered_memory_falls_back_to_the_weight_loader(tmp_path):
    columns = Declared(
        declare=lambda param, shape, shard: WeightDestination(param.data.narrow(1, 0, 4).narrow(0, 0, 4)))
    tensors = {"s0": torch.arange(20.0).reshape(4, 5).narrow(1, 0, 4).contiguous()}
    columns.load = lambda param, loaded, shard_id: param.data.narrow(1, 0, 4).narrow(0, 0, 4).copy_(loaded)
    columns.w.weight_loader = columns.load
    load_checkpoint(columns, write(tmp_path, tensors))
    assert torch.equal(columns.w[:4, :4], tensors["s0"]) and not columns.w[4:].any()
