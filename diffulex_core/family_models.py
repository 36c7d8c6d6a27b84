"""Building a family's model for a checkpoint, in its dtype (``diffulex_core.loading.family_models``)."""

from diffulex_core.loading.family_models import build_for_checkpoint, checkpoint_config, checkpoint_dtype

__all__ = ["build_for_checkpoint", "checkpoint_config", "checkpoint_dtype"]
