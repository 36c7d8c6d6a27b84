"""A MoE family written the seed's way: stacked experts filled by one-argument loaders that declare nothing.

What the drop-in costs: every expert tensor goes through plugin code (``ResolvedWeight(loader=fn)``),
which the loader runs first, under its write watcher (and, for a model that already holds
weights, keeping the bytes it overwrites so a failed load can be undone). Contenders, each in its
own fresh process, alternating, on the same file (page cache warm):

* ``seed-loop``: Diffulex's own algorithm (``safe_open``, ``get_tensor``, walk the module prefixes
  for a resolver, call its loader or copy), the baseline;
* ``load_model``: our seed door on a materialized model (watched; like Diffulex, no undo copies);
* ``load_checkpoint``: our strict door on a materialized model (watched; keeps a host copy of every
  byte the loaders overwrite, so a failed load can be undone);
* ``load_checkpoint-meta``: our strict door on a model built on the meta device (watched; nothing to
  undo, a failure puts the model back on meta). Its time includes materializing the model (first
  touch of fresh memory), which the others did before the timer started.

Each process builds the model (untimed), times the load alone, verifies a sample of experts
against the file, and reports its peak RSS growth during the load (VmHWM reset before it) as a
share of the model's bytes.

    python benchmarks/bench_seed_moe.py [--gib 0.8] [--repeats 5]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors import safe_open
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_load import GIB, _status_kib, fsync, moe_specs, warm_page_cache, write_big  # noqa: E402

from diffulex_core.checkpoint import ResolvedWeight  # noqa: E402

CONTENDERS = ("seed-loop", "load_model", "load_checkpoint", "load_checkpoint-meta")


class FusedMoE(nn.Module):
    def __init__(self, experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.inter = inter
        self.w13_weight = nn.Parameter(torch.empty(experts, 2 * inter, hidden, dtype=torch.bfloat16))
        self.w2_weight = nn.Parameter(torch.empty(experts, hidden, inter, dtype=torch.bfloat16))
        self.resolve_checkpoint_weight = self._resolve

    def _resolve(self, suffix, ctx):
        expert, proj, _ = suffix.split(".")
        return ResolvedWeight(loader=partial(self._load, int(expert), proj))

    def _load(self, expert, proj, w):
        if proj == "gate_proj":
            self.w13_weight.data[expert, : self.inter].copy_(w)
        elif proj == "up_proj":
            self.w13_weight.data[expert, self.inter :].copy_(w)
        else:
            self.w2_weight.data[expert].copy_(w)


def build(specs: dict) -> nn.Module:
    """Plain parameters for everything but the experts, which are stacked per layer."""
    root = nn.Module()
    experts: dict[str, list] = {}
    for name, shape in specs.items():
        if ".mlp.experts." in name:
            layer, rest = name.split(".mlp.experts.")
            experts.setdefault(layer, []).append((rest, shape))
            continue
        module = root
        *path, leaf = name.split(".")
        for part in path:
            if not hasattr(module, part):
                module.add_module(part, nn.Module())
            module = getattr(module, part)
        module.register_parameter(leaf, nn.Parameter(torch.empty(shape, dtype=torch.bfloat16)))
    for layer, entries in experts.items():
        count = 1 + max(int(rest.split(".")[0]) for rest, _ in entries)
        inter, hidden = next(shape for rest, shape in entries if rest.endswith("gate_proj.weight"))
        root.get_submodule(layer + ".mlp").add_module("experts", FusedMoE(count, hidden, inter))
    return root


def seed_loop(model: nn.Module, path: Path) -> None:
    """Diffulex's load_model, minus LoRA: resolver by prefix walk, else exact parameter."""
    named = dict(model.named_modules())
    with safe_open(str(path), "pt", "cpu") as f:
        for name in f.keys():
            tensor = f.get_tensor(name)
            parts, spec = name.split("."), None
            for i in range(len(parts), 0, -1):
                module = named.get(".".join(parts[:i]))
                resolver = getattr(module, "resolve_checkpoint_weight", None) if module is not None else None
                if resolver is not None:
                    spec = resolver(".".join(parts[i:]), None)
                    if spec is not None:
                        break
            if spec is not None:
                spec.loader(tensor)
            else:
                model.get_parameter(name).data.copy_(tensor)


def worker(contender: str, path: Path, specs: dict) -> None:
    from diffulex_core.loader import load_checkpoint, load_model

    with torch.device("meta") if contender == "load_checkpoint-meta" else torch.device("cpu"):
        model = build(specs)
    if contender != "load_checkpoint-meta":
        with torch.no_grad():
            for p in model.parameters():
                p.zero_()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    Path("/proc/self/clear_refs").write_text("5")
    rss_before = _status_kib("VmRSS")
    started = time.perf_counter()
    with torch.no_grad():
        if contender == "seed-loop":
            seed_loop(model, path)
        elif contender == "load_model":
            load_model(model, SimpleNamespace(model=str(path), use_lora=False))
        elif contender == "load_checkpoint":
            load_checkpoint(model, path)
        else:
            load_checkpoint(model, path, device="cpu")
    seconds = time.perf_counter() - started
    peak = _status_kib("VmHWM")
    with safe_open(str(path), "pt", "cpu") as f:
        layers = model.model.layers
        for layer in ("0", str(len(layers._modules) - 1)):
            experts = layers.get_submodule(layer).mlp.experts
            inter = experts.inter
            for e in (0, experts.w13_weight.shape[0] - 1):
                p = f"model.layers.{layer}.mlp.experts.{e}."
                assert torch.equal(experts.w13_weight[e, :inter], f.get_tensor(p + "gate_proj.weight"))
                assert torch.equal(experts.w13_weight[e, inter:], f.get_tensor(p + "up_proj.weight"))
                assert torch.equal(experts.w2_weight[e], f.get_tensor(p + "down_proj.weight"))
    print(json.dumps({"seconds": seconds, "extra_rss": (peak - rss_before) * 1024 / model_bytes}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--gib", type=float, default=0.8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--file", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    specs = moe_specs(args.gib)
    if args.worker:
        worker(args.worker, args.file, specs)
        return
    with tempfile.TemporaryDirectory(prefix="bench_seed_moe_") as tmp:
        path = Path(tmp) / "moe.safetensors"
        write_big(path, specs, torch.bfloat16)
        fsync(path)
        warm_page_cache(path)
        size = path.stat().st_size / GIB
        print(f"{len(specs):,} tensors, {size:.3f} GiB, bf16; {args.repeats} alternating runs per contender")
        results: dict[str, list[dict]] = {c: [] for c in CONTENDERS}
        for _ in range(args.repeats):
            for contender in CONTENDERS:
                out = subprocess.run([sys.executable, __file__, "--worker", contender, "--file", str(path),
                                      "--gib", str(args.gib)], check=True, capture_output=True, text=True)
                results[contender].append(json.loads(out.stdout.strip().splitlines()[-1]))
    base = statistics.median(r["seconds"] for r in results["seed-loop"])
    print(f"{'contender':<22} {'median s':>9} {'GiB/s':>7} {'vs seed-loop':>12} {'extra RSS % of model':>21}")
    for contender, runs in results.items():
        seconds = statistics.median(r["seconds"] for r in runs)
        rss = statistics.median(r["extra_rss"] for r in runs) * 100
        print(f"{contender:<22} {seconds:>9.3f} {size / seconds:>7.2f} {base / seconds:>11.2f}x {rss:>20.1f}")
    print(f"(Python {sys.version.split()[0]}, torch {torch.__version__}, {__import__('os').cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
