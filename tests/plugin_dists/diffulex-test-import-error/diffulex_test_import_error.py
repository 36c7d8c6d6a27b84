"""Fails at import time, as a plugin with a missing dependency does."""

import diffulex_test_dependency_that_is_not_installed  # noqa: F401
