"""A seeded fuzzer for safetensors headers (issue 9, item 6).

Small valid checkpoints written by ``safetensors.torch.save_file`` are damaged at random: bytes
flipped, the file cut or extended, the header-length field changed, and the header's JSON
rewritten (hostile numbers, wrong types, deep nesting, duplicate keys, BOM, UTF-16, gaps, bad
metadata, dtype codes, shapes, offsets). For every case:

* ``read_header`` (our header validation) either passes or raises a ``LoadError``, and its
  verdict on "is this a valid safetensors file" agrees with safetensors' own reader
  (``safe_open`` and reading every tensor). The one deliberate difference: we refuse a key that
  appears twice in one JSON object, which safetensors takes in some places (last copy wins);
  such cases are counted apart, never as agreement or disagreement.
* ``load_checkpoint`` into a materialized model succeeds or raises a ``LoadError``, and after a
  failure every parameter and buffer is bit-for-bit what it was.
* Each case takes under ``CASE_SECONDS`` and memory stays bounded.

``DIFFULEX_FUZZ_CASES`` sets the number of cases: by default 1,000 (about a second, so the suite
stays fast); the full run is ``DIFFULEX_FUZZ_CASES=5000`` (``FULL_CASES``, about five seconds), and
any larger number runs more. ``DIFFULEX_FUZZ_SEED`` sets the base seed, ``DIFFULEX_FUZZ_SHARD=i/n``
runs every n-th case from i (to use several processes), and ``DIFFULEX_FUZZ_REPORT`` names a JSON
file the counts are written to. A failure lists the case seeds; ``DIFFULEX_FUZZ_ONLY=<case>``
reruns one.
"""

from __future__ import annotations

import json
import logging
import os
import random
import resource
import signal
import struct
import sys
import time
import tracemalloc
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from diffulex_core.errors import LoadError
from diffulex_core.files.headers import DTYPE_BITS, read_header, read_records
from diffulex_core.loader import load_checkpoint

DEFAULT_CASES, FULL_CASES = 1000, 5000  # the full run: DIFFULEX_FUZZ_CASES=5000
CASES = int(os.environ.get("DIFFULEX_FUZZ_CASES", str(DEFAULT_CASES)))
BASE_SEED = int(os.environ.get("DIFFULEX_FUZZ_SEED", "0"))
SHARD, SHARDS = (int(x) for x in os.environ.get("DIFFULEX_FUZZ_SHARD", "0/1").split("/"))
ONLY = os.environ.get("DIFFULEX_FUZZ_ONLY")
CASE_SECONDS = 2.0
TRACE_EVERY = 97  # every so many cases runs under tracemalloc, whose peak must stay small
TRACE_PEAK_BYTES = 16 * 1024**2
RSS_GROWTH_BYTES = 256 * 1024**2
ALARM = hasattr(signal, "setitimer")


# --------------------------------------------------------------------------- the model and the seed files


class FuzzNet(nn.Module):
    """float32, bf16 and int64 tensors, a scalar and an empty one: every shape kind a header has."""

    def __init__(self) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(3, 2))
        self.h = nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))
        self.register_buffer("step", torch.zeros((), dtype=torch.int64))
        self.register_buffer("empty", torch.zeros(0, 4))


def make_model() -> FuzzNet:
    model = FuzzNet()
    with torch.no_grad():
        model.w.copy_(torch.tensor([[1.5, float("nan")], [-0.0, 3.0], [float("inf"), 7.0]]))
        model.h.copy_(torch.tensor([0.25, -2.0]))
        model.step.fill_(41)
    return model


def seed_tensors(seed: int) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    return {"w": torch.randn(3, 2, generator=gen), "h": torch.randn(2, generator=gen).to(torch.bfloat16),
            "step": torch.tensor(seed, dtype=torch.int64), "empty": torch.zeros(0, 4)}


def seed_files(directory: Path) -> list[bytes]:
    """A few valid files: the full model, with metadata, a subset, and extra dtypes."""
    variants = [
        (seed_tensors(1), None),
        (seed_tensors(2), {"format": "pt", "note": "fuzz"}),
        ({k: v for k, v in seed_tensors(3).items() if k in ("w", "step")}, None),
        ({**seed_tensors(4), "extra.i8": torch.arange(5, dtype=torch.int8), "extra.b": torch.tensor([True, False])},
         None),
    ]
    out = []
    for i, (tensors, metadata) in enumerate(variants):
        file = directory / f"seed{i}.safetensors"
        save_file(tensors, str(file), metadata=metadata)
        out.append(file.read_bytes())
    return out


# --------------------------------------------------------------------------- JSON with raw tokens and repeated keys


class Raw(str):
    """JSON text written as it is: numbers Python cannot print, NaN, lone surrogates."""


class Pairs(list):
    """A JSON object as a list of (key, value): keys may repeat."""


def dump(value) -> str:
    if isinstance(value, Raw):
        return str(value)
    if isinstance(value, Pairs):
        return "{" + ",".join(f"{dump(k) if isinstance(k, Raw) else json.dumps(k)}:{dump(v)}" for k, v in value) + "}"
    if isinstance(value, dict):
        return dump(Pairs(value.items()))
    if isinstance(value, list):
        return "[" + ",".join(dump(v) for v in value) + "]"
    return json.dumps(value)


def nest(depth: int, kind: str) -> Raw:
    return Raw("[" * depth + "1" + "]" * depth if kind == "list" else '{"k":' * depth + "1" + "}" * depth)


HOSTILE = [
    0, 1, -1, 7, 2**32, 2**63 - 1, 2**63, 2**64 - 1, Raw("18446744073709551616"), Raw("-9223372036854775809"),
    Raw("1" + "0" * 400), Raw("9" * 5000), Raw("-0"), Raw("1.0"), Raw("1e3"), Raw("1e999"), Raw("-1e999"), Raw("NaN"),
    Raw("Infinity"), Raw("-Infinity"), 0.5, "a", "", "F32", Raw('"\\ud800"'), Raw('"\\udc00x"'),
    Raw('"\\ud83d\\ude00"'),
    None, True, False, [], {}, [1], [0, 0], [0, 0, 0], [18446744073709551616, "a"], Raw('[18446744073709551616, "a"]'),
    [1000000000, "a"], [1000000000, 1000000000, 1000000000], [4294967296, 4294967296, 0], [0, 4294967296, 4294967296],
    {"F32": None}, {"F32": 1}, {"BF16": None, "F32": None}, "x" * 300,
]


def hostile(rng: random.Random):
    roll = rng.random()
    if roll < 0.1:
        return nest(rng.choice([1, 5, 124, 125, 126, 127, 200, 3000]), rng.choice(["list", "dict"]))
    if roll < 0.2:
        return [rng.choice([0, 1, 2, 3, 4, 6, 2**20, 2**40, 2**64 - 1, -1]) for _ in range(rng.randint(0, 5))]
    return rng.choice(HOSTILE)


# --------------------------------------------------------------------------- mutations


def split(raw: bytes) -> tuple[dict, bytes] | None:
    (n,) = struct.unpack("<Q", raw[:8])
    return json.loads(raw[8:8 + n]), raw[8 + n:]


def frame(text: str | bytes, data: bytes, pad: bool = True) -> bytes:
    body = text.encode() if isinstance(text, str) else text
    if pad:
        body += b" " * (-len(body) % 8)
    return struct.pack("<Q", len(body)) + body + data


def retile(header: Pairs, rng: random.Random) -> tuple[Pairs, bytes]:
    """Offsets and data made consistent again for entries whose shape and dtype allow it, so
    mutated shapes and dtypes reach the deeper checks and the loader."""
    at, out = 0, Pairs()
    for name, info in header:
        if isinstance(info, dict) and isinstance(info.get("shape"), list) and isinstance(info.get("dtype"), str) \
                and info["dtype"] in DTYPE_BITS and all(type(d) is int and 0 <= d < 64 for d in info["shape"]):
            count = 1
            for d in info["shape"]:
                count *= d
            nbytes = count * DTYPE_BITS[info["dtype"]] // 8
            info = {**info, "data_offsets": [at, at + nbytes]}
            at += nbytes
        out.append((name, info))
    return out, bytes(rng.getrandbits(8) for _ in range(at))


class Mutation:
    """A header being mutated: its entries, the indices of its tensor entries, its data, and
    whether offsets and data are made consistent again at the end (``retile``)."""

    def __init__(self, entries: Pairs, data: bytes) -> None:
        self.entries, self.data, self.repair = entries, data, False
        self.reindex()

    def reindex(self) -> None:
        self.tensors = [j for j, (k, _) in enumerate(self.entries) if k != "__metadata__"]


# Mutations of one tensor entry ``i`` (``name``, ``info``), by op code; each is skipped when the
# header has no tensor entry left.


def _hostile_field(m: Mutation, rng: random.Random, i: int, name, info) -> None:  # one field gets a hostile value
    m.entries[i] = (name, {**info, rng.choice(["dtype", "shape", "data_offsets"]): hostile(rng)})


def _dtype_code(m: Mutation, rng: random.Random, i: int, name, info) -> None:  # a dtype code, valid or not
    m.entries[i] = (name, {**info, "dtype": rng.choice([*DTYPE_BITS, "f32", "C128", "E8M0", "F32 ", "",
                                                         {"F32": None}])})


def _shape_edit(m: Mutation, rng: random.Random, i: int, name, info) -> None:  # a shape edited
    shape = list(info["shape"])
    edit = rng.randrange(4)
    if edit == 0 or not shape:
        shape.insert(rng.randint(0, len(shape)), rng.choice([0, 1, 2, 3, 2**32, 2**62, 2**63]))
    elif edit == 1:
        shape.pop(rng.randrange(len(shape)))
    else:
        shape[rng.randrange(len(shape))] = rng.choice([0, 1, 2, 5, -1, 2**64 - 1])
    m.entries[i] = (name, {**info, "shape": shape})


def _offsets(m: Mutation, rng: random.Random, i: int, name, info) -> None:  # offsets shifted, swapped or extended
    begin, end = info["data_offsets"]
    delta = rng.choice([-8, -1, 1, 2, 8, 2**32, 2**64 - 1 - end])
    m.entries[i] = (name, {**info, "data_offsets": rng.choice(
        [[begin + delta, end + delta], [begin, end + delta], [end, begin], [begin, end, end], [begin]])})


def _fields(m: Mutation, rng: random.Random, i: int, name, info) -> None:  # a field missing, repeated, or an extra one
    roll = rng.randrange(3)
    if roll == 0:
        m.entries[i] = (name, {k: v for k, v in info.items() if k != rng.choice(list(info))})
    elif roll == 1:
        key = rng.choice(list(info))
        m.entries[i] = (name, Pairs([*info.items(), (key, info[key])]))
    else:
        m.entries[i] = (name, {**info, rng.choice(["x", "__metadata__", "dtype2"]): hostile(rng)})


def _repeated_name(m: Mutation, rng: random.Random, i: int, name, info) -> None:  # a tensor name repeated
    m.entries.append((name, rng.choice([info, m.entries[rng.choice(m.tensors)][1]])))  # same or other entry


def _not_an_object(m: Mutation, rng: random.Random, i: int, name, info) -> None:  # replaced by a non-object, or renamed
    m.entries[i] = rng.choice([(name, hostile(rng)), ("__metadata__", info), ("", info), (Raw('"\\ud800"'), info),
                               ("é" + name, info)])


def _new_tensor(m: Mutation, rng: random.Random, i: int, name, info) -> None:  # a new tensor, maybe empty or a scalar
    m.entries.append((f"new{rng.randrange(5)}", {
        "dtype": rng.choice(list(DTYPE_BITS)), "shape": rng.choice([[], [0], [1], [2, 3], [0, 2**63]]),
        "data_offsets": [len(m.data), len(m.data) + rng.choice([0, 1, 2, 4, 8])]}))


# Mutations of the header as a whole, by op code.


def _metadata(m: Mutation, rng: random.Random) -> None:  # __metadata__ replaced
    meta = rng.choice([None, {}, {"a": "b"}, {"a": 1}, {"a": None}, {"a": ["b"]}, [], "x", 3,
                       {"a": "b", "c": hostile(rng)}, Pairs([("a", "b"), ("a", "c")]), {"a": Raw('"\\ud800"')},
                       nest(3, "dict")])
    m.entries = Pairs([(k, v) for k, v in m.entries if k != "__metadata__"])
    m.entries.insert(rng.randint(0, len(m.entries)), ("__metadata__", meta))
    if rng.random() < 0.2:
        m.entries.append(("__metadata__", meta))
    m.reindex()


def _reorder(m: Mutation, rng: random.Random) -> None:  # entries reordered, or one dropped
    rng.shuffle(m.entries)
    if m.entries and rng.random() < 0.3:
        m.entries.pop(rng.randrange(len(m.entries)))
    m.reindex()


def _data(m: Mutation, rng: random.Random) -> None:  # data buffer: gap, trailing or missing bytes
    m.data = rng.choice([m.data + b"\0" * rng.randint(1, 9), m.data[:-rng.randint(1, 4)] if m.data else m.data,
                         b"\0" * 4 + m.data])


def _hostile_top_level(m: Mutation, rng: random.Random) -> None:  # a hostile top-level value beside the tensors
    m.entries.append((rng.choice(["zz", "w"]), hostile(rng)))


def _repair(m: Mutation, rng: random.Random) -> None:
    m.repair = True


ENTRY_MUTATIONS = {0: _hostile_field, 1: _hostile_field, 2: _hostile_field, 3: _hostile_field, 4: _dtype_code,
                   5: _shape_edit, 6: _offsets, 7: _fields, 8: _repeated_name, 10: _not_an_object, 13: _new_tensor}
HEADER_MUTATIONS = {9: _metadata, 11: _reorder, 12: _data, 14: _hostile_top_level, 15: _repair}


def mutate_json(raw: bytes, rng: random.Random) -> bytes:
    header, data = split(raw)
    m = Mutation(Pairs(header.items()), data)
    pad, m.repair = rng.random() < 0.8, rng.random() < 0.4
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(16)
        try:  # an earlier mutation may have left this one nothing to work on: then it is skipped
            i = rng.choice(m.tensors) if m.tensors else None
            name, info = m.entries[i] if i is not None else (None, None)
            if op in HEADER_MUTATIONS:
                HEADER_MUTATIONS[op](m, rng)
            elif i is not None:
                ENTRY_MUTATIONS[op](m, rng, i, name, info)
        except (TypeError, KeyError, ValueError, IndexError, AttributeError):
            continue
    entries, data = retile(m.entries, rng) if m.repair else (m.entries, m.data)
    text = dump(entries)
    roll = rng.random()
    if roll < 0.04:
        return frame(text.encode("utf-16"), data)
    if roll < 0.08:
        return frame("\ufeff" + text, data)
    if roll < 0.15:
        text = (rng.choice([" ", "\n", "\t", "\r\n", "\x0c", "\0", "\xa0"]) + text
                + rng.choice(["", " ", "\0", "\x0c", "  \t"]))
    if roll < 0.2:
        text = dump(hostile(rng))  # not an object at all
    return frame(text, data, pad)


def mutate_bytes(raw: bytes, rng: random.Random) -> bytes:
    out = bytearray(raw)
    (n,) = struct.unpack("<Q", raw[:8])
    op = rng.randrange(7)
    if op == 0:  # bits flipped, mostly in the header
        for _ in range(rng.randint(1, 4)):
            pos = rng.randrange(8, 8 + n) if rng.random() < 0.8 else rng.randrange(len(out))
            out[pos] ^= 1 << rng.randrange(8)
    elif op == 1:  # cut
        del out[rng.randrange(len(out)):]
    elif op == 2:  # extended
        out += bytes(rng.getrandbits(8) for _ in range(rng.randint(1, 16)))
    elif op == 3:  # the header-length field changed
        out[:8] = struct.pack("<Q", rng.choice([n + rng.randint(-9, 9), len(raw), len(raw) - 8, 0, 1, 100_000_000,
                                                100_000_001, 2**63, 2**64 - 1, rng.getrandbits(64)]) % 2**64)
    elif op == 4:  # a byte inserted or removed in the header, the length field kept
        pos = rng.randrange(8, 8 + n)
        if rng.random() < 0.5:
            del out[pos]
        else:
            out.insert(pos, rng.choice(b'{}[]",:0 \\\x00\xff'))
    elif op == 5:  # a random byte in the header replaced with a JSON-significant one
        out[rng.randrange(8, 8 + n)] = rng.choice(b'{}[]",:-0123456789eE. \\u\x00\x80\xc0\xed\xff')
    else:  # nothing but garbage after a plausible length
        length = struct.pack("<Q", rng.randint(0, 64))
        out = bytearray(length + bytes(rng.getrandbits(8) for _ in range(rng.randint(0, 64))))
    return bytes(out)


def make_case(seeds: list[bytes], case: int) -> bytes:
    rng = random.Random(BASE_SEED * 1_000_003 + case)
    raw = rng.choice(seeds)
    if rng.random() < 0.02:
        return raw  # an intact file now and then: the "accept" side must agree too
    return mutate_json(raw, rng) if rng.random() < 0.7 else mutate_bytes(raw, rng)


# --------------------------------------------------------------------------- verdicts


def safetensors_verdict(path: Path) -> tuple[bool, bool]:
    """safetensors' verdict: (the file is valid: ``safe_open`` validates the whole header and the
    file's size when it opens, every tensor reads into torch). A tensor can be valid safetensors
    that torch cannot hold (an F6 dtype, an empty tensor with a dimension over 2**63)."""
    try:
        with safe_open(str(path), framework="pt") as f:
            f.metadata()
            keys = f.keys()
            try:
                for key in keys:
                    f.get_tensor(key)
            except Exception:  # noqa: BLE001 - torch could not hold it
                return True, False
    except Exception:  # noqa: BLE001 - any refusal is the verdict
        return False, False
    return True, True


def has_repeated_key(raw: bytes) -> bool:
    """Whether the header's JSON repeats a key in one object (our deliberate strictness)."""
    found = []

    def pairs(items):
        if len({k for k, _ in items}) != len(items):
            found.append(True)
        return dict(items)

    try:
        (n,) = struct.unpack("<Q", raw[:8])
        json.loads(raw[8:8 + n].decode("utf-8"), object_pairs_hook=pairs)
    except Exception:  # noqa: BLE001 - not JSON at all: then not our strictness either
        return False
    return bool(found)


def state_bytes(model: nn.Module) -> dict[str, bytes]:
    """Every parameter and buffer as raw bytes: NaN-safe and dtype-exact."""
    return {name: bytes(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()) + str(t.dtype).encode()
            + str(tuple(t.shape)).encode() for name, t in [*model.named_parameters(), *model.named_buffers()]}


class CaseTimeout(Exception):
    pass


def _alarm(signum, frame):
    raise CaseTimeout()


def run_case(case: int, seeds: list[bytes], path: Path, stats: dict, failures: list[str]) -> None:
    raw = make_case(seeds, case)
    path.write_bytes(raw)
    started = time.perf_counter()
    traced = case % TRACE_EVERY == 0
    if traced:
        tracemalloc.start()
    if ALARM:
        signal.setitimer(signal.ITIMER_REAL, CASE_SECONDS * 5)  # a hang fails the case instead of the run
    try:
        ours, loadable = our_verdicts(case, path, stats, failures)
    except CaseTimeout:
        stats["untyped"] += 1
        failures.append(f"case {case}: took over {CASE_SECONDS} s")
        return
    except Exception as exc:  # noqa: BLE001 - the very thing under test
        stats["untyped"] += 1
        failures.append(f"case {case}: untyped {type(exc).__name__}: {str(exc)[:300]}")
        return
    finally:
        if ALARM:
            signal.setitimer(signal.ITIMER_REAL, 0)
        if traced:
            peak = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
            if peak > TRACE_PEAK_BYTES:
                failures.append(f"case {case}: traced peak memory {peak / 1024**2:.1f} MiB")
    elapsed = time.perf_counter() - started
    if elapsed > CASE_SECONDS:
        failures.append(f"case {case}: took {elapsed:.2f} s")
    compare_verdicts(case, raw, path, ours, loadable, stats, failures)


def our_verdicts(case: int, path: Path, stats: dict, failures: list[str]) -> tuple[bool, bool]:
    """(read_header accepts the file, read_records does); then a load into a fresh model, which
    must leave it bit-for-bit unchanged when it fails."""
    try:
        read_header(path)
        ours = True
    except LoadError as exc:
        ours = False
        if len(str(exc)) > 2000:
            failures.append(f"case {case}: error message of {len(str(exc)):,} characters")
    try:
        read_records(path)
        loadable = True
    except LoadError:
        loadable = False
    model = make_model()
    before = state_bytes(model)
    try:
        load_checkpoint(model, path, strict=case % 3 != 0)
        stats["loaded"] += 1
    except LoadError:
        if state_bytes(model) != before:
            stats["modified"] += 1
            failures.append(f"case {case}: a failed load modified the model")
    return ours, loadable


def compare_verdicts(case: int, raw: bytes, path: Path, ours: bool, loadable: bool, stats: dict,
                     failures: list[str]) -> None:
    reference, readable = safetensors_verdict(path)
    if loadable and not readable:
        stats["disagreements"] += 1
        failures.append(f"case {case}: read_records accepts a tensor safetensors cannot read into torch")
    stats["accepted"] += ours
    if ours != reference:
        if reference and not ours and has_repeated_key(raw):
            stats["stricter_repeated_key"] += 1
        else:
            stats["disagreements"] += 1
            failures.append(f"case {case}: we {'accept' if ours else 'refuse'}, safetensors "
                            f"{'accepts' if reference else 'refuses'}")


def test_fuzz_headers(tmp_path):
    seeds = seed_files(tmp_path)
    for raw in seeds:  # the seeds themselves are valid for both readers
        (tmp_path / "check.safetensors").write_bytes(raw)
        read_header(tmp_path / "check.safetensors")
        assert safetensors_verdict(tmp_path / "check.safetensors") == (True, True)
    path = tmp_path / "model.safetensors"
    cases = [int(ONLY)] if ONLY else range(SHARD, CASES, SHARDS)
    stats = dict.fromkeys(["cases", "accepted", "loaded", "untyped", "modified", "disagreements",
                           "stricter_repeated_key"], 0)
    failures: list[str] = []
    load_checkpoint(make_model(), tmp_path / "seed0.safetensors")  # warm-up: imports, plugin discovery
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    if ALARM:
        previous = signal.signal(signal.SIGALRM, _alarm)
    logging.disable(logging.WARNING)  # strict=False loads log their problems; thousands of them here
    started = time.perf_counter()
    try:
        for case in cases:
            run_case(case, seeds, path, stats, failures)
            stats["cases"] += 1
    finally:
        logging.disable(logging.NOTSET)
        if ALARM:
            signal.signal(signal.SIGALRM, previous)
    stats["seconds"] = round(time.perf_counter() - started, 1)
    rss_growth = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - rss_before
    stats["rss_growth_mib"] = round(rss_growth / 1024**2, 1)
    print(f"\nfuzz: {stats}", file=sys.stderr)
    if os.environ.get("DIFFULEX_FUZZ_REPORT"):
        Path(os.environ["DIFFULEX_FUZZ_REPORT"]).write_text(json.dumps({**stats, "failures": failures[:200]}, indent=1))
    assert not failures, (f"{len(failures)} failing case(s) (rerun one with DIFFULEX_FUZZ_ONLY=<case>):\n"
                          + "\n".join(failures[:30]))
    assert rss_growth < RSS_GROWTH_BYTES, f"peak RSS grew by {rss_growth / 1024**2:.0f} MiB"
    assert stats["accepted"] > 0 and stats["accepted"] < stats["cases"] or ONLY, stats  # both verdicts exercised


# --------------------------------------------------------------------------- the rules, one case each

T = '"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}'
X = '{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4],"x":%s}}'  # an ignored extra field
RULES = [  # (what, header text, data, safetensors accepts; None: it does, we refuse by design)
    ("plain", "{" + T + "}", b"xxxx", True),
    ("leading whitespace", " \n{" + T + "}", b"xxxx", True),
    ("trailing spaces, tab, CR, LF", "{" + T + "}  \t\r\n", b"xxxx", True),
    ("trailing NUL", "{" + T + "}\0", b"xxxx", False),
    ("trailing form feed", "{" + T + "}\x0c", b"xxxx", False),
    ("UTF-8 BOM", "\ufeff{" + T + "}", b"xxxx", False),
    ("empty header", "", b"", False),
    ("empty object, no data", "{}", b"", True),
    ("trailing data byte", "{" + T + "}", b"xxxxy", False),
    ("gap before a tensor", '{"t":{"dtype":"F32","shape":[1],"data_offsets":[4,8]}}', b"x" * 8, False),
    ("end before begin", '{"t":{"dtype":"F32","shape":[0],"data_offsets":[4,0]}}', b"xxxx", False),
    ("two empty tensors at one offset", '{"a":{"dtype":"F32","shape":[0],"data_offsets":[0,0]},'
                                        '"b":{"dtype":"F32","shape":[0],"data_offsets":[0,0]}}', b"", True),
    ("scalar", '{"t":{"dtype":"F32","shape":[],"data_offsets":[0,4]}}', b"xxxx", True),
    ("repeated tensor name", "{" + T + "," + T + "}", b"xxxx", None),
    ("repeated metadata key", '{"__metadata__":{"a":"b","a":"c"},' + T + "}", b"xxxx", None),
    ("repeated field in an entry", '{"t":{"dtype":"F32","dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"xxxx",
     False),
    ("repeated __metadata__", '{"__metadata__":{},"__metadata__":{},' + T + "}", b"xxxx", False),
    ("metadata null", '{"__metadata__":null,' + T + "}", b"xxxx", True),
    ("metadata int value", '{"__metadata__":{"a":1},' + T + "}", b"xxxx", False),
    ("metadata list", '{"__metadata__":[],' + T + "}", b"xxxx", False),
    ("dtype as {code: null}", '{"t":{"dtype":{"F32":null},"shape":[1],"data_offsets":[0,4]}}', b"xxxx", True),
    ("dtype lower case", '{"t":{"dtype":"f32","shape":[1],"data_offsets":[0,4]}}', b"xxxx", False),
    ("dtype C128", '{"t":{"dtype":"C128","shape":[0],"data_offsets":[0,0]}}', b"", False),
    ("F4, whole bytes", '{"t":{"dtype":"F4","shape":[2],"data_offsets":[0,1]}}', b"x", True),
    ("F4, half a byte", '{"t":{"dtype":"F4","shape":[1],"data_offsets":[0,1]}}', b"x", False),
    ("shape -0", '{"t":{"dtype":"F32","shape":[-0],"data_offsets":[0,0]}}', b"", False),
    ("shape 1.0", '{"t":{"dtype":"F32","shape":[1.0],"data_offsets":[0,4]}}', b"xxxx", False),
    ("shape -1", '{"t":{"dtype":"F32","shape":[-1],"data_offsets":[0,4]}}', b"xxxx", False),
    ("shape true", '{"t":{"dtype":"F32","shape":[true],"data_offsets":[0,4]}}', b"xxxx", False),
    ("shape 2**64 and a string", '{"t":{"dtype":"F32","shape":[18446744073709551616,"a"],"data_offsets":[0,0]}}', b"",
     False),
    ("shape 1e9 and a string", '{"t":{"dtype":"F32","shape":[1000000000,"a"],"data_offsets":[0,0]}}', b"", False),
    ("overflow before a 0", '{"t":{"dtype":"F32","shape":[4294967296,4294967296,0],"data_offsets":[0,0]}}', b"", False),
    ("0 before an overflow", '{"t":{"dtype":"F32","shape":[0,4294967296,4294967296],"data_offsets":[0,0]}}', b"", True),
    ("offsets of 3", '{"t":{"dtype":"F32","shape":[1],"data_offsets":[0,4,4]}}', b"xxxx", False),
    ("entry missing shape", '{"t":{"dtype":"F32","data_offsets":[0,4]}}', b"xxxx", False),
    ("entry not an object", '{"t":[1]}', b"", False),
    ("top level a list", "[]", b"", False),
    ("extra field: nested 125 deep", X % ("[" * 125 + "]" * 125), b"xxxx", True),
    ("extra field: nested 126 deep", X % ("[" * 126 + "]" * 126), b"xxxx", False),
    ("extra field: nested 5000 deep", X % ("[" * 5000 + "]" * 5000), b"xxxx", False),
    ("extra field: brackets in a string", X % ('"' + "[" * 300 + '"'), b"xxxx", True),
    ("extra field: NaN", X % "NaN", b"xxxx", False),
    ("extra field: 1e999", X % "1e999", b"xxxx", False),
    ("extra field: 2**64", X % "18446744073709551616", b"xxxx", True),
    ("extra field: 10**308", X % ("1" + "0" * 308), b"xxxx", True),
    ("extra field: 10**309", X % ("1" + "0" * 309), b"xxxx", False),
    ("extra field: 5000 digits", X % ("9" * 5000), b"xxxx", False),
    ("extra field: lone surrogate", X % '"\\ud800"', b"xxxx", False),
    ("extra field: surrogate pair", X % '"\\ud83d\\ude00"', b"xxxx", True),
    ("extra field: repeated key", X % '{"y":1,"y":2}', b"xxxx", None),
    ("control character in a name", '{"t\x01":{"dtype":"F32","shape":[1],"data_offsets":[0,4]}}', b"xxxx", False),
]


@pytest.mark.parametrize("what, text, data, accepts", RULES, ids=[r[0] for r in RULES])
def test_header_rule(tmp_path, what, text, data, accepts):
    """Each rule as safetensors applies it: our verdict and safetensors' agree (or we are
    stricter, only for a repeated key), and a refusal is a ``LoadError`` with a bounded message."""
    path = tmp_path / "model.safetensors"
    path.write_bytes(frame(text, data, pad=False))
    assert safetensors_verdict(path)[0] is (accepts is not False), "safetensors changed its mind"
    try:
        read_header(path)
        ours = True
    except LoadError as exc:
        ours = False
        assert len(str(exc)) < 1000 and str(path) in str(exc)
    assert ours is bool(accepts)


def test_utf16_header_is_refused(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(frame(("{" + T + "}").encode("utf-16"), b"xxxx", pad=False))
    assert safetensors_verdict(path)[0] is False
    with pytest.raises(LoadError, match="UTF-8"):
        read_header(path)
