"""Fixups that ship with diffulex-core, registered as a plugin so plugins can override them.

They are hookimpls like any plugin's, marked ``trylast`` so an installed plugin's answer wins.
"""

from __future__ import annotations

from pathlib import Path

from .hookspecs import hookimpl
from .tokenizer import STANDARD_SPECIAL_TOKENS

PLUGIN_NAME = "diffulex-core"


@hookimpl(trylast=True)
def diffulex_fix_tokenizer(path, tokenizer_config, error):
    """transformers 5 writes ``tokenizer_class: "TokenizersBackend"``, a class transformers 4 lacks;
    the same files load as ``PreTrainedTokenizerFast`` when a ``tokenizer.json`` is there.

    transformers 5 also writes named extra special tokens as top-level ``*_token`` keys (with an
    empty ``extra_special_tokens`` list); transformers 4 only names those it finds in an
    ``extra_special_tokens`` dict, so they are passed as one.
    """
    if tokenizer_config.get("tokenizer_class") != "TokenizersBackend" or not (Path(path) / "tokenizer.json").is_file():
        return None
    import transformers

    if hasattr(transformers, "TokenizersBackend"):
        return None  # this transformers knows the class: the failure is something else
    fix = {"tokenizer_class": "PreTrainedTokenizerFast"}
    named = {key: value for key, value in tokenizer_config.items()
             if key.endswith("_token") and key not in STANDARD_SPECIAL_TOKENS and isinstance(value, (str, dict))}
    if named and not tokenizer_config.get("extra_special_tokens"):
        fix["extra_special_tokens"] = named
    return fix
