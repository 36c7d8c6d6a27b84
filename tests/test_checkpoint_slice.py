"""Slice reads and parallel state in one process: what a rank reads, and how it is told its place."""

from __future__ import annotations

import itertools

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffulex_core.checkpoint import LoadContext, ResolvedWeight
from diffulex_core.checkpoint_slice import CheckpointSlice, takes_checkpoint_slices
from diffulex_core.errors import LoadPlanError, ParallelConfigError
from diffulex_core.files.handles import OpenFiles
from diffulex_core.files.headers import read_records
from diffulex_core.io.slices import ByteMeter
from diffulex_core.loader import load_checkpoint, plan_checkpoint
from diffulex_core.parallel import ParallelState, current_parallel_state, parallel_state, use_parallel_state


@pytest.fixture
def tensors():
    torch.manual_seed(0)
    return {
        "matrix": torch.randn(6, 10),
        "cube": torch.arange(2 * 3 * 4 * 5, dtype=torch.int32).reshape(2, 3, 4, 5),
        "vector": torch.randn(7).bfloat16(),
    }


@pytest.fixture
def views(tmp_path, tensors):
    path = tmp_path / "model.safetensors"
    save_file(tensors, str(path))
    with OpenFiles() as files:
        fd = files.open(path)
        meter = ByteMeter()
        yield {r.name: CheckpointSlice(r, fd, meter) for r in read_records(path, fd)}, meter


def test_every_narrow_reads_what_torch_narrow_gives_and_only_those_bytes(views, tensors):
    found, meter = views
    for name, tensor in tensors.items():
        view = found[name]
        for dim in range(tensor.ndim):
            for start, length in itertools.combinations_with_replacement(range(tensor.shape[dim] + 1), 2):
                length -= start
                expected = tensor.narrow(dim, start, length)
                narrowed = view.narrow(dim, start, length)
                before = meter.bytes
                assert torch.equal(narrowed.to_tensor(), expected)
                assert meter.bytes - before == expected.numel() * expected.element_size()
                inner = narrowed.narrow(-1, 1, tensor.shape[-1] - 2) if dim != tensor.ndim - 1 else narrowed
                inner_expected = expected.narrow(-1, 1, tensor.shape[-1] - 2) if dim != tensor.ndim - 1 else expected
                assert torch.equal(inner.to_tensor(), inner_expected)


def test_copy_reads_into_the_destination_casting_where_needed(views, tensors):
    found, _ = views
    rows = found["matrix"].narrow(0, 2, 3)
    into = torch.zeros(3, 10)
    assert into.copy_(rows) is into and torch.equal(into, tensors["matrix"][2:5])
    wider = torch.zeros(6, 5, dtype=torch.float64)
    wider.copy_(found["matrix"].narrow(1, 5, 5))  # columns, cast
    assert torch.equal(wider, tensors["matrix"][:, 5:].double())
    assert torch.equal(torch.add(rows, 1), tensors["matrix"][2:5] + 1)  # anything else reads it whole first


def test_a_slice_is_never_broadcast_and_bad_narrows_name_the_tensor(views):
    found, _ = views
    with pytest.raises(ValueError, match=r"'matrix'.*\[1, 10\].*\[3, 10\]"):
        torch.zeros(3, 10).copy_(found["matrix"].narrow(0, 0, 1))
    with pytest.raises(IndexError, match="'matrix'.*outside its size 6"):
        found["matrix"].narrow(0, 4, 3)
    with pytest.raises(IndexError, match="dimension 2 out of range"):
        found["matrix"].narrow(2, 0, 1)


class HalfRows(nn.Module):
    """A stand-in for a tensor-parallel layer: keeps the rows of 'rank' ``rank`` of 2."""

    def __init__(self, rank: int, marked: bool = True) -> None:
        super().__init__()
        self.rank = rank
        self.weight = nn.Parameter(torch.zeros(3, 10), requires_grad=False)
        self.weight.weight_loader = takes_checkpoint_slices(self.load) if marked else self.load_tensor
        self.seen: list[type] = []

    def load(self, param, loaded_weight):
        self.seen.append(type(loaded_weight))
        if loaded_weight.shape[0] != 6:
            raise ValueError(f"expected 6 rows, got {loaded_weight.shape[0]}")
        param.data.copy_(loaded_weight.narrow(0, 3 * self.rank, 3))

    def load_tensor(self, param, loaded_weight):
        self.seen.append(type(loaded_weight))
        param.data.copy_(loaded_weight[3 * self.rank:3 * self.rank + 3])


@pytest.mark.parametrize("rank", [0, 1])
def test_a_marked_weight_loader_reads_only_its_rows(tmp_path, tensors, rank):
    save_file({"weight": tensors["matrix"]}, str(tmp_path / "model.safetensors"))
    layer = HalfRows(rank)
    report = load_checkpoint(layer, tmp_path)
    assert torch.equal(layer.weight, tensors["matrix"][3 * rank:3 * rank + 3])
    assert layer.seen == [CheckpointSlice, CheckpointSlice]  # the plan's dry run, then the load
    assert report.bytes_total == 6 * 10 * 4 and report.bytes_read == 3 * 10 * 4


def test_an_unmarked_weight_loader_gets_a_plain_tensor(tmp_path, tensors):
    save_file({"weight": tensors["matrix"]}, str(tmp_path / "model.safetensors"))
    layer = HalfRows(1, marked=False)
    report = load_checkpoint(layer, tmp_path)
    assert torch.Tensor in layer.seen and CheckpointSlice not in layer.seen
    assert torch.equal(layer.weight, tensors["matrix"][3:]) and report.bytes_read == 6 * 10 * 4


def test_a_marked_loader_s_shape_check_runs_in_the_plan(tmp_path):
    save_file({"weight": torch.ones(4, 10)}, str(tmp_path / "model.safetensors"))
    layer = HalfRows(0)
    with pytest.raises(LoadPlanError, match="expected 6 rows, got 4"):
        load_checkpoint(layer, tmp_path)
    assert torch.equal(layer.weight, torch.zeros(3, 10))


def test_single_process_state_and_installed_state():
    assert current_parallel_state() == ParallelState() == parallel_state()
    assert not ParallelState().distributed
    with pytest.raises(ParallelConfigError, match="tp_rank=2 and tp_size=2"):
        ParallelState(tp_rank=2, tp_size=2, tp_group=object())
    with pytest.raises(ParallelConfigError, match="ep_size=2 needs a torch.distributed process group"):
        ParallelState(ep_rank=1, ep_size=2)
    with pytest.raises(ParallelConfigError, match="not initialised"):
        parallel_state(tp_group=object())
    installed = ParallelState(tp_rank=1, tp_size=2, tp_group="group", ep_rank=0, ep_size=1)
    with use_parallel_state(installed):
        assert current_parallel_state() is installed
    assert current_parallel_state() == ParallelState()


def test_resolvers_see_the_rank_in_their_load_context(tmp_path):
    seen: list[LoadContext] = []

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.weight = nn.Parameter(torch.zeros(2))

        def resolve_checkpoint_weight(self, suffix, ctx):
            seen.append(ctx)
            return ResolvedWeight(param="weight")

    save_file({"weight": torch.ones(2)}, str(tmp_path / "model.safetensors"))
    state = ParallelState(tp_rank=1, tp_size=4, tp_group="tp", ep_rank=0, ep_size=2, ep_group="ep")
    plan = plan_checkpoint(Model(), tmp_path, parallel=state)  # planning runs no collective
    assert (seen[0].tp_rank, seen[0].tp_size, seen[0].ep_rank, seen[0].ep_size) == (1, 4, 0, 2)
    assert plan.report.parallel == {"tp_rank": 1, "tp_size": 4, "ep_rank": 0, "ep_size": 2}
    assert "tp rank 1/4, ep rank 0/2" in plan.report.summary()
