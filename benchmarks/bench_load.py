"""Checkpoint loading: ``load_checkpoint`` against the naive ``safe_open`` loop, on generated checkpoints.

The naive loop is what most loaders do::

    params = dict(model.named_parameters())
    with safe_open(file, "pt") as f:
        for name in f.keys():
            params[name].copy_(f.get_tensor(name))

Cases (``--cases``, comma-separated; sizes are flags so a quick run is possible):

* ``dense``: bf16, ~1.7 GiB in 147 tensors (24 transformer layers of q/k/v/o/up/down,
  embeddings, lm_head, final norm), one file.
* ``moe``:   bf16, ~0.8 GiB in 3,171 tensors (24 layers of attention + router + norm and
  42 experts x gate/up/down small matrices), one file.
* ``tiny``:  100,000 tensors of 16 float32 each, one file; also times ``plan_checkpoint``
  alone (headers only) and a load with a no-op ``diffulex_resolve_weight`` hook registered
  (so every tensor pays a hook call).

Method: the checkpoint is written to a temp dir under /tmp (deleted afterwards), fsync'ed, and
read once, untimed, so the page cache is warm and clean. Each repeat runs the naive loop and then the loader
(alternating) into the same already-materialized model; figures are medians of ``--repeats``.
GiB/s is tensor bytes over the whole call (the loader's time includes its plan). Before timing,
each approach loads once into a zeroed model and a sample of parameters is compared with the
file (``torch.equal``), so a broken load cannot be measured. Peak RSS is measured per approach
in a fresh subprocess (``--worker``): VmHWM is reset (``/proc/self/clear_refs``) after the model
is built, zero-filled and imports are done; extra RSS = (VmHWM after load - VmRSS before) as a
percentage of the model's bytes. File pages mapped by ``safe_open`` count, as they do in VmHWM.

    python benchmarks/bench_load.py [--cases dense,moe,tiny] [--repeats 3]
    python benchmarks/bench_load.py --dense-gib 0.2 --moe-gib 0.1 --tiny-count 10000 --repeats 1   # quick

``--device cuda`` (one short run on a GPU machine; the CPU cases are not run): a dense bf16
checkpoint of ``--cuda-gib`` (8) GiB in ``--cuda-files`` (4) files, page cache warm, loaded into a
model whose parameters are on ``cuda:0``. It prints the pinned host-to-device limit (a pinned
1 GiB buffer copied repeatedly), then per contender (each verified first: a sample of parameters
compared with the files) the median time, GiB/s, ratio to the naive loop and share of the limit:

* ``naive``: ``safe_open`` + ``get_tensor`` + ``param.copy_`` (then ``torch.cuda.synchronize``);
* ``safe_open-cuda``: ``safe_open(device="cuda:0")`` + ``get_tensor`` + ``param.copy_``;
* ``loader``: ``load_checkpoint`` as it is today;
* ``ring AxB``: ``device_staging.copy_to_device`` over reads derived from the headers (times include
  parsing headers and opening files), with A pinned buffers of B MiB, one row per shape in
  ``--ring-configs`` (default ``4x64,8x16,16x8``), ``--threads`` readers;
* ``registered``: ``device_staging.copy_registered`` over the same reads (``--segment-mib``).

A contender that fails prints its error and the run goes on. ``--dry-run`` does all of it on the
CPU without CUDA, on a small checkpoint (0.05 GiB unless ``--cuda-gib``), the ring through
``CpuStandInBackend``; the CUDA-only contenders are listed as skipped::

    python benchmarks/bench_load.py --device cuda                        # on the GPU machine
    python benchmarks/bench_load.py --device cuda --dry-run --repeats 1  # anywhere
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffulex_core import hookimpl

sys.path.insert(0, str(Path(__file__).parent))
from named_model import build_named_model, raw_header_specs, verify_against_file  # noqa: E402
from peak_rss import reset_peak_rss, status_kib  # noqa: E402

GIB = 1024**3
DTYPES = {"BF16": torch.bfloat16, "F32": torch.float32, "F16": torch.float16}


# --------------------------------------------------------------------------- checkpoint shapes


def dense_specs(target_gib: float, layers: int = 24, vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """147 tensors for 24 layers: GQA attention (kv = hidden/4), MLP up (2*inter x hidden) and down."""

    def build(hidden: int) -> dict[str, tuple[int, ...]]:
        inter = max(64, round(2.75 * hidden / 64) * 64)
        kv = max(64, hidden // 4)
        specs = {"model.embed_tokens.weight": (vocab, hidden)}
        for i in range(layers):
            p = f"model.layers.{i}"
            specs[f"{p}.self_attn.q_proj.weight"] = (hidden, hidden)
            specs[f"{p}.self_attn.k_proj.weight"] = (kv, hidden)
            specs[f"{p}.self_attn.v_proj.weight"] = (kv, hidden)
            specs[f"{p}.self_attn.o_proj.weight"] = (hidden, hidden)
            specs[f"{p}.mlp.gate_up_proj.weight"] = (2 * inter, hidden)
            specs[f"{p}.mlp.down_proj.weight"] = (hidden, inter)
        specs["model.norm.weight"] = (hidden,)
        specs["lm_head.weight"] = (vocab, hidden)
        return specs

    return _closest(build, target_gib * GIB / 2)


def moe_specs(target_gib: float, layers: int = 24, experts: int = 42, hidden: int = 768,
              vocab: int = 32000) -> dict[str, tuple[int, ...]]:
    """3 + 24 * (4 attention + router + norm + 42 experts * 3) = 3,171 tensors; expert width solved for size."""

    def build(inter: int) -> dict[str, tuple[int, ...]]:
        specs = {"model.embed_tokens.weight": (vocab, hidden)}
        for i in range(layers):
            p = f"model.layers.{i}"
            for proj in ("q_proj", "k_proj", "v_proj", "o_proj"):
                specs[f"{p}.self_attn.{proj}.weight"] = (hidden, hidden)
            specs[f"{p}.mlp.gate.weight"] = (experts, hidden)
            specs[f"{p}.post_attention_layernorm.weight"] = (hidden,)
            for e in range(experts):
                specs[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (inter, hidden)
                specs[f"{p}.mlp.experts.{e}.up_proj.weight"] = (inter, hidden)
                specs[f"{p}.mlp.experts.{e}.down_proj.weight"] = (hidden, inter)
        specs["model.norm.weight"] = (hidden,)
        specs["lm_head.weight"] = (vocab, hidden)
        return specs

    return _closest(build, target_gib * GIB / 2, step=8)


def _closest(build, target_elems: float, step: int = 64) -> dict[str, tuple[int, ...]]:
    """The build(k) (k a multiple of step) whose element count is closest to target_elems."""
    best, k = None, step
    while True:
        specs = build(k)
        n = sum(math.prod(s) for s in specs.values())
        if best is None or abs(n - target_elems) < best[0]:
            best = (abs(n - target_elems), specs)
        if n > target_elems:
            return best[1]
        k += step


def tiny_names(count: int) -> list[str]:
    return [f"blocks.{i // 100}.t{i % 100}" for i in range(count)]


# --------------------------------------------------------------------------- writing checkpoints


def write_big(path: Path, specs: dict[str, tuple[int, ...]], dtype: torch.dtype) -> None:
    """Random-looking content without generating ~1e9 random numbers: each tensor is a copy of a
    random pool, starting at a different offset."""
    gen = torch.Generator().manual_seed(0)
    pool_n = (1 << 22) + 4099
    pool = torch.randn(pool_n, generator=gen).to(dtype)
    pool2 = torch.cat([pool, pool])
    tensors = {}
    for i, (name, shape) in enumerate(specs.items()):
        n = math.prod(shape)
        out = torch.empty(n, dtype=dtype)
        offset = (i * 7919) % pool_n
        done = 0
        while done < n:
            k = min(n - done, pool_n)
            out[done:done + k].copy_(pool2[offset:offset + k])
            done += k
        tensors[name] = out.view(shape)
    save_file(tensors, str(path))


def write_tiny(path: Path, count: int, width: int) -> None:
    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(count, width, generator=gen)
    save_file({name: rows[i].clone() for i, name in enumerate(tiny_names(count))}, str(path))


def fsync(path: Path) -> None:
    """Flush the new file to disk, so background writeback of its dirty pages cannot overlap the timing."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def header_specs(path: Path) -> dict[str, tuple[tuple[int, ...], torch.dtype]]:
    """Names, shapes and dtypes from a safetensors header (in file order)."""
    return {name: (shape, DTYPES[dtype]) for name, (shape, dtype) in raw_header_specs(path).items()}


def data_offset(path: Path) -> int:
    with open(path, "rb") as f:
        return 8 + struct.unpack("<Q", f.read(8))[0]


def read_chars() -> int | None:
    """Bytes this process has read through read()/pread() so far (/proc/self/io rchar), or None."""
    try:
        for line in Path("/proc/self/io").read_text().splitlines():
            if line.startswith("rchar:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def warm_page_cache(path: Path) -> None:
    with open(path, "rb", buffering=0) as f:
        while f.read(64 << 20):
            pass


# --------------------------------------------------------------------------- model


def Holder(specs: dict[str, tuple[tuple[int, ...], torch.dtype]], device=None) -> nn.Module:  # noqa: N802
    """An nn.Module tree whose parameters carry exactly the checkpoint's dotted names."""
    return build_named_model(specs, device)


def model_bytes(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for p in model.parameters())


def zero_model(model: nn.Module) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()


# --------------------------------------------------------------------------- the two approaches


def load_naive(model: nn.Module, path: Path) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad(), safe_open(str(path), "pt") as f:
        for name in f.keys():
            params[name].copy_(f.get_tensor(name))


def load_loader(model: nn.Module, path: Path):
    from diffulex_core.loader import load_checkpoint

    return load_checkpoint(model, path, progress=False)


def plan_only(model: nn.Module, path: Path):
    from diffulex_core.loader import plan_checkpoint

    return plan_checkpoint(model, path)


APPROACHES = {"naive": load_naive, "loader": load_loader}


def verify(model: nn.Module, path: Path, label: str, samples: int = 32) -> None:
    """Compare first, last and evenly spaced parameters with the file's tensors."""
    checked = verify_against_file(model, path, label, samples)
    print(f"  verified {label}: {checked} parameters equal to the file", flush=True)


def timed(fn, *args) -> tuple[float, object]:
    gc.collect()
    start = time.perf_counter()
    result = fn(*args)
    return time.perf_counter() - start, result


class NoopResolveHook:
    """A plugin whose diffulex_resolve_weight answers None for every tensor (pure hook overhead)."""

    @staticmethod
    @hookimpl
    def diffulex_resolve_weight(model, name, ctx):
        return None


# --------------------------------------------------------------------------- peak RSS (subprocess)


def worker(approach: str, path: Path) -> None:
    """Build the model, do every import, reset the RSS high-water mark, load once, print JSON."""
    model = Holder(header_specs(path))  # torch.zeros: every page is resident before measuring
    if approach == "loader":
        import tqdm.auto  # noqa: F401  (imported by the loader on first use)

        from diffulex_core.plugins import get_plugin_manager

        get_plugin_manager()
    reset = reset_peak_rss()
    before = status_kib("VmRSS")
    hwm_before = status_kib("VmHWM")
    start = time.perf_counter()
    APPROACHES[approach](model, path)
    seconds = time.perf_counter() - start
    after = status_kib("VmHWM")
    print(json.dumps({"approach": approach, "rss_before_kib": before, "hwm_before_kib": hwm_before,
                      "hwm_after_kib": after, "hwm_reset": reset, "model_bytes": model_bytes(model),
                      "seconds": seconds}))


def measure_rss(approach: str, path: Path) -> dict:
    out = subprocess.run([sys.executable, __file__, "--worker", approach, "--file", str(path)],
                         check=True, capture_output=True, text=True).stdout
    data = json.loads(out.strip().splitlines()[-1])
    if not data["hwm_reset"] and data["hwm_before_kib"] > data["rss_before_kib"]:
        print(f"  note: VmHWM could not be reset; {approach} figure may be overstated", flush=True)
    data["extra_pct"] = 100.0 * ((data["hwm_after_kib"] - data["rss_before_kib"]) * 1024) / data["model_bytes"]
    return data


# --------------------------------------------------------------------------- running a case


def run_case(case: str, path: Path, repeats: int, rss: bool) -> dict:
    specs = header_specs(path)
    model = Holder(specs)
    nbytes = model_bytes(model)
    print(f"[{case}] {len(specs):,} tensors, {nbytes / GIB:.3f} GiB, file {path.stat().st_size / GIB:.3f} GiB",
          flush=True)
    warm_page_cache(path)

    for approach, fn in APPROACHES.items():  # untimed: correctness, and first-use imports / plugin discovery
        zero_model(model)
        fn(model, path)
        verify(model, path, f"{case}/{approach}")

    times: dict[str, list[float]] = {"naive": [], "loader": []}
    plan_in_load: list[float] = []
    for r in range(repeats):
        for approach, fn in APPROACHES.items():
            seconds, report = timed(fn, model, path)
            times[approach].append(seconds)
            if approach == "loader":
                plan_in_load.append(report.plan_seconds)
        print(f"  repeat {r + 1}: naive {times['naive'][-1]:.3f} s, loader {times['loader'][-1]:.3f} s "
              f"(plan {plan_in_load[-1]:.3f} s)", flush=True)

    row = {
        "case": case, "tensors": len(specs), "gib": nbytes / GIB,
        "naive_s": statistics.median(times["naive"]), "loader_s": statistics.median(times["loader"]),
        "plan_in_load_s": statistics.median(plan_in_load),
    }
    row["naive_gibs"] = row["gib"] / row["naive_s"]
    row["loader_gibs"] = row["gib"] / row["loader_s"]
    row["ratio"] = row["naive_s"] / row["loader_s"]

    if case == "tiny":
        plans = []
        header_bytes = data_offset(path)
        for _ in range(repeats):
            read_before = read_chars()
            seconds, plan = timed(plan_only, model, path)
            read = read_chars() - read_before if read_before is not None else None
            if plan.report.bytes_read != 0 or plan.report.problems:
                raise SystemExit(f"tiny: plan read {plan.report.bytes_read} bytes / problems "
                                 f"{plan.report.problems[:3]}")
            if read is not None and read > header_bytes + (1 << 20):
                raise SystemExit(f"tiny: plan_checkpoint read {read:,} bytes; the header is {header_bytes:,}")
            plans.append(seconds)
        row["plan_s"] = statistics.median(plans)
        print(f"  plan_checkpoint alone: {', '.join(f'{s:.3f}' for s in plans)} s; read "
              f"{'?' if read is None else f'{read:,}'} bytes (header {header_bytes:,}, tensor data "
              f"{path.stat().st_size - header_bytes:,})", flush=True)

        from diffulex_core.plugins import get_plugin_manager

        pm = get_plugin_manager()
        pm.register(NoopResolveHook, name="bench-noop-resolve")
        try:
            zero_model(model)
            load_loader(model, path)
            verify(model, path, "tiny/loader+noop-hook")
            hooked = []
            for _ in range(repeats):
                seconds, _report = timed(load_loader, model, path)
                hooked.append(seconds)
        finally:
            pm.unregister(name="bench-noop-resolve")
        row["hooked_s"] = statistics.median(hooked)
        row["hooked_ratio"] = row["naive_s"] / row["hooked_s"]
        print(f"  loader with a no-op resolve hook: {', '.join(f'{s:.3f}' for s in hooked)} s", flush=True)

    del model
    gc.collect()
    if rss:
        for approach in APPROACHES:
            data = measure_rss(approach, path)
            row[f"rss_{approach}"] = data["extra_pct"]
            print(f"  peak RSS {approach}: +{(data['hwm_after_kib'] - data['rss_before_kib']) / 1024:.0f} MiB "
                  f"over {data['model_bytes'] / 2**20:.0f} MiB of model = {data['extra_pct']:.1f}%", flush=True)
    return row


def print_table(rows: list[dict], repeats: int) -> None:
    import diffulex_core.loader as loader_module

    digest = hashlib.sha256(Path(loader_module.__file__).read_bytes()).hexdigest()[:12]
    print()
    print(f"diffulex_core/loader.py sha256 {digest}")
    print(f"median of {repeats} alternating runs, page cache warm (Python {sys.version.split()[0]}, "
          f"torch {torch.__version__}, {os.cpu_count()} CPUs)")
    header = (f"{'case':6s} {'tensors':>8s} {'GiB':>6s} {'naive s':>8s} {'loader s':>8s} {'naive GiB/s':>11s} "
              f"{'loader GiB/s':>12s} {'ratio':>6s} {'plan s':>7s} {'extra RSS% naive/loader':>24s}")
    print(header)
    print("-" * len(header))
    for r in rows:
        plan = r.get("plan_s", r["plan_in_load_s"])
        rss = (f"{r['rss_naive']:.1f} / {r['rss_loader']:.1f}" if "rss_naive" in r else "-")
        print(f"{r['case']:6s} {r['tensors']:>8,d} {r['gib']:6.3f} {r['naive_s']:8.3f} {r['loader_s']:8.3f} "
              f"{r['naive_gibs']:11.3f} {r['loader_gibs']:12.3f} {r['ratio']:5.2f}x {plan:7.3f} {rss:>24s}")
    for r in rows:
        if "hooked_s" in r:
            print(f"tiny with a no-op diffulex_resolve_weight hook: loader {r['hooked_s']:.3f} s, "
                  f"ratio {r['hooked_ratio']:.2f}x naive")
    print("ratio = naive time / loader time (>1: loader faster); plan s = plan_checkpoint alone for tiny, "
          "plan part of load_checkpoint otherwise")


# --------------------------------------------------------------------------- --device cuda


def shard_specs(specs: dict[str, tuple[int, ...]], files: int) -> list[dict[str, tuple[int, ...]]]:
    """Consecutive tensors split into ``files`` groups of about equal bytes."""
    total = sum(math.prod(shape) for shape in specs.values())
    shards: list[dict[str, tuple[int, ...]]] = [{}]
    done = 0
    for name, shape in specs.items():
        if done >= total * len(shards) / files and len(shards) < files:
            shards.append({})
        shards[-1][name] = shape
        done += math.prod(shape)
    return [shard for shard in shards if shard]


def header_ranges(path: Path) -> tuple[int, dict[str, tuple[int, int]]]:
    """Where the tensor data starts, and each tensor's (begin, end) relative to it."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    return 8 + length, {name: tuple(info["data_offsets"]) for name, info in header.items()}


def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def device_naive(model: nn.Module, paths: list[Path], device: str) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path in paths:
            with safe_open(str(path), "pt") as f:
                for name in f.keys():
                    params[name].copy_(f.get_tensor(name))
    sync(device)


def device_safe_open(model: nn.Module, paths: list[Path], device: str) -> None:
    params = dict(model.named_parameters())
    with torch.no_grad():
        for path in paths:
            with safe_open(str(path), "pt", device=device) as f:
                for name in f.keys():
                    params[name].copy_(f.get_tensor(name))
    sync(device)


def device_loader(model: nn.Module, paths: list[Path], device: str) -> None:
    from diffulex_core.loader import load_checkpoint

    load_checkpoint(model, paths[0].parent, progress=False)
    sync(device)


def device_staged(model: nn.Module, paths: list[Path], device: str, copy, **options):
    """``copy`` (a device_staging path) over reads derived from the headers, into the parameters."""
    from diffulex_core.io.staging import DeviceRead

    params = dict(model.named_parameters())
    fds = {path: os.open(path, os.O_RDONLY) for path in paths}
    try:
        reads = []
        for path in paths:
            base, ranges = header_ranges(path)
            for name, (lo, hi) in ranges.items():
                dest = params[name].detach().view(-1).view(torch.uint8)
                reads.append(DeviceRead(path, base + lo, hi - lo, dest, name))
        return copy(reads, fds, **options)
    finally:
        for fd in fds.values():
            os.close(fd)


def pinned_limit(gib: float = 1.0, repeats: int = 8) -> float:
    """GiB/s of a pinned host buffer copied to the device, the PCIe limit any loader works under."""
    nbytes = int(gib * GIB)
    src = torch.empty(nbytes, dtype=torch.uint8, pin_memory=True)
    src.fill_(1)
    dst = torch.empty(nbytes, dtype=torch.uint8, device="cuda")
    dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src, non_blocking=True)
    torch.cuda.synchronize()
    seconds = time.perf_counter() - start
    del src, dst
    return gib * repeats / seconds


def _ring_shapes(args) -> list[tuple[str, dict]]:
    """(label, options) per ring shape of ``--ring-configs`` (``COUNTxMIB``)."""
    rings = []
    for shape in (part.strip() for part in args.ring_configs.split(",") if part.strip()):
        count, _, mib = shape.partition("x")
        rings.append((f"ring {count}x{mib}MiB", {"ring_buffers": int(count), "buffer_bytes": int(float(mib) * 2**20),
                                                 "threads": args.threads}))
    return rings


def _time_contender(label, fn, model, paths, device, repeats) -> tuple[str, float | None, str]:
    """(label, median seconds or None, note) of one contender, its result verified first."""
    from diffulex_core.io.staging import StagingStats

    if fn is None:
        print(f"  {label}: skipped (needs CUDA)", flush=True)
        return label, None, "skipped (needs CUDA)"
    try:
        zero_model(model)
        sync(device)
        fn(model, paths, device)
        for path in paths:
            verify(model, path, f"{label} ({path.name})", samples=8)
        times = []
        for _ in range(repeats):
            gc.collect()
            sync(device)
            begin = time.perf_counter()
            result = fn(model, paths, device)
            times.append(time.perf_counter() - begin)
        note = f"{result.threads} threads, staging {result.staging_bytes / 2**20:.0f} MiB" \
            if isinstance(result, StagingStats) else ""
        print(f"  {label}: {', '.join(f'{t:.3f}' for t in times)} s {note}", flush=True)
        return label, statistics.median(times), note
    except (Exception, SystemExit) as exc:  # one broken contender must not cost the others their run
        print(f"  {label}: FAILED: {type(exc).__name__}: {exc}", flush=True)
        return label, None, f"FAILED: {type(exc).__name__}: {exc}"


def _print_device_table(rows, gib_moved, paths, specs, repeats, device, dry, limit) -> None:
    naive_s = rows[0][1]
    print()
    print(f"{gib_moved:.3f} GiB bf16 in {len(paths)} files, {len(specs)} tensors, median of {repeats}, "
          f"page cache warm, model on {device}" + (" (DRY RUN: CPU, stand-in backend)" if dry else ""))
    if limit is not None:
        print(f"pinned host->device limit {limit:.1f} GiB/s")
    header = f"{'contender':18s} {'s':>8s} {'GiB/s':>8s} {'x naive':>8s} {'% limit':>8s}  note"
    print(header)
    print("-" * len(header))
    for label, seconds, note in rows:
        if seconds is None:
            print(f"{label:18s} {'-':>8s} {'-':>8s} {'-':>8s} {'-':>8s}  {note}")
            continue
        rate = gib_moved / seconds
        ratio = f"{naive_s / seconds:7.2f}x" if naive_s else "-"
        share = f"{100 * rate / limit:7.1f}%" if limit else "-"
        print(f"{label:18s} {seconds:8.3f} {rate:8.2f} {ratio:>8s} {share:>8s}  {note}")


def run_device_case(args) -> None:
    from diffulex_core.io import staging as device_staging
    from diffulex_core.testing.cpu_backend import CpuStandInBackend

    dry = args.dry_run
    if not dry and not torch.cuda.is_available():
        raise SystemExit(f"--device cuda needs a GPU (torch {torch.__version__} sees none); "
                         f"--dry-run runs the same steps on the CPU")
    device = "cpu" if dry else "cuda:0"
    gib = args.cuda_gib if args.cuda_gib is not None else (0.05 if dry else 8.0)
    rings = _ring_shapes(args)
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_cuda_", dir=args.tmp))
    try:
        start = time.perf_counter()
        shards = shard_specs(dense_specs(gib), args.cuda_files)
        paths = [tmp / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors" for i in range(len(shards))]
        for path, shard in zip(paths, shards, strict=True):
            write_big(path, shard, torch.bfloat16)
            fsync(path)
        print(f"[{'dry-run' if dry else 'cuda'}] wrote {len(paths)} files in {time.perf_counter() - start:.1f} s",
              flush=True)
        for path in paths:
            warm_page_cache(path)
        specs: dict = {}
        for path in paths:
            specs.update(header_specs(path))
        model = Holder(specs, device=device)
        nbytes = model_bytes(model)
        gib_moved = nbytes / GIB
        print(f"[{'dry-run' if dry else 'cuda'}] {len(specs):,} tensors, {gib_moved:.3f} GiB in {len(paths)} files, "
              f"model on {device}, {os.cpu_count()} CPUs, torch {torch.__version__}", flush=True)

        limit = None
        if not dry:
            limit = pinned_limit()
            print(f"  pinned host->device limit: {limit:.1f} GiB/s", flush=True)

        def ring_call(options):
            def call(m, ps, dev):
                backend = CpuStandInBackend(check_sources=False) if dry else None
                stats = device_staged(m, ps, dev, device_staging.copy_to_device, backend=backend, **options)
                sync(dev)
                return stats
            return call

        def registered_call(m, ps, dev):
            stats = device_staged(m, ps, dev, device_staging.copy_registered, threads=args.threads,
                                  segment_bytes=int(args.segment_mib * 2**20))
            sync(dev)
            return stats

        contenders = {"naive": device_naive, "safe_open-cuda": None if dry else device_safe_open,
                      "loader": device_loader,
                      **{label: ring_call(options) for label, options in rings},
                      "registered": None if dry else registered_call}
        rows = [_time_contender(label, fn, model, paths, device, args.repeats) for label, fn in contenders.items()]
        _print_device_table(rows, gib_moved, paths, specs, args.repeats, device, dry, limit)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", default="dense,moe,tiny", help="comma-separated: dense, moe, tiny")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dense-gib", type=float, default=1.7)
    parser.add_argument("--moe-gib", type=float, default=0.8)
    parser.add_argument("--tiny-count", type=int, default=100_000)
    parser.add_argument("--tiny-width", type=int, default=16, help="float32 elements per tiny tensor")
    parser.add_argument("--rss-cases", default="dense,moe", help="cases whose peak RSS is measured ('' for none)")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary checkpoint directory goes")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                        help="cuda: the GPU comparison (naive, safe_open-cuda, loader, ring, registered) "
                             "instead of the CPU cases")
    parser.add_argument("--dry-run", action="store_true",
                        help="with --device cuda: every step on the CPU, no CUDA needed")
    parser.add_argument("--cuda-gib", type=float, default=None,
                        help="checkpoint size for --device cuda (8; 0.05 with --dry-run)")
    parser.add_argument("--cuda-files", type=int, default=4,
                        help="files the --device cuda checkpoint is split into")
    parser.add_argument("--threads", type=int, default=None,
                        help="reader / registration threads (default: one per CPU)")
    parser.add_argument("--ring-configs", default="4x64,8x16,16x8",
                        help="staging ring shapes to time, BUFFERSxMIB, comma-separated (4x64 is the default ring)")
    parser.add_argument("--segment-mib", type=float, default=256, help="registered path: bytes registered at once")
    parser.add_argument("--worker", choices=sorted(APPROACHES), help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        worker(args.worker, args.file)
        return
    if args.device == "cuda":
        run_device_case(args)
        return
    if args.dry_run:
        parser.error("--dry-run goes with --device cuda")

    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = set(cases) - {"dense", "moe", "tiny"}
    if unknown:
        parser.error(f"unknown case(s): {', '.join(sorted(unknown))}")
    rss_cases = {c.strip() for c in args.rss_cases.split(",") if c.strip()}
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_load_", dir=args.tmp))
    try:
        for case in cases:
            path = tmp / f"{case}.safetensors"
            start = time.perf_counter()
            if case == "dense":
                write_big(path, dense_specs(args.dense_gib), torch.bfloat16)
            elif case == "moe":
                write_big(path, moe_specs(args.moe_gib), torch.bfloat16)
            else:
                write_tiny(path, args.tiny_count, args.tiny_width)
            fsync(path)
            print(f"[{case}] wrote {path} in {time.perf_counter() - start:.1f} s", flush=True)
            rows.append(run_case(case, path, args.repeats, case in rss_cases))
            path.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print_table(rows, args.repeats)


if __name__ == "__main__":
    main()
