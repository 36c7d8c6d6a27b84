"""Finding a checkpoint's ``.safetensors`` files and reading their headers (never tensor bytes).

Every malformed input raises ``CheckpointFormatError`` or ``CheckpointNotFoundError`` naming
the file (and the tensor where there is one), before the loader writes anything.
"""

from __future__ import annotations

import json
import math
import posixpath
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

import torch

from .errors import CheckpointFormatError, CheckpointNotFoundError

__all__ = ["TensorRecord", "CheckpointFiles", "find_checkpoint_files", "read_header", "read_records", "DTYPES"]

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the limit the safetensors format itself sets
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_LFS_PREFIX = b"version https://git-lfs"

DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"),
                     ("U16", "uint16"), ("U32", "uint32"), ("U64", "uint64")):
    if hasattr(torch, _attr):
        DTYPES[_code] = getattr(torch, _attr)


class TensorRecord(NamedTuple):
    """One tensor as its file's header describes it; ``start``/``end`` are absolute file offsets.

    A NamedTuple because a checkpoint can hold 100,000 of them and creating one must be cheap.
    """

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start


@dataclass
class CheckpointFiles:
    """The files a load reads, and the index's tensor -> file map when there is one."""

    root: Path
    files: list[Path]
    index: dict[str, str] | None = None
    notes: list[str] = field(default_factory=list)


def find_checkpoint_files(path: str | Path) -> CheckpointFiles:
    """One file, a directory with ``model.safetensors.index.json``, or a directory of ``*.safetensors``."""
    path = Path(path)
    if not path.exists():
        raise CheckpointNotFoundError(f"checkpoint {path} does not exist")
    if path.is_file():
        if path.name.endswith(".index.json"):
            return _from_index(path)
        _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointFormatError(f"{path} is not a .safetensors file or a safetensors index")
        return CheckpointFiles(path.parent, [path])
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise CheckpointFormatError(f"{path} holds several safetensors indexes ({names}); pass the one to load")
    if indexes:
        return _from_index(indexes[0])
    files = sorted(path.glob("*.safetensors"))
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointNotFoundError(
                f"{path} holds only pickle checkpoints ({', '.join(pickles)}); diffulex never loads pickles. "
                f"Convert them to .safetensors (for example with transformers' save_pretrained(safe_serialization=True))"
            )
        raise CheckpointNotFoundError(f"{path} holds no .safetensors file")
    return CheckpointFiles(path, files)


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointFormatError(f"{path} is a pickle checkpoint; diffulex never loads pickles. Convert it to .safetensors")


def _from_index(index_path: Path) -> CheckpointFiles:
    root = index_path.parent
    try:
        weight_map = json.loads(index_path.read_text())["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise CheckpointFormatError(f"{index_path} is not a safetensors index with a 'weight_map': {exc}") from None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(f"{index_path}: 'weight_map' must map tensor names to file names")
    # Names are checked as written, not where symlinks point: a Hugging Face cache snapshot's
    # shards are symlinks into ../../blobs, and that is fine; "../x" or "/x" in the index is not.
    weight_map = {tensor: posixpath.normpath(name) for tensor, name in weight_map.items()}
    files = []
    for name in sorted(set(weight_map.values())):
        if posixpath.isabs(name) or name == ".." or name.startswith("../"):
            raise CheckpointFormatError(f"{index_path} names {name!r}, which lies outside the checkpoint directory {root}")
        file = root / name
        _refuse_pickle(file)
        if not file.is_file():
            tensor = next(t for t, f in weight_map.items() if f == name)
            raise CheckpointFormatError(f"{index_path} names {name!r} (for tensor {tensor!r} and others), which does not exist")
        files.append(file)
    ignored = sorted(p.name for p in root.glob("*.safetensors") if p not in set(files))
    notes = [f"ignored {name}: not named by {index_path.name}" for name in ignored]
    return CheckpointFiles(root, files, weight_map, notes)


def read_header(file: Path) -> tuple[int, dict]:
    """Return (data start offset, header dict) of one safetensors file, validating its framing."""
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(min(size, 64))
        if head.startswith(_LFS_PREFIX):
            raise CheckpointFormatError(
                f"{file.name} is a Git LFS pointer ({size} bytes), not safetensors data. "
                f"Fetch the real file (git lfs pull) and load again. Nothing was loaded."
            )
        if size < 8:
            raise CheckpointFormatError(f"{file} is {size} bytes long, too short for a safetensors header; it is truncated")
        (length,) = struct.unpack("<Q", head[:8])
        if length > MAX_HEADER_BYTES:
            raise CheckpointFormatError(f"{file}: header of {length:,} bytes is over the 100 MB limit; the file is corrupt")
        if 8 + length > size:
            raise CheckpointFormatError(
                f"{file}: header length {length:,} runs past the end of the file ({size:,} bytes); the file is truncated or not safetensors"
            )
        f.seek(8)
        raw = f.read(length)
    try:
        header = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise CheckpointFormatError(f"{file}: the header is not valid JSON ({exc})") from None
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{file}: the header is a JSON {type(header).__name__}, not an object")
    return 8 + length, header


def read_records(file: Path) -> list[TensorRecord]:
    """Every tensor of one file, checked against the file's size, in file order."""
    data_start, header = read_header(file)
    data_size = file.stat().st_size - data_start
    records = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_code, shape, (begin, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
            dtype = DTYPES.get(dtype_code)
            expected = math.prod(shape) * (dtype.itemsize if dtype is not None else 0)
            valid = all(type(v) is int for v in (*shape, begin, end)) and min(shape, default=0) >= 0 and begin >= 0
        except (KeyError, TypeError, ValueError):
            valid = False
        if not valid:
            raise CheckpointFormatError(f"{file}: tensor {name!r} has a malformed header entry {info!r}")
        if dtype is None:
            raise CheckpointFormatError(f"{file}: tensor {name!r} has dtype {dtype_code!r}, which this torch cannot hold")
        if end - begin != expected:
            raise CheckpointFormatError(
                f"{file}: tensor {name!r} ({dtype_code}, shape {list(shape)}) spans bytes {begin}..{end}, expected {expected} bytes"
            )
        if end > data_size:
            raise CheckpointFormatError(
                f"{file}: tensor {name!r} needs data up to byte {end:,} but the file holds {data_size:,}; the file is truncated"
            )
        records.append(TensorRecord(name, file, dtype, shape, data_start + begin, data_start + end))
    records.sort(key=lambda r: r.start)
    for before, after in zip(records, records[1:]):
        if after.start < before.end:
            raise CheckpointFormatError(f"{file}: tensors {before.name!r} and {after.name!r} overlap")
    return records
