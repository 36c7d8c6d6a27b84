"""The files ``diffulex demo`` writes on its embedded default: a word-level tokenizer whose config
needs a built-in fixup, and a PEFT LoRA adapter on the checkpoint's ``q_proj``/``v_proj``."""

from __future__ import annotations

import json
from pathlib import Path

from diffulex_core.errors import DiffulexError

__all__ = ["EOS_TOKEN", "LORA_ALPHA", "LORA_RANK", "PAD_TOKEN", "WORDS", "has_tokenizer", "vocabulary",
           "write_demo_lora", "write_demo_tokenizer"]

LORA_RANK = 4
LORA_ALPHA = 8.0
MASK_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|mask|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
# A module name the demo tokenizer's auto_map points to and never writes (see write_demo_tokenizer).
REMOTE_MODULE = "tokenization_diffulex_demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
WORDS = """
the a an of and to in is it that was for on are with as his they be at one have this from or had by word but what
some we can out other were all there when up use your how said each she which do their time if will way about many
then them write writes would like so these her long make thing see him two has look more day could go come did
number sound no most people my over know water than call first who may down side been now find any new work part
take get place made live where after back little only round man year came show every good me give our under name
very through just form sentence great think say help low line turn cause much mean before move right boy old too
same tell does set three want air well also play small end put home read hand large add even land here must big
high such follow act why ask men change went light kind off need house try us again animal point mother world near
build self earth father quick brown fox jumps lazy dog diffusion model models text token tokens mask step steps
""".split()



def vocabulary(size: int) -> list[str]:
    """Tokens for ids ``0 .. size - 1``: pad, unk, eos, words, and the mask token last."""
    if size < 8:
        raise DiffulexError(f"the model has {size} embedding rows; the demo's tokenizer needs at least 8")
    words = list(dict.fromkeys(WORDS))[:size - 4]
    return [PAD_TOKEN, UNK_TOKEN, EOS_TOKEN, *words, MASK_TOKEN]


def write_demo_tokenizer(directory: str | Path, vocab_size: int) -> Path:
    """A word-level tokenizer (``tokenizers``, nothing downloaded) of at most ``vocab_size`` tokens,
    with pad, eos and mask tokens, saved as ``tokenizer.json`` and a ``tokenizer_config.json`` that
    needs a fixup: it declares ``PreTrainedTokenizerFast`` and an ``auto_map`` to a module file the
    directory lacks (as when a model's files are copied without their code), so plain
    ``AutoTokenizer.from_pretrained(..., trust_remote_code=True)`` fails; and it lists its extra
    special tokens as transformers 5 writes them (a list, which transformers 4.47-4.57 reject)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers

    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    vocab = vocabulary(vocab_size)
    tokenizer = Tokenizer(models.WordLevel({token: i for i, token in enumerate(vocab)}, unk_token=UNK_TOKEN))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.decoder = decoders.WordPiece(prefix="##", cleanup=False)  # joins words with spaces
    tokenizer.add_special_tokens([PAD_TOKEN, UNK_TOKEN, EOS_TOKEN, MASK_TOKEN])
    tokenizer.save(str(directory / "tokenizer.json"))
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "auto_map": {"AutoTokenizer": [None, f"{REMOTE_MODULE}.DiffulexDemoTokenizerFast"]},
        "pad_token": PAD_TOKEN, "unk_token": UNK_TOKEN, "eos_token": EOS_TOKEN, "mask_token": MASK_TOKEN,
        "extra_special_tokens": [MASK_TOKEN], "model_max_length": 2048, "clean_up_tokenization_spaces": False,
    }  # fmt: skip
    (directory / "tokenizer_config.json").write_text(json.dumps(config, indent=2))
    return directory


def write_demo_lora(directory: str | Path, checkpoint: str | Path, *, seed: int = 0) -> tuple[Path | None, list[str]]:
    """A PEFT adapter of rank ``LORA_RANK`` on every 2-D ``q_proj``/``v_proj`` weight of ``checkpoint``
    (small random A and B); (None, []) when it has none."""
    import torch

    from diffulex_core.files.finding import find_checkpoint_files
    from diffulex_core.files.headers import read_records
    from diffulex_core.lora.writer import write_lora_adapter

    shapes = {}
    for file in find_checkpoint_files(checkpoint).files:
        for record in read_records(file):
            if record.name.endswith(("q_proj.weight", "v_proj.weight")) and len(record.shape) == 2:
                shapes[record.name.removesuffix(".weight")] = tuple(record.shape)
    if not shapes:
        return None, []
    generator = torch.Generator().manual_seed(seed)
    adapters = {name: (torch.randn(LORA_RANK, cols, generator=generator) * 0.05,
                       torch.randn(rows, LORA_RANK, generator=generator) * 0.05)
                for name, (rows, cols) in sorted(shapes.items())}
    return write_lora_adapter(directory, adapters, lora_alpha=LORA_ALPHA), sorted(shapes)


def has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)
