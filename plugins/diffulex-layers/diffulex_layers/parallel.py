"""Tensor-parallel reference layers with the seed's (vLLM-like) ``weight_loader`` contract.

Each layer reads ``diffulex_core.parallel.current_parallel_state()`` when it is built and holds
only its rank's part of the weight: ``tp_rank``, ``tp_size``, ``tp_group`` and ``tp_dim`` (the
weight dimension split across ranks: 0 column-parallel, 1 row-parallel, ``None`` replicated)
are attributes, as the seed's LoRA code expects.

Every parameter carries ``weight_loader(param, loaded_weight)`` (whole tensors) or
``weight_loader(param, loaded_weight, shard_id)`` (packed layers). ``loaded_weight`` is the FULL
checkpoint tensor, or a lazy ``CheckpointSlice`` view of it: the loaders are marked
``accepts_checkpoint_slice`` and use only ``.shape``/``.ndim``/``.narrow`` on it and
``dest.copy_(part)``, so the core loader reads just this rank's bytes from the file
(``takes_checkpoint_slices``, from ``diffulex_core.plugin_api``). A tensor of
the wrong shape, or an unknown shard id, is a ``ValueError`` (the loader reports it).

With ``tp_size == 1`` every layer computes exactly what ``nn.Linear``/``nn.Embedding`` would.
Every layer takes LoRA adapters (``diffulex_layers.lora``): ``__init_lora__``, ``lora_destination``
and ``merge_lora``; each rank holds the slices of A and B that match its part of the weight.
The forwards use plain ``torch.distributed`` collectives: they are meant for inference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffulex_core.errors import ParallelConfigError
from diffulex_core.plugin_api import (
    ParallelState,
    WeightDestination,
    current_parallel_state,
    divide,
    takes_checkpoint_slices,
)

from .lora import LoRAGeometry, LoRALayer, LoRASpan
from .shapes import check_loaded_shape

__all__ = [
    "ColumnParallelLinear",
    "GroupRef",
    "MergedColumnParallelLinear",
    "PackedLinear",
    "ParallelLMHead",
    "QKVParallelLinear",
    "ReplicatedLinear",
    "RowParallelLinear",
    "Shard",
    "VocabParallelEmbedding",
    "VocabShard",
    "check_loaded_shape",
    "takes_checkpoint_slices",
    "vocab_shard",
]


class _KeepsWeightLoaders:
    """Re-attaches ``weight_loader`` to the module's own parameters: ``to_empty()``/``_apply``,
    ``deepcopy`` and unpickling make new ``Parameter`` objects without attributes."""

    def _attach_loaders(self) -> None:
        for param in self.parameters(recurse=False):  # type: ignore[attr-defined]
            param.weight_loader = self.weight_loader  # type: ignore[attr-defined]
            param.weight_destination = self.weight_destination  # type: ignore[attr-defined]

    def weight_destination(self, param: nn.Parameter, loaded_shape: Sequence[int],
                           shard_id: Any = None) -> WeightDestination:
        raise NotImplementedError

    @takes_checkpoint_slices
    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        """Copy this rank's part of ``loaded_weight`` (a tensor or a ``CheckpointSlice``) where
        ``weight_destination`` says: the loader and the declaration cannot disagree."""
        self.weight_destination(param, loaded_weight.shape, shard_id).apply(loaded_weight)

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = super()._apply(fn, *args, **kwargs)  # type: ignore[misc]
        self._attach_loaders()
        return result

    def __setstate__(self, state: dict) -> None:
        super().__setstate__(state)  # type: ignore[misc]
        self._attach_loaders()


class GroupRef:
    """A process group held by reference: deep-copying a layer shares its group (a
    ``ProcessGroup`` cannot be copied or pickled)."""

    __slots__ = ("group",)

    def __init__(self, group: Any) -> None:
        self.group = group

    def __deepcopy__(self, memo: dict) -> GroupRef:
        return self


class _TensorParallel:
    """``tp_rank``, ``tp_size``, ``tp_group`` and ``tp_dim`` of a layer, from the state it was built in."""

    tp_rank: int
    tp_size: int
    tp_dim: int | None
    _tp_group: GroupRef

    def _set_tp(self, state: ParallelState, tp_dim: int | None) -> None:
        self.tp_rank, self.tp_size, self.tp_dim = state.tp_rank, state.tp_size, tp_dim
        self._tp_group = GroupRef(state.tp_group)

    @property
    def tp_group(self) -> Any:
        return self._tp_group.group


class _ParallelLinear(LoRALayer, _TensorParallel, _KeepsWeightLoaders, nn.Linear):
    """An ``nn.Linear`` of this rank's (local) shape, so ``tp_size == 1`` is ``nn.Linear`` itself."""

    def __init__(self, in_features: int, out_features: int, bias: bool, state: ParallelState,
                 tp_dim: int | None) -> None:
        nn.Linear.__init__(self, in_features, out_features, bias=bias)
        self._set_tp(state, tp_dim)
        self._attach_loaders()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = F.linear(x, self.weight, self.bias)
        return self._add_lora(x, out) if "lora" in self._modules else out

    def _lora_geometry(self, shard_id: Any) -> LoRAGeometry:
        """A LoRA adapter's A splits like the weight's columns (row-parallel), its B like the
        weight's rows (column-parallel); a replicated layer's are whole."""
        if shard_id is not None:
            raise ValueError(f"{type(self).__name__} takes a LoRA adapter on its whole output (shard id None), "
                             f"not shard id {shard_id!r}")
        cols, rows = self.in_features, self.out_features
        col_span, row_span = LoRASpan(cols, 0, cols), LoRASpan(rows, 0, rows)
        if self.tp_dim == 1:
            col_span = LoRASpan(cols * self.tp_size, self.tp_rank * cols, cols)
        elif self.tp_dim == 0:
            row_span = LoRASpan(rows * self.tp_size, self.tp_rank * rows, rows)
        return LoRAGeometry(cols, col_span, rows, row_span, 0)


class ReplicatedLinear(_ParallelLinear):
    """The full weight on every rank (routers, small heads)."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        super().__init__(in_features, out_features, bias, current_parallel_state(), None)

    def weight_destination(self, param: nn.Parameter, loaded_shape: Sequence[int],
                           shard_id: Any = None) -> WeightDestination:
        _no_shard_id(self, shard_id)
        check_loaded_shape(type(self).__name__, param.shape, loaded_shape)
        return WeightDestination(param.data)


class ColumnParallelLinear(_ParallelLinear):
    """Output rows (and the bias) split across ranks; the output stays sharded on the last dim."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        state = current_parallel_state()
        local = divide(out_features, state.tp_size, f"output size of {type(self).__name__}")
        super().__init__(in_features, local, bias, state, 0)
        self.output_size = out_features

    def weight_destination(self, param: nn.Parameter, loaded_shape: Sequence[int],
                           shard_id: Any = None) -> WeightDestination:
        _no_shard_id(self, shard_id)
        check_loaded_shape(type(self).__name__, (self.output_size, *param.shape[1:]), loaded_shape)
        size = param.shape[0]
        return WeightDestination(param.data, ((0, self.tp_rank * size, size),))


class RowParallelLinear(_ParallelLinear):
    """Input columns split across ranks (the input arrives sharded on its last dim); the partial
    products are summed over the group and the full bias is added once, after the sum."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True) -> None:
        state = current_parallel_state()
        local = divide(in_features, state.tp_size, f"input size of {type(self).__name__}")
        super().__init__(local, out_features, bias, state, 1)
        self.input_size = in_features

    def weight_destination(self, param: nn.Parameter, loaded_shape: Sequence[int],
                           shard_id: Any = None) -> WeightDestination:
        _no_shard_id(self, shard_id)
        if param.dim() == 1:  # the bias is replicated
            check_loaded_shape(f"{type(self).__name__} bias", param.shape, loaded_shape)
            return WeightDestination(param.data)
        check_loaded_shape(type(self).__name__, (param.shape[0], self.input_size), loaded_shape)
        size = param.shape[1]
        return WeightDestination(param.data, ((1, self.tp_rank * size, size),))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            return super().forward(x)
        out = F.linear(x, self.weight)
        if "lora" in self._modules:  # this rank's partial LoRA product joins the same all-reduce
            out = self._add_lora(x, out)
        dist.all_reduce(out, group=self.tp_group)
        return out if self.bias is None else out + self.bias


class Shard(NamedTuple):
    """One checkpoint tensor of a packed layer: its rows, and the rows of it this rank holds."""

    full: int  # rows of the checkpoint tensor
    start: int  # first of this rank's rows in it
    size: int  # rows this rank holds


def _no_shard_id(layer: nn.Module, shard_id: Any) -> None:
    if shard_id is not None:
        raise ValueError(f"{type(layer).__name__} takes whole checkpoint tensors, not shard id {shard_id!r}")


def _even_shard(full: int, state: ParallelState, what: str) -> Shard:
    size = divide(full, state.tp_size, what)
    return Shard(full, state.tp_rank * size, size)


class PackedLinear(_ParallelLinear):
    """A column-parallel Linear whose output rows stack several checkpoint tensors, each split
    across ranks. ``shard_slices[shard_id] = (start, size)`` are this rank's (local) rows."""

    def __init__(self, in_features: int, shard_sizes: Mapping[Any, int], bias: bool) -> None:
        state = current_parallel_state()
        shards = {sid: _even_shard(size, state, f"output size of shard {sid!r}") for sid, size in shard_sizes.items()}
        self._build(in_features, shards, bias, state)

    def _build(self, in_features: int, shards: Mapping[Any, Shard], bias: bool, state: ParallelState) -> None:
        _ParallelLinear.__init__(self, in_features, sum(s.size for s in shards.values()), bias, state, 0)
        self.shards = dict(shards)
        self.shard_slices: dict[Any, tuple[int, int]] = {}
        start = 0
        for shard_id, shard in shards.items():
            self.shard_slices[shard_id] = (start, shard.size)
            start += shard.size

    def weight_destination(self, param: nn.Parameter, loaded_shape: Sequence[int],
                           shard_id: Any = None) -> WeightDestination:
        if shard_id is None:  # an engine-format checkpoint stores the packed tensor whole
            if self.tp_size > 1:
                raise ValueError(f"a whole packed tensor cannot be split for tensor-parallel rank {self.tp_rank} of "
                                 f"{self.tp_size}; the checkpoint must store each shard ({list(self.shards)}) "
                                 f"on its own")
            check_loaded_shape(type(self).__name__, param.shape, loaded_shape)
            return WeightDestination(param.data)
        if shard_id not in self.shard_slices:
            raise ValueError(f"unknown shard id {shard_id!r}; expected one of {list(self.shard_slices)}")
        shard, (start, size) = self.shards[shard_id], self.shard_slices[shard_id]
        check_loaded_shape(f"shard {shard_id!r}", (shard.full, *param.shape[1:]), loaded_shape)
        return WeightDestination(param.data.narrow(0, start, size), ((0, shard.start, size),))

    @takes_checkpoint_slices
    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any) -> None:  # a shard id is required
        self.weight_destination(param, loaded_weight.shape, shard_id).apply(loaded_weight)

    def _lora_geometry(self, shard_id: Any) -> LoRAGeometry:
        """A shard's adapter covers its rows, and its B splits like them (a replicated kv head
        included: ``Shard.start``); a whole-layer adapter is whole, so single-process only."""
        cols = self.in_features
        if shard_id is None:
            if self.tp_size > 1:
                raise ValueError(f"a LoRA adapter on the whole packed {type(self).__name__} cannot be split for "
                                 f"tensor-parallel rank {self.tp_rank} of {self.tp_size}; it needs one adapter per "
                                 f"shard ({list(self.shards)})")
            return LoRAGeometry(cols, LoRASpan(cols, 0, cols), self.out_features,
                                LoRASpan(self.out_features, 0, self.out_features), 0)
        if shard_id not in self.shard_slices:
            raise ValueError(f"unknown LoRA shard id {shard_id!r} for {type(self).__name__}; "
                             f"expected one of {list(self.shard_slices)} (or None for the whole layer)")
        shard, (start, size) = self.shards[shard_id], self.shard_slices[shard_id]
        return LoRAGeometry(cols, LoRASpan(cols, 0, cols), size, LoRASpan(shard.full, shard.start, size), start)


class MergedColumnParallelLinear(PackedLinear):
    """Several column-parallel outputs in one (``gate_up_proj``); shard ids ``0..n-1``."""

    def __init__(self, in_features: int, output_sizes: Sequence[int], bias: bool = False) -> None:
        super().__init__(in_features, dict(enumerate(output_sizes)), bias)


class QKVParallelLinear(PackedLinear):
    """q/k/v in one Linear (shard ids ``"q"``, ``"k"``, ``"v"``). Query heads are split across
    ranks; key/value heads too when there are at least as many as ranks, else each is replicated
    on ``tp_size // kv_heads`` ranks (rank r holds kv head ``r // (tp_size // kv_heads)``).
    ``num_heads``/``num_kv_heads`` are this rank's."""

    def __init__(self, hidden: int, head_dim: int, heads: int, kv_heads: int, bias: bool = False) -> None:
        state = current_parallel_state()
        tp, rank = state.tp_size, state.tp_rank
        local_heads = divide(heads, tp, "number of attention heads")
        if kv_heads >= tp:
            local_kv, kv_rank = divide(kv_heads, tp, "number of key/value heads"), rank
        elif tp % kv_heads:
            raise ParallelConfigError(f"number of key/value heads = {kv_heads}: the tensor-parallel size {tp} "
                                      f"must divide it or be a multiple of it")
        else:
            local_kv, kv_rank = 1, rank // (tp // kv_heads)
        kv = Shard(kv_heads * head_dim, kv_rank * local_kv * head_dim, local_kv * head_dim)
        q = Shard(heads * head_dim, rank * local_heads * head_dim, local_heads * head_dim)
        self._build(hidden, {"q": q, "k": kv, "v": kv}, bias, state)
        self.head_dim, self.num_heads, self.num_kv_heads = head_dim, local_heads, local_kv


class VocabShard(NamedTuple):
    """The rows of a vocabulary-parallel weight: the vocabulary is padded up to a multiple of
    ``tp_size`` and each rank holds ``size`` padded rows from ``start``, the first ``real`` of
    them real tokens (the rest are zero)."""

    vocab: int
    padded: int
    start: int
    size: int
    real: int


def vocab_shard(vocab: int, state: ParallelState) -> VocabShard:
    """This rank's rows of a ``vocab``-row embedding or LM head."""
    size = -(-vocab // state.tp_size)
    start = state.tp_rank * size
    return VocabShard(vocab, size * state.tp_size, start, size, max(0, min(size, vocab - start)))


class _VocabRows(_TensorParallel, _KeepsWeightLoaders):
    """This rank's rows of a vocabulary-sized weight (see ``VocabShard``), padding rows zero."""

    shard: VocabShard
    weight: nn.Parameter

    def _finish_vocab(self, shard: VocabShard, state: ParallelState) -> None:
        self.shard = shard
        self._set_tp(state, 0)
        with torch.no_grad():
            self.weight.narrow(0, shard.real, shard.size - shard.real).zero_()
        self._attach_loaders()

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:
        result = super()._apply(fn, *args, **kwargs)
        with torch.no_grad():  # to_empty() leaves garbage: padding rows are zero after every move
            self.weight.narrow(0, self.shard.real, self.shard.size - self.shard.real).zero_()
        self._zero_lora_padding()
        return result

    @takes_checkpoint_slices
    def weight_loader(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        self.weight_destination(param, loaded_weight.shape, shard_id).apply(loaded_weight)
        param.data.narrow(0, self.shard.real, self.shard.size - self.shard.real).zero_()

    def weight_destination(self, param: nn.Parameter, loaded_shape: Sequence[int],
                           shard_id: Any = None) -> WeightDestination:
        """The real rows; the padding rows are zeroed whenever the weight is made or moved."""
        _no_shard_id(self, shard_id)
        shard = self.shard
        check_loaded_shape("vocabulary-parallel weight", (shard.vocab, *param.shape[1:]), loaded_shape)
        return WeightDestination(param.data.narrow(0, 0, shard.real), ((0, shard.start, shard.real),))


class VocabParallelEmbedding(LoRALayer, _VocabRows, nn.Embedding):
    """Embedding rows split across ranks (see ``VocabShard``); each rank embeds the ids in its
    range, zeros the others, and the results are summed over the group."""

    def __init__(self, vocab: int, hidden: int) -> None:
        state = current_parallel_state()
        shard = vocab_shard(vocab, state)
        nn.Embedding.__init__(self, shard.size, hidden)
        self._finish_vocab(shard, state)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.tp_size == 1:
            out = super().forward(input_ids)
            return self._add_lora(input_ids, out) if "lora" in self._modules else out
        start = self.shard.start
        mine = (input_ids >= start) & (input_ids < start + self.shard.real)
        local_ids = torch.where(mine, input_ids - start, 0)
        out = F.embedding(local_ids, self.weight)
        if "lora" in self._modules:  # masked and summed with the embedding
            out = self._add_lora(local_ids, out)
        out = out.masked_fill(~mine.unsqueeze(-1), 0)
        dist.all_reduce(out, group=self.tp_group)
        return out

    def _lora_geometry(self, shard_id: Any) -> LoRAGeometry:
        """PEFT's ``lora_embedding_A`` is (r, vocab): its columns are vocabulary entries, split like
        the weight's rows (this rank's real ones, padding columns zero); B (dim, r) is whole."""
        _no_shard_id(self, shard_id)
        shard, dim = self.shard, self.embedding_dim
        return LoRAGeometry(shard.size, LoRASpan(shard.vocab, shard.start, shard.real), dim, LoRASpan(dim, 0, dim), 0)

    def _add_lora(self, input_ids: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """PEFT's embedding LoRA, ``embedding(ids, A^T) @ B^T * scaling`` (no dropout on ids)."""
        for adapter in self._modules["lora"].values():
            if not adapter.merged:
                out = out + F.linear(F.embedding(input_ids, adapter.lora_A.t()), adapter.lora_B) * adapter.scaling
        return out

    def _lora_merge_pair(self, adapter: Any) -> tuple[torch.Tensor, torch.Tensor]:
        return self.weight.data, adapter.delta_weight().t()  # (B @ A) is (dim, vocab): the weight's transpose


class ParallelLMHead(LoRALayer, _VocabRows, nn.Linear):
    """LM head sharded like ``VocabParallelEmbedding`` (so weights can be tied); the logits are
    gathered over the group and trimmed to the real vocabulary."""

    def __init__(self, vocab: int, hidden: int) -> None:
        state = current_parallel_state()
        shard = vocab_shard(vocab, state)
        nn.Linear.__init__(self, hidden, shard.size, bias=False)
        self._finish_vocab(shard, state)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        logits = F.linear(x, self.weight)
        if "lora" in self._modules:  # on this rank's vocabulary rows, before the gather
            logits = self._add_lora(x, logits)
        if self.tp_size > 1:
            parts = [torch.empty_like(logits) for _ in range(self.tp_size)]
            dist.all_gather(parts, logits.contiguous(), group=self.tp_group)
            logits = torch.cat(parts, dim=-1)
        return logits if self.shard.padded == self.shard.vocab else logits[..., : self.shard.vocab]

    def _lora_geometry(self, shard_id: Any) -> LoRAGeometry:
        """B's rows are vocabulary entries, split like the weight's rows (padding rows zero); A is whole."""
        _no_shard_id(self, shard_id)
        shard, cols = self.shard, self.in_features
        rows = LoRASpan(shard.vocab, shard.start, shard.real)
        return LoRAGeometry(cols, LoRASpan(cols, 0, cols), shard.size, rows, 0)
