"""A model whose parameters carry exactly a checkpoint's tensor names, for the flat benchmarks.

Importing this module costs only the standard library (``bench_first_load`` times a fresh
process from its first statement); torch is imported when a model is built.
"""

from __future__ import annotations

import json
import struct
from pathlib import Path


def raw_header_specs(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    """Names -> (shape, safetensors dtype name) from a safetensors header, in file order."""
    with open(path, "rb") as f:
        (length,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(length))
    header.pop("__metadata__", None)
    items = sorted(header.items(), key=lambda kv: kv[1]["data_offsets"][0])
    return {name: (tuple(info["shape"]), info["dtype"]) for name, info in items}


def build_named_model(specs: dict, device=None):
    """An ``nn.Module`` tree with a zero-filled parameter (``requires_grad=False``) per name of
    ``specs`` (name -> (shape, torch dtype or safetensors dtype name))."""
    import torch
    from torch import nn

    names = {"F32": torch.float32, "BF16": torch.bfloat16, "F16": torch.float16}
    root = nn.Module()
    modules: dict[str, nn.Module] = {"": root}
    for name, (shape, dtype) in specs.items():
        *path, leaf = name.split(".")
        parent, prefix = root, ""
        for part in path:
            prefix = f"{prefix}.{part}" if prefix else part
            child = modules.get(prefix)
            if child is None:
                child = modules[prefix] = nn.Module()
                setattr(parent, part, child)
            parent = child
        dtype = names[dtype] if isinstance(dtype, str) else dtype
        setattr(parent, leaf, nn.Parameter(torch.zeros(shape, dtype=dtype, device=device), requires_grad=False))
    return root


def verify_against_file(model, path: Path, label: str, samples: int = 32) -> int:
    """Compare the first, last and evenly spaced parameters with the file's tensors (exits on a
    difference, or on an all-zero file tensor, which would prove nothing); returns how many."""
    import torch
    from safetensors import safe_open

    params = dict(model.named_parameters())
    with safe_open(str(path), "pt") as f:
        names = list(f.keys())
        picks = sorted({0, len(names) - 1, *range(0, len(names), max(1, len(names) // samples))})
        for i in picks:
            expected = f.get_tensor(names[i])
            if not torch.any(expected != 0):
                raise SystemExit(f"{label}: file tensor {names[i]!r} is all zeros; the check would prove nothing")
            if not torch.equal(params[names[i]].detach().cpu(), expected):
                raise SystemExit(f"{label}: parameter {names[i]!r} differs from the checkpoint after loading")
    return len(picks)
