"""Writing a LoRA adapter as PEFT saves one (``adapter_model.safetensors`` and
``adapter_config.json``): the demo's adapter and the kit's test adapters."""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_lora_adapter"]


def write_lora_adapter(directory: str | Path, adapters: Mapping[str, tuple[Any, Any]], *,
                       lora_alpha: float | None = None, target_modules: list[str] | str | None = None,
                       embeddings: tuple[str, ...] = (), **config: Any) -> Path:
    """Write a LoRA adapter as PEFT saves one and return ``directory``.

    ``adapters`` maps each adapted module's checkpoint name (``model.layers.0.self_attn.q_proj``)
    to ``(A, B)``: A is ``(r, in_features)``, B ``(out_features, r)``; for the modules named in
    ``embeddings``, A is ``(r, num_embeddings)`` and B ``(embedding_dim, r)`` (PEFT's
    ``lora_embedding_A/B``). ``r`` is the first adapter's rank, other ranks go to ``rank_pattern``;
    ``lora_alpha`` defaults to ``r``; ``target_modules`` to the adapted names. Other keyword
    arguments are written to ``adapter_config.json`` as they are (``use_rslora=True``, ...).
    """
    from safetensors.torch import save_file

    if not adapters:
        raise ValueError("write_lora_adapter needs at least one adapter")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors, ranks = {}, {}
    for name, (a, b) in adapters.items():
        if a.dim() != 2 or b.dim() != 2 or a.shape[0] != b.shape[1]:
            raise ValueError(f"adapter {name}: A {tuple(a.shape)} and B {tuple(b.shape)} are not (r, in) and (out, r)")
        kind = "lora_embedding_{}" if name in embeddings else "lora_{}.weight"
        tensors[f"base_model.model.{name}.{kind.format('A')}"] = a.detach().to("cpu").contiguous().clone()
        tensors[f"base_model.model.{name}.{kind.format('B')}"] = b.detach().to("cpu").contiguous().clone()
        ranks[name] = int(a.shape[0])
    r = next(iter(ranks.values()))
    rank_pattern = {re.escape(name): rank for name, rank in ranks.items() if rank != r}
    fields = {
        "peft_type": "LORA", "r": r, "lora_alpha": r if lora_alpha is None else lora_alpha, "lora_dropout": 0.0,
        "target_modules": list(adapters) if target_modules is None else target_modules, "bias": "none",
        "use_rslora": False, "rank_pattern": rank_pattern, "alpha_pattern": {}, "fan_in_fan_out": False,
        "modules_to_save": None, "use_dora": False,
    }  # fmt: skip
    fields.update(config)
    save_file(tensors, directory / "adapter_model.safetensors", metadata={"format": "pt"})
    (directory / "adapter_config.json").write_text(json.dumps(fields, indent=2))
    return directory
