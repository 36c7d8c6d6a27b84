"""LoRA adapters on the tensor-parallel reference layers (Diffulex's ``LoRAMixin`` contract).

The core loader calls ``layer.__init_lora__(r, lora_alpha, lora_dropout, shard_id=..., scaling=...)``
for each adapter a PEFT checkpoint has on the layer, writes the adapter tensors where
``layer.lora_destination(shard_id, part, loaded_shape)`` says (a ``WeightDestination``, like
``weight_destination`` for the base weights, so each rank reads only its part of the FULL PEFT
tensor), and may call ``layer.merge_lora()``.

A layer may carry several adapters, one per output shard of a packed layer (q/k/v of
``qkv_proj``, gate/up of ``gate_up_proj``) or one for the whole layer, each with its own rank and
scaling. They live in ``layer.lora``, an ``nn.ModuleDict`` keyed by ``str(shard_id)`` (``"whole"``
for the whole layer), so their parameters are real, registered parameters
(``qkv_proj.lora.q.lora_A``) that ``to_empty``/``.to()``/``deepcopy`` move like the weight. The
whole-layer adapter is also ``layer.lora_A``/``lora_B``/``scaling``/``r`` as in the seed.

Tensor parallelism: each rank holds the slices of A and B that its part of the weight needs, so
the LoRA product of each rank is exactly its part of the full product, merges only touch local
weights, and a row-parallel layer's partial LoRA products ride on the all-reduce the layer
already does. Without an adapter a layer's forward does nothing more than before.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from diffulex_core.plugin_api import WeightDestination

from .shapes import check_loaded_shape

__all__ = ["LoRAAdapter", "LoRAGeometry", "LoRALayer", "LoRASpan", "lora_key"]

WHOLE = "whole"  # the key of the adapter on the whole layer's output (shard_id None)


def lora_key(shard_id: Any) -> str:
    """The ``layer.lora`` key of an adapter: ``"whole"`` for ``shard_id=None``, else ``str(shard_id)``."""
    return WHOLE if shard_id is None else str(shard_id)


class LoRASpan(NamedTuple):
    """How one dimension of a local adapter tensor maps onto the full (PEFT) tensor: the full
    size, and the ``length`` entries from ``start`` this rank copies into its first ``length``
    (the rest, vocabulary padding, stays zero)."""

    full: int
    start: int
    length: int


class LoRAGeometry(NamedTuple):
    """Where an adapter sits on its layer, in local sizes: A is ``(r, in_local)``, B is
    ``(out_local, r)`` and covers local output rows ``[row_start, row_start + out_local)``."""

    in_local: int
    in_span: LoRASpan  # columns of A
    out_local: int
    out_span: LoRASpan  # rows of B
    row_start: int


class LoRAAdapter(nn.Module):
    """One adapter: ``lora_A`` (r, in_local), ``lora_B`` (size, r), ``scaling``, and the local
    output rows ``[start, start + size)`` it adds to. Made on the weight's device and dtype,
    initialised like the seed (A Kaiming-uniform, B zero: the adapter starts as a no-op)."""

    def __init__(self, r: int, geometry: LoRAGeometry, scaling: float, dropout: float,
                 device: torch.device, dtype: torch.dtype) -> None:
        super().__init__()
        self.r, self.scaling, self.merged = r, float(scaling), False
        self.start, self.size = geometry.row_start, geometry.out_local
        self.in_span, self.out_span = geometry.in_span, geometry.out_span
        self.lora_A = nn.Parameter(torch.empty(r, geometry.in_local, device=device, dtype=dtype))
        self.lora_B = nn.Parameter(torch.zeros(geometry.out_local, r, device=device, dtype=dtype))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.zero_padding()

    @torch.no_grad()
    def zero_padding(self) -> None:
        """Zero the columns of A / rows of B that stand for vocabulary padding: they must not
        reach a merged weight (``to_empty`` fills them with garbage)."""
        a_pad, b_pad = self.lora_A.shape[1] - self.in_span.length, self.size - self.out_span.length
        if a_pad:
            self.lora_A.narrow(1, self.in_span.length, a_pad).zero_()
        if b_pad:
            self.lora_B.narrow(0, self.out_span.length, b_pad).zero_()

    def delta_weight(self) -> torch.Tensor:
        """``(B @ A) * scaling`` in float32: what merging adds to the weight rows (a linear layer's)."""
        return (self.lora_B.detach().float() @ self.lora_A.detach().float()) * self.scaling

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """``scaling * dropout(x) @ A^T @ B^T``: this adapter's addition to its output rows."""
        return F.linear(F.linear(self.lora_dropout(x), self.lora_A), self.lora_B) * self.scaling

    def extra_repr(self) -> str:
        rows = f"[{self.start}, {self.start + self.size})"
        return f"r={self.r}, scaling={self.scaling}, rows={rows}, merged={self.merged}"


class LoRALayer:
    """Mixin for the tensor-parallel layers: ``__init_lora__``, ``lora_destination``,
    ``merge_lora`` and the seed's ``lora_A``/``lora_B``/``scaling``/``r``/``merged``.

    A layer provides ``_lora_geometry(shard_id)`` (raising ``ValueError`` for a shard id it does
    not have) and adds ``_add_lora(x, out)`` to its forward when ``"lora" in self._modules``.
    """

    weight: nn.Parameter
    _modules: dict

    def _lora_geometry(self, shard_id: Any) -> LoRAGeometry:
        raise NotImplementedError

    def __init_lora__(self, r: int, lora_alpha: float, lora_dropout: float, *, shard_id: Any = None,
                      scaling: float | None = None) -> None:
        """Add (or replace) the adapter of rank ``r`` on ``shard_id``'s output rows (None: the
        whole output). ``scaling`` defaults to the seed's ``lora_alpha / r``; the core passes it
        for rsLoRA and rank/alpha patterns."""
        if not isinstance(r, int) or isinstance(r, bool) or r <= 0:
            raise ValueError(f"{type(self).__name__}: the LoRA rank r must be a positive integer, got {r!r}")
        geometry = self._lora_geometry(shard_id)
        scaling = lora_alpha / r if scaling is None else scaling
        adapter = LoRAAdapter(r, geometry, scaling, lora_dropout, self.weight.device, self.weight.dtype)
        # A new ModuleDict each time, made only now: a layer without adapters keeps its state_dict
        # and forward, and a caller that saved ``_modules`` can put the old adapters back.
        self.lora = nn.ModuleDict({**(self._modules.get("lora") or {}), lora_key(shard_id): adapter})

    def lora_adapter(self, shard_id: Any = None) -> LoRAAdapter:
        """The adapter on ``shard_id`` (``ValueError`` if it was not initialised)."""
        adapters = self._modules.get("lora") or {}
        key = lora_key(shard_id)
        if key not in adapters:
            raise ValueError(f"{type(self).__name__} has no LoRA adapter for shard id {shard_id!r}; "
                             f"initialised: {list(adapters)} (call __init_lora__ first)")
        return adapters[key]

    def lora_destination(self, shard_id: Any, part: str, loaded_shape: Sequence[int]) -> WeightDestination:
        """Where this rank's part of the FULL PEFT tensor ``part`` ("A" or "B") of the adapter on
        ``shard_id`` lands: a view of the local parameter and the narrows of the full tensor.
        A splits on its columns (input features, or vocabulary entries of an embedding), B on
        its rows (output features), exactly as the weight splits."""
        adapter = self.lora_adapter(shard_id)
        if part == "A":
            param, dim, span = adapter.lora_A, 1, adapter.in_span
        elif part == "B":
            param, dim, span = adapter.lora_B, 0, adapter.out_span
        else:
            raise ValueError(f"LoRA part must be 'A' or 'B', got {part!r}")
        expected = list(param.shape)
        expected[dim] = span.full
        check_loaded_shape(f"{type(self).__name__} LoRA {part} (rank r={adapter.r}) of shard {shard_id!r}",
                           expected, loaded_shape)
        if span.length == span.full == param.shape[dim]:
            return WeightDestination(param.data)
        return WeightDestination(param.data.narrow(dim, 0, span.length), ((dim, span.start, span.length),))

    def _lora_merge_pair(self, adapter: LoRAAdapter) -> tuple[torch.Tensor, torch.Tensor]:
        """The weight rows the adapter changes and the float32 change to them."""
        return self.weight.data.narrow(0, adapter.start, adapter.size), adapter.delta_weight()

    @torch.no_grad()
    def merge_lora(self) -> None:
        """Fold every unmerged adapter into this rank's weight, in float32 then cast back
        (``W.copy_((W.float() + delta).to(W.dtype))``); forward then stops adding it. Again: no-op."""
        for adapter in (self._modules.get("lora") or {}).values():
            if not adapter.merged:
                target, delta = self._lora_merge_pair(adapter)
                target.copy_((target.float() + delta).to(target.dtype))
                adapter.merged = True

    def _add_lora(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor:
        """``out`` plus each unmerged adapter's product on its output rows."""
        for adapter in self._modules["lora"].values():
            if not adapter.merged:
                delta = adapter(x)
                if adapter.size == out.shape[-1]:
                    out = out + delta
                else:
                    out.narrow(-1, adapter.start, adapter.size).add_(delta)
        return out

    def _zero_lora_padding(self) -> None:
        for adapter in (self._modules.get("lora") or {}).values():
            adapter.zero_padding()

    # The seed's single-adapter attributes, for the whole-layer adapter.
    @property
    def lora_A(self) -> nn.Parameter:
        return self._whole().lora_A

    @property
    def lora_B(self) -> nn.Parameter:
        return self._whole().lora_B

    @property
    def scaling(self) -> float:
        return self._whole().scaling

    @scaling.setter
    def scaling(self, value: float) -> None:  # seed-style callers set rsLoRA's scaling after __init_lora__
        self._whole().scaling = float(value)

    @property
    def r(self) -> int:
        return self._whole().r

    @property
    def merged(self) -> bool:
        """True once every adapter is merged into the weight (setting it sets every adapter's flag)."""
        adapters = self._modules.get("lora") or {}
        return bool(adapters) and all(a.merged for a in adapters.values())

    @merged.setter
    def merged(self, value: bool) -> None:
        for adapter in (self._modules.get("lora") or {}).values():
            adapter.merged = bool(value)

    def _whole(self) -> LoRAAdapter:
        adapters = self._modules.get("lora") or {}
        if WHOLE not in adapters:  # AttributeError: hasattr(layer, "lora_A") is False, as in the seed
            raise AttributeError(f"{type(self).__name__} has no whole-layer LoRA adapter")
        return adapters[WHOLE]
