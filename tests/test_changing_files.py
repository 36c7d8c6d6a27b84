"""Files that change between plan and apply: the apply step reads the bytes the plan described.

The checkpoint is changed from inside the plan (a module resolver runs after every header was
read and before anything is applied), which is exactly the window a concurrent writer hits.
"""

from __future__ import annotations

import errno
import os

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffulex_core.errors import CheckpointFormatError, LoadApplyError
from diffulex_core.io import reader
from diffulex_core.loader import load_checkpoint

ORIGINAL = {"a.weight": torch.arange(12.0).view(3, 4), "b.weight": torch.full((4, 2), 7.0)}


class Net(nn.Module):
    """Two linears; ``during_plan`` runs when the plan asks about the first tensor."""

    def __init__(self, during_plan=None):
        super().__init__()
        self.a = nn.Linear(4, 3, bias=False)
        self.b = nn.Linear(2, 4, bias=False)
        self.during_plan = during_plan

    def resolve_checkpoint_weight(self, suffix, ctx):
        if suffix == "a.weight" and self.during_plan is not None:
            self.during_plan(ctx.checkpoint)
            self.during_plan = None
        return None


def checkpoint(tmp_path):
    save_file({k: v.clone() for k, v in ORIGINAL.items()}, str(tmp_path / "model.safetensors"))
    return tmp_path


def filled(during_plan=None, meta=False):
    if meta:
        with torch.device("meta"):
            return Net(during_plan)
    model = Net(during_plan)
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(-1.0)
    return model


def test_a_file_replaced_after_planning_is_still_read_as_planned(tmp_path):
    path = checkpoint(tmp_path)

    def replace(ckpt):
        other = tmp_path / "other.safetensors"  # same tensors, other values, behind a longer header
        save_file({k: torch.zeros_like(v) for k, v in ORIGINAL.items()}, str(other), metadata={"pad": "x" * 999})
        os.replace(other, tmp_path / "model.safetensors")

    model = filled(replace)
    report = load_checkpoint(model, path)
    assert report.ok
    assert torch.equal(model.a.weight, ORIGINAL["a.weight"]) and torch.equal(model.b.weight, ORIGINAL["b.weight"])


def test_a_file_deleted_after_planning_is_still_read_as_planned(tmp_path):
    path = checkpoint(tmp_path)
    model = filled(lambda ckpt: os.unlink(tmp_path / "model.safetensors"))
    load_checkpoint(model, path)
    assert torch.equal(model.a.weight, ORIGINAL["a.weight"])


def test_a_file_truncated_in_place_after_planning_is_refused_before_writing(tmp_path):
    path = checkpoint(tmp_path)
    model = filled(lambda ckpt: os.truncate(tmp_path / "model.safetensors", 100))
    with pytest.raises(CheckpointFormatError, match=r"model.safetensors changed after it was planned .*nothing was "
                                                    r"loaded"):
        load_checkpoint(model, path)
    assert all(torch.equal(p, torch.full_like(p, -1.0)) for p in model.parameters())


@pytest.mark.parametrize("meta", [False, True], ids=["materialized", "meta-built"])
def test_an_io_error_while_reading_names_file_and_tensor(tmp_path, monkeypatch, meta):
    path = checkpoint(tmp_path)

    def failing_preadv(fd, buffers, offset):
        raise OSError(errno.EIO, os.strerror(errno.EIO))

    monkeypatch.setattr(reader.os, "preadv", failing_preadv)  # the disk, not the code under test
    model = filled(meta=meta)
    with pytest.raises(LoadApplyError, match=r"model.safetensors: tensors? .*'a.weight'.*reading failed "
                                             r"\(Input/output error\)"):
        load_checkpoint(model, path, device="cpu" if meta else None)
    if meta:
        assert all(p.is_meta for p in model.parameters())  # a failed load leaves it where it was
