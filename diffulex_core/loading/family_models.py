"""Building a family's model for a checkpoint: its ``config.json`` and, by default, its dtype.

transformers 5 builds a model in the checkpoint's dtype unless told otherwise; so do we
(``diffulex load``, ``diffulex demo --checkpoint``): a bf16 checkpoint loaded into float32
parameters takes twice the memory and a cast per tensor.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path
from typing import Any

from diffulex_core.errors import DiffulexError

__all__ = ["build_for_checkpoint", "checkpoint_config", "checkpoint_dtype", "parse_dtype"]


def checkpoint_config(path: str | Path) -> dict:
    """The checkpoint's ``config.json`` (what family factories take), or {} when it has none."""
    path = Path(path)
    config_file = path / "config.json" if path.is_dir() else path.parent / "config.json"
    if not config_file.exists():
        return {}
    try:
        config = json.loads(config_file.read_text())
    except ValueError as exc:
        raise DiffulexError(f"{config_file} is not valid JSON: {exc}") from None
    if not isinstance(config, dict):
        raise DiffulexError(f"{config_file} must hold a JSON object, not {type(config).__name__}")
    return config


def parse_dtype(name: Any, what: str):
    """A floating torch dtype from its name (``"bfloat16"``, ``"torch.float16"``); ``DiffulexError`` otherwise."""
    import torch

    text = str(name).removeprefix("torch.")
    dtype = getattr(torch, text, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype) or not dtype.is_floating_point:
        raise DiffulexError(f"{what} {name!r} is not a floating-point torch dtype (float32, bfloat16, float16, ...)")
    return dtype


def checkpoint_dtype(path: str | Path, config: dict | None = None) -> tuple[Any, str]:
    """(dtype, where it came from): config ``dtype``/``torch_dtype``, else the floating dtype holding
    most of the checkpoint's bytes; (None, reason) when neither says."""
    from diffulex_core.files.finding import find_checkpoint_files
    from diffulex_core.files.headers import read_records

    config = checkpoint_config(path) if config is None else config
    for key in ("dtype", "torch_dtype"):
        value = config.get(key)
        if isinstance(value, str) and value != "auto":
            return parse_dtype(value, f"config.json {key}"), f"config.json {key}"
    found = find_checkpoint_files(path)
    by_bytes: Counter = Counter()
    for file in found.files:
        for record in read_records(file):
            if record.dtype.is_floating_point:
                by_bytes[record.dtype] += record.nbytes
    if not by_bytes:
        return None, "no floating-point tensors"
    return by_bytes.most_common(1)[0][0], "the checkpoint's tensors"


def build_for_checkpoint(family: str, path: str | Path, device: Any = "meta", dtype: str | None = None):
    """``(model, dtype note)``: the family's model from the checkpoint's config, on ``device``, in
    ``dtype`` (a name) or else the checkpoint's dtype. ``"meta"`` puts the parameters on the meta
    device and keeps computed buffers real (``init_empty_weights``)."""
    import torch

    from diffulex_core.empty_weights import init_empty_weights
    from diffulex_core.registry import get_family

    config = checkpoint_config(path)
    if dtype is not None:
        torch_dtype, source = parse_dtype(dtype, "--dtype"), "--dtype"
    else:
        torch_dtype, source = checkpoint_dtype(path, config)
    factory = get_family(family)
    # On meta: parameters only; buffers computed in __init__ (rotary caches) keep their values.
    with init_empty_weights() if str(device) == "meta" else torch.device(device):
        model = factory(config)
    if torch_dtype is not None:
        model = model.to(torch_dtype)
    return model, f"{str(torch_dtype).removeprefix('torch.') if torch_dtype else 'the family default'} (from {source})"
