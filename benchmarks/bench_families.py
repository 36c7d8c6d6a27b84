"""Loading real family layouts: ``load_checkpoint`` against a hand-written engine loader.

Each case writes a checkpoint with a bundled family's real checkpoint names and config.json,
builds that family's model, and loads it two ways:

* ``naive``: what a hand-written engine loader does: ``safe_open`` every file, ``get_tensor``
  every key, map the name to its destination by hand (the case's ``naive_map``) and call the
  destination's ``weight_loader`` with a shard id where the name is packed or stacked (the same
  weight loaders the family's parameters carry); else, for cases with ``naive_whole_loaders``
  (llada_*), the parameter's own whole-tensor ``weight_loader(param, tensor)`` where it has one,
  and otherwise ``params[name].copy_(tensor)``;
* ``loader``: ``load_checkpoint(model, dir, progress=False)``, the defaults otherwise (strict; on
  a model that already holds weights it keeps a host copy of what weight loaders overwrite, so a
  failed load can be undone).

Both start from the same state: the worker builds the model on the CPU, casts it to the case's
dtype and zero-fills every parameter *before* the timer starts (materialized-before-timing, so
neither pays for first-touching fresh memory inside the timer). The loader's first-use imports
and plugin discovery are also done before the timer. The timed part is the load call alone.

Method: the checkpoint is written once per case to a temp dir under /tmp (deleted after the
case), fsync'ed and read once, untimed, so the page cache is warm. Each contender runs in its own
fresh process (``--worker``), alternating naive / loader, ``--repeats`` times; figures are
medians. After loading (untimed) each worker compares a sample of parameters (first/middle/last
layers, expert slots, plain tensors) with the file's tensors, cast to the model's dtype where
they differ (``torch.equal``; the file's tensors are checked to be non-zero) and exits non-zero if
any differs. GiB is checkpoint tensor bytes; GiB/s is over the load call. ratio = naive s /
loader s (above 1: the loader is faster). Peak RSS: each worker resets VmHWM
(``/proc/self/clear_refs``) after building, zeroing and imports; extra RSS = VmHWM after the load
- VmRSS before it, as a % of the model's parameter bytes (file pages a memory map touches count).

Cases (``--cases``, comma-separated; add more to ``CASES``: a write function, a build function,
the naive name mapping, the verification sample and the model's dtype):

* ``sdar_moe``: the bundled ``sdar_moe`` family (Qwen3-MoE names), bf16, ``--layers`` (48) layers
  of ``--experts`` (128) experts, top-8, hidden 64, 4 heads / 2 kv heads of 16, expert width 32,
  vocab 1024: 18,867 tiny tensors (~0.07 GiB) in ``--files`` (4) shards with an index.
* ``llada_bf16`` / ``llada_fp32``: the bundled ``llada`` family (LLaDA names,
  ``model.transformer.blocks.N.{q_proj,...,ff_out}``), a bf16 checkpoint of ``--llada-layers``
  (24) layers, 16 heads = 16 kv heads (``n_kv_heads`` null), SwiGLU width 2.75 x d_model (2048 ->
  5632, as LLaDA's family), vocab 32000, untied LM head, d_model solved (multiple of 128) for
  ``--llada-gib`` (1.7: d_model 1664, MLP 4608, 219 tensors, 1.72 GiB) or set by
  ``--llada-hidden``; in ``--files`` (4) shards with an index. ``llada_bf16`` loads it into bf16
  parameters; ``llada_fp32`` into float32 parameters, so every tensor is cast.

    python benchmarks/bench_families.py [--cases sdar_moe,llada_bf16,llada_fp32] [--repeats 3]
    python benchmarks/bench_families.py --layers 4 --experts 16 --llada-gib 0.1 --llada-layers 4 --repeats 1  # quick
    python benchmarks/bench_families.py --profile 25   # also: one loader worker under cProfile
"""

from __future__ import annotations

import argparse
import cProfile
import io
import json
import math
import os
import platform
import pstats
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, NamedTuple

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

sys.path.insert(0, str(Path(__file__).parent))
from bench_load import DTYPES, GIB, fsync, warm_page_cache  # noqa: E402
from peak_rss import reset_peak_rss, status_kib  # noqa: E402

CONTENDERS = ("naive", "loader")
INDEX_NAME = "model.safetensors.index.json"


# --------------------------------------------------------------------------- writing checkpoints


class Pool:
    """Random-looking, non-zero content without generating one random number per element: each
    tensor is a copy of a random pool from its own offset (consecutive tensors differ)."""

    def __init__(self, dtype: torch.dtype, size: int = (1 << 20) + 4099) -> None:
        gen = torch.Generator().manual_seed(0)
        pool = torch.randn(size, generator=gen)
        pool[pool == 0] = 1.0
        self.size, self.count = size, 0
        self.data = torch.cat([pool, pool]).to(dtype)

    def take(self, shape: tuple[int, ...]) -> torch.Tensor:
        n = math.prod(shape)
        offset = (self.count * 7919) % self.size
        self.count += 1
        if n > self.size:  # the pool from this tensor's own offset, repeated (so same-shaped tensors differ)
            reps = -(-n // self.size)
            return self.data[offset:offset + self.size].repeat(reps)[:n].view(shape)
        return self.data[offset:offset + n].view(shape).clone()


def write_shards(directory: Path, shards: list[dict[str, tuple[int, ...]]], dtype: torch.dtype,
                 config: dict) -> None:
    """``shards`` (names -> shapes, one dict per file) as HF-style files plus index and config.json."""
    directory.mkdir(parents=True, exist_ok=True)
    pool = Pool(dtype)
    weight_map: dict[str, str] = {}
    total = 0
    for i, specs in enumerate(shards):
        name = "model.safetensors" if len(shards) == 1 else f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
        tensors = {key: pool.take(shape) for key, shape in specs.items()}
        total += sum(t.numel() * t.element_size() for t in tensors.values())
        save_file(tensors, str(directory / name), metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))
        del tensors
    if len(shards) > 1:
        (directory / INDEX_NAME).write_text(json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map},
                                                       indent=2))
    (directory / "config.json").write_text(json.dumps(config, indent=2))


def split_layers(layers: int, files: int) -> list[range]:
    """Contiguous layer ranges, one per file (as HF's sharding keeps a layer's tensors together)."""
    files = max(1, min(files, layers))
    bounds = [round(i * layers / files) for i in range(files + 1)]
    return [range(bounds[i], bounds[i + 1]) for i in range(files)]


# --------------------------------------------------------------------------- case: sdar_moe


def sdar_moe_config(args: argparse.Namespace) -> dict:
    return {
        "architectures": ["SDARMoeForCausalLM"], "model_type": "sdar_moe", "torch_dtype": "bfloat16",
        "hidden_size": 64, "num_hidden_layers": args.layers, "num_attention_heads": 4, "num_key_value_heads": 2,
        "head_dim": 16, "intermediate_size": 128, "vocab_size": 1024, "num_experts": args.experts,
        "num_experts_per_tok": min(8, args.experts), "moe_intermediate_size": 32, "norm_topk_prob": True,
        "decoder_sparse_step": 1, "mlp_only_layers": [], "block_size": 4, "tie_word_embeddings": False,
        "rms_norm_eps": 1e-6, "rope_theta": 10000.0, "max_position_embeddings": 2048,
    }  # fmt: skip


def sdar_moe_write(directory: Path, args: argparse.Namespace) -> None:
    """Qwen3-MoE checkpoint names, every layer sparse (decoder_sparse_step 1, no mlp_only_layers)."""
    cfg = sdar_moe_config(args)
    hidden, heads, kv, hd = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["head_dim"]
    inter, experts, vocab = cfg["moe_intermediate_size"], cfg["num_experts"], cfg["vocab_size"]
    shards: list[dict[str, tuple[int, ...]]] = []
    ranges = split_layers(cfg["num_hidden_layers"], args.files)
    for i, layers in enumerate(ranges):
        specs: dict[str, tuple[int, ...]] = {}
        if i == 0:
            specs["model.embed_tokens.weight"] = (vocab, hidden)
        for n in layers:
            p = f"model.layers.{n}"
            specs[f"{p}.input_layernorm.weight"] = (hidden,)
            specs[f"{p}.self_attn.q_proj.weight"] = (heads * hd, hidden)
            specs[f"{p}.self_attn.k_proj.weight"] = (kv * hd, hidden)
            specs[f"{p}.self_attn.v_proj.weight"] = (kv * hd, hidden)
            specs[f"{p}.self_attn.o_proj.weight"] = (hidden, heads * hd)
            specs[f"{p}.self_attn.q_norm.weight"] = (hd,)
            specs[f"{p}.self_attn.k_norm.weight"] = (hd,)
            specs[f"{p}.post_attention_layernorm.weight"] = (hidden,)
            specs[f"{p}.mlp.gate.weight"] = (experts, hidden)
            for e in range(experts):
                specs[f"{p}.mlp.experts.{e}.gate_proj.weight"] = (inter, hidden)
                specs[f"{p}.mlp.experts.{e}.up_proj.weight"] = (inter, hidden)
                specs[f"{p}.mlp.experts.{e}.down_proj.weight"] = (hidden, inter)
        if i == len(ranges) - 1:
            specs["model.norm.weight"] = (hidden,)
            specs["lm_head.weight"] = (vocab, hidden)
        shards.append(specs)
    write_shards(directory, shards, torch.bfloat16, cfg)


def sdar_moe_build(config: dict) -> nn.Module:
    from diffulex_sdar.model import build_sdar_moe

    return build_sdar_moe(config)


def sdar_moe_naive_map(name: str) -> tuple[str, Any]:
    """Checkpoint name -> (parameter name, shard id or None), written by hand as engines do."""
    if ".mlp.experts." in name:
        prefix, rest = name.split(".mlp.experts.")
        expert, proj, _ = rest.split(".")
        if proj == "down_proj":
            return f"{prefix}.mlp.experts.down_proj", int(expert)
        return f"{prefix}.mlp.experts.gate_up_proj", (int(expert), 0 if proj == "gate_proj" else 1)
    for shard in ("q", "k", "v"):
        packed = f".self_attn.{shard}_proj."
        if packed in name:
            return name.replace(packed, ".self_attn.qkv_proj."), shard
    return name, None


def sdar_moe_samples(model: nn.Module) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """(checkpoint name, the model's view of it) for first/last layers and expert slots, plain tensors."""
    layers = model.model.layers
    out: list[tuple[str, Callable[[], torch.Tensor]]] = []
    last = len(layers) - 1
    for n in sorted({0, last // 2, last}):
        layer, p = layers[n], f"model.layers.{n}"
        experts = layer.mlp.experts
        count, inter = experts.gate_up_proj.shape[0], experts.inter
        for e in sorted({0, 1, count // 2, count - 1}):
            q = f"{p}.mlp.experts.{e}"
            out.append((f"{q}.gate_proj.weight", lambda x=experts, e=e, i=inter: x.gate_up_proj[e, :i]))
            out.append((f"{q}.up_proj.weight", lambda x=experts, e=e, i=inter: x.gate_up_proj[e, i:]))
            out.append((f"{q}.down_proj.weight", lambda x=experts, e=e: x.down_proj[e]))
        qkv = layer.self_attn.qkv_proj
        for shard in ("q", "k", "v"):
            start, size = qkv.shard_slices[shard]
            out.append((f"{p}.self_attn.{shard}_proj.weight", lambda w=qkv.weight, s=start, z=size: w[s:s + z]))
        for plain in ("self_attn.o_proj.weight", "self_attn.k_norm.weight", "mlp.gate.weight",
                      "post_attention_layernorm.weight"):
            out.append((f"{p}.{plain}", lambda m=layer, k=plain: m.get_parameter(k)))
    for plain in ("model.embed_tokens.weight", "model.norm.weight", "lm_head.weight"):
        out.append((plain, lambda k=plain: model.get_parameter(k)))
    return out


# --------------------------------------------------------------------------- cases: llada_bf16, llada_fp32

LLADA_HEADS, LLADA_VOCAB = 16, 32000


def llada_width(args: argparse.Namespace) -> tuple[int, int]:
    """(d_model, mlp_hidden_size): ``--llada-hidden``, or the multiple of 128 whose checkpoint
    (``--llada-layers`` layers, vocab 32000, untied head) is closest to ``--llada-gib`` of bf16."""

    def inter(d: int) -> int:
        return round(2.75 * d / 64) * 64  # 2048 -> 5632, LLaDA-style SwiGLU width

    def elements(d: int) -> int:
        return args.llada_layers * (4 * d * d + 3 * d * inter(d) + 2 * d) + 2 * LLADA_VOCAB * d + d

    if args.llada_hidden:
        return args.llada_hidden, inter(args.llada_hidden)
    target = args.llada_gib * GIB / 2
    d = min(range(128, 8192 + 1, 128), key=lambda d: abs(elements(d) - target))
    return d, inter(d)


def llada_config(args: argparse.Namespace) -> dict:
    d, inter = llada_width(args)
    return {
        "architectures": ["LLaDAModelLM"], "model_type": "llada", "torch_dtype": "bfloat16",
        "d_model": d, "n_heads": LLADA_HEADS, "n_kv_heads": None, "n_layers": args.llada_layers,
        "mlp_hidden_size": inter, "vocab_size": LLADA_VOCAB, "embedding_size": LLADA_VOCAB,
        "include_bias": False, "include_qkv_bias": False, "weight_tying": False, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "max_sequence_length": 4096, "mask_token_id": 126336,
    }  # fmt: skip


def llada_write(directory: Path, args: argparse.Namespace) -> None:
    """LLaDA checkpoint names (model.transformer.*), ``--files`` shards of whole layers, bf16."""
    cfg = llada_config(args)
    d, inter, vocab = cfg["d_model"], cfg["mlp_hidden_size"], cfg["vocab_size"]
    shards: list[dict[str, tuple[int, ...]]] = []
    ranges = split_layers(cfg["n_layers"], args.files)
    for i, layers in enumerate(ranges):
        specs: dict[str, tuple[int, ...]] = {}
        if i == 0:
            specs["model.transformer.wte.weight"] = (vocab, d)
        for n in layers:
            p = f"model.transformer.blocks.{n}"
            specs[f"{p}.attn_norm.weight"] = (d,)
            for proj in ("q_proj", "k_proj", "v_proj", "attn_out"):  # n_kv_heads == n_heads
                specs[f"{p}.{proj}.weight"] = (d, d)
            specs[f"{p}.ff_norm.weight"] = (d,)
            specs[f"{p}.ff_proj.weight"] = (inter, d)
            specs[f"{p}.up_proj.weight"] = (inter, d)
            specs[f"{p}.ff_out.weight"] = (d, inter)
        if i == len(ranges) - 1:
            specs["model.transformer.ln_f.weight"] = (d,)
            specs["model.transformer.ff_out.weight"] = (vocab, d)
        shards.append(specs)
    write_shards(directory, shards, torch.bfloat16, cfg)


def llada_build(config: dict) -> nn.Module:
    from diffulex_llada.model import build_llada

    return build_llada(config)


LLADA_BLOCK = {  # LLaDA block tensor -> (parameter under model.layers.N, shard id or None)
    "q_proj": ("self_attn.qkv_proj", "q"), "k_proj": ("self_attn.qkv_proj", "k"),
    "v_proj": ("self_attn.qkv_proj", "v"), "attn_out": ("self_attn.o_proj", None),
    "ff_proj": ("mlp.gate_up_proj", 0), "up_proj": ("mlp.gate_up_proj", 1), "ff_out": ("mlp.down_proj", None),
    "attn_norm": ("input_layernorm", None), "ff_norm": ("post_attention_layernorm", None),
}  # fmt: skip
LLADA_TOP = {"model.transformer.wte.weight": "model.embed_tokens.weight",
             "model.transformer.ln_f.weight": "model.norm.weight",
             "model.transformer.ff_out.weight": "lm_head.weight"}


def llada_naive_map(name: str) -> tuple[str, Any]:
    """Checkpoint name -> (parameter name, shard id or None), written by hand as engines do."""
    if name in LLADA_TOP:
        return LLADA_TOP[name], None
    _model, _transformer, _blocks, n, module, leaf = name.split(".")
    target, shard = LLADA_BLOCK[module]
    return f"model.layers.{n}.{target}.{leaf}", shard


def llada_samples(model: nn.Module) -> list[tuple[str, Callable[[], torch.Tensor]]]:
    """(checkpoint name, the model's view of it): every tensor of the first/middle/last layers, plain tensors."""
    layers = model.model.layers
    out: list[tuple[str, Callable[[], torch.Tensor]]] = []
    last = len(layers) - 1
    for n in sorted({0, last // 2, last}):
        layer, p = layers[n], f"model.transformer.blocks.{n}"
        for module, (target, shard) in LLADA_BLOCK.items():
            packed = layer.get_submodule(target)
            if shard is None:
                out.append((f"{p}.{module}.weight", lambda m=packed: m.weight))
            else:
                start, size = packed.shard_slices[shard]
                out.append((f"{p}.{module}.weight", lambda m=packed, s=start, z=size: m.weight[s:s + z]))
    for name, param in LLADA_TOP.items():
        out.append((name, lambda k=param: model.get_parameter(k)))
    return out


class Case(NamedTuple):
    write: Callable[[Path, argparse.Namespace], None]  # writes the checkpoint files and config.json
    build: Callable[[dict], nn.Module]  # config.json -> the family's model (on the default device)
    naive_map: Callable[[str], tuple[str, Any]]  # checkpoint name -> (parameter, shard id or None)
    samples: Callable[[nn.Module], list[tuple[str, Callable[[], torch.Tensor]]]]  # what verify compares
    dtype: torch.dtype  # the model's parameters (the checkpoint may differ: every tensor is then cast)
    naive_whole_loaders: bool = False  # naive: whole tensors through the parameter's weight_loader if any


CASES: dict[str, Case] = {
    "sdar_moe": Case(sdar_moe_write, sdar_moe_build, sdar_moe_naive_map, sdar_moe_samples, torch.bfloat16),
    "llada_bf16": Case(llada_write, llada_build, llada_naive_map, llada_samples, torch.bfloat16, True),
    "llada_fp32": Case(llada_write, llada_build, llada_naive_map, llada_samples, torch.float32, True),
}


# --------------------------------------------------------------------------- the two contenders


def checkpoint_files(directory: Path) -> list[Path]:
    index = directory / INDEX_NAME
    if index.exists():
        names = json.loads(index.read_text())["weight_map"].values()
        return [directory / name for name in sorted(set(names))]
    return sorted(directory.glob("*.safetensors"))


def load_naive(model: nn.Module, directory: Path, case: Case) -> None:
    params = dict(model.named_parameters())
    naive_map, whole_loaders = case.naive_map, case.naive_whole_loaders
    with torch.no_grad():
        for path in checkpoint_files(directory):
            with safe_open(str(path), "pt", device="cpu") as f:
                for key in f.keys():
                    tensor = f.get_tensor(key)
                    name, shard_id = naive_map(key)
                    param = params[name]
                    if shard_id is not None:
                        param.weight_loader(param, tensor, shard_id)
                    elif whole_loaders and hasattr(param, "weight_loader"):
                        param.weight_loader(param, tensor)
                    else:
                        param.copy_(tensor)


def load_loader(model: nn.Module, directory: Path) -> Any:
    from diffulex_core.loader import load_checkpoint

    return load_checkpoint(model, directory, progress=False)


def tensor_stats(directory: Path) -> tuple[int, int]:
    count = nbytes = 0
    for path in checkpoint_files(directory):
        with safe_open(str(path), "pt", device="cpu") as f:
            for key in f.keys():
                sl = f.get_slice(key)
                count += 1
                nbytes += math.prod(sl.get_shape()) * DTYPES[sl.get_dtype()].itemsize
    return count, nbytes


def verify(model: nn.Module, directory: Path, case: Case) -> int:
    """Compare the case's sample with the file; SystemExit(1) on any difference."""
    where = {}
    for path in checkpoint_files(directory):
        with safe_open(str(path), "pt", device="cpu") as f:
            where.update(dict.fromkeys(f.keys(), path))
    samples = case.samples(model)
    for name, view in samples:
        with safe_open(str(where[name]), "pt", device="cpu") as f:
            expected = f.get_tensor(name)
        if not torch.any(expected != 0):
            print(f"verify: file tensor {name!r} is all zeros; the check would prove nothing", file=sys.stderr)
            raise SystemExit(1)
        got = view()
        if got.dtype != case.dtype:
            print(f"verify: parameter for {name!r} is {got.dtype}, not {case.dtype}", file=sys.stderr)
            raise SystemExit(1)
        if not torch.equal(got, expected.to(case.dtype)):  # exact: bf16 -> fp32 is lossless
            print(f"verify: parameter for {name!r} differs from the checkpoint after loading", file=sys.stderr)
            raise SystemExit(1)
    return len(samples)


def worker(contender: str, case_name: str, directory: Path, profile: int) -> None:
    """Build + zero the model (untimed), time the load alone, verify (untimed), print one JSON line.

    Peak RSS: VmHWM is reset (``/proc/self/clear_refs``) once the model is built, zeroed and the
    imports are done; extra = VmHWM after the load - VmRSS before it (file pages mapped count)."""
    case = CASES[case_name]
    config = json.loads((directory / "config.json").read_text())
    model = case.build(config).to(case.dtype)
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
    model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
    if contender == "loader":  # first-use imports and plugin discovery, outside the timer
        import diffulex_core.loader  # noqa: F401
        from diffulex_core.plugins import get_plugin_manager

        get_plugin_manager()
    hwm_reset = reset_peak_rss()
    rss_before = status_kib("VmRSS")
    profiler = cProfile.Profile() if profile else None
    if profiler:
        profiler.enable()
    started = time.perf_counter()
    if contender == "naive":
        load_naive(model, directory, case)
    else:
        load_loader(model, directory)
    seconds = time.perf_counter() - started
    hwm_after = status_kib("VmHWM")
    if profiler:
        profiler.disable()
        out = io.StringIO()
        pstats.Stats(profiler, stream=out).sort_stats("cumulative").print_stats(profile)
        print(out.getvalue(), file=sys.stderr)
    checked = verify(model, directory, case)
    print(json.dumps({"contender": contender, "seconds": seconds, "verified": checked, "model_bytes": model_bytes,
                      "rss_before_kib": rss_before, "hwm_after_kib": hwm_after, "hwm_reset": hwm_reset,
                      "extra_rss_pct": 100.0 * (hwm_after - rss_before) * 1024 / model_bytes}))


def run_worker(contender: str, case: str, directory: Path, profile: int = 0) -> dict:
    cmd = [sys.executable, __file__, "--worker", contender, "--cases", case, "--dir", str(directory)]
    if profile:
        cmd += ["--profile", str(profile)]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode:
        sys.stderr.write(proc.stderr)
        raise SystemExit(f"{case}/{contender} worker failed (exit {proc.returncode})")
    if profile:
        sys.stdout.write(proc.stderr)
    return json.loads(proc.stdout.strip().splitlines()[-1])


# --------------------------------------------------------------------------- main


def run_case(name: str, directory: Path, args: argparse.Namespace) -> dict:
    started = time.perf_counter()
    CASES[name].write(directory, args)
    files = checkpoint_files(directory)
    for path in files:
        fsync(path)
        warm_page_cache(path)
    count, nbytes = tensor_stats(directory)
    print(f"[{name}] {count:,} tensors, {nbytes / GIB:.3f} GiB in {len(files)} file(s), "
          f"written in {time.perf_counter() - started:.1f} s", flush=True)
    times: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    rss: dict[str, list[float]] = {c: [] for c in CONTENDERS}
    for r in range(args.repeats):
        for contender in CONTENDERS:  # alternating, each a fresh process
            result = run_worker(contender, name, directory)
            if not result["hwm_reset"]:
                print(f"  note: VmHWM could not be reset; {contender}'s peak RSS may be overstated", flush=True)
            times[contender].append(result["seconds"])
            rss[contender].append(result["extra_rss_pct"])
        print(f"  repeat {r + 1}: " + ", ".join(f"{c} {times[c][-1]:.3f} s (+{rss[c][-1]:.1f}% RSS)"
                                                for c in CONTENDERS), flush=True)
    row = {"case": name, "tensors": count, "gib": nbytes / GIB, "model_gib": result["model_bytes"] / GIB,
           **{f"{c}_s": statistics.median(times[c]) for c in CONTENDERS},
           **{f"{c}_rss": statistics.median(rss[c]) for c in CONTENDERS}}
    row["ratio"] = row["naive_s"] / row["loader_s"]
    if args.profile:
        print(f"  cProfile of one loader worker's load call (top {args.profile}, cumulative):", flush=True)
        run_worker("loader", name, directory, args.profile)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--cases", default=",".join(CASES), help=f"comma-separated, of {', '.join(CASES)}")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--layers", type=int, default=48, help="sdar_moe: decoder layers")
    parser.add_argument("--experts", type=int, default=128, help="sdar_moe: experts per layer")
    parser.add_argument("--llada-gib", type=float, default=1.7,
                        help="llada_*: checkpoint size (bf16) the width is solved for")
    parser.add_argument("--llada-layers", type=int, default=24, help="llada_*: decoder layers")
    parser.add_argument("--llada-hidden", type=int, default=0,
                        help="llada_*: d_model (multiple of 16; 0: solved from --llada-gib)")
    parser.add_argument("--files", type=int, default=4, help="safetensors shards per checkpoint")
    parser.add_argument("--profile", type=int, default=0, metavar="N",
                        help="after the timed runs, profile one loader worker and print the top N lines")
    parser.add_argument("--worker", choices=CONTENDERS, help=argparse.SUPPRESS)
    parser.add_argument("--dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    unknown = [c for c in cases if c not in CASES]
    if unknown:
        parser.error(f"unknown case(s) {unknown}; known: {list(CASES)}")
    if args.worker:
        worker(args.worker, cases[0], args.dir, args.profile)
        return
    wall = time.perf_counter()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="bench_families_"))
    try:
        for name in cases:
            rows.append(run_case(name, tmp / name, args))
            shutil.rmtree(tmp / name, ignore_errors=True)  # one checkpoint on disk at a time
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"\nmedians of {args.repeats} alternating runs, each contender a fresh process, page cache warm")
    print(f"{'case':<10} {'tensors':>8} {'file GiB':>8} {'model GiB':>9} {'naive s':>8} {'loader s':>9} "
          f"{'naive GiB/s':>12} {'loader GiB/s':>13} {'ratio':>6} {'extra RSS % naive/loader':>25}")
    for r in rows:
        rss = f"{r['naive_rss']:.1f} / {r['loader_rss']:.1f}"
        print(f"{r['case']:<10} {r['tensors']:>8,} {r['gib']:>8.3f} {r['model_gib']:>9.3f} {r['naive_s']:>8.3f} "
              f"{r['loader_s']:>9.3f} {r['gib'] / r['naive_s']:>12.3f} {r['gib'] / r['loader_s']:>13.3f} "
              f"{r['ratio']:>5.2f}x {rss:>25}")
    print("GiB/s = checkpoint bytes / load time; extra RSS = peak RSS growth during the load call, % of the "
          "model's parameter bytes (median)")
    import safetensors

    print(f"machine: {os.cpu_count()} CPUs ({len(os.sched_getaffinity(0))} usable), Python "
          f"{platform.python_version()}, torch {torch.__version__}, safetensors {safetensors.__version__}, "
          f"{platform.machine()}; total wall {time.perf_counter() - wall:.1f} s")


if __name__ == "__main__":
    main()
