"""LoRA adapters on the tensor-parallel layers, against plain torch math.

Single-process tests write full PEFT-shaped A/B tensors through ``lora_destination`` (as the core
loader does) and compare forwards and merges with formulas written out here. One real 2-rank gloo
run (this file as a script, from ``test_two_ranks_match_one_process``) checks that each rank's
outputs and merged weights are its part of what one process computes with the full adapter.
"""

from __future__ import annotations

import copy
import math

import pytest
import torch
import torch.nn.functional as F

from diffulex_core.parallel import ParallelState, use_parallel_state
from diffulex_layers import (
    ColumnParallelLinear,
    DiffusionLM,
    MergedColumnParallelLinear,
    PackedLinear,
    ParallelLMHead,
    QKVParallelLinear,
    ReplicatedLinear,
    RowParallelLinear,
    TransformerConfig,
    VocabParallelEmbedding,
    hf_state_dict,
)
from diffulex_layers.testing import rank_main, run_on_ranks, simulated_rank

SINGLE = ParallelState()



def put(layer, shard_id, a: torch.Tensor, b: torch.Tensor) -> None:
    """Write full PEFT tensors A and B through the layer's declared destinations."""
    layer.lora_destination(shard_id, "A", a.shape).apply(a)
    layer.lora_destination(shard_id, "B", b.shape).apply(b)


def adapt(layer, shard_id, r, a_shape, b_shape, scaling=None, alpha=8.0):
    """``__init_lora__`` then random full A/B written in; returns (A, B, scaling)."""
    layer.__init_lora__(r, alpha, 0.0, shard_id=shard_id, scaling=scaling)
    a, b = torch.randn(*a_shape), torch.randn(*b_shape)
    put(layer, shard_id, a, b)
    return a, b, alpha / r if scaling is None else scaling


def plain_lora(x, a, b, s):
    return (x @ a.T @ b.T) * s


def check_merge(layer, inputs, expected_weight):
    """Merging keeps the output, stops adding the adapters, and is done once."""
    before = layer(inputs)
    layer.merge_lora()
    assert layer.merged
    torch.testing.assert_close(layer.weight, expected_weight, rtol=0, atol=1e-5)
    torch.testing.assert_close(layer(inputs), before, rtol=0, atol=1e-5)
    merged = layer.weight.detach().clone()
    layer.merge_lora()
    assert torch.equal(layer.weight, merged)


# --------------------------------------------------------------------------- single process


@torch.no_grad()
@pytest.mark.parametrize("cls", [ReplicatedLinear, ColumnParallelLinear, RowParallelLinear])
def test_whole_linear_adapter_is_plain_lora(cls):
    torch.manual_seed(0)
    layer, x = cls(8, 6, bias=True), torch.randn(2, 5, 8)
    w, bias = layer.weight.clone(), layer.bias.clone()
    a, b, s = adapt(layer, None, 3, (3, 8), (6, 3))
    assert (layer.r, layer.scaling, layer.merged) == (3, 8.0 / 3, False)
    assert layer.lora_A is layer.lora["whole"].lora_A and torch.equal(layer.lora_A, a) and torch.equal(layer.lora_B, b)
    assert {"lora.whole.lora_A", "lora.whole.lora_B"} <= dict(layer.named_parameters()).keys()
    torch.testing.assert_close(layer(x), F.linear(x, w, bias) + plain_lora(x, a, b, s), rtol=0, atol=1e-5)
    check_merge(layer, x, w + s * b @ a)


@torch.no_grad()
def test_packed_adapters_land_on_their_own_rows():
    torch.manual_seed(1)
    x = torch.randn(2, 5, 8)
    qkv = QKVParallelLinear(8, 2, 4, 2, bias=True)  # q rows 0..8, k 8..12, v 12..16
    w, bias = qkv.weight.clone(), qkv.bias.clone()
    q = adapt(qkv, "q", 4, (4, 8), (8, 4))  # scaling alpha / r = 2
    v = adapt(qkv, "v", 2, (2, 8), (4, 2), scaling=8.0 / math.sqrt(2))  # rsLoRA-style, passed by the core
    assert not hasattr(qkv, "lora_A") and set(qkv.lora) == {"q", "v"}
    assert (qkv.lora["q"].r, qkv.lora["v"].r) == (4, 2)
    assert (qkv.lora["q"].scaling, qkv.lora["v"].scaling) == (2.0, 8.0 / math.sqrt(2))
    assert {"lora.q.lora_A", "lora.q.lora_B", "lora.v.lora_A", "lora.v.lora_B"} <= dict(qkv.named_parameters()).keys()
    base = F.linear(x, w, bias)
    expected = torch.cat([base[..., :8] + plain_lora(x, *q), base[..., 8:12], base[..., 12:] + plain_lora(x, *v)], -1)
    torch.testing.assert_close(qkv(x), expected, rtol=0, atol=1e-5)
    merged = w.clone()
    merged[:8] += q[2] * q[1] @ q[0]
    merged[12:] += v[2] * v[1] @ v[0]
    check_merge(qkv, x, merged)

    gate_up = MergedColumnParallelLinear(8, [2, 4], bias=True)
    w, bias = gate_up.weight.clone(), gate_up.bias.clone()
    g, u = adapt(gate_up, 0, 2, (2, 8), (2, 2)), adapt(gate_up, 1, 5, (5, 8), (4, 5), scaling=0.25)
    base = F.linear(x, w, bias)
    expected = torch.cat([base[..., :2] + plain_lora(x, *g), base[..., 2:] + plain_lora(x, *u)], -1)
    torch.testing.assert_close(gate_up(x), expected, rtol=0, atol=1e-5)
    check_merge(gate_up, x, w + torch.cat([g[2] * g[1] @ g[0], u[2] * u[1] @ u[0]]))

    whole = PackedLinear(8, {"a": 2, "b": 4}, bias=False)  # an engine-format adapter on the packed tensor
    w = whole.weight.clone()
    a, b, s = adapt(whole, None, 3, (3, 8), (6, 3))
    torch.testing.assert_close(whole(x), F.linear(x, w) + plain_lora(x, a, b, s), rtol=0, atol=1e-5)
    check_merge(whole, x, w + s * b @ a)


@torch.no_grad()
def test_vocab_adapters_follow_peft():
    torch.manual_seed(2)
    ids, x = torch.randint(0, 11, (2, 7)), torch.randn(2, 5, 8)
    embedding = VocabParallelEmbedding(11, 8)
    w = embedding.weight.clone()
    a, b, s = adapt(embedding, None, 3, (3, 11), (8, 3))  # PEFT: lora_embedding_A (r, vocab), _B (dim, r)
    torch.testing.assert_close(embedding(ids), w[ids] + (a.T[ids] @ b.T) * s, rtol=0, atol=1e-5)
    check_merge(embedding, ids, w + (s * b @ a).T)

    head = ParallelLMHead(11, 8)
    w = head.weight.clone()
    a, b, s = adapt(head, None, 4, (4, 8), (11, 4))
    torch.testing.assert_close(head(x), x @ w.T + plain_lora(x, a, b, s), rtol=0, atol=1e-5)
    check_merge(head, x, w + s * b @ a)


@torch.no_grad()
def test_bf16_merge_is_computed_in_float32_then_cast():
    torch.manual_seed(3)
    column = ColumnParallelLinear(8, 6).to(torch.bfloat16)
    qkv = QKVParallelLinear(8, 2, 4, 2).to(torch.bfloat16)
    embedding = VocabParallelEmbedding(11, 8).to(torch.bfloat16)
    cases = [(column, None, 3, (3, 8), (6, 3)), (qkv, "k", 2, (2, 8), (4, 2)), (embedding, None, 3, (3, 11), (8, 3))]
    for layer, shard_id, r, a_shape, b_shape in cases:
        w = layer.weight.clone()
        adapt(layer, shard_id, r, a_shape, b_shape, scaling=0.7)
        adapter = layer.lora_adapter(shard_id)
        assert adapter.lora_A.dtype == adapter.lora_B.dtype == torch.bfloat16
        delta = (adapter.lora_B.float() @ adapter.lora_A.float()) * 0.7
        if layer is embedding:
            delta = delta.T
        rows = slice(adapter.start, adapter.start + adapter.size) if layer is not embedding else slice(None)
        expected = w.clone()
        expected[rows] = (w[rows].float() + delta).to(torch.bfloat16)
        layer.merge_lora()
        assert torch.equal(layer.weight, expected), type(layer).__name__


def test_bad_ranks_shapes_and_shard_ids_are_value_errors():
    qkv = QKVParallelLinear(8, 2, 4, 2)
    for r in (0, -1):
        with pytest.raises(ValueError, match="rank r must be a positive integer"):
            qkv.__init_lora__(r, 8, 0.0, shard_id="q")
    with pytest.raises(ValueError, match=r"unknown LoRA shard id 'x'.*\['q', 'k', 'v'\]"):
        qkv.__init_lora__(4, 8, 0.0, shard_id="x")
    with pytest.raises(ValueError, match="shard id 'q'"):
        ColumnParallelLinear(8, 6).__init_lora__(4, 8, 0.0, shard_id="q")
    with pytest.raises(ValueError, match="shard id 0"):
        VocabParallelEmbedding(11, 8).__init_lora__(4, 8, 0.0, shard_id=0)
    qkv.__init_lora__(4, 8, 0.0, shard_id="q")
    with pytest.raises(ValueError, match=r"rank r=4.*\(4, 8\).*\(4, 9\)"):
        qkv.lora_destination("q", "A", (4, 9))
    with pytest.raises(ValueError, match=r"rank r=4.*\(8, 4\).*\(8, 3\)"):
        qkv.lora_destination("q", "B", (8, 3))
    with pytest.raises(ValueError, match=r"no LoRA adapter for shard id 'k'.*\['q'\]"):
        qkv.lora_destination("k", "A", (4, 8))
    with pytest.raises(ValueError, match="'A' or 'B'"):
        qkv.lora_destination("q", "C", (4, 8))
    with use_parallel_state(simulated_rank(1, 2)):
        row, packed = RowParallelLinear(8, 6), QKVParallelLinear(8, 2, 4, 2)
    row.__init_lora__(4, 8, 0.0)
    with pytest.raises(ValueError, match=r"\(4, 8\).*\(4, 4\)"):  # A must be the full PEFT tensor
        row.lora_destination(None, "A", (4, 4))
    with pytest.raises(ValueError, match="whole packed QKVParallelLinear cannot be split.*'q', 'k', 'v'"):
        packed.__init_lora__(4, 8, 0.0)


def picked(dest, shape, dim: int) -> list[int]:
    """Which entries along ``dim`` of a full tensor of ``shape`` a destination takes."""
    index = torch.arange(shape[dim]).reshape([-1 if d == dim else 1 for d in range(len(shape))]).expand(*shape)
    for d, start, length in dest.source:
        index = index.narrow(d, start, length)
    return index.select(1 - dim, 0).tolist()


@pytest.mark.parametrize("tp", [2, 4])
def test_adapters_split_exactly_like_the_weights(tp):
    """B of column/packed/LM-head adapters takes the weight's rows (replicated kv heads too);
    A of row-parallel the weight's columns, of the embedding the weight's (vocabulary) rows."""
    for rank in range(tp):
        with use_parallel_state(simulated_rank(rank, tp)):
            layers = [ColumnParallelLinear(8, 12), RowParallelLinear(8, 12), QKVParallelLinear(8, 2, 4, 1),
                      QKVParallelLinear(8, 2, 8, 2), MergedColumnParallelLinear(8, [4, 8]),
                      VocabParallelEmbedding(11, 8), ParallelLMHead(11, 8)]
        for layer in layers:
            for sid in getattr(layer, "shard_slices", [None]):
                layer.__init_lora__(3, 6, 0.0, shard_id=sid)
                shard = getattr(layer, "shards", {}).get(sid)
                rows = shard.full if shard else 11 if hasattr(layer, "shard") else 12
                weight_dest = layer.weight_destination(layer.weight, (rows, 8), sid)
                weight_rows, weight_cols = picked(weight_dest, (rows, 8), 0), picked(weight_dest, (rows, 8), 1)
                if isinstance(layer, VocabParallelEmbedding):  # A's columns are the weight's (vocabulary) rows
                    assert picked(layer.lora_destination(sid, "A", (3, 11)), (3, 11), 1) == weight_rows
                    assert picked(layer.lora_destination(sid, "B", (8, 3)), (8, 3), 0) == list(range(8))
                elif isinstance(layer, RowParallelLinear):  # A's columns are the weight's columns
                    assert picked(layer.lora_destination(sid, "A", (3, 8)), (3, 8), 1) == weight_cols
                    assert picked(layer.lora_destination(sid, "B", (12, 3)), (12, 3), 0) == list(range(12))
                else:
                    assert picked(layer.lora_destination(sid, "B", (rows, 3)), (rows, 3), 0) == weight_rows
                    assert picked(layer.lora_destination(sid, "A", (3, 8)), (3, 8), 1) == list(range(8))


def test_meta_adapters_stay_meta_and_vocab_padding_is_zero_after_to_empty():
    with torch.device("meta"), use_parallel_state(simulated_rank(3, 4)):  # 11 tokens: this rank 2 real of 3
        layers = [QKVParallelLinear(8, 2, 4, 2), RowParallelLinear(8, 6), VocabParallelEmbedding(11, 8),
                  ParallelLMHead(11, 8)]
    for layer in layers:
        sid = "k" if isinstance(layer, QKVParallelLinear) else None
        layer.__init_lora__(2, 4, 0.1, shard_id=sid)
        assert all(p.is_meta for p in layer.parameters())
        assert isinstance(layer.lora_adapter(sid).lora_dropout, torch.nn.Dropout)
        layer.to_empty(device="cpu")
        copied = copy.deepcopy(layer)
        for made in (layer, copied):
            adapter = made.lora_adapter(sid)
            assert adapter.lora_A.device.type == "cpu" and not any(p.is_meta for p in made.parameters())
            assert made.weight.weight_loader.__self__ is made
        if isinstance(layer, VocabParallelEmbedding):
            assert layer.lora_A.shape == (2, 3) and not layer.lora_A[:, 2:].any()
        if isinstance(layer, ParallelLMHead):
            assert layer.lora_B.shape == (3, 2) and not layer.lora_B[2:].any()
    layer = ColumnParallelLinear(4, 4)
    layer.__init_lora__(2, 4, 0.0)
    assert isinstance(layer.lora["whole"].lora_dropout, torch.nn.Identity)


def test_without_adapters_nothing_changes():
    layer = QKVParallelLinear(8, 2, 4, 2)
    assert "lora" not in layer._modules and not hasattr(layer, "lora_A") and not layer.merged
    assert set(layer.state_dict()) == {"weight"}
    layer.merge_lora()  # nothing to merge


def test_adding_an_adapter_leaves_a_saved_module_state_restorable():
    """The core undoes a failed adapter load by restoring a shallow copy of ``_modules``."""
    layer = QKVParallelLinear(8, 2, 4, 2)
    layer.__init_lora__(4, 8, 0.0, shard_id="q")
    q, saved = layer.lora["q"], dict(layer._modules)
    layer.__init_lora__(2, 8, 0.0, shard_id="q")
    layer.__init_lora__(2, 8, 0.0, shard_id="k")
    assert list(layer.lora) == ["q", "k"] and layer.lora["q"] is not q and layer.lora["q"].r == 2
    layer._modules.clear(), layer._modules.update(saved)
    assert list(layer.lora) == ["q"] and layer.lora["q"] is q
    whole = ColumnParallelLinear(8, 6)
    whole.__init_lora__(4, 8, 0.0)
    whole.scaling = 0.5  # the seed's way of setting rsLoRA's scaling
    assert whole.lora["whole"].scaling == 0.5


class ToyLM(DiffusionLM):
    diffulex_family = "toy-lora"
    packed_modules_mapping = {"q_proj": ("qkv_proj", "q"), "k_proj": ("qkv_proj", "k"), "v_proj": ("qkv_proj", "v")}

    @classmethod
    def resolve_config(cls, config):
        return TransformerConfig(hidden=16, heads=4, kv_heads=2, head_dim=4, layers=1, inter=24, vocab=30, eps=1e-6)


@torch.no_grad()
def test_model_output_embeddings_and_merged_adapters():
    torch.manual_seed(4)
    model = ToyLM()
    assert model.get_output_embeddings() is model.lm_head
    qkv = model.model.layers[0].self_attn.qkv_proj
    adapt(qkv, "q", 2, (2, 16), (16, 2))
    adapt(model.model.layers[0].mlp.down_proj, None, 3, (3, 24), (16, 3))
    ids = torch.randint(0, 30, (2, 6))
    before = model(ids)
    assert "model.layers.0.self_attn.qkv_proj.lora.q.lora_A" in dict(model.named_parameters())
    assert not any("lora" in name for name in hf_state_dict(model))
    for module in model.modules():
        if hasattr(module, "merge_lora"):
            module.merge_lora()
    torch.testing.assert_close(model(ids), before, rtol=0, atol=1e-5)


# --------------------------------------------------------------------------- two real ranks


def test_two_ranks_match_one_process(tmp_path):
    run_on_ranks(__file__, CHECKS, tmp_path)


def full_and_local(make, weights, adapters):
    """The layer built for one process and for this rank, each loaded with the same full weights
    (``{shard_id: tensor}``) and full adapters (``{shard_id: (r, A, B, scaling)}``)."""
    built = []
    for state in (SINGLE, None):
        if state is None:
            layer = make()
        else:
            with use_parallel_state(state):
                layer = make()
        for sid, tensor in weights.items():
            layer.weight_loader(layer.weight, tensor, sid)
        for sid, (r, a, b, s) in adapters.items():
            layer.__init_lora__(r, 2.0 * r, 0.0, shard_id=sid, scaling=s)
            put(layer, sid, a, b)
        built.append(layer)
    return built


def check_merged_weights(full, local, weights):
    """Each rank's merged weight is its slice (per the weight's own destination) of the one-process merged weight."""
    full.merge_lora(), local.merge_lora()
    for sid, tensor in weights.items():
        full_rows = full.weight
        if sid is not None:
            start, size = full.shard_slices[sid]
            full_rows = full.weight.narrow(0, start, size)
        dest = local.weight_destination(local.weight, tensor.shape, sid)
        for dim, start, length in dest.source:
            full_rows = full_rows.narrow(dim, start, length)
        torch.testing.assert_close(dest.target, full_rows)


def lora_tensors(r, rows, cols, scaling):
    return r, torch.randn(r, cols), torch.randn(rows, r), scaling


@torch.no_grad()
def check_linear_layers(rank: int) -> None:
    torch.manual_seed(0)
    x, wide = torch.randn(2, 3, 8), torch.randn(2, 3, 12)
    full, local = full_and_local(lambda: ColumnParallelLinear(8, 12, bias=False), {None: torch.randn(12, 8)},
                                 {None: lora_tensors(3, 12, 8, 0.5)})
    for _ in ("unmerged", "merged"):
        torch.testing.assert_close(local(x), full(x)[..., rank * 6:(rank + 1) * 6])
        check_merged_weights(full, local, {None: torch.empty(12, 8)})

    weights = {None: torch.randn(8, 12)}
    full, local = full_and_local(lambda: RowParallelLinear(12, 8, bias=True), weights,
                                 {None: lora_tensors(4, 8, 12, 2.0)})
    full.bias.copy_(torch.randn(8)), local.bias.copy_(full.bias)
    for _ in ("unmerged", "merged"):
        torch.testing.assert_close(local(wide[..., rank * 6:(rank + 1) * 6]), full(wide))
        check_merged_weights(full, local, weights)


@torch.no_grad()
def check_packed_layers(rank: int) -> None:
    torch.manual_seed(1)
    x = torch.randn(2, 3, 8)
    cases = []
    for kv_heads in (2, 1):  # one kv head: replicated on both ranks
        kv = 2 * kv_heads
        weights = {"q": torch.randn(8, 8), "k": torch.randn(kv, 8), "v": torch.randn(kv, 8)}
        adapters = {"q": lora_tensors(4, 8, 8, 2.0), "k": lora_tensors(3, kv, 8, 0.5), "v": lora_tensors(2, kv, 8, 1.5)}
        cases.append((lambda kv_heads=kv_heads: QKVParallelLinear(8, 2, 4, kv_heads), weights, adapters))
    weights = {0: torch.randn(6, 8), 1: torch.randn(6, 8)}
    cases.append((lambda: MergedColumnParallelLinear(8, [6, 6]), weights, {1: lora_tensors(5, 6, 8, 0.25)}))
    for make, weights, adapters in cases:
        full, local = full_and_local(make, weights, adapters)
        for _ in ("unmerged", "merged"):
            out, expected = local(x), full(x)
            for sid, (start, size) in local.shard_slices.items():
                full_start = full.shard_slices[sid][0] + local.shards[sid].start
                torch.testing.assert_close(out[..., start:start + size], expected[..., full_start:full_start + size])
            check_merged_weights(full, local, weights)


@torch.no_grad()
def check_vocab_layers(rank: int) -> None:
    torch.manual_seed(2)
    ids, x = torch.arange(11).reshape(1, 11), torch.randn(2, 3, 8)
    weights = {None: torch.randn(11, 8)}
    full, local = full_and_local(lambda: VocabParallelEmbedding(11, 8), weights, {None: lora_tensors(3, 8, 11, 0.5)})
    for _ in ("unmerged", "merged"):
        torch.testing.assert_close(local(ids), full(ids))
        check_merged_weights(full, local, weights)
        assert rank == 0 or not local.weight[5:].any()  # 11 tokens: rank 1 holds 5 real rows of 6
    full, local = full_and_local(lambda: ParallelLMHead(11, 8), weights, {None: lora_tensors(4, 11, 8, 2.0)})
    for _ in ("unmerged", "merged"):
        torch.testing.assert_close(local(x), full(x))
        check_merged_weights(full, local, weights)
        assert rank == 0 or not local.weight[5:].any()


CHECKS = [check_linear_layers, check_packed_layers, check_vocab_layers]


if __name__ == "__main__":
    rank_main(CHECKS)
