"""Fixups that ship with diffulex-core, registered as a plugin so plugins can override them.

They are hookimpls like any plugin's, marked ``trylast`` so an installed plugin's answer wins.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from diffulex_core.errors import TokenizerLoadError
from diffulex_core.hookspecs import hookimpl
from diffulex_core.special_tokens import STANDARD_SPECIAL_TOKENS

__all__ = ["PLUGIN_NAME", "diffulex_fix_tokenizer"]

PLUGIN_NAME = "diffulex-core"


@hookimpl(trylast=True)
def diffulex_fix_tokenizer(path, tokenizer_config, error):
    """Load as ``PreTrainedTokenizerFast`` from ``tokenizer.json`` (when there is one) if:

    - ``tokenizer_class`` is ``"TokenizersBackend"``, which transformers 5 writes and
      transformers 4 lacks. transformers 5 also writes named extra special tokens as top-level
      ``*_token`` keys (with an empty ``extra_special_tokens`` list); transformers 4 only names
      those it finds in an ``extra_special_tokens`` dict, so they are passed as one.
    - ``tokenizer_class`` is ``"PreTrainedTokenizerFast"`` and the ``auto_map`` entry for
      ``AutoTokenizer`` points to a module file the directory does not have (a dangling
      ``auto_map``: with ``trust_remote_code=True``, ``AutoTokenizer`` tries to import it and
      fails). The class the config names is used; ``trust_remote_code`` is never turned on.
    - the tokenizer built cannot encode text (``error`` is a ``TokenizerLoadError`` whose
      ``tokenizer`` is the one built) and is not a ``PreTrainedTokenizerFast`` already:
      transformers 5 may build a model-type class (``Qwen2Tokenizer``) that drops every word of
      another model's ``tokenizer.json``, which itself encodes them.
    """
    if not (Path(path) / "tokenizer.json").is_file():
        return None
    if isinstance(error, TokenizerLoadError) and getattr(error, "tokenizer", None) is not None:
        import transformers

        return None if type(error.tokenizer) is transformers.PreTrainedTokenizerFast else {
            "tokenizer_class": "PreTrainedTokenizerFast"}
    tokenizer_class = tokenizer_config.get("tokenizer_class")
    if tokenizer_class == "TokenizersBackend":
        return _tokenizers_backend(tokenizer_config)
    if tokenizer_class == "PreTrainedTokenizerFast" and _dangling_auto_map(Path(path), tokenizer_config):
        return {"tokenizer_class": "PreTrainedTokenizerFast"}
    return None


def _tokenizers_backend(tokenizer_config: dict[str, Any]) -> dict[str, Any] | None:
    import transformers

    if hasattr(transformers, "TokenizersBackend"):
        return None  # this transformers knows the class: the failure is something else
    fix: dict[str, Any] = {"tokenizer_class": "PreTrainedTokenizerFast"}
    named = {key: value for key, value in tokenizer_config.items()
             if key.endswith("_token") and key not in STANDARD_SPECIAL_TOKENS and isinstance(value, (str, dict))}
    if named and not tokenizer_config.get("extra_special_tokens"):
        fix["extra_special_tokens"] = named
    return fix


def _dangling_auto_map(path: Path, tokenizer_config: dict[str, Any]) -> bool:
    """True when the class ``AutoTokenizer`` would import for the ``auto_map`` lives in a module
    file that ``path`` lacks. A reference into another repository (``repo--module.Class``) is
    not checked: it is not dangling as far as the directory can tell.
    """
    auto_map = tokenizer_config.get("auto_map")
    refs = auto_map.get("AutoTokenizer") if isinstance(auto_map, dict) else auto_map  # a list: legacy form
    if isinstance(refs, str):
        refs = [refs]
    if not isinstance(refs, (list, tuple)):
        return False
    # as transformers picks it: the fast class when one is named, else the slow one
    ref = refs[1] if len(refs) > 1 and refs[1] else (refs[0] if refs else None)
    if not isinstance(ref, str) or "--" in ref:
        return False
    module, dot, _ = ref.rpartition(".")
    if not dot or not module:
        return True  # not "module.Class": nothing transformers could import
    return not (path / (module.replace(".", "/") + ".py")).is_file()
