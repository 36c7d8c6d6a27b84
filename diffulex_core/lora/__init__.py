"""PEFT LoRA adapters: ``adapter_config.json`` and PEFT's target matching (``config``), and adding,
checking, loading and merging adapters (``adapters``). The seed's doors are in ``diffulex_core.loader``."""

__all__: list[str] = []  # a layer of modules; import each by its own name
