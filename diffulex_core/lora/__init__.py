"""PEFT LoRA adapters: ``adapter_config.json`` and PEFT's target matching (``config``), and adding,
checking, loading and merging adapters (``adapters``). The seed's doors are in ``diffulex_core.loader``."""
