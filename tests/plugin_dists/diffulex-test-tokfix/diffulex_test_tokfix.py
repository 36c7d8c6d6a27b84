"""Tokenizer fixups for made-up tokenizer classes, keyed on tokenizer_config.json."""

from diffulex_core import hookimpl


@hookimpl
def diffulex_fix_tokenizer(path, tokenizer_config, error):
    wanted = tokenizer_config.get("tokenizer_class")
    if wanted == "FamilyXTokenizer":
        return {"tokenizer_class": "PreTrainedTokenizerFast"}
    if wanted == "NeedsRemoteCode":
        return {"trust_remote_code": True}
    if wanted == "BrokenFixup":
        raise RuntimeError("fixup exploded")
    return None
