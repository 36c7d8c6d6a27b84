"""Generation outputs: reading an engine's request objects (``requests``), what is kept per request
and step (``trajectory``) and the metrics over it (``outputs``). Imported through ``diffulex_core.output``."""

__all__: list[str] = []  # a layer of modules; import each by its own name
