"""Things that are not regular files where a checkpoint file is expected (issue 9, item 2).

A FIFO, a directory, a character device, a dangling symlink, a symlink loop or a name too long
is refused with a typed ``LoadError`` naming the path: never a raw ``OSError``, never a hang
(a FIFO is never opened: opening one for reading waits for a writer). Symlinks that resolve to
regular files load, as in a Hugging Face cache snapshot.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from contextlib import contextmanager
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from diffulex_core.errors import CheckpointFormatError, CheckpointNotFoundError, LoadError
from diffulex_core.loader import load_checkpoint

INDEX = "model.safetensors.index.json"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="FIFOs, /dev/null and symlinks as on POSIX")
linux_only = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="Linux file-system behaviour")


class Net(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.a = nn.Parameter(torch.full((2, 3), 5.0))
        self.b = nn.Parameter(torch.full((3,), -1.0))


def tensors() -> dict[str, torch.Tensor]:
    return {"a": torch.arange(6.0).reshape(2, 3), "b": torch.ones(3)}


@contextmanager
def no_hang(seconds: int = 10):
    """Fail instead of waiting forever (an opened FIFO blocks until a writer comes)."""
    if not hasattr(signal, "SIGALRM"):
        yield
        return

    def expired(signum, frame):
        raise TimeoutError(f"the load hung for {seconds} s")

    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def expect(path, exc_type, *fragments) -> LoadError:
    """Load ``path``: exactly ``exc_type``, every fragment in the message, the model unchanged."""
    model = Net()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with no_hang(), pytest.raises(LoadError) as info:
        load_checkpoint(model, path)
    assert type(info.value) is exc_type, f"expected {exc_type.__name__}, got {type(info.value).__name__}: {info.value}"
    for fragment in fragments:
        assert fragment in str(info.value), f"{fragment!r} not in {info.value}"
    assert all(torch.equal(v, before[k]) for k, v in model.state_dict().items())
    return info.value


def write_sharded(root: Path) -> None:
    """a in shard 1, b in shard 2, and the index naming both."""
    root.mkdir(parents=True, exist_ok=True)
    t = tensors()
    save_file({"a": t["a"]}, str(root / "s1.safetensors"))
    save_file({"b": t["b"]}, str(root / "s2.safetensors"))
    (root / INDEX).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "s2.safetensors"}}))


# --------------------------------------------------------------------------- FIFOs: refused, never opened


@posix_only
def test_fifo_as_the_checkpoint_path(tmp_path):
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    expect(fifo, CheckpointFormatError, str(fifo), "FIFO", "not a file or a directory")


@posix_only
def test_fifo_named_like_a_file_in_the_directory(tmp_path):
    os.mkfifo(tmp_path / "model.safetensors")
    expect(tmp_path, CheckpointFormatError, "model.safetensors", "FIFO")


@posix_only
def test_fifo_as_a_shard_named_by_the_index(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    os.mkfifo(tmp_path / "s2.safetensors")
    expect(tmp_path, CheckpointFormatError, INDEX, "s2.safetensors", "FIFO")


@posix_only
def test_fifo_as_the_index(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / INDEX).unlink()
    os.mkfifo(tmp_path / INDEX)
    expect(tmp_path, CheckpointFormatError, INDEX, "FIFO")


# --------------------------------------------------------------------------- directories where files belong


def test_index_that_is_a_directory(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / INDEX).unlink()
    (tmp_path / INDEX).mkdir()
    expect(tmp_path, CheckpointFormatError, INDEX, "directory")


def test_shard_named_by_the_index_is_a_directory(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    (tmp_path / "s2.safetensors").mkdir()
    expect(tmp_path, CheckpointFormatError, "s2.safetensors", "directory")


def test_directory_named_like_a_safetensors_file(tmp_path):
    save_file(tensors(), str(tmp_path / "a.safetensors"))
    (tmp_path / "b.safetensors").mkdir()
    expect(tmp_path, CheckpointFormatError, "b.safetensors", "directory")


# --------------------------------------------------------------------------- devices, symlinks, long names


@linux_only
def test_dev_null_as_the_checkpoint_path():
    expect(Path("/dev/null"), CheckpointFormatError, "/dev/null", "character device")


@linux_only
def test_dev_null_as_a_shard(tmp_path):
    (tmp_path / "model.safetensors").symlink_to("/dev/null")
    expect(tmp_path, CheckpointFormatError, "model.safetensors", "character device")


@posix_only
def test_dangling_symlink_as_the_checkpoint_path(tmp_path):
    link = tmp_path / "model.safetensors"
    link.symlink_to(tmp_path / "gone.safetensors")
    error = expect(link, CheckpointNotFoundError, str(link), "dangling symlink", "gone.safetensors")
    assert isinstance(error, FileNotFoundError)


@posix_only
def test_dangling_symlink_in_the_directory(tmp_path):
    (tmp_path / "model.safetensors").symlink_to("gone.safetensors")
    expect(tmp_path, CheckpointNotFoundError, "model.safetensors", "dangling symlink")


@posix_only
def test_dangling_symlink_as_a_shard_named_by_the_index(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / "s2.safetensors").unlink()
    (tmp_path / "s2.safetensors").symlink_to("../blobs/gone")
    expect(tmp_path, CheckpointFormatError, INDEX, "s2.safetensors", "does not exist")


@posix_only
def test_symlink_loop_as_the_checkpoint_path(tmp_path):
    (tmp_path / "x.safetensors").symlink_to("y.safetensors")
    (tmp_path / "y.safetensors").symlink_to("x.safetensors")
    expect(tmp_path / "x.safetensors", CheckpointFormatError, "x.safetensors", "symlink loop")


@posix_only
def test_symlink_loop_in_the_directory(tmp_path):
    (tmp_path / "loop.safetensors").symlink_to("loop.safetensors")
    expect(tmp_path, CheckpointFormatError, "loop.safetensors", "symlink loop")


@posix_only
def test_name_too_long(tmp_path):
    long = tmp_path / ("m" * 300 + ".safetensors")
    error = expect(long, CheckpointNotFoundError, "too long")
    assert len(str(error)) < 1000


@posix_only
def test_index_names_a_file_whose_name_is_too_long(tmp_path):
    write_sharded(tmp_path)
    (tmp_path / INDEX).write_text(json.dumps({"weight_map": {"a": "s1.safetensors", "b": "n" * 300 + ".safetensors"}}))
    expect(tmp_path, CheckpointFormatError, INDEX, "too long")


# --------------------------------------------------------------------------- symlinks to regular files still load


@posix_only
def test_symlink_to_a_regular_file_loads(tmp_path):
    save_file(tensors(), str(tmp_path / "blob"))
    (tmp_path / "model.safetensors").symlink_to("blob")
    model = Net()
    assert load_checkpoint(model, tmp_path / "model.safetensors").ok
    assert torch.equal(model.a, tensors()["a"])


@posix_only
def test_symlinked_checkpoint_directory_loads(tmp_path):
    write_sharded(tmp_path / "real")
    (tmp_path / "link").symlink_to("real", target_is_directory=True)
    model = Net()
    assert load_checkpoint(model, tmp_path / "link").ok
    assert torch.equal(model.b, tensors()["b"])
