"""diffulex-core: checkpoint loading and output accounting for diffusion-LM engines.

Importing this package is cheap on purpose: it scans no entry points, imports no plugin
and no transformers. Plugins are discovered on first use (see ``diffulex_core.plugins.discovery``).
"""

from diffulex_core.hookspecs import hookimpl

__version__ = "0.1.0"

__all__ = ["hookimpl", "__version__"]
