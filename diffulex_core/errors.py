"""Typed errors and warnings, so callers can catch exactly what went wrong."""


class DiffulexError(Exception):
    """Base class of every error raised by diffulex-core."""


class ConfigurationError(DiffulexError, ValueError):
    """An environment variable or option has a value we cannot interpret."""


class PluginError(DiffulexError):
    """A plugin could not be loaded (raised in strict mode, or listed in reports)."""


class PluginLoadError(PluginError):
    """Strict mode (``DIFFULEX_STRICT_PLUGINS=1``) found one or more plugin failures."""

    def __init__(self, failures):
        self.failures = tuple(failures)
        lines = [f"{len(self.failures)} plugin problem(s) with DIFFULEX_STRICT_PLUGINS=1:"]
        lines += [f"  - {failure.describe()}" for failure in self.failures]
        super().__init__("\n".join(lines))


class FamilyError(DiffulexError, LookupError):
    """A model-family lookup failed."""


class UnknownFamilyError(FamilyError):
    """No plugin registered the requested family name."""


class DuplicateFamilyError(FamilyError):
    """Two plugins registered the same family name and neither asked to override."""


class FamilyFactoryError(FamilyError):
    """A family's lazy ``"module:attr"`` factory could not be imported or is not callable."""


class PluginWarning(UserWarning):
    """A plugin failed and was skipped; the other plugins still work."""
