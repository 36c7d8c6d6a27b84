"""Writing safetensors checkpoints as transformers does: one file, or shards with an index.

Used by the plugin author's kit (``diffulex_core.testing.write_checkpoint``), ``diffulex check``
and ``diffulex demo``; imports nothing of diffulex_core, so any module may use it.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

__all__ = ["write_checkpoint"]


def _tensors(source: Any, to_checkpoint: Callable | None) -> dict[str, Any]:
    if to_checkpoint is not None:
        tensors = dict(to_checkpoint(source))
    elif isinstance(source, Mapping):
        tensors = dict(source)
    else:  # a model: its state dict, tied tensors stored once each (safetensors refuses shared storage)
        tensors = dict(source.state_dict())
    return {name: t.detach().to("cpu").contiguous().clone() for name, t in tensors.items()}


def write_checkpoint(directory: str | Path, source: Any, *, shards: int = 1, config: Mapping[str, Any] | None = None,
                     to_checkpoint: Callable[[Any], Mapping[str, Any]] | None = None) -> Path:
    """Write ``source`` (a dict of tensors, or a model's ``state_dict``; or ``to_checkpoint(source)``,
    a family's export to checkpoint names) as safetensors in ``directory`` and return it.

    ``shards=1`` writes ``model.safetensors``; more writes ``model-0000i-of-0000n.safetensors``
    and ``model.safetensors.index.json``, as transformers does. ``config`` becomes ``config.json``.
    """
    from safetensors.torch import save_file

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    tensors = _tensors(source, to_checkpoint)
    if shards < 1 or shards > max(1, len(tensors)):
        raise ValueError(f"shards must be between 1 and the number of tensors ({len(tensors)}), got {shards}")
    if shards == 1:
        save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    else:
        names, weight_map = list(tensors), {}
        for i in range(shards):
            part = names[i * len(names) // shards:(i + 1) * len(names) // shards]
            file = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
            save_file({n: tensors[n] for n in part}, directory / file, metadata={"format": "pt"})
            weight_map.update(dict.fromkeys(part, file))
        total = sum(t.numel() * t.element_size() for t in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (directory / "model.safetensors.index.json").write_text(json.dumps(index, indent=2))
    if config is not None:
        (directory / "config.json").write_text(json.dumps(dict(config), indent=2))
    return directory
