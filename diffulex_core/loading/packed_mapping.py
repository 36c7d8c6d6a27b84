"""Packed-module mappings: checkpoint-name segments -> parameter-name segments, as data.

A key matches whole dotted segments, never part of one (``"ff_out"`` matches
``blocks.0.ff_out.weight`` but not ``blocks.0.ff_out2.weight``). Where keys overlap the most
specific (most segments) key wins, so ``{"model.transformer.ff_out": "lm_head",
"ff_out": "mlp.down_proj"}`` sends the LM head and the block projections to different places.
Non-overlapping keys all apply (``transformer.blocks`` and ``q_proj`` in one name).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from diffulex_core.errors import WeightSpecError

__all__ = ["PackedMapping", "MappedName", "normalize_mapping", "merge_mappings"]


@dataclass(frozen=True, slots=True)
class MappedName:
    """The parameter name a checkpoint name maps to, its shard id, and the keys that applied."""

    name: str
    shard_id: Any
    keys: tuple[str, ...]


def normalize_mapping(mapping: Mapping[str, Any], source: str) -> dict[str, tuple[str, Any]]:
    """Accept ``{key: (target, shard_id)}`` or ``{key: target}``; reject anything else, naming ``source``."""
    if not isinstance(mapping, Mapping):
        raise WeightSpecError(f"packed-module mapping from {source} must be a mapping, got {type(mapping).__name__}")
    out = {}
    for key, value in mapping.items():
        if isinstance(value, str):
            target, shard_id = value, None
        elif isinstance(value, (tuple, list)) and len(value) == 2:
            target, shard_id = value
        else:
            target, shard_id = None, None
        if not isinstance(key, str) or not key or not isinstance(target, str) or not target:
            raise WeightSpecError(
                f"packed-module mapping from {source}: entry {key!r}: {value!r} must be 'segment': ('target', shard_id)"
            )
        out[key] = (target, shard_id)
    return out


def merge_mappings(parts: list[tuple[str, Mapping[str, Any]]]) -> dict[str, tuple[str, Any]]:
    """Merge mappings from several sources; one key mapped two ways is an error naming both."""
    merged: dict[str, tuple[str, Any]] = {}
    owner: dict[str, str] = {}
    for source, mapping in parts:
        for key, value in normalize_mapping(mapping, source).items():
            if key in merged and merged[key] != value:
                raise WeightSpecError(
                    f"packed-module mapping key {key!r} is {merged[key]!r} in {owner[key]} but {value!r} in {source}"
                )
            merged[key] = value
            owner.setdefault(key, source)
    return merged


class PackedMapping:
    """A compiled mapping: keys indexed by first segment so matching costs little per name."""

    def __init__(self, mapping: Mapping[str, tuple[str, Any]]) -> None:
        self.mapping = dict(mapping)
        self._by_first: dict[str, list[tuple[tuple[str, ...], str]]] = {}
        for key in self.mapping:
            segments = tuple(key.split("."))
            self._by_first.setdefault(segments[0], []).append((segments, key))

    def __bool__(self) -> bool:
        return bool(self.mapping)

    def _matches(self, name: str) -> tuple[list[str], list[tuple[int, int, str]]]:
        """The name's segments and the keys that apply to it: (start, end, key), left to right."""
        segments = name.split(".")
        matches = []
        for i, segment in enumerate(segments):
            for key_segments, key in self._by_first.get(segment, ()):
                n = len(key_segments)
                if tuple(segments[i : i + n]) == key_segments:
                    matches.append((-n, i, key))
        matches.sort()
        taken: list[tuple[int, int, str]] = []
        for neg_n, start, key in matches:
            end = start - neg_n
            if all(end <= s or start >= e for s, e, _ in taken):
                taken.append((start, end, key))
        taken.sort()
        return segments, taken

    def _rewrite(self, name: str, segments: list[str], taken: list[tuple[int, int, str]]) -> MappedName:
        out, cursor, shard_ids = [], 0, []
        for start, end, key in taken:
            target, shard_id = self.mapping[key]
            out += segments[cursor:start] + [target]
            cursor = end
            if shard_id is not None:
                shard_ids.append((key, shard_id))
        out += segments[cursor:]
        if len(shard_ids) > 1:
            raise WeightSpecError(f"checkpoint tensor {name!r} matches several keys with shard ids: {shard_ids}")
        return MappedName(".".join(out), shard_ids[0][1] if shard_ids else None, tuple(k for _, _, k in taken))

    def map(self, name: str) -> MappedName | None:
        """Rewrite ``name`` by every non-overlapping matching key, most specific first; None if none match."""
        segments, taken = self._matches(name)
        return self._rewrite(name, segments, taken) if taken else None

    def rooted(self, name: str) -> list[MappedName]:
        """The rewrites that start at a key's target, dropping what precedes it, first key first.

        Diffulex's LLaDA maps ``"transformer.ff_out": ("lm_head", None)`` for a model whose
        ``lm_head`` sits at the root while the checkpoint says ``model.transformer.ff_out.weight``:
        the in-place rewrite ``model.lm_head.weight`` names nothing, ``lm_head.weight`` does.
        """
        segments, taken = self._matches(name)
        return [self._rewrite(name, segments[start:], [(s - start, e - start, k) for s, e, k in taken[i:]])
                for i, (start, _, _) in enumerate(taken) if start > 0]

    def sources(self, name: str, limit: int = 256) -> list[str]:
        """Names that may rewrite to ``name``: each key's target replaced back by its key, in every
        combination, ``name`` itself first. Candidates only: a caller keeps those whose ``map``
        really gives ``name`` (LoRA targets are matched on checkpoint names, so the model's
        module names are translated back to them)."""
        entries = [(tuple(target.split(".")), key.split(".")) for key, (target, _) in self.mapping.items()]
        found, seen = [name], {name}
        for candidate in found:  # grows while iterated: a breadth-first walk over rewrites
            segments = candidate.split(".")
            for target, key in entries:
                n = len(target)
                for i in range(len(segments) - n + 1):
                    if tuple(segments[i : i + n]) == target:
                        new = ".".join([*segments[:i], *key, *segments[i + n :]])
                        if new not in seen and len(found) < limit:
                            seen.add(new)
                            found.append(new)
        return found
