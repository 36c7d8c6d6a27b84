"""One rule for the boolean environment variables diffulex-core reads (its own and the hub's
offline switches), so ``DIFFULEX_SAVE_TRACE=off`` and ``DIFFULEX_STRICT_PLUGINS=off`` mean the same."""

from __future__ import annotations

import os

from diffulex_core.errors import ConfigurationError

__all__ = ["env_flag"]

TRUE_WORDS = ("1", "true", "yes", "on")
FALSE_WORDS = ("0", "false", "no", "off")


def env_flag(name: str, default: bool) -> bool:
    """``name`` read as a boolean: unset or empty is ``default``; ``1/true/yes/on`` and
    ``0/false/no/off`` (any case, spaces ignored); anything else is a ``ConfigurationError`` naming it."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in TRUE_WORDS:
        return True
    if value in FALSE_WORDS:
        return False
    raise ConfigurationError(f"{name}={raw!r} is not a boolean; use one of {', '.join(TRUE_WORDS + FALSE_WORDS)}")
