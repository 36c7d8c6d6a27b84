"""Reading and validating a safetensors file's header (never tensor bytes).

Every malformed input raises ``CheckpointFormatError`` or ``CheckpointNotFoundError`` naming
the file (and the tensor where there is one), before the loader writes anything.

The header rules are those of safetensors' own reader (0.8, Rust ``SafeTensors::read_metadata``
behind ``safe_open``), found by reading its source and probing it, so a file we accept is one
safetensors accepts, and the other way round. In the order we check them (cheap checks first,
so no hostile header costs more than reading it once):

1. Framing: the file is at least 8 bytes; the first 8 are a little-endian u64 ``N`` with
   ``N <= 100,000,000`` and ``8 + N <= file size``.
2. Text: the ``N`` header bytes are strict UTF-8 (no BOM: safetensors rejects it as JSON, and
   we never guess UTF-16/32 as ``json.loads(bytes)`` would). Whitespace (space, tab, CR, LF)
   may lead and trail the JSON; that is how writers pad headers to 8 bytes. Nothing else may.
3. JSON as serde_json reads it: no ``NaN``/``Infinity``; no number whose value overflows a
   double; integers in ``[-2**63, 2**64)`` are integers, any other (and ``-0``) is a float;
   no lone UTF-16 surrogate escape; at most 127 nested arrays/objects.
   Stricter than safetensors by design: a key twice in one object is refused everywhere
   (safetensors refuses it inside a tensor entry and for ``__metadata__``, but keeps the last
   copy of a repeated tensor name or metadata key, so two copies could hold different tensors).
4. Structure: the top level is an object. ``__metadata__`` is ``null`` or an object of strings.
   Every other key is a tensor name whose entry is an object with ``dtype`` (a known code, as a
   string, or serde's ``{"F32": null}`` form), ``shape`` (a list of ints in ``[0, 2**64)``) and
   ``data_offsets`` (a list of exactly two such ints); other keys in an entry are ignored.
   Element types are checked before any arithmetic.
5. Sizes, with u64 overflow refused: elements = product of ``shape`` folded left to right (an
   overflow is an error even if a later dimension is 0, as in safetensors), bits = elements x
   the dtype's bit width, a multiple of 8 (sub-byte dtypes F4, F6_*).
6. Layout: sorted by ``(begin, end)``, the tensors tile the data buffer exactly: each begins
   where the one before ended (the first at 0), ``end - begin`` is its size, and the last end is
   the end of the file (no gap, no overlap, no trailing byte).

A sharded checkpoint's index is read with the same JSON rules (``parse_json``, used by ``finding``).
"""

from __future__ import annotations

import json
import math
import os
import re
import struct
from itertools import accumulate
from pathlib import Path
from typing import Any, NamedTuple

import torch

from diffulex_core.errors import CheckpointFormatError
from diffulex_core.files.regular import MAX_SHOWN, open_regular, read_fd, shown

__all__ = ["DTYPES", "TensorRecord", "read_header", "read_records"]

MAX_HEADER_BYTES = 100 * 1000 * 1000  # the limit the safetensors format itself sets
MAX_JSON_DEPTH = 127  # serde_json's recursion limit, as safetensors applies it
_LFS_PREFIX = b"version https://git-lfs"
_U64 = 2**64

# Every dtype code safetensors 0.8 knows, with its width in bits.
DTYPE_BITS: dict[str, int] = {
    "BOOL": 8, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8,
    "F8_E8M0": 8, "I16": 16, "U16": 16, "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32,
    "C64": 64, "F64": 64, "I64": 64, "U64": 64,
}

# The codes this torch can hold (F4 and F6_* pack several values per byte: not loadable here).
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "BOOL": torch.bool, "C64": torch.complex64,
}
for _code, _attr in (("F8_E4M3", "float8_e4m3fn"), ("F8_E5M2", "float8_e5m2"), ("F8_E8M0", "float8_e8m0fnu"),
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



# --------------------------------------------------------------------------- JSON as serde_json reads it


class _Refused(ValueError):
    """A JSON value safetensors' parser refuses though Python's would take it."""


def _json_int(text: str) -> int | float:
    """serde_json keeps integers in [-2**63, 2**64) and reads any other (and "-0") as a float.

    Short strings only go through ``int()``: no 4,300-digit limit, no quadratic conversion.
    """
    if len(text) <= 20 and text != "-0":
        value = int(text)
        if -(2**63) <= value < _U64:
            return value
    return _json_float(text)


def _json_float(text: str) -> float:
    value = float(text)
    if math.isinf(value):
        raise _Refused(f"number {shown(text)} is out of range")
    return value


def _json_constant(text: str) -> None:
    raise _Refused(f"{text} is not JSON")


def _json_object(pairs: list[tuple[str, Any]]) -> dict:
    obj = dict(pairs)
    if len(obj) != len(pairs):
        seen: set[str] = set()
        duplicate = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise _Refused(f"key {shown(duplicate)} appears twice in one object")
    return obj


_NON_BRACKET_BYTES = bytes(c for c in range(256) if c not in b"[]{}")
_NON_STRUCTURE_BYTES = bytes(c for c in range(256) if c not in b'"[]{}')
_BRACKET_STEP = {ord("["): 1, ord("{"): 1, ord("]"): -1, ord("}"): -1}
_SURROGATE_ESCAPE = re.compile(r"\\u[dD][89a-fA-F]")
_DIGITS_TO_ZERO = bytes.maketrans(b"123456789", b"000000000")


def _depth(brackets: bytes) -> int:
    return max(accumulate(map(_BRACKET_STEP.__getitem__, brackets)), default=0)


def _too_deep(raw: bytes) -> bool:
    """Whether arrays and objects nest more than ``MAX_JSON_DEPTH`` deep, found before parsing
    (so Python's parser never recurses that deep) in linear time at C speed. First counting every
    bracket; only if that says too deep, again without those inside strings: escaped backslashes
    and quotes dropped, every quote left delimits a string, and every other piece is outside one."""
    if _depth(raw.translate(None, _NON_BRACKET_BYTES)) <= MAX_JSON_DEPTH:
        return False
    unescaped = raw.replace(b"\\\\", b"").replace(b'\\"', b"").translate(None, _NON_STRUCTURE_BYTES)
    return _depth(b"".join(unescaped.split(b'"')[::2])) > MAX_JSON_DEPTH


def _special_ints(raw: bytes) -> bool:
    """Whether an integer may be "-0" or outside [-2**63, 2**64) (19 digits or more), the only
    ones ``_json_int`` reads differently from ``int()``. A plain scan at C speed (a regex is ten
    times slower on a 10 MB header); digits inside strings merely give a false alarm."""
    return b"-0" in raw or b"0" * 19 in raw.translate(_DIGITS_TO_ZERO)


def _check_strings(value: Any) -> None:
    """No string (key or value) holds a lone surrogate; iterative, so no RecursionError."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, str):
            try:
                item.encode("utf-8")
            except UnicodeEncodeError:
                raise _Refused(f"string {shown(item)} holds a lone UTF-16 surrogate escape") from None
        elif isinstance(item, dict):
            stack.extend(item)
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)


def parse_json(raw: bytes, what: str) -> Any:
    """Strict UTF-8 JSON by the rules above; any failure is a ``CheckpointFormatError`` that
    starts with ``what`` (the file and which part of it)."""
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise CheckpointFormatError(f"{what} is not valid UTF-8 ({exc.reason} at byte {exc.start})") from None
    try:
        if _too_deep(raw):
            raise RecursionError
        # _json_int only where it can matter: Python's own int() reads every other integer alike
        value = json.loads(text, object_pairs_hook=_json_object, parse_float=_json_float, parse_constant=_json_constant,
                           parse_int=_json_int if _special_ints(raw) else None)
        if _SURROGATE_ESCAPE.search(text):  # only then can a string hold a lone surrogate
            _check_strings(value)
    except RecursionError:
        raise CheckpointFormatError(f"{what} nests arrays and objects more than {MAX_JSON_DEPTH} deep") from None
    except _Refused as exc:
        raise CheckpointFormatError(f"{what} is not valid safetensors JSON: {str(exc)[:2 * MAX_SHOWN]}") from None
    except ValueError as exc:
        raise CheckpointFormatError(f"{what} is not valid JSON ({str(exc)[:MAX_SHOWN]})") from None
    return value


# --------------------------------------------------------------------------- headers


_INT = {int}


def _entry(file: Path, name: str, info: Any) -> tuple[str, tuple[int, ...], int, int]:
    """(dtype code, shape, begin, end) of one tensor entry, types checked before any arithmetic.

    Written for speed (100,000 entries is a real checkpoint): C-level type and range checks.
    """
    def bad(why: str) -> CheckpointFormatError:
        return CheckpointFormatError(f"{file}: tensor {shown(name)} has a malformed header entry: {why}")

    if type(info) is not dict:
        raise bad(f"{shown(info)} is not an object")
    try:
        code, shape, offsets = info["dtype"], info["shape"], info["data_offsets"]
    except KeyError as exc:
        raise bad(f"no {exc.args[0]!r}") from None
    if type(code) is dict and len(code) == 1 and None in code.values():
        (code,) = code  # serde's {"F32": null} form of the same unit variant
    if type(code) is not str or code not in DTYPE_BITS:
        raise bad(f"dtype {shown(code)} is not a safetensors dtype")
    if type(shape) is not list or (shape and (set(map(type, shape)) != _INT or min(shape) < 0)):
        raise bad(f"shape {shown(shape)} is not a list of non-negative integers")
    if type(offsets) is not list or len(offsets) != 2 or set(map(type, offsets)) != _INT or min(offsets) < 0:
        raise bad(f"data_offsets {shown(offsets)} is not a list of two non-negative integers")
    return code, tuple(shape), offsets[0], offsets[1]  # every int is < 2**64: _json_int saw to it


def _nbytes(file: Path, name: str, code: str, shape: tuple[int, ...]) -> int:
    """Bytes the tensor takes, with u64 overflow refused at every step, as safetensors does."""
    count = 1
    for dim in shape:
        count *= dim  # both factors < 2**64, so this stays cheap
        if count >= _U64:
            break
    bits = count * DTYPE_BITS[code]
    if count >= _U64 or bits >= _U64:
        raise CheckpointFormatError(
            f"{file}: tensor {shown(name)} ({code}, shape {shown(list(shape))}) is larger than 2**64 bits")
    if bits % 8:
        raise CheckpointFormatError(
            f"{file}: tensor {shown(name)} ({code}, shape {shown(list(shape))}) does not end on a byte")
    return bits // 8


Span = tuple[int, int, str, str, tuple[int, ...]]  # (begin, end, name, dtype code, shape) of one tensor


def read_header(file: Path, fd: int | None = None) -> tuple[int, dict]:
    """(data start offset, header dict) of one safetensors file, valid by every rule above.

    ``fd``, when given, is an open descriptor of ``file`` to read through (a load reads its
    headers and its tensors through one descriptor, so both come from the same file).
    """
    data_start, header, _ = _validated(file, fd)
    return data_start, header


def _validated(file: Path, fd: int | None) -> tuple[int, dict, list[Span]]:
    """Data start, header, and the span of every tensor, in file order."""
    if fd is None:
        fd = open_regular(file, "file")
        try:
            return _validated(file, fd)
        finally:
            os.close(fd)
    size, length, raw = _framed(file, fd)
    header = parse_json(raw[8:], f"{file}: the header")
    if not isinstance(header, dict):
        raise CheckpointFormatError(f"{file}: the header is a JSON {type(header).__name__}, not an object")
    spans = _spans(file, header)
    _check_layout(file, spans, size - 8 - length)
    return 8 + length, header, spans


def _framed(file: Path, fd: int) -> tuple[int, int, bytes]:
    """(file size, header length ``N``, the first ``8 + N`` bytes), by the framing rule (1)."""
    size, head = read_fd(fd, file, "file", 64)
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
            f"{file}: header length {length:,} runs past the end of the file ({size:,} bytes); "
            f"the file is truncated or not safetensors"
        )
    size, raw = read_fd(fd, file, "file", 8 + length)
    if len(raw) != 8 + length:
        raise CheckpointFormatError(f"{file} changed while its header was read")
    return size, length, raw


def _spans(file: Path, header: dict) -> list[Span]:
    """Every tensor entry checked by the structure rule (4), sorted by ``(begin, end)``."""
    spans = []
    for name, info in header.items():
        if name == "__metadata__":
            if info is not None and not (isinstance(info, dict) and all(isinstance(v, str) for v in info.values())):
                raise CheckpointFormatError(
                    f"{file}: '__metadata__' must be null or map strings to strings, not {shown(info)}")
            continue
        code, shape, begin, end = _entry(file, name, info)
        spans.append((begin, end, name, code, shape))
    spans.sort(key=lambda span: (span[0], span[1]))
    return spans


def _check_layout(file: Path, spans: list[Span], data_size: int) -> None:
    """The sizes (5) and layout (6) rules: sorted spans tile the ``data_size`` bytes exactly."""
    at = 0  # where the next tensor must begin
    for begin, end, name, code, shape in spans:
        if begin != at or end < begin:
            what = "begins before it ends" if end < begin else "overlaps the tensor before it" if begin < at \
                else f"leaves {begin - at:,} unused bytes before it"
            raise CheckpointFormatError(f"{file}: tensor {shown(name)} spans bytes {begin}..{end}, which {what}; "
                                        f"safetensors tensors must tile the data exactly")
        expected = _nbytes(file, name, code, shape)
        if end - begin != expected:
            raise CheckpointFormatError(
                f"{file}: tensor {shown(name)} ({code}, shape {shown(list(shape))}) spans bytes {begin}..{end}, "
                f"expected {expected} bytes"
            )
        if end > data_size:
            raise CheckpointFormatError(
                f"{file}: tensor {shown(name)} needs data up to byte {end:,} but the file holds {data_size:,}; "
                f"the file is truncated"
            )
        at = end
    if at != data_size:
        raise CheckpointFormatError(f"{file}: {data_size - at:,} bytes follow the last tensor's data; "
                                    f"the file is corrupt or was appended to")


def read_records(file: Path, fd: int | None = None) -> list[TensorRecord]:
    """Every tensor of one file, checked against the file's size, in file order (``fd``: see ``read_header``)."""
    data_start, _, spans = _validated(file, fd)
    records = []
    for begin, end, name, code, shape in spans:
        dtype = DTYPES.get(code)
        if dtype is None:
            raise CheckpointFormatError(
                f"{file}: tensor {shown(name)} has dtype {code!r}, which this torch cannot hold")
        if shape and max(shape) >= 2**63:  # valid safetensors (when empty), but over torch's int64 sizes
            raise CheckpointFormatError(
                f"{file}: tensor {shown(name)} has shape {shown(list(shape))}, which torch cannot hold")
        records.append(TensorRecord(name, file, dtype, shape, data_start + begin, data_start + end))
    return records
