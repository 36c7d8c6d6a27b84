"""Test helpers for the family plugins: a reference of the core loader's checkpoint-name rewrite,
``FamilySuite`` (the checks every family passes, so a family's tests state only its specifics), a
tiny mixture-of-experts LM for expert-parallel loading tests and benchmarks, and gloo ranks on CPU.

pytest is imported only by the ``FamilySuite`` checks that need it: the benchmarks use this module too.
"""

from __future__ import annotations

import importlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed as dist
from torch import nn

from diffulex_core.plugin_api import ParallelState

from .moe import SparseMoeBlock, StackedExperts, per_expert_tensors
from .parallel import ParallelLMHead, VocabParallelEmbedding
from .transformer import RMSNorm

if TYPE_CHECKING:
    import pytest

__all__ = ["FamilySuite", "TinyMoeLM", "check_gated_mlp", "check_round_trip", "load_hf", "moe_checkpoint_tensors",
           "rank_main", "run_on_ranks", "seeded", "simulated_rank", "to_param_name"]


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
    it ``source`` again, bit for bit (the two are built from one config)."""
    assert all(t.is_contiguous() for t in state_dict.values())
    assert load_hf(target, state_dict) == set(dict(target.named_parameters()))
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values(), strict=True):
        assert torch.equal(a, b), name
    ids = torch.randint(0, 100, (2, 5))
    torch.testing.assert_close(target(ids), source(ids), rtol=0, atol=0)


# --------------------------------------------------------------------------- the checks of every family


class FamilySuite:
    """What every bundled family must do, run by subclassing: ``class TestDream(FamilySuite)`` in
    the family's test module sets the attributes and ``check_*`` methods below (its specifics),
    and pytest collects the inherited checks, parametrized by ``pytest_generate_tests``.

    Set ``build`` and ``export`` with ``staticmethod``. The argument names of the checks
    (``built_config``, ``config_json``, ``resolved``, ``bad_config``, ``message``, ``tie``, ``bias``)
    are parametrized here: a subclass's own test methods should not use them.
    """

    family: str  # the built model's diffulex_family
    plugin: str  # the plugin module: it registers ``registered`` and imports without torch
    registered: list[tuple[str, str]]  # (family, "module:factory") in the order the plugin registers them
    model_class: type[nn.Module]
    build: Callable[..., nn.Module]  # the factory
    export: Callable[[nn.Module], dict[str, torch.Tensor]]  # the weights under checkpoint names
    tiny: dict[str, Any]  # a tiny config; its vocabulary takes token ids below 100
    released: dict[str, Any]  # a released model's config.json sizes (built on the meta device only)
    config_cases: list[tuple[dict, dict]]  # (config.json, the TransformerConfig fields it resolves to)
    rejected: list[tuple[dict, str]]  # (config.json, the pattern of the ValueError that building raises)
    max_positions_key: str  # the config key of the rotary cache's length
    tiny_logits: int  # the size of ``tiny``'s logits' last dimension (its padded vocabulary)
    mlp_weights: tuple[str, str, str]  # layer 0's gate, up and down checkpoint names
    tie_key: str  # the config key that ties lm_head to the embedding
    bias_key: str | None = None  # a config switch for biases that the round trip tries both ways
    lm_head_name: str = "lm_head.weight"  # the LM head's checkpoint name

    def check_released(self, model: nn.Module) -> None:
        """Shapes of the released model built on meta."""
        raise NotImplementedError

    def check_defaults(self, model: nn.Module) -> None:
        """What the model built from an empty config has beyond the shared small defaults."""

    def check_checkpoint(self, state_dict: Mapping[str, torch.Tensor], tie: bool, bias: bool) -> None:
        """The export of ``tiny`` with ``tie_key=tie`` (and ``bias_key=bias``): names, count, shapes."""
        raise NotImplementedError

    def pytest_generate_tests(self, metafunc: pytest.Metafunc) -> None:
        """pytest calls this for each check: the family's cases become the check's parameters."""
        cases = {
            "built_config": ([None, self.tiny, self.released], ["default", "tiny", "released"]),
            "config_json,resolved": (self.config_cases, [str(i) for i in range(len(self.config_cases))]),
            "bad_config,message": (self.rejected, [str(i) for i in range(len(self.rejected))]),
            "tie": ([False, True], ["untied", "tied"]),
            "bias": ([False, True], ["bias_off", "bias_on"]) if self.bias_key else ([False], ["bias_off"]),
        }
        for argnames, (values, ids) in cases.items():
            if set(argnames.split(",")) <= set(metafunc.fixturenames):
                metafunc.parametrize(argnames, values, ids=ids)

    def test_builds_on_meta_without_storage(self, built_config: dict | None) -> None:
        with torch.device("meta"):
            model = self.build(built_config)
        assert model.diffulex_family == self.family
        assert model.config_dict == dict(built_config or {})
        assert all(t.is_meta for t in [*model.parameters(), *model.buffers()])
        if built_config is self.released:
            self.check_released(model)

    def test_defaults_are_small(self) -> None:
        model = self.build()
        layer = model.model.layers[0]
        assert len(model.model.layers) == 2
        assert layer.self_attn.qkv_proj.weight.shape == ((4 + 2 * 2) * 16, 64)
        assert layer.mlp.gate_up_proj.weight.shape == (256, 64)
        self.check_defaults(model)
        assert model(torch.randint(0, 256, (1, 5))).shape == (1, 5, 256)

    def test_config_keys(self, config_json: dict, resolved: dict) -> None:
        c = self.model_class.resolve_config(config_json)
        assert {key: getattr(c, key) for key in resolved} == resolved

    def test_bad_sizes_are_rejected(self, bad_config: dict, message: str) -> None:
        import pytest

        with pytest.raises(ValueError, match=message):
            self.build(bad_config)

    def test_forward_shape_and_max_positions(self) -> None:
        model = seeded(self.build, self.tiny, 0)
        ids = torch.randint(0, 100, (2, 7))
        logits = model(ids)
        assert logits.shape == (2, 7, self.tiny_logits) and torch.isfinite(logits).all()
        short = seeded(self.build, {**self.tiny, self.max_positions_key: 4}, 0)  # same weights, tiny rotary cache
        torch.testing.assert_close(short(ids), logits)  # the cache grows past the configured length

    def test_checkpoint_mlp_is_silu_gated(self) -> None:
        model = seeded(self.build, self.tiny, 1)
        state_dict = self.export(model)
        gate, up, down = (state_dict[name] for name in self.mlp_weights)
        check_gated_mlp(model.model.layers[0].mlp, gate, up, down)

    def test_hf_round_trip(self, tie: bool, bias: bool) -> None:
        config = {**self.tiny, self.tie_key: tie, **({self.bias_key: bias} if self.bias_key else {})}
        source, target = seeded(self.build, config, 2), seeded(self.build, config, 3)
        assert (target.lm_head.weight is target.model.embed_tokens.weight) is tie
        state_dict = self.export(source)
        assert (self.lm_head_name in state_dict) is not tie
        self.check_checkpoint(state_dict, tie, bias)
        check_round_trip(source, target, state_dict)

    def test_plugin_registers_lazy_factory_without_importing_torch(self) -> None:
        import pytest

        pytest.importorskip("diffulex_core")
        import pluggy

        pm = pluggy.PluginManager("diffulex")
        pm.register(importlib.import_module(self.plugin))
        calls = []
        pm.hook.diffulex_register_families(register=lambda *a, **k: calls.append((a, k)))
        assert calls == [(registration, {}) for registration in self.registered]
        code = f"import sys, {self.plugin}; assert 'torch' not in sys.modules, 'torch imported'"
        env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
        subprocess.run([sys.executable, "-c", code], check=True, env=env)
        assert self.model_class.diffulex_family == self.family
        packed = sys.modules[self.build.__module__].PackedLinear  # re-exported by the family's model module
        assert isinstance(self.build(self.tiny).model.layers[0].self_attn.qkv_proj, packed)


# --------------------------------------------------------------------------- a tiny mixture-of-experts LM


class _MoeLayer(nn.Module):
    def __init__(self, c: Mapping[str, Any]) -> None:
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


def simulated_rank(rank: int, size: int) -> ParallelState:
    """Rank ``rank`` of ``size`` for tensor and expert parallelism, in one process: the layers
    build that rank's part; the group is a stand-in, so no collective may run."""
    group = object()
    return ParallelState(rank, size, group, rank, size, group)


def run_on_ranks(script: str, checks: list[Callable[[int], None]], tmp_path: Path, world: int = 2,
                 wait_seconds: float = 120) -> None:
    """Run ``script`` as ``world`` gloo ranks on CPU (the script calls ``rank_main(checks)`` when run
    as ``__main__``) and fail with every rank's log unless each rank passed every check within
    ``wait_seconds`` (a hang fails the test instead of blocking CI)."""
    roots = [str(p) for p in Path(script).resolve().parents[2].glob("diffulex-*")]
    path = os.pathsep.join([*roots, os.environ.get("PYTHONPATH", "")])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    logs = [tmp_path / f"rank{rank}.log" for rank in range(world)]
    rendezvous = tmp_path / "rendezvous"  # a FileStore: no TCP store thread that can outlive its rank at exit
    rendezvous.unlink(missing_ok=True)
    procs = [subprocess.Popen([sys.executable, script, str(rank), str(world), str(rendezvous)], env=env,
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
    for rank, (proc, log) in enumerate(zip(procs, logs, strict=True)):
        output = log.read_text()
        assert proc.returncode == 0, f"rank {rank} exited {proc.returncode}:\n{output}"
        assert all(f"ok {check.__name__}" in output for check in checks), output


def rank_main(checks: list[Callable[[int], None]]) -> None:
    """One rank of ``run_on_ranks``: join the group from ``argv`` (rank, world, rendezvous file), run the checks."""
    rank, world, rendezvous = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
    dist.init_process_group("gloo", init_method=f"file://{rendezvous}", rank=rank, world_size=world,
                            timeout=timedelta(seconds=60))
    try:
        for check in checks:
            check(rank)
            print(f"ok {check.__name__}", flush=True)
        dist.barrier()  # no rank closes its gloo connections while another still uses them
    finally:
        dist.destroy_process_group()
