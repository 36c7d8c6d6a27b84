"""Sparse mixture-of-experts (Qwen3-MoE style) with experts split across expert-parallel ranks.

Experts are stored stacked, ``experts.gate_up_proj`` [E_local, 2*I, H] and ``experts.down_proj``
[E_local, H, I]; the expert-parallel group splits the E experts into contiguous ranges. A
checkpoint names them one by one (``<prefix>.experts.{e}.{gate,up,down}_proj.weight``):
``StackedExperts.resolve_checkpoint_weight`` places the ones this rank owns and skips the
others, so their bytes are never read.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from diffulex_core.plugin_api import (
    LoadContext,
    ResolvedWeight,
    WeightDestination,
    current_parallel_state,
    divide,
    takes_checkpoint_slices,
)

from .parallel import GroupRef, ReplicatedLinear
from .shapes import check_loaded_shape

__all__ = ["ExpertWeight", "SparseMoeBlock", "StackedExperts", "parse_expert_weight", "per_expert_tensors"]

_EXPERT_WEIGHT = re.compile(r"(\d+)\.(gate_proj|up_proj|down_proj)\.weight")


class ExpertWeight(NamedTuple):
    """A per-expert checkpoint tensor: which expert, which projection."""

    expert: int
    proj: str  # "gate_proj", "up_proj" or "down_proj"


def parse_expert_weight(suffix: str) -> ExpertWeight | None:
    """``"5.gate_proj.weight"`` -> ``ExpertWeight(5, "gate_proj")``; ``None`` for other names."""
    match = _EXPERT_WEIGHT.fullmatch(suffix)
    return ExpertWeight(int(match[1]), match[2]) if match else None


class StackedExperts(nn.Module):
    """This rank's experts, stacked; ``forward`` adds their weighted outputs for the tokens routed
    to them and sums over the expert-parallel group."""

    def __init__(self, num_experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        state = current_parallel_state()
        self.num_experts, self.hidden, self.inter = num_experts, hidden, inter
        self.num_local_experts = divide(num_experts, state.ep_size, "number of experts")
        self.ep_rank, self.ep_size, self._ep_group = state.ep_rank, state.ep_size, GroupRef(state.ep_group)
        self.expert_start = state.ep_rank * self.num_local_experts
        self.gate_up_proj = nn.Parameter(torch.empty(self.num_local_experts, 2 * inter, hidden))
        self.down_proj = nn.Parameter(torch.empty(self.num_local_experts, hidden, inter))
        with torch.no_grad():
            self.gate_up_proj.normal_(0, 0.02)
            self.down_proj.normal_(0, 0.02)
        self._attach_loaders()

    @property
    def ep_group(self) -> Any:
        return self._ep_group.group

    def _attach_loaders(self) -> None:
        self.gate_up_proj.weight_loader = self.load_gate_up
        self.gate_up_proj.weight_destination = self.gate_up_destination
        self.down_proj.weight_loader = self.load_down
        self.down_proj.weight_destination = self.down_destination

    def _apply(self, fn: Any, *args: Any, **kwargs: Any) -> Any:  # to_empty() makes new Parameters
        result = super()._apply(fn, *args, **kwargs)
        self._attach_loaders()
        return result

    def __setstate__(self, state: dict) -> None:  # deepcopy / unpickle drop Parameter attributes
        super().__setstate__(state)
        self._attach_loaders()

    def owner(self, expert: int) -> int:
        """The expert-parallel rank that holds ``expert``."""
        return expert // self.num_local_experts

    def resolve_checkpoint_weight(self, suffix: str, ctx: LoadContext) -> ResolvedWeight | None:
        """Module resolver for ``{e}.{gate,up,down}_proj.weight``: this rank's experts go into
        their slot of the stacked parameters, the others are skipped unread."""
        parsed = parse_expert_weight(suffix)
        if parsed is None or parsed.expert >= self.num_experts:
            return None
        owner = self.owner(parsed.expert)
        if owner != self.ep_rank:
            return ResolvedWeight(skip=True, reason=f"expert {parsed.expert} belongs to expert-parallel rank "
                                                    f"{owner} of {self.ep_size}")
        local = parsed.expert - self.expert_start
        if parsed.proj == "down_proj":
            return ResolvedWeight(param=self.down_proj, shard_id=local)
        return ResolvedWeight(param=self.gate_up_proj, shard_id=(local, 0 if parsed.proj == "gate_proj" else 1))

    def _local_expert(self, shard_id: Any) -> int:
        if isinstance(shard_id, int) and not isinstance(shard_id, bool) and 0 <= shard_id < self.num_local_experts:
            return shard_id
        raise ValueError(f"unknown expert shard id {shard_id!r}; "
                         f"expected a local expert 0..{self.num_local_experts - 1}")

    def gate_up_destination(self, param: nn.Parameter, loaded_shape: Sequence[int],
                            shard_id: Any = None) -> WeightDestination:
        """``shard_id=(local expert, 0 gate | 1 up)``: one [I, H] tensor into its rows of the slot;
        without it, a stacked [E, 2I, H] tensor, of which this rank takes its experts."""
        if shard_id is None:
            check_loaded_shape("experts.gate_up_proj", (self.num_experts, *param.shape[1:]), loaded_shape)
            return WeightDestination(param.data, ((0, self.expert_start, self.num_local_experts),))
        if not (isinstance(shard_id, tuple) and len(shard_id) == 2 and shard_id[1] in (0, 1)):
            raise ValueError(f"unknown gate_up_proj shard id {shard_id!r}; expected (local expert, 0 or 1)")
        local, half = self._local_expert(shard_id[0]), shard_id[1]
        name = "gate_proj" if half == 0 else "up_proj"
        check_loaded_shape(f"expert {self.expert_start + local} {name}", (self.inter, self.hidden), loaded_shape)
        return WeightDestination(param.data.select(0, local).narrow(0, half * self.inter, self.inter))

    def down_destination(self, param: nn.Parameter, loaded_shape: Sequence[int],
                         shard_id: Any = None) -> WeightDestination:
        """``shard_id=local expert``: one [H, I] tensor into its slot; without it, a stacked [E, H, I] one."""
        if shard_id is None:
            check_loaded_shape("experts.down_proj", (self.num_experts, *param.shape[1:]), loaded_shape)
            return WeightDestination(param.data, ((0, self.expert_start, self.num_local_experts),))
        local = self._local_expert(shard_id)
        check_loaded_shape(f"expert {self.expert_start + local} down_proj", (self.hidden, self.inter), loaded_shape)
        return WeightDestination(param.data.select(0, local))

    @takes_checkpoint_slices
    def load_gate_up(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        self.gate_up_destination(param, loaded_weight.shape, shard_id).apply(loaded_weight)

    @takes_checkpoint_slices
    def load_down(self, param: nn.Parameter, loaded_weight: Any, shard_id: Any = None) -> None:
        self.down_destination(param, loaded_weight.shape, shard_id).apply(loaded_weight)

    def forward(self, hidden: torch.Tensor, top_index: torch.Tensor, top_weights: torch.Tensor) -> torch.Tensor:
        """hidden [N, H], top_index/top_weights [N, k] -> sum of the routed experts' outputs [N, H]."""
        out = torch.zeros_like(hidden)
        for local in range(self.num_local_experts):
            # (k position, token) pairs in transformers' order, so sums round alike
            top_pos, token = torch.where((top_index == self.expert_start + local).T)
            if token.numel() == 0:
                continue
            gate, up = F.linear(hidden[token], self.gate_up_proj[local]).chunk(2, dim=-1)
            part = F.linear(F.silu(gate) * up, self.down_proj[local]) * top_weights[token, top_pos, None]
            out.index_add_(0, token, part.to(out.dtype))
        if self.ep_size > 1:
            dist.all_reduce(out, group=self.ep_group)
        return out


def per_expert_tensors(prefix: str, experts: StackedExperts) -> dict[str, torch.Tensor]:
    """This rank's stacked experts under per-expert checkpoint names
    (``{prefix}.{e}.{gate_proj,up_proj,down_proj}.weight``), for writing checkpoints."""
    out: dict[str, torch.Tensor] = {}
    for local in range(experts.num_local_experts):
        name = f"{prefix}.{experts.expert_start + local}"
        gate, up = experts.gate_up_proj[local].detach().chunk(2)
        out[f"{name}.gate_proj.weight"] = gate.clone().contiguous()
        out[f"{name}.up_proj.weight"] = up.clone().contiguous()
        out[f"{name}.down_proj.weight"] = experts.down_proj[local].detach().clone().contiguous()
    return out


class SparseMoeBlock(nn.Module):
    """Router (``gate``, replicated, no bias) + ``experts``: softmax in float32, top-k,
    optionally renormalised, as transformers' ``Qwen3MoeSparseMoeBlock``."""

    def __init__(self, hidden: int, num_experts: int, top_k: int, inter: int, norm_topk_prob: bool = True) -> None:
        super().__init__()
        if not 0 < top_k <= num_experts:
            raise ValueError(f"top_k={top_k} must be between 1 and the number of experts {num_experts}")
        self.top_k, self.norm_topk_prob = top_k, norm_topk_prob
        self.gate = ReplicatedLinear(hidden, num_experts, bias=False)
        self.experts = StackedExperts(num_experts, hidden, inter)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, T, H = x.shape
        flat = x.reshape(-1, H)
        probs = F.softmax(self.gate(flat), dim=-1, dtype=torch.float32)
        top_weights, top_index = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk_prob:
            top_weights = top_weights / top_weights.sum(dim=-1, keepdim=True)
        return self.experts(flat, top_index, top_weights.to(x.dtype)).reshape(B, T, H)
