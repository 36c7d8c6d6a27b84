"""Finding a checkpoint's ``.safetensors`` files: one file, a sharded checkpoint's index, or a
directory of them. Pickles (``.bin``, ``.pt``, ...) are refused by name, never opened.

The index (``model.safetensors.index.json``) is read with the same JSON rules as headers
(``headers.parse_json``); its ``weight_map`` maps tensor names to file names (strings), inside
the checkpoint directory.
"""

from __future__ import annotations

import posixpath
import stat
from dataclasses import dataclass, field
from pathlib import Path

from diffulex_core.errors import CheckpointFormatError, CheckpointNotFoundError, LoadError
from diffulex_core.files.headers import MAX_HEADER_BYTES, parse_json
from diffulex_core.files.regular import file_kind, read_regular, shown, stat_path, stat_regular

__all__ = ["CheckpointFiles", "find_checkpoint_files"]

MAX_INDEX_BYTES = MAX_HEADER_BYTES  # an index lists names only; anything larger is not one
INDEX_NAME = "model.safetensors.index.json"
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")


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
    st = stat_path(path, "checkpoint")
    if stat.S_ISREG(st.st_mode):
        if path.name.endswith(".index.json"):
            return _from_index(path)
        _refuse_pickle(path)
        if path.suffix != ".safetensors":
            raise CheckpointFormatError(f"{path} is not a .safetensors file or a safetensors index")
        return CheckpointFiles(path.parent, [path])
    if not stat.S_ISDIR(st.st_mode):
        raise CheckpointFormatError(f"checkpoint {path} is {file_kind(st.st_mode)}, not a file or a directory")
    try:
        return _from_directory(path)
    except LoadError:
        raise
    except OSError as exc:  # a directory we may not list, or one changing under us
        raise CheckpointFormatError(f"checkpoint directory {path} cannot be read: {exc.strerror or exc}") from None


def _from_directory(path: Path) -> CheckpointFiles:
    indexes = sorted(path.glob("*.safetensors.index.json"))
    if len(indexes) > 1:
        names = ", ".join(p.name for p in indexes)
        raise CheckpointFormatError(f"{path} holds several safetensors indexes ({names}); pass the one to load")
    if indexes:
        return _from_index(indexes[0])
    files = sorted(path.glob("*.safetensors"))  # a directory or FIFO named so is refused below
    if not files:
        pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
        if pickles:
            raise CheckpointNotFoundError(
                f"{path} holds only pickle checkpoints ({', '.join(pickles)}); diffulex never loads pickles. "
                f"Convert them to .safetensors (for example with transformers' "
                f"save_pretrained(safe_serialization=True))"
            )
        raise CheckpointNotFoundError(f"{path} holds no .safetensors file")
    for file in files:
        stat_regular(file, "file")
    return CheckpointFiles(path, files)


def _refuse_pickle(path: Path) -> None:
    if path.suffix in PICKLE_SUFFIXES:
        raise CheckpointFormatError(f"{path} is a pickle checkpoint; diffulex never loads pickles. "
                                    f"Convert it to .safetensors")


def _from_index(index_path: Path) -> CheckpointFiles:
    root = index_path.parent
    size, raw = read_regular(index_path, "index", MAX_INDEX_BYTES + 1)
    if size > MAX_INDEX_BYTES:
        raise CheckpointFormatError(f"index {index_path} is {size:,} bytes, over the {MAX_INDEX_BYTES:,}-byte limit")
    index = parse_json(raw, f"{index_path}: the index")
    weight_map = index.get("weight_map") if isinstance(index, dict) else None
    if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
        raise CheckpointFormatError(f"{index_path} is not a safetensors index: "
                                    f"'weight_map' must map tensor names to file names")
    # Names are checked as written, not where symlinks point: a Hugging Face cache snapshot's
    # shards are symlinks into ../../blobs, and that is fine; "../x" or "/x" in the index is not.
    weight_map = {tensor: posixpath.normpath(name) for tensor, name in weight_map.items()}
    files = []
    for name in sorted(set(weight_map.values())):
        if posixpath.isabs(name) or name == ".." or name.startswith("../"):
            raise CheckpointFormatError(f"{index_path} names {shown(name)}, which lies outside the checkpoint "
                                        f"directory {root}")
        if "\x00" in name:  # no file name can hold one; os.stat would raise a bare ValueError
            raise CheckpointFormatError(f"{index_path} names {shown(name)} (for tensor {_first(weight_map, name)} and "
                                        f"others), which holds a NUL byte: no file can have that name")
        file = root / name
        _refuse_pickle(file)
        try:
            stat_regular(file, "shard")
        except CheckpointNotFoundError as exc:
            raise CheckpointFormatError(f"{index_path} names {shown(name)} (for tensor {_first(weight_map, name)} and "
                                        f"others), which does not exist ({exc})") from None
        except CheckpointFormatError as exc:
            raise CheckpointFormatError(f"{index_path} names {shown(name)}: {exc}") from None
        files.append(file)
    ignored = sorted(p.name for p in root.glob("*.safetensors") if p not in set(files))
    notes = [f"ignored {name}: not named by {index_path.name}" for name in ignored]
    return CheckpointFiles(root, files, weight_map, notes)


def _first(weight_map: dict[str, str], name: str) -> str:
    """The first tensor the index sends to file ``name``, quoted for an error message."""
    return shown(next(t for t, f in weight_map.items() if f == name))
