"""Names of a tokenizer's standard special-token attributes, shared by the robust tokenizer and
the built-in fixups (which the tokenizer reaches through the plugin manager, so they may not
import the tokenizer back)."""

__all__ = ["STANDARD_SPECIAL_TOKENS"]

# attribute names a tokenizer already has for its standard special tokens
STANDARD_SPECIAL_TOKENS = {f"{name}_token" for name in ("bos", "eos", "unk", "sep", "pad", "cls", "mask")} | {
    "additional_special_tokens", "extra_special_tokens"}
