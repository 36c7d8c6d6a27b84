"""Save or load a test tokenizer with whatever transformers this interpreter has.

Run by the tokenizer tests under the project's environment (transformers 5) and under a second
environment with a transformers 4.5x release, so files written by one are loaded by the other.

    python tokenizer_tool.py save DIR --extra list|dict|none
    python tokenizer_tool.py load DIR [--plain] [--extra-json JSON] [--trust-remote-code]

``load`` prints one JSON object: the tokenizer's class, the fixes applied, encodings of SAMPLES,
decoded round trips, and its special tokens; or the error's type and message; and the seconds
the load took.
"""

from __future__ import annotations

import argparse
import json
import sys
import time

VOCAB = {"<pad>": 0, "<unk>": 1, "<s>": 2, "</s>": 3, "<|mask|>": 4, "<|im_start|>": 5, "<|im_end|>": 6,
         "hello": 7, "world": 8, "diffusion": 9, "is": 10, "fun": 11, "!": 12}
EXTRA = ["<|mask|>", "<|im_start|>", "<|im_end|>"]
SAMPLES = ["hello world", "<|im_start|>diffusion is fun !<|im_end|>", "hello <|mask|> <|mask|> world </s>",
           "unknownword hello"]


def build_and_save(directory: str, extra: str) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.WordLevel(VOCAB, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    kwargs = {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>", "pad_token": "<pad>"}
    if extra == "list":
        kwargs["extra_special_tokens"] = list(EXTRA)
    elif extra == "dict":
        kwargs["extra_special_tokens"] = {"mask_extra_token": "<|mask|>", "im_start_token": "<|im_start|>",
                                          "im_end_token": "<|im_end|>"}
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, **kwargs)
    if extra == "none":
        tokenizer.add_special_tokens({"additional_special_tokens": list(EXTRA)})
    tokenizer.save_pretrained(directory)


def describe(tokenizer) -> dict:
    encodings = [tokenizer(text, add_special_tokens=False)["input_ids"] for text in SAMPLES]
    named = getattr(tokenizer, "extra_special_tokens", None)  # the names they got: a dict under transformers 4
    return {
        "class": type(tokenizer).__name__,
        "fixups": list(getattr(tokenizer, "diffulex_fixups", ())),
        "encodings": encodings,
        "decoded": [tokenizer.decode(ids) for ids in encodings],
        "decoded_skip_special": [tokenizer.decode(ids, skip_special_tokens=True) for ids in encodings],
        "special": {name: getattr(tokenizer, name) for name in ("bos_token", "eos_token", "unk_token", "pad_token")},
        "extra_ids": [tokenizer.convert_tokens_to_ids(token) for token in EXTRA],
        "extra_are_special": sorted(set(EXTRA) & set(tokenizer.all_special_tokens)),
        "extra_names": {k: str(v) for k, v in named.items()} if isinstance(named, dict) else None,
    }


def load(directory: str, plain: bool, extra_json: str | None, trust_remote_code: bool = False) -> dict:
    kwargs = {"extra_special_tokens": json.loads(extra_json)} if extra_json else {}
    if trust_remote_code:
        kwargs["trust_remote_code"] = True
    try:
        if plain:
            from transformers import AutoTokenizer

            tokenizer = AutoTokenizer.from_pretrained(directory, **kwargs)
        else:
            from diffulex_core.tokenizer import auto_tokenizer_from_pretrained

            tokenizer = auto_tokenizer_from_pretrained(directory, **kwargs)
    except Exception as exc:  # reported to the test, which decides what it means
        return {"error": type(exc).__name__, "message": str(exc)}
    result = describe(tokenizer)
    if extra_json:
        result["caller_names"] = {name: getattr(tokenizer, name, None) for name in json.loads(extra_json)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["save", "load"])
    parser.add_argument("directory")
    parser.add_argument("--extra", default="list", choices=["list", "dict", "none"])
    parser.add_argument("--plain", action="store_true", help="plain AutoTokenizer, no diffulex fixes")
    parser.add_argument("--extra-json", help="extra_special_tokens the caller passes, as JSON")
    parser.add_argument("--trust-remote-code", action="store_true", help="pass trust_remote_code=True")
    args = parser.parse_args()
    if args.action == "save":
        build_and_save(args.directory, args.extra)
    else:
        import transformers

        start = time.monotonic()  # after the import: how long the load itself took
        result = load(args.directory, args.plain, args.extra_json, args.trust_remote_code)
        json.dump({"transformers": transformers.__version__, **result,
                   "seconds": round(time.monotonic() - start, 2)}, sys.stdout)


if __name__ == "__main__":
    main()
