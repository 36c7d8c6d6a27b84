"""First load in a fresh process: ``load_checkpoint`` against the naive ``safe_open`` loop.

The target: a fresh process loading 100,000 tiny tensors must not be slower than the naive loop
in a fresh process. Everything a fresh process pays counts: interpreter start, imports, plugin
discovery, building the model, the plan and the copies.

Contenders, each a fresh ``python`` process (``--child``), alternating naive / loader,
``--repeats`` times; figures are medians:

* ``naive``:  ``import torch``, ``from safetensors import safe_open``, build the model, then::

      params = dict(model.named_parameters())
      with torch.no_grad(), safe_open(file, "pt") as f:
          for name in f.keys():
              params[name].copy_(f.get_tensor(name))

* ``loader``: ``import torch``, ``import diffulex_core.loader``, plugin discovery
  (``get_plugin_manager()``, which ``load_checkpoint`` would otherwise do on first use), build the
  same model, then ``load_checkpoint(model, file, progress=False)`` (defaults otherwise).

The model (both): an ``nn.Module`` tree whose parameters carry the checkpoint's names (as
``bench_load.Holder``), built from the file's header with ``torch.zeros`` (so its memory is
touched before the load). Build time is the same code for both; it is in the totals and also
reported on its own. The child imports nothing but the standard library before its timer starts
(``bench_load`` is not imported: it imports ``diffulex_core``).

Figures per run: ``wall``: the parent's clock around the whole subprocess (start to exit,
teardown included); ``to done``: from just before the parent starts the process to the moment the
child's load returns (``time.time()`` in both); the child's own breakdown (``perf_counter`` from
its first statement): import torch, import the library (safetensors / diffulex_core.loader),
plugin discovery, build, plan (``LoadReport.plan_seconds``) and apply (load call - plan; for naive
the whole loop), and ``startup`` = to done - the child's own total (interpreter start, site
imports). ratio = naive / loader (above 1: the loader is faster).

Checkpoint: ``--count`` (100,000) tensors of ``--width`` (16) float32, one file (``write_tiny``
of bench_load, duplicated here), written once to a temp dir, fsync'ed and read once (warm page
cache). Before the timed runs one untimed child per contender loads into a zeroed model and
compares a sample of parameters with the file (``torch.equal``; file tensors non-zero).

``--profile N``: afterwards, one loader child under ``python -X importtime`` (imports: the
slowest top-level imports by cumulative time, and the biggest self times under diffulex) and
one under cProfile of the load call (top N by cumulative, and by tottime).

    python benchmarks/bench_first_load.py [--repeats 5] [--profile 30]
    python benchmarks/bench_first_load.py --count 10000 --repeats 1      # quick
"""

from __future__ import annotations

import time

_T0 = time.perf_counter()  # the child's first statement (after interpreter start and site)

import argparse  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import platform  # noqa: E402
import shutil  # noqa: E402
import statistics  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
from pathlib import Path  # noqa: E402

CONTENDERS = ("naive", "loader")
STEPS = ("import_torch", "import_lib", "discovery", "build", "plan", "apply")


# --------------------------------------------------------------------------- child (fresh process)


def build_holder(path: Path):
    """bench_load.Holder: an nn.Module tree whose parameters carry exactly the checkpoint's names."""
    from named_model import build_named_model, raw_header_specs  # stdlib until a model is built

    return build_named_model(raw_header_specs(path))


def verify(model, path: Path, samples: int = 64) -> int:
    from named_model import verify_against_file

    return verify_against_file(model, path, "verify", samples)


def child(contender: str, path: Path, check: bool, profile: int) -> None:
    t: dict[str, float] = dict.fromkeys(STEPS, 0.0)
    mark = time.perf_counter()

    def lap(step: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        t[step] += now - mark
        mark = now

    import torch

    lap("import_torch")
    if contender == "naive":
        from safetensors import safe_open

        lap("import_lib")
        model = build_holder(path)
        lap("build")
        params = dict(model.named_parameters())
        with torch.no_grad(), safe_open(str(path), "pt") as f:
            for name in f.keys():
                params[name].copy_(f.get_tensor(name))
        lap("apply")
    else:
        from diffulex_core.loader import load_checkpoint

        lap("import_lib")
        from diffulex_core.plugins import get_plugin_manager

        get_plugin_manager()
        lap("discovery")
        model = build_holder(path)
        lap("build")
        profiler = None
        if profile:
            import cProfile

            profiler = cProfile.Profile()
            profiler.enable()
        report = load_checkpoint(model, path, progress=False)
        if profiler:
            profiler.disable()
        lap("apply")
        t["plan"] = report.plan_seconds
        t["apply"] -= report.plan_seconds
    done_wall = time.time()
    total = time.perf_counter() - _T0
    if profile:
        import io
        import pstats

        for key in ("cumulative", "tottime"):
            out = io.StringIO()
            pstats.Stats(profiler, stream=out).sort_stats(key).print_stats(profile)
            print(f"==== cProfile of load_checkpoint, sorted by {key} (top {profile})\n{out.getvalue()}",
                  file=sys.stderr)
    verified = verify(model, path) if check else 0
    print(json.dumps({"contender": contender, "done_wall": done_wall, "child_total": total,
                      "verified": verified, **t}), flush=True)


# --------------------------------------------------------------------------- parent


def write_tiny(path: Path, count: int, width: int) -> None:
    """bench_load.write_tiny: ``count`` float32 tensors of ``width`` random values, one file."""
    import torch
    from safetensors.torch import save_file

    gen = torch.Generator().manual_seed(0)
    rows = torch.randn(count, width, generator=gen)
    rows[rows == 0] = 1.0
    names = [f"blocks.{i // 100}.t{i % 100}" for i in range(count)]
    save_file({name: rows[i].clone() for i, name in enumerate(names)}, str(path))
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    with open(path, "rb", buffering=0) as f:  # warm page cache
        while f.read(64 << 20):
            pass


def run_child(contender: str, path: Path, *, check: bool = False, profile: int = 0,
              python_flags: tuple[str, ...] = ()) -> tuple[dict, str]:
    cmd = [sys.executable, *python_flags, __file__, "--child", contender, "--file", str(path)]
    if check:
        cmd.append("--check")
    if profile:
        cmd += ["--profile", str(profile)]
    start_wall = time.time()
    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - start
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{contender} child failed (exit {proc.returncode})")
    data = json.loads(proc.stdout.strip().splitlines()[-1])
    data["wall"] = wall
    data["to_done"] = data["done_wall"] - start_wall
    data["startup"] = data["to_done"] - data["child_total"]
    return data, proc.stderr


def importtime_summary(stderr: str, top: int = 15) -> str:
    """Top-level imports by cumulative time, and the largest self times in diffulex_* modules."""
    rows = []
    for line in stderr.splitlines():
        if not line.startswith("import time:") or "self [us]" in line:
            continue
        self_us, cum_us, name = line[len("import time:"):].split("|", 2)
        depth = (len(name) - len(name.lstrip()) - 1) // 2  # one space after "|", two more per level
        rows.append((int(self_us), int(cum_us), depth, name.strip()))
    lines = [f"  {'cumulative ms':>13} {'self ms':>8}  imports at depth 0-1 (slowest)"]
    tops = sorted((r for r in rows if r[2] <= 1), key=lambda r: -r[1])[:top]
    lines += [f"  {c / 1000:13.1f} {s / 1000:8.1f}  {n}" for s, c, _, n in tops]
    ours = sorted((r for r in rows if r[3].startswith("diffulex")), key=lambda r: -r[0])[:top]
    lines.append(f"  {'self ms':>13} {'cum ms':>8}  diffulex* modules by self time")
    lines += [f"  {s / 1000:13.1f} {c / 1000:8.1f}  {n}" for s, c, _, n in ours]
    total = sum(r[0] for r in rows)
    by_root: dict[str, int] = {}
    for s, _c, _d, n in rows:
        by_root[n.split(".")[0]] = by_root.get(n.split(".")[0], 0) + s
    lines.append(f"  self time by root package (all {total / 1000:.0f} ms of imports): " + ", ".join(
        f"{k} {v / 1000:.0f}" for k, v in sorted(by_root.items(), key=lambda kv: -kv[1])[:12]))
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--count", type=int, default=100_000, help="tensors in the checkpoint")
    parser.add_argument("--width", type=int, default=16, help="float32 elements per tensor")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="afterwards: one loader child under -X importtime, one under cProfile (top N)")
    parser.add_argument("--tmp", default="/tmp", help="where the temporary checkpoint goes")
    parser.add_argument("--child", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    parser.add_argument("--check", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        child(args.child, args.file, args.check, args.profile)
        return

    wall = time.perf_counter()
    tmp = Path(tempfile.mkdtemp(prefix="bench_first_load_", dir=args.tmp))
    try:
        path = tmp / "tiny.safetensors"
        write_tiny(path, args.count, args.width)
        print(f"{args.count:,} float32 tensors of {args.width}, {path.stat().st_size / 2**20:.1f} MiB, one file",
              flush=True)
        for contender in CONTENDERS:  # untimed: the load is right
            data, _ = run_child(contender, path, check=True)
            print(f"  verified {contender}: {data['verified']} parameters equal to the file", flush=True)
        runs: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
        for r in range(args.repeats):
            for contender in CONTENDERS:  # alternating, each a fresh process
                runs[contender].append(run_child(contender, path)[0])
            print(f"  repeat {r + 1}: " + ", ".join(
                f"{c} wall {runs[c][-1]['wall']:.3f} s (to done {runs[c][-1]['to_done']:.3f})" for c in CONTENDERS),
                flush=True)
        med = {c: {k: statistics.median(run[k] for run in runs[c])
                   for k in ("wall", "to_done", "startup", "child_total", *STEPS)} for c in CONTENDERS}
        print(f"\nmedians of {args.repeats} alternating fresh processes, page cache warm; seconds")
        cols = ("wall", "to_done", "startup", *STEPS)
        print(f"{'':8}" + "".join(f"{k:>13}" for k in cols))
        for c in CONTENDERS:
            print(f"{c:8}" + "".join(f"{med[c][k]:13.3f}" for k in cols))
        n, ld = med["naive"], med["loader"]
        print(f"{'ratio':8}" + "".join(
            f"{(n[k] / ld[k] if ld[k] else float('nan')):12.2f}x" if k in ("wall", "to_done") else f"{'':>13}"
            for k in cols))
        no_build = {c: med[c]["to_done"] - med[c]["build"] for c in CONTENDERS}
        print(f"ratio naive/loader: wall {n['wall'] / ld['wall']:.2f}x, start to load done "
              f"{n['to_done'] / ld['to_done']:.2f}x, the same without the build "
              f"{no_build['naive'] / no_build['loader']:.2f}x (above 1: the loader is faster)")
        print("import_lib = safetensors (naive) / diffulex_core.loader (loader); discovery = get_plugin_manager(); "
              "plan = LoadReport.plan_seconds; apply = the rest of the load call (naive: the whole loop); "
              "startup = to_done - the child's own clock (interpreter start, site)")

        if args.profile:
            _, stderr = run_child("loader", path, python_flags=("-X", "importtime"))
            print("\n==== python -X importtime, one loader child")
            print(importtime_summary(stderr))
            _, stderr = run_child("naive", path, python_flags=("-X", "importtime"))
            print("\n==== python -X importtime, one naive child")
            print(importtime_summary(stderr, top=8))
            _, stderr = run_child("loader", path, profile=args.profile)
            print()
            print(stderr)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    import torch

    print(f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), Python "
          f"{platform.python_version()}, torch {torch.__version__}, {platform.machine()}; "
          f"total wall {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
