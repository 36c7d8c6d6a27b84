"""Torch building blocks shared by the bundled diffulex model-family plugins (not a plugin).

Everything public lives in ``diffulex_layers.transformer`` and is re-exported here; test helpers
for the family plugins are in ``diffulex_layers.testing``.
"""

from diffulex_layers import transformer as _transformer
from diffulex_layers.transformer import *  # noqa: F403

__all__ = list(_transformer.__all__)
