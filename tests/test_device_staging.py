"""The pinned staging ring's scheduling, on CPU through ``CpuStandInBackend``; the CUDA paths on a GPU."""

from __future__ import annotations

import json
import os
import struct
import threading
from contextlib import ExitStack
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

from diffulex_core.errors import ConfigurationError, LoadApplyError
from diffulex_core.io.staging import (
    CudaBackend,
    DeviceRead,
    StagingMisuseError,
    choose_path,
    copy_registered,
    copy_to_device,
    registered,
    ring,
)
from diffulex_core.io.staging.backend import dest_part
from diffulex_core.testing.cpu_backend import CpuStandInBackend

KIB = 1024


def write_checkpoint(path: Path, shapes: dict[str, tuple[int, ...]], seed: int = 0, dtype=torch.float32) -> Path:
    gen = torch.Generator().manual_seed(seed)
    save_file({name: torch.randn(shape, generator=gen).to(dtype) for name, shape in shapes.items()}, str(path))
    return path


def header(path: Path) -> tuple[int, dict]:
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        info = json.loads(f.read(length))
    info.pop("__metadata__", None)
    return 8 + length, info


def plan(paths: list[Path], device: str | torch.device = "cpu") -> tuple[list[DeviceRead], dict[str, torch.Tensor]]:
    """Reads of every tensor in ``paths`` into fresh destinations (filled with 0xAB so untouched bytes show)."""
    reads, dests = [], {}
    for path in paths:
        base, info = header(path)
        for name, entry in info.items():
            lo, hi = entry["data_offsets"]
            dest = torch.full((hi - lo,), 0xAB, dtype=torch.uint8, device=device)
            dests[name] = dest
            reads.append(DeviceRead(path, base + lo, hi - lo, dest, name))
    return reads, dests


def expected(paths: list[Path]) -> dict[str, torch.Tensor]:
    out = {}
    for path in paths:
        with safe_open(str(path), "pt") as f:
            for name in f.keys():
                t = f.get_tensor(name)
                out[name] = t.contiguous().view(-1).view(torch.uint8)
    return out


def assert_identical(dests: dict[str, torch.Tensor], paths: list[Path]) -> None:
    want = expected(paths)
    assert dests.keys() == want.keys()
    for name, tensor in want.items():
        assert torch.equal(dests[name].cpu(), tensor), name


@pytest.fixture
def fds():
    with ExitStack() as stack:
        opened: dict[Path, int] = {}

        def open_all(paths: list[Path]) -> dict[Path, int]:
            for path in paths:
                if path not in opened:
                    opened[path] = os.open(path, os.O_RDONLY)
                    stack.callback(os.close, opened[path])
            return opened

        yield open_all


def staging_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith(("diffulex-stage", "diffulex-standin"))]


MIXED = {  # tiny ones packed together, a zero-size one, ones larger than a 16 KiB buffer
    "a.tiny0": (3,), "a.tiny1": (5,), "a.empty": (0,), "a.tiny2": (7, 2), "b.big": (9000,),
    "b.mid": (1000,), "c.tiny3": (1,), "c.huge": (40, 300), "c.empty2": (0, 4), "d.tail": (17,),
}


@pytest.mark.parametrize("ring_buffers,buffer_bytes,threads,piece", [
    (4, 16 * KIB, 4, 4 * KIB), (1, 16 * KIB, 1, None), (2, 4 * KIB, 3, 1 * KIB), (3, 1 << 20, 2, None),
])
def test_bit_identical_for_mixed_tensors_and_files(tmp_path, fds, ring_buffers, buffer_bytes, threads, piece):
    paths = [write_checkpoint(tmp_path / "one.safetensors", MIXED, seed=1),
             write_checkpoint(tmp_path / "two.safetensors", {"x.big": (5000,), "x.small": (2,), "x.e": (0,)}, seed=2)]
    reads, dests = plan(paths)
    backend = CpuStandInBackend()
    progress: list[int] = []
    stats = copy_to_device(reads, fds(paths), ring_buffers=ring_buffers, buffer_bytes=buffer_bytes, threads=threads,
                           backend=backend, on_progress=progress.append, piece_bytes=piece)
    assert_identical(dests, paths)
    total = sum(r.nbytes for r in reads)
    assert stats.path == "cuda-ring" and stats.nbytes == total == sum(progress)
    assert backend.max_allocated_bytes <= ring_buffers * buffer_bytes
    assert backend.max_busy_bytes <= ring_buffers * buffer_bytes
    assert backend.max_pending_copy_bytes <= ring_buffers * buffer_bytes
    assert backend.live_buffers == 0 and not staging_threads()


def test_tiny_tensors_share_one_buffer_and_large_ones_are_split(tmp_path, fds):
    path = write_checkpoint(tmp_path / "m.safetensors", {f"t{i}": (4,) for i in range(50)} | {"big": (20000,)})
    reads, dests = plan([path])
    backend = CpuStandInBackend()
    copy_to_device(reads, fds([path]), ring_buffers=2, buffer_bytes=32 * KIB, threads=2, backend=backend)
    assert_identical(dests, [path])
    fills = [e for e in backend.log if e[0] == "fill"]
    assert len(fills) == 3  # 50 * 16 bytes + 80,000 bytes packed into buffers of 32 KiB: 3 buffers' worth
    # the big tensor arrives in three pieces, the 50 tiny ones in one buffer with its first piece
    copies = [e for e in backend.log if e[0] == "copy"]
    assert len(copies) == 50 + 3


def test_ring_saturates_but_never_exceeds_its_bound(tmp_path, fds):
    path = write_checkpoint(tmp_path / "m.safetensors", {f"w{i}": (3000,) for i in range(24)})
    reads, dests = plan([path])
    backend = CpuStandInBackend(copy_delay=0.002)  # slow copies: readers must wait for free buffers
    copy_to_device(reads, fds([path]), ring_buffers=3, buffer_bytes=8 * KIB, threads=4, backend=backend,
                   piece_bytes=2 * KIB)
    assert_identical(dests, [path])
    assert backend.max_busy_bytes == 3 * 8 * KIB  # saturated ...
    assert backend.max_allocated_bytes == 3 * 8 * KIB  # ... and bounded
    # A buffer is handed out again only after the copies from it completed.
    state: dict[int, str] = {}
    for op, slot, _ in backend.log:
        if op == "fill":
            assert state.get(slot, "complete") == "complete", backend.log
            state[slot] = "filling"
        elif op == "complete":
            state[slot] = "complete"
    assert backend.live_buffers == 0 and not staging_threads()


def test_stand_in_detects_a_buffer_refilled_before_its_copy(tmp_path):
    backend = CpuStandInBackend(copy_delay=0.05)
    backend.open(torch.device("cpu"))
    try:
        buffer = backend.allocate(16)
        backend.begin_fill(buffer)
        buffer.fill_(1)
        backend.copy(buffer, [(torch.zeros(16, dtype=torch.uint8), buffer)])
        with pytest.raises(StagingMisuseError, match="pending"):
            backend.begin_fill(buffer)
        buffer.fill_(2)  # overwritten while its copy waits: the copy notices
        with pytest.raises(StagingMisuseError, match="overwritten"):
            backend.wait(backend.record(buffer))
    finally:
        backend.close()


def test_truncated_file_names_file_and_tensor_and_cleans_up(tmp_path, fds):
    path = write_checkpoint(tmp_path / "cut.safetensors", {f"w{i}": (2000,) for i in range(8)} | {"z.last": (6000,)})
    reads, dests = plan([path])
    assert max(reads, key=lambda r: r.start).name == "z.last"
    os.truncate(path, path.stat().st_size - 100)
    backend = CpuStandInBackend()
    with pytest.raises(LoadApplyError) as info:
        copy_to_device(reads, fds([path]), ring_buffers=2, buffer_bytes=8 * KIB, threads=3, backend=backend)
    assert str(path) in str(info.value) and "'z.last'" in str(info.value)
    assert "ended" in str(info.value)
    assert backend.live_buffers == 0 and not staging_threads()


def test_error_in_a_reader_thread_stops_the_others(tmp_path, fds, monkeypatch):
    path = write_checkpoint(tmp_path / "m.safetensors", {f"w{i}": (1000,) for i in range(64)})
    reads, _ = plan([path])
    calls = []
    real = ring.read_exact

    def flaky(fd, buffer, offset, what):
        calls.append(offset)
        if len(calls) == 5:
            raise OSError("injected read failure")
        return real(fd, buffer, offset, what)

    monkeypatch.setattr(ring, "read_exact", flaky)
    backend = CpuStandInBackend(copy_delay=0.001)
    with pytest.raises(OSError, match="injected read failure"):
        copy_to_device(reads, fds([path]), ring_buffers=2, buffer_bytes=4 * KIB, threads=4, backend=backend,
                       piece_bytes=1 * KIB)
    assert len(calls) < 64 * 4  # stopped early: 256 pieces in all
    assert backend.live_buffers == 0 and not staging_threads()


@pytest.mark.parametrize("fail_at", [0, 7])
def test_failed_copy_propagates_and_cleans_up(tmp_path, fds, fail_at):
    path = write_checkpoint(tmp_path / "m.safetensors", {f"w{i}": (1500,) for i in range(20)})
    reads, _ = plan([path])
    backend = CpuStandInBackend(fail_copy_at=fail_at, fail_with=RuntimeError("injected copy failure"))
    progress: list[int] = []
    with pytest.raises(RuntimeError, match="injected copy failure"):
        copy_to_device(reads, fds([path]), ring_buffers=2, buffer_bytes=8 * KIB, threads=2, backend=backend,
                       on_progress=progress.append)
    assert sum(progress) < sum(r.nbytes for r in reads)
    assert backend.live_buffers == 0 and not staging_threads()


def test_only_empty_tensors_and_no_reads(tmp_path, fds):
    path = write_checkpoint(tmp_path / "e.safetensors", {"a": (0,), "b": (0, 3)})
    reads, dests = plan([path])
    backend = CpuStandInBackend()
    stats = copy_to_device(reads, fds([path]), backend=backend)
    assert stats.nbytes == 0 and backend.log == []
    assert copy_to_device([], {}, backend=backend).nbytes == 0


def test_bad_destinations_are_refused(tmp_path, fds):
    path = write_checkpoint(tmp_path / "m.safetensors", {"a": (4,)})
    (read,), _ = plan([path])
    with pytest.raises(ValueError, match="'a'.*contiguous 1-D uint8"):
        copy_to_device([read._replace(dest=torch.zeros(4))], fds([path]), backend=CpuStandInBackend())
    with pytest.raises(ValueError, match="'a'"):
        copy_to_device([read._replace(nbytes=8)], fds([path]), backend=CpuStandInBackend())


def test_segments_cover_every_byte_once_on_disjoint_page_ranges(tmp_path, fds):
    """The registered path's layout, checked on CPU: map the file, copy per segment, compare."""
    paths = [write_checkpoint(tmp_path / "r1.safetensors", MIXED, seed=3),
             write_checkpoint(tmp_path / "r2.safetensors", {"z": (20000,)}, seed=4)]
    reads, dests = plan(paths)
    reads = [r for r in reads if r.nbytes]
    sizes = {p: p.stat().st_size for p in paths}
    segments = registered._segments(reads, sizes, segment_bytes=8 * KIB)
    assert len(segments) > len(paths)
    by_file: dict[Path, list[tuple[int, int]]] = {}
    for s in segments:
        assert s.lo % registered.PAGE == 0 and s.hi % registered.PAGE == 0 and s.lo < s.hi
        by_file.setdefault(s.file, []).append((s.lo, s.hi))
    for ranges in by_file.values():
        ranges.sort()
        assert all(a[1] <= b[0] for a, b in zip(ranges, ranges[1:], strict=False))
    opened = fds(paths)
    maps = {p: registered._map_read_only(opened[p], sizes[p], p) for p in paths}
    try:
        for s in segments:
            source = registered._host_tensor(maps[s.file] + s.lo, s.hi - s.lo)
            for read, done, nbytes in s.parts:
                at = read.start + done - s.lo
                assert s.lo <= read.start + done and read.start + done + nbytes <= s.hi
                dest_part(read, done, nbytes).copy_(source[at:at + nbytes])
            del source
    finally:
        for p, address in maps.items():
            registered._unmap(address, sizes[p])
    assert_identical(dests, paths)


def test_registered_refuses_a_truncated_file_before_mapping(tmp_path, fds):
    path = write_checkpoint(tmp_path / "cut.safetensors", {"w": (100,), "z.last": (300,)})
    reads, _ = plan([path])
    with pytest.raises(LoadApplyError, match="'z.last'.*ended"):
        registered._segments(reads, {path: path.stat().st_size - 10}, 1 << 20)


def test_choose_path():
    assert choose_path("auto") is copy_to_device and choose_path(None) is copy_to_device
    assert choose_path("ring") is copy_to_device
    assert choose_path("registered") is copy_registered
    with pytest.raises(ConfigurationError, match="'fast'"):
        choose_path("fast")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal without CUDA")
def test_cuda_paths_refuse_clearly_without_cuda(tmp_path, fds):
    with pytest.raises(LoadApplyError, match="needs a CUDA device"):
        CudaBackend()
    path = write_checkpoint(tmp_path / "m.safetensors", {"a": (4,)})
    reads, _ = plan([path])
    with pytest.raises(LoadApplyError, match="needs a CUDA device"):
        copy_to_device(reads, fds([path]))
    with pytest.raises(LoadApplyError, match="copy_registered.*needs a CUDA device"):
        copy_registered(reads, fds([path]))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("path_option", ["ring", "registered"])
def test_cuda_paths_bit_identical(tmp_path, fds, path_option):
    shapes = MIXED | {"e.large": (700, 1000)}
    paths = [write_checkpoint(tmp_path / "g1.safetensors", shapes, seed=5, dtype=torch.bfloat16),
             write_checkpoint(tmp_path / "g2.safetensors", {"f.x": (3, 5), "f.y": (100_000,)}, seed=6)]
    reads, dests = plan(paths, device="cuda")
    progress: list[int] = []
    copy = choose_path(path_option)
    kwargs = {"buffer_bytes": 256 * KIB, "ring_buffers": 3} if path_option == "ring" else {"segment_bytes": 1 << 20}
    stats = copy(reads, fds(paths), threads=4, on_progress=progress.append, **kwargs)
    assert stats.nbytes == sum(r.nbytes for r in reads) == sum(progress)
    assert stats.path == f"cuda-{path_option}"
    assert_identical(dests, paths)


@pytest.mark.parametrize("seed", range(12))
def test_random_layouts_with_gaps_and_repeats(tmp_path, fds, seed):
    """Some tensors skipped (gaps in the file to pack over or split on), some read twice."""
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(0, 3000, (30,), generator=gen).tolist()
    paths = [write_checkpoint(tmp_path / f"f{k}.safetensors", {f"t{k}.{i:02d}": (n,) for i, n in enumerate(sizes)
                                                               if i % 3 == k}, seed=seed * 3 + k) for k in range(3)]
    reads, dests = plan(paths)
    keep = torch.rand(len(reads), generator=gen) < 0.7
    chosen = [r for r, k in zip(reads, keep.tolist(), strict=True) if k]
    twice = [r._replace(dest=torch.zeros_like(r.dest), name=r.name + "#2") for r in chosen[::4]]
    ring_buffers = int(torch.randint(1, 5, (1,), generator=gen))
    buffer_bytes = int(torch.randint(64, 20000, (1,), generator=gen))
    backend = CpuStandInBackend()
    progress: list[int] = []
    copy_to_device(chosen + twice, fds(paths), ring_buffers=ring_buffers, buffer_bytes=buffer_bytes,
                   threads=int(torch.randint(1, 6, (1,), generator=gen)), backend=backend,
                   on_progress=progress.append, piece_bytes=int(torch.randint(16, 5000, (1,), generator=gen)))
    want = expected(paths)
    for read, k in zip(reads, keep.tolist(), strict=True):
        if k:
            assert torch.equal(dests[read.name], want[read.name]), read.name
        else:
            assert bool((dests[read.name] == 0xAB).all()), read.name  # not asked for: untouched
    for read in twice:
        assert torch.equal(read.dest, want[read.name[:-2]])
    assert sum(progress) == sum(r.nbytes for r in chosen + twice)
    assert backend.max_allocated_bytes <= ring_buffers * buffer_bytes
    assert backend.live_buffers == 0 and not staging_threads()


def test_load_checkpoint_refuses_an_unknown_cuda_path_before_reading(tmp_path):
    from diffulex_core.loader import load_checkpoint

    path = write_checkpoint(tmp_path / "model.safetensors", {"w": (2, 2)})
    model = torch.nn.Module()
    model.w = torch.nn.Parameter(torch.zeros(2, 2))
    with pytest.raises(ConfigurationError, match="ringg"):
        load_checkpoint(model, path.parent, cuda_path="ringg")
    assert not model.w.any()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
@pytest.mark.parametrize("cuda_path", ["ring", "registered"])
def test_a_family_loads_onto_cuda_through_the_chosen_path(tmp_path, cuda_path):
    """The whole loader on a GPU: plain and declared (packed) destinations through the device path,
    the rest through code with its tensor on the device; bit-identical to a CPU load."""
    from safetensors.torch import save_file as save

    from diffulex_core.loader import load_checkpoint
    from diffulex_layers.testing import seeded
    from diffulex_llada.model import build_llada, to_hf_state_dict

    source = seeded(build_llada, {"vocab_size": 255}, 0).to(torch.bfloat16)
    save(to_hf_state_dict(source), str(tmp_path / "model.safetensors"))
    with torch.device("meta"):
        model = build_llada({"vocab_size": 255}).to(torch.bfloat16)
    report = load_checkpoint(model, tmp_path, device="cuda", cuda_path=cuda_path)
    assert report.ok and f"cuda-{cuda_path}" in report.read_paths
    for (name, a), b in zip(source.state_dict().items(), model.state_dict().values(), strict=True):
        assert torch.equal(a, b.cpu()), name
