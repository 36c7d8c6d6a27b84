"""Torch building blocks shared by the bundled diffulex model-family plugins (not a plugin).

The transformer blocks live in ``diffulex_layers.transformer``, the tensor-parallel layers in
``diffulex_layers.parallel`` (their LoRA adapters in ``diffulex_layers.lora``) and the sparse
mixture-of-experts block in ``diffulex_layers.moe``; all are re-exported here. Test helpers for
the family plugins are in ``diffulex_layers.testing``.
"""

from diffulex_layers import lora as _lora
from diffulex_layers import moe as _moe
from diffulex_layers import parallel as _parallel
from diffulex_layers import transformer as _transformer
from diffulex_layers.lora import *  # noqa: F403
from diffulex_layers.moe import *  # noqa: F403
from diffulex_layers.parallel import *  # noqa: F403
from diffulex_layers.transformer import *  # noqa: F403

__all__ = list(dict.fromkeys([*_transformer.__all__, *_parallel.__all__, *_moe.__all__, *_lora.__all__]))
