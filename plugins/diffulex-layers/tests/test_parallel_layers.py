"""Tensor- and expert-parallel layers.

Single-process tests build layers under a simulated ``ParallelState`` (construction and loading
touch no process group) and check where each rank's rows land. One real 2-rank gloo run (this
file, run as a script by ``test_two_ranks_match_one_process``) checks that the forwards, with
their collectives, compute what one process computes.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F

from diffulex_core.checkpoint import LoadContext
from diffulex_core.errors import ParallelConfigError
from diffulex_core.parallel import ParallelState, use_parallel_state
from diffulex_layers import (
    ColumnParallelLinear,
    MergedColumnParallelLinear,
    PackedLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    SparseMoeBlock,
    StackedExperts,
    VocabParallelEmbedding,
    parse_expert_weight,
)
from diffulex_layers.testing import rank_main, run_on_ranks, simulated_rank

SINGLE = ParallelState()


class StrictSlice:
    """Stands in for the core's lazy ``CheckpointSlice`` and allows only what it promises:
    shape/dtype/ndim/dim/size, ``narrow`` and being the source of ``Tensor.copy_``."""

    def __init__(self, tensor: torch.Tensor) -> None:
        self._t = tensor

    shape = property(lambda self: self._t.shape)
    dtype = property(lambda self: self._t.dtype)
    ndim = property(lambda self: self._t.ndim)

    def dim(self) -> int:
        return self._t.dim()

    def size(self, dim=None):
        return self._t.size() if dim is None else self._t.size(dim)

    def narrow(self, dim: int, start: int, length: int) -> "StrictSlice":
        return StrictSlice(self._t.narrow(dim, start, length))

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if func is torch.Tensor.copy_ and isinstance(args[0], torch.Tensor) and isinstance(args[1], StrictSlice):
            return args[0].copy_(args[1]._t)
        raise TypeError(f"{getattr(func, '__name__', func)} on a checkpoint slice")


def load(param: torch.nn.Parameter, tensor: torch.Tensor, shard_id=None) -> None:
    """Through the parameter's weight_loader, as a lazy slice where the loader accepts one."""
    loader = param.weight_loader
    source = StrictSlice(tensor) if getattr(loader, "accepts_checkpoint_slice", False) else tensor
    loader(param, source) if shard_id is None else loader(param, source, shard_id)


def rows(n: int, cols: int = 3) -> torch.Tensor:
    """Row i is filled with i: where rows land is readable from the values."""
    return torch.arange(n, dtype=torch.float32)[:, None].expand(n, cols).contiguous()


# --------------------------------------------------------------------------- single process


@pytest.mark.parametrize("heads,kv_heads,tp", [(4, 2, 1), (4, 2, 2), (4, 4, 4), (4, 1, 2), (8, 2, 4), (4, 2, 4)])
def test_qkv_rows_of_each_rank(heads, kv_heads, tp):
    head_dim = 2
    q, k, v = rows(heads * head_dim), rows(kv_heads * head_dim) + 100, rows(kv_heads * head_dim) + 200
    for rank in range(tp):
        with use_parallel_state(simulated_rank(rank, tp)):
            layer = QKVParallelLinear(3, head_dim, heads, kv_heads, bias=True)
        for shard_id, tensor in zip("qkv", (q, k, v), strict=True):
            load(layer.weight, tensor, shard_id)
            load(layer.bias, tensor[:, 0], shard_id)
        local_heads = heads // tp
        kv_per = max(1, kv_heads // tp)
        kv_head = rank * kv_per if kv_heads >= tp else rank // (tp // kv_heads)
        kv_rows = slice(kv_head * head_dim, (kv_head + kv_per) * head_dim)
        q_part = slice(rank * local_heads * head_dim, (rank + 1) * local_heads * head_dim)
        expected = torch.cat([q[q_part], k[kv_rows], v[kv_rows]])
        assert torch.equal(layer.weight, expected) and torch.equal(layer.bias, expected[:, 0])
        assert (layer.num_heads, layer.num_kv_heads) == (local_heads, kv_per)
        assert (layer.tp_rank, layer.tp_size, layer.tp_dim) == (rank, tp, 0)
        q_rows, kv_len = local_heads * head_dim, kv_per * head_dim
        assert layer.shard_slices == {"q": (0, q_rows), "k": (q_rows, kv_len), "v": (q_rows + kv_len, kv_len)}


def test_column_row_merged_and_replicated_parts_make_the_whole():
    weight, tp = rows(12, 8), 4
    parts = {"column": [], "row": [], "merged": []}
    for rank in range(tp):
        with use_parallel_state(simulated_rank(rank, tp)):
            column, row = ColumnParallelLinear(8, 12), RowParallelLinear(8, 12)
            merged, replicated = MergedColumnParallelLinear(8, [4, 8], bias=True), ReplicatedLinear(8, 12)
        load(column.weight, weight), load(column.bias, weight[:, 0])
        load(row.weight, weight), load(row.bias, weight[:, 0])
        load(merged.weight, weight[:4], 0), load(merged.weight, weight[4:], 1)
        load(replicated.weight, weight)
        assert torch.equal(row.bias, weight[:, 0]) and torch.equal(replicated.weight, weight)
        assert torch.equal(column.bias, column.weight[:, 0])
        assert merged.shard_slices == {0: (0, 1), 1: (1, 2)}
        assert (column.tp_dim, row.tp_dim, merged.tp_dim, replicated.tp_dim) == (0, 1, 0, None)
        for kind, layer in (("column", column), ("row", row), ("merged", merged)):
            parts[kind].append(layer.weight.data)
    assert torch.equal(torch.cat(parts["column"]), weight) and torch.equal(torch.cat(parts["row"], dim=1), weight)
    merged_rows = torch.cat(parts["merged"])  # rank r: gate row r, then up rows 4+2r, 5+2r
    assert merged_rows[:, 0].tolist() == [0, 4, 5, 1, 6, 7, 2, 8, 9, 3, 10, 11]


def test_vocab_is_padded_and_padding_rows_stay_zero():
    weight, tp = rows(11, 4) + 1, 4  # 11 tokens -> 12 padded rows, 3 per rank, the last rank 2 real
    for cls in (VocabParallelEmbedding, ParallelLMHead):
        shards = []
        for rank in range(tp):
            with torch.device("meta"), use_parallel_state(simulated_rank(rank, tp)):
                layer = cls(11, 4)
            layer.to_empty(device="cpu")
            assert not layer.weight[layer.shard.real:].any()  # to_empty's garbage is zeroed in padding rows
            layer.weight.data.fill_(float("nan"))  # garbage
            load(layer.weight, weight)
            shards.append(layer.weight.data)
            assert (layer.shard.start, layer.shard.size, layer.shard.padded) == (3 * rank, 3, 12)
        full = torch.cat(shards)
        assert torch.equal(full[:11], weight) and torch.equal(full[11], torch.zeros(4)), cls.__name__


def test_single_process_layers_are_the_plain_torch_layers():
    torch.manual_seed(0)
    x, ids = torch.randn(2, 5, 8), torch.randint(0, 11, (2, 5))
    plain_linear, plain_embedding = torch.nn.Linear(8, 6), torch.nn.Embedding(11, 8)
    layers = [ReplicatedLinear(8, 6), ColumnParallelLinear(8, 6), RowParallelLinear(8, 6),
              MergedColumnParallelLinear(8, [2, 4], bias=True), PackedLinear(8, {"a": 6}, bias=True)]
    for layer in layers:
        layer.load_state_dict(plain_linear.state_dict())
        assert torch.equal(layer(x), plain_linear(x)), type(layer).__name__
    embedding, head = VocabParallelEmbedding(11, 8), ParallelLMHead(11, 8)
    embedding.load_state_dict(plain_embedding.state_dict()), head.load_state_dict(plain_embedding.state_dict())
    assert torch.equal(embedding(ids), plain_embedding(ids))
    assert torch.equal(head(x), F.linear(x, plain_embedding.weight))


def test_weight_loaders_are_marked_checked_and_survive_to_empty_and_deepcopy():
    with torch.device("meta"), use_parallel_state(simulated_rank(1, 2)):
        layers = [ReplicatedLinear(4, 6), ColumnParallelLinear(4, 6), RowParallelLinear(4, 6),
                  QKVParallelLinear(4, 2, 2, 2, bias=True), VocabParallelEmbedding(7, 4), ParallelLMHead(7, 4),
                  StackedExperts(4, 4, 2)]
    for layer in layers:
        for made in (layer.to_empty(device="cpu"), copy.deepcopy(layer)):
            for param in made.parameters():
                assert param.weight_loader.__self__ is made and param.weight_loader.accepts_checkpoint_slice
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(6, 5\)"):
        load(layers[1].weight, torch.zeros(6, 5))
    with pytest.raises(ValueError, match=r"\(6, 4\).*\(6, 2\)"):
        load(layers[2].weight, torch.zeros(6, 2))  # a row-parallel tensor must be the full one
    with pytest.raises(ValueError, match=r"shard id 'x'"):
        load(layers[3].weight, torch.zeros(4, 4), "x")
    with pytest.raises(ValueError, match=r"\(7, 4\).*\(8, 4\)"):
        load(layers[4].weight, torch.zeros(8, 4))


def test_bad_group_sizes_name_the_quantity():
    with use_parallel_state(simulated_rank(0, 4)):
        for build, what in [(lambda: QKVParallelLinear(8, 2, 6, 2), "attention heads"),
                            (lambda: QKVParallelLinear(8, 2, 8, 6), "key/value heads"),
                            (lambda: QKVParallelLinear(8, 2, 8, 3), "key/value heads"),
                            (lambda: MergedColumnParallelLinear(8, [8, 6]), "shard 1"),
                            (lambda: RowParallelLinear(6, 8), "input size"),
                            (lambda: ColumnParallelLinear(8, 6), "output size"),
                            (lambda: StackedExperts(6, 4, 2), "number of experts")]:
            with pytest.raises(ParallelConfigError, match=what):
                build()


def test_expert_resolver_places_owned_experts_and_skips_the_others():
    assert parse_expert_weight("5.gate_proj.weight") == (5, "gate_proj")
    assert parse_expert_weight("5.gate_proj.bias") is None and parse_expert_weight("x.up_proj.weight") is None
    gate_up, down = torch.randn(4, 6, 5), torch.randn(4, 5, 3)
    with use_parallel_state(simulated_rank(1, 2)):
        experts = StackedExperts(4, 5, 3)
    ctx = LoadContext(full_name="layer.experts.0.up_proj.weight", ep_rank=1, ep_size=2)
    skipped = experts.resolve_checkpoint_weight("0.up_proj.weight", ctx)
    assert skipped.skip and skipped.reason == "expert 0 belongs to expert-parallel rank 0 of 2"
    assert experts.resolve_checkpoint_weight("9.up_proj.weight", ctx) is None
    assert experts.resolve_checkpoint_weight("gate_up_proj", ctx) is None
    for e in (2, 3):
        for proj, tensor in [("gate_proj", gate_up[e, :3]), ("up_proj", gate_up[e, 3:]), ("down_proj", down[e])]:
            spec = experts.resolve_checkpoint_weight(f"{e}.{proj}.weight", ctx)
            assert spec.param is (experts.down_proj if proj == "down_proj" else experts.gate_up_proj)
            load(spec.param, tensor, spec.shard_id)
    assert torch.equal(experts.gate_up_proj, gate_up[2:]) and torch.equal(experts.down_proj, down[2:])
    load(experts.gate_up_proj, gate_up * 2), load(experts.down_proj, down * 2)  # stacked checkpoints too
    assert torch.equal(experts.gate_up_proj, gate_up[2:] * 2) and torch.equal(experts.down_proj, down[2:] * 2)
    with pytest.raises(ValueError, match=r"expert 3 up_proj.*\(3, 5\).*\(5, 3\)"):
        load(experts.gate_up_proj, torch.zeros(5, 3), (1, 1))
    with pytest.raises(ValueError, match="shard id"):
        load(experts.down_proj, torch.zeros(5, 3), 2)


# --------------------------------------------------------------------------- two real ranks


def test_two_ranks_match_one_process(tmp_path):
    run_on_ranks(__file__, CHECKS, tmp_path)


@torch.no_grad()
def check_linear_layers(rank: int) -> None:
    torch.manual_seed(0)
    x, w, b, wide = torch.randn(2, 3, 8), torch.randn(12, 8), torch.randn(12), torch.randn(2, 3, 12)
    column, row, replicated = ColumnParallelLinear(8, 12), RowParallelLinear(12, 8), ReplicatedLinear(8, 12)
    merged = MergedColumnParallelLinear(8, [6, 6], bias=True)
    load(column.weight, w), load(column.bias, b), load(replicated.weight, w), load(replicated.bias, b)
    load(row.weight, w.T.contiguous()), load(row.bias, b[:8])
    load(merged.weight, w[:6], 0), load(merged.weight, w[6:], 1)
    load(merged.bias, b[:6], 0), load(merged.bias, b[6:], 1)
    full = F.linear(x, w, b)
    torch.testing.assert_close(column(x), full[..., rank * 6:(rank + 1) * 6])
    torch.testing.assert_close(replicated(x), full)
    torch.testing.assert_close(row(wide[..., rank * 6:(rank + 1) * 6]), F.linear(wide, w.T, b[:8]))
    gate, up = full[..., rank * 3:(rank + 1) * 3], full[..., 6 + rank * 3:9 + rank * 3]
    torch.testing.assert_close(merged(x), torch.cat([gate, up], -1))


@torch.no_grad()
def check_vocab_layers(rank: int) -> None:
    torch.manual_seed(1)
    w, ids, x = torch.randn(11, 8), torch.arange(11).reshape(1, 11), torch.randn(2, 3, 8)
    embedding, head = VocabParallelEmbedding(11, 8), ParallelLMHead(11, 8)
    load(embedding.weight, w), load(head.weight, w)
    assert embedding.weight.shape == (6, 8) and (rank == 0 or not embedding.weight[5].any())
    torch.testing.assert_close(embedding(ids), F.embedding(ids, w))
    torch.testing.assert_close(head(x), F.linear(x, w))  # gathered and trimmed to 11


def tp_load(model: torch.nn.Module, checkpoint: dict) -> None:
    """What the core loader does with a checkpoint, through each parameter's weight_loader."""
    from diffulex_layers.testing import to_param_name

    params, filled = dict(model.named_parameters()), set()
    for name, tensor in checkpoint.items():
        param_name, shard_id = to_param_name(name, model.packed_modules_mapping)
        param = params[param_name]
        if hasattr(param, "weight_loader"):
            load(param, tensor, shard_id)
        else:
            param.data.copy_(tensor)
        filled.add(param_name)
    assert filled == set(params)


@torch.no_grad()
def check_diffusion_lm(rank: int) -> None:
    from diffulex_layers.testing import seeded
    from diffulex_llada.model import LLaDAForDiffusionLM, to_hf_state_dict

    base = {"d_model": 32, "n_heads": 4, "n_layers": 2, "mlp_hidden_size": 48, "vocab_size": 101}
    for config in [{**base, "n_kv_heads": 2, "include_bias": True},
                   {**base, "n_kv_heads": 1, "weight_tying": True}]:
        with use_parallel_state(SINGLE):
            full = seeded(LLaDAForDiffusionLM, config, 0)
        with torch.device("meta"):
            model = LLaDAForDiffusionLM(config)
        model.to_empty(device="cpu")
        tp_load(model, to_hf_state_dict(full))
        attn = model.model.layers[0].self_attn
        assert (attn.n_heads, attn.n_kv_heads, model.model.embed_tokens.weight.shape[0]) == (2, 1, 51)
        assert (model.lm_head.weight is model.model.embed_tokens.weight) is bool(config.get("weight_tying"))
        ids = torch.randint(0, 101, (2, 7), generator=torch.Generator().manual_seed(5))
        logits = model(ids)
        torch.testing.assert_close(logits, full(ids), rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(copy.deepcopy(model)(ids), logits, rtol=0, atol=0)


@torch.no_grad()
def check_moe_block(rank: int) -> None:
    from transformers.models.qwen3_moe.configuration_qwen3_moe import Qwen3MoeConfig
    from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

    world = ParallelState(0, 1, None, rank, 2, torch.distributed.group.WORLD)  # expert-parallel only
    for norm in (True, False):
        config = Qwen3MoeConfig(hidden_size=16, moe_intermediate_size=8, num_experts=4, num_experts_per_tok=2,
                                norm_topk_prob=norm, hidden_act="silu")
        torch.manual_seed(2)
        reference = Qwen3MoeSparseMoeBlock(config)
        for param in reference.parameters():
            param.normal_(0, 0.5)
        gate_up, down = reference.experts.gate_up_proj, reference.experts.down_proj
        checkpoint = {"gate.weight": reference.gate.weight}
        for e in range(4):
            checkpoint |= {f"experts.{e}.gate_proj.weight": gate_up[e, :8],
                           f"experts.{e}.up_proj.weight": gate_up[e, 8:],
                           f"experts.{e}.down_proj.weight": down[e]}
        x = torch.randn(2, 5, 16)
        outputs = []
        for state in (SINGLE, world):
            with use_parallel_state(state):
                block = SparseMoeBlock(16, 4, 2, 8, norm_topk_prob=norm)
            skipped = []
            for name, tensor in checkpoint.items():
                if name.startswith("experts."):
                    suffix = name.removeprefix("experts.")
                    spec = block.experts.resolve_checkpoint_weight(suffix, LoadContext(full_name=name))
                    if spec.skip:
                        skipped.append(spec.reason)
                        continue
                    load(spec.param, tensor, spec.shard_id)
                else:
                    load(block.gate.weight, tensor)
            owned = 4 if state is SINGLE else 2
            assert len(skipped) == 3 * (4 - owned) and all(f"of {block.experts.ep_size}" in r for r in skipped)
            outputs.append(block(x))
        torch.testing.assert_close(outputs[0], reference(x))
        torch.testing.assert_close(outputs[1], outputs[0])


def check_bad_group_sizes(rank: int) -> None:
    from diffulex_llada.model import LLaDAForDiffusionLM

    base = {"d_model": 48, "n_heads": 4, "n_kv_heads": 2, "mlp_hidden_size": 48}
    for config, what in [({**base, "n_heads": 3, "n_kv_heads": 3}, "attention heads"),
                         ({**base, "n_heads": 6, "n_kv_heads": 3}, "key/value heads"),
                         ({**base, "mlp_hidden_size": 47}, "intermediate size")]:
        with pytest.raises(ParallelConfigError, match=what):
            LLaDAForDiffusionLM(config)
    with pytest.raises(ParallelConfigError, match="number of experts"):
        SparseMoeBlock(8, 3, 2, 4)


CHECKS = [check_linear_layers, check_vocab_layers, check_diffusion_lm, check_moe_block, check_bad_group_sizes]


if __name__ == "__main__":
    rank_main(CHECKS)
