"""Decoding token ids with any tokenizer, as Diffulex's ``decode_token_ids_robust`` does: tokenizers
whose ``decode`` is stricter than transformers' still give text."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

__all__ = ["decode_token_ids_robust"]


def _ids(token_ids: Any) -> list[int]:
    if hasattr(token_ids, "tolist"):
        token_ids = token_ids.tolist()
    return [int(t) for t in token_ids]


def decode_token_ids_robust(tokenizer: Any, token_ids: Iterable[int] | None, *,
                            skip_special_tokens: bool = False) -> str:
    """Decode with ``tokenizer.decode``; if its signature rejects our arguments (``TypeError``),
    convert the whole id list to tokens (``None`` becomes empty) and join them, as Diffulex does;
    if the tokenizer converts only one id at a time, go id by id (unknown ids become empty).
    ``None`` or no ids give ``""``.
    """
    if token_ids is None:
        return ""
    ids = _ids(token_ids)
    if not ids:
        return ""
    try:
        return tokenizer.decode(ids, skip_special_tokens=skip_special_tokens)
    except TypeError:
        pass  # a stricter decode signature; other errors are real and propagate
    try:
        converted = tokenizer.convert_ids_to_tokens(ids)
    except (TypeError, IndexError, KeyError, ValueError, OverflowError):
        converted = None  # takes one id at a time, or choked on one id: the per-id path below handles both
    if converted is None or isinstance(converted, str):
        converted = []
        for token_id in ids:
            try:
                converted.append(tokenizer.convert_ids_to_tokens(token_id))
            except (IndexError, KeyError, ValueError, OverflowError):
                converted.append(None)
    special = set(getattr(tokenizer, "all_special_tokens", ()) or ()) if skip_special_tokens else set()
    tokens = ["" if t is None else t for t in converted if t is None or t not in special]
    join = getattr(tokenizer, "convert_tokens_to_string", None)
    return join(tokens) if callable(join) else "".join(tokens)
