"""``CheckpointSlice`` and ``takes_checkpoint_slices``, where tensor-parallel weight loaders import
them: a checkpoint tensor narrowed before it is read (``diffulex_core.io.slices``)."""

from diffulex_core.io.slices import CheckpointSlice, takes_checkpoint_slices

__all__ = ["CheckpointSlice", "takes_checkpoint_slices"]
