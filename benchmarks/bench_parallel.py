"""Tensor- and expert-parallel loading: what each rank reads and how long it takes, 1 rank vs 2.

Two checkpoints are generated once (page cache warm afterwards): a dense LLaDA model (the bundled
``llada`` family, built on ``diffulex_layers``' parallel layers) and a mixture-of-experts model
(``diffulex_layers.testing.TinyMoeLM``: Qwen3-MoE expert and router names, experts stacked per
layer, split over the expert-parallel group). For each, ``world`` = 1 and 2 are run alternately,
``--repeats`` times; each run launches its ranks as fresh processes joined by gloo over TCP (as
``torchrun`` does), each rank builds its shard on the meta device and times ``load_checkpoint``.
Printed per case: the checkpoint's bytes, each rank's bytes read (and share), and the median load
time of the slowest rank. A rank of the same load in every engine that reads whole tensors (vLLM,
SGLang) reads 100% of the bytes.

    python benchmarks/bench_parallel.py [--repeats 3] [--scale 1.0]
"""

from __future__ import annotations

import argparse
import json
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import timedelta
from pathlib import Path

import torch
from safetensors.torch import save_file

GIB = 1024**3


def dense_config(scale: float) -> dict:
    return {"d_model": 1024, "n_heads": 16, "n_kv_heads": 8, "n_layers": max(1, round(8 * scale)),
            "mlp_hidden_size": 2816, "vocab_size": 32000, "weight_tying": False}


def moe_config(scale: float) -> dict:
    return {"vocab": 32000, "hidden": 512, "layers": max(1, round(8 * scale)), "experts": 64, "top_k": 4,
            "inter": 256}


def build(kind: str, config: dict) -> torch.nn.Module:
    if kind == "moe":
        from diffulex_layers.testing import TinyMoeLM

        return TinyMoeLM(config)
    from diffulex_llada.model import build_llada

    return build_llada(config)


def write_checkpoint(kind: str, config: dict, directory: Path) -> int:
    """A random bf16 model of the kind, saved under its checkpoint names; returns its bytes."""
    torch.manual_seed(0)
    model = build(kind, config).to(torch.bfloat16)
    if kind == "moe":
        from diffulex_layers.testing import moe_checkpoint_tensors

        tensors = moe_checkpoint_tensors(model)
    else:
        from diffulex_llada.model import to_hf_state_dict

        tensors = to_hf_state_dict(model)
    directory.mkdir(parents=True)
    save_file(tensors, str(directory / "model.safetensors"))
    return sum(t.numel() * t.element_size() for t in tensors.values())


def worker(kind: str, config_json: str, checkpoint: str, rank: int, world: int, port: int) -> None:
    """One rank: join the group, build this rank's shard on meta, time the load, print the report."""
    import torch.distributed as dist

    from diffulex_core.loader import load_checkpoint

    config = json.loads(config_json)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                                timeout=timedelta(seconds=120))
    with torch.device("meta"):
        model = build(kind, config).to(torch.bfloat16)
    if world > 1:
        dist.barrier()
    started = time.perf_counter()
    report = load_checkpoint(model, checkpoint, device="cpu")
    seconds = time.perf_counter() - started
    print(json.dumps({"rank": rank, "seconds": seconds, "bytes_read": report.bytes_read,
                      "bytes_total": report.bytes_total, "skipped": len(report.skipped)}))
    if world > 1:
        dist.barrier()  # no rank closes its connections while another still receives from it
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(kind: str, config: dict, checkpoint: Path, world: int) -> list[dict]:
    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", kind, json.dumps(config), str(checkpoint),
                               str(rank), str(world), str(port)], stdout=subprocess.PIPE, text=True)
             for rank in range(world)]
    results = []
    for proc in procs:
        out, _ = proc.communicate(timeout=600)
        if proc.returncode:
            raise SystemExit(f"a rank failed (exit {proc.returncode})")
        results.append(json.loads(out.strip().splitlines()[-1]))
    return results


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        kind, config_json, checkpoint, rank, world, port = sys.argv[2:8]
        worker(kind, config_json, checkpoint, int(rank), int(world), int(port))
        return
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scale", type=float, default=1.0, help="multiplies the number of layers")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        for kind, config in (("dense", dense_config(args.scale)), ("moe", moe_config(args.scale))):
            checkpoint = Path(tmp) / kind
            nbytes = write_checkpoint(kind, config, checkpoint)
            (checkpoint / "model.safetensors").read_bytes()  # page cache warm
            seconds: dict[int, list[float]] = {1: [], 2: []}
            reads: dict[int, list[int]] = {}
            for _ in range(args.repeats):
                for world in (1, 2):  # alternating, each rank a fresh process
                    results = run(kind, config, checkpoint, world)
                    seconds[world].append(max(r["seconds"] for r in results))
                    reads[world] = [r["bytes_read"] for r in results]
            print(f"{kind}: checkpoint {nbytes / GIB:.3f} GiB")
            for world in (1, 2):
                shares = ", ".join(f"rank {r}: {b / GIB:.3f} GiB ({b / nbytes:.1%})"
                                   for r, b in enumerate(reads[world]))
                print(f"  {world} rank(s): {shares}; load median {statistics.median(seconds[world]):.3f} s "
                      f"(slowest rank; runs {', '.join(f'{s:.3f}' for s in seconds[world])})")


if __name__ == "__main__":
    main()
