"""Test helpers for family plugins: a reference of the core loader's checkpoint-name rewrite, and
a tiny mixture-of-experts LM for expert-parallel loading tests and benchmarks."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

__all__ = ["TinyMoeLM", "check_gated_mlp", "check_round_trip", "load_hf", "moe_checkpoint_tensors", "rank_main",
           "run_on_ranks", "seeded", "to_param_name"]


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


class _MoeLayer(nn.Module):
    def __init__(self, c: Mapping[str, Any]) -> None:
        from diffulex_layers.moe import SparseMoeBlock
        from diffulex_layers.transformer import RMSNorm

        super().__init__()
        self.post_attention_layernorm = RMSNorm(c["hidden"], eps=1e-6)
        self.mlp = SparseMoeBlock(c["hidden"], c["experts"], c["top_k"], c["inter"], norm_topk_prob=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.mlp(self.post_attention_layernorm(x))


class TinyMoeLM(nn.Module):
    """Embedding, ``layers`` residual sparse-MoE blocks (no attention), norm, LM head: Qwen3-MoE
    names for the expert and router tensors, built as this process's tensor/expert-parallel shard.
    Config keys: ``vocab``, ``hidden``, ``layers``, ``experts``, ``top_k``, ``inter``."""

    def __init__(self, config: Mapping[str, Any]) -> None:
        from diffulex_layers.parallel import ParallelLMHead, VocabParallelEmbedding
        from diffulex_layers.transformer import RMSNorm

        super().__init__()
        c = dict(config)
        self.model = nn.Module()
        self.model.embed_tokens = VocabParallelEmbedding(c["vocab"], c["hidden"])
        self.model.layers = nn.ModuleList(_MoeLayer(c) for _ in range(c["layers"]))
        self.model.norm = RMSNorm(c["hidden"], eps=1e-6)
        self.lm_head = ParallelLMHead(c["vocab"], c["hidden"])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.model.embed_tokens(input_ids)
        for layer in self.model.layers:
            x = layer(x)
        return self.lm_head(self.model.norm(x))


def moe_checkpoint_tensors(model: TinyMoeLM) -> dict[str, torch.Tensor]:
    """A single-process ``TinyMoeLM``'s weights under per-expert checkpoint names."""
    from diffulex_layers.moe import StackedExperts, per_expert_tensors

    out: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        prefix = name.rpartition(".")[0]
        owner = model.get_submodule(prefix)
        if not isinstance(owner, StackedExperts):
            out[name] = tensor.detach().clone().contiguous()
        elif name.endswith(".gate_up_proj"):
            out.update(per_expert_tensors(prefix, owner))
    return out


# --------------------------------------------------------------------------- layer checks on real ranks


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_on_ranks(script: str, checks: list[Callable[[int], None]], tmp_path: Path, world: int = 2,
                 wait_seconds: float = 120) -> None:
    """Run ``script`` as ``world`` gloo ranks on CPU (the script calls ``rank_main(checks)`` when run
    as ``__main__``) and fail with every rank's log unless each rank passed every check in time."""
    roots = [str(p) for p in Path(script).resolve().parents[2].glob("diffulex-*")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])}
    logs = [tmp_path / f"rank{rank}.log" for rank in range(world)]
    port = _free_port()
    procs = [subprocess.Popen([sys.executable, script, str(rank), str(world), str(port)], env=env,
                              stdout=log.open("w"), stderr=subprocess.STDOUT) for rank, log in enumerate(logs)]
    deadline = time.monotonic() + wait_seconds
    try:  # a rank that fails leaves the other waiting in a collective: stop it at once
        while any(p.poll() is None for p in procs) and time.monotonic() < deadline:
            if any(p.poll() not in (None, 0) for p in procs):
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    for rank, (proc, log) in enumerate(zip(procs, logs)):
        output = log.read_text()
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output}"
        assert all(f"ok {check.__name__}" in output for check in checks), output


def rank_main(checks: list[Callable[[int], None]]) -> None:
    """One rank of ``run_on_ranks``: join the group from ``argv`` (rank, world, port), run the checks."""
    rank, world, port = (int(arg) for arg in sys.argv[1:4])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for check in checks:
            check(rank)
            print(f"ok {check.__name__}", flush=True)
    finally:
        dist.destroy_process_group()
