"""Save or load a test tokenizer with whatever transformers this interpreter has.

Run by the tokenizer tests under the project's environment (transformers 5) and under a second
environment with a transformers 4.5x release, so files written by one are loaded by the other.

    python tokenizer_tool.py save DIR --extra list|dict|none
    python tokenizer_tool.py load DIR [--plain] [--extra-json JSON] [--trust-remote-code]

    python tokenizer_tool.py batch JOBS.json OUT_DIR

``load`` prints one JSON object: the tokenizer's class, the fixes applied, encodings of SAMPLES,
decoded round trips, and its special tokens; or the error's type and message; and the seconds
the load took.

``batch`` runs several ``save``/``load`` command lines (JOBS.json: ``{"jobs": [argument lists],
"watch": [paths]}``) one after the other in this one process, so a test pays the interpreter's start and transformers'
import once. Each job's stdout and stderr (at the file-descriptor level: transformers' logging, a
"run the custom code?" prompt) are captured apart, warnings and transformers' ``*_once`` log calls
are shown again as in a fresh process, and one JSON line per finished job is appended to
OUT_DIR/results.jsonl: ``{"job", "argv", "stdout", "stderr", "after", "result"}``, ``after``
listing each watched path once the job is done (None: it does not exist; a directory: every path
under it, relative; a file: "file").
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import warnings

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


def parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser()
    parser.add_argument("action", choices=["save", "load"])
    parser.add_argument("directory")
    parser.add_argument("--extra", default="list", choices=["list", "dict", "none"])
    parser.add_argument("--plain", action="store_true", help="plain AutoTokenizer, no diffulex fixes")
    parser.add_argument("--extra-json", help="extra_special_tokens the caller passes, as JSON")
    parser.add_argument("--trust-remote-code", action="store_true", help="pass trust_remote_code=True")
    return parser


def run(args: argparse.Namespace) -> dict | None:
    """What one command line does: None for ``save``, the JSON object for ``load``."""
    if args.action == "save":
        build_and_save(args.directory, args.extra)
        return None
    import transformers

    start = time.monotonic()  # after the import: how long the load itself took
    result = load(args.directory, args.plain, args.extra_json, args.trust_remote_code)
    return {"transformers": transformers.__version__, **result, "seconds": round(time.monotonic() - start, 2)}


def _as_if_fresh() -> None:
    """Log and warn as a fresh process would: transformers' warning_once/info_once forget what they
    said (``warnings.catch_warnings`` around each job resets the warnings registries)."""
    import logging

    for name in ("warning_once", "info_once"):
        cache_clear = getattr(getattr(logging.Logger, name, None), "cache_clear", None)
        if cache_clear is not None:
            cache_clear()


def listing(path: str) -> list[str] | str | None:
    if os.path.isdir(path):
        return sorted(os.path.relpath(os.path.join(d, name), path)
                      for d, dirs, files in os.walk(path) for name in dirs + files)
    return "file" if os.path.exists(path) else None


def batch(jobs_file: str, out_dir: str) -> None:
    with open(jobs_file) as file:
        spec = json.load(file)
    jobs, watch = spec["jobs"], spec.get("watch", [])
    saved = os.dup(1), os.dup(2)
    for index, argv in enumerate(jobs):
        args = parser().parse_args(argv)
        with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
            sys.stdout.flush(), sys.stderr.flush()
            os.dup2(out.fileno(), 1), os.dup2(err.fileno(), 2)
            failed = True
            try:
                _as_if_fresh()
                with warnings.catch_warnings():
                    result = run(args)
                failed = False
            finally:
                sys.stdout.flush(), sys.stderr.flush()
                os.dup2(saved[0], 1), os.dup2(saved[1], 2)
                out.seek(0), err.seek(0)
                line = {"job": index, "argv": argv, "stdout": out.read(), "stderr": err.read()}
                if failed:  # the traceback follows on stderr
                    print(f"job {index} {argv} raised; its stdout and stderr:\n{line['stdout']}{line['stderr']}",
                          file=sys.stderr)
        with open(os.path.join(out_dir, "results.jsonl"), "a") as file:
            file.write(json.dumps({**line, "after": {p: listing(p) for p in watch}, "result": result}) + "\n")


def main() -> None:
    if sys.argv[1:2] == ["batch"]:
        batch(*sys.argv[2:4])
        return
    result = run(parser().parse_args())
    if result is not None:
        json.dump(result, sys.stdout)


if __name__ == "__main__":
    main()
