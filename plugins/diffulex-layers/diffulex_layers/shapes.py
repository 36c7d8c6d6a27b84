"""The shape check of every weight and LoRA destination, apart from the layers: ``parallel``'s
layers mix in ``lora``'s ``LoRALayer``, so ``lora`` cannot import it from ``parallel``."""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["check_loaded_shape"]


def check_loaded_shape(what: str, expected: Sequence[int], loaded_shape: Sequence[int]) -> None:
    """A ``ValueError`` naming expected vs got, before anything is written."""
    if tuple(loaded_shape) != tuple(expected):
        raise ValueError(f"{what}: expected a checkpoint tensor of shape {tuple(expected)} "
                         f"but loaded weight has shape {tuple(loaded_shape)}")
