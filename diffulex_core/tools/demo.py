"""``diffulex demo``: the whole library on one path, from checkpoint files to generation metrics.

On its embedded default (no arguments) the demo writes, in a temporary directory, a tiny random
checkpoint of a family (``--family``, else the first installed, alphabetically, that has an
example) built from the example config its plugin gives ``diffulex check``
(``diffulex_family_examples`` or ``factory.example_config``; a family's defaults may be full
size) with the demo's vocabulary, under the family's real checkpoint names and sharded in two; a
word-level tokenizer whose ``tokenizer_config.json`` needs one of the built-in fixups to load;
and a PEFT LoRA adapter on the checkpoint's ``q_proj``/``v_proj`` projections (none when it has
none). Then it runs what an engine runs:

1. plugins (``get_plugins``) and the family's factory;
2. the plan (``plan_checkpoint``) from the safetensors headers alone;
3. the model built on the meta device in the checkpoint's dtype (``build_for_checkpoint``), the
   adapter checked and added (``prepare_lora``) before the base load (``load_checkpoint``), then
   written (``PreparedLora.apply``);
4. the tokenizer through ``auto_tokenizer_from_pretrained``, with the fixups it needed;
5. masked-diffusion decoding of two prompts with confidence-based unmasking, every step recorded
   in ``GenerationOutputs`` through requests on the ``EngineRequest`` protocol; the texts
   (``convert_to_text``), the metrics and ``to_benchmark_format()``.

On the default the weights are random, so the decoded text is noise: the point is the path. The
demo also checks that the loaded model (with the same adapter added to the source the same way)
reproduces the source model's logits exactly.

``--checkpoint DIR --family NAME`` runs the same path on a user's checkpoint (nothing written but,
when DIR has no tokenizer files, the demo's own tokenizer; LoRA only with ``--lora DIR``).

Importing this module is cheap (the standard library only): ``diffulex_core.tools.cli`` imports it to
build its parser; torch, transformers and the plugins are imported when the demo runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from diffulex_core.errors import DiffulexError

__all__ = ["DemoRequest", "add_arguments", "first_embedding_rows", "main", "run_demo", "write_demo_lora",
           "write_demo_tokenizer"]

PROMPTS = ("the quick brown fox", "a diffusion model writes")
GEN_LENGTH = 8  # mask tokens appended to each prompt: one block
TOKENS_PER_STEP = 2  # the most confident masked positions unmasked per step (so 4 steps)
LORA_RANK = 4
LORA_ALPHA = 8.0
MASK_TOKEN, EOS_TOKEN, PAD_TOKEN, UNK_TOKEN = "<|mask|>", "<|endoftext|>", "<|pad|>", "<|unk|>"
# A module name the demo tokenizer's auto_map points to and never writes (see write_demo_tokenizer).
REMOTE_MODULE = "tokenization_diffulex_demo"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
RANDOM_WARNING = ("the weights are random (a tiny model made up on the spot), so the decoded text is noise: "
                  "the demo shows the path, not a language model")
_WORDS = """
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


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The ``diffulex demo`` options."""
    parser.add_argument("--family", help="family name (default: the first installed, alphabetically; "
                                         "required with --checkpoint)")
    parser.add_argument("--checkpoint", metavar="DIR", help="run on this checkpoint instead of the embedded tiny "
                                                            "random one (its tokenizer files if it has them)")
    parser.add_argument("--lora", metavar="DIR", help="with --checkpoint: a PEFT LoRA adapter to load on top")
    parser.add_argument("--dtype", help="parameter dtype, e.g. bfloat16 (default: the checkpoint's)")
    parser.add_argument("--device", default="cpu", help="where the model runs (default: cpu)")
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of text")


def first_embedding_rows(model: Any) -> int:
    """Rows of the model's first ``nn.Embedding``: the vocabulary the model can read."""
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return module.num_embeddings
    raise DiffulexError(f"{type(model).__qualname__} has no nn.Embedding; the demo cannot make a prompt for it")


# --------------------------------------------------------------------------- requests


@dataclass
class DemoRequest:
    """One prompt's request, on this package's ``EngineRequest`` protocol (what ``record_step``
    reads), updated in place by the decoding loop before each step is recorded."""

    req_id: int
    num_prompt_tokens: int
    running_token_ids: list[int]  # the response region after the step, mask tokens included
    eos_token_ids: tuple[int, ...]
    block_size: int = GEN_LENGTH
    buffer_block_ids: list[int] = field(default_factory=lambda: [0])
    is_prefill: bool = True
    num_generated_tokens: int = 0
    is_finished: bool = False
    completion_reason: str | None = None
    mask_token_id: int = -1

    @property
    def response_token_ids(self) -> list[int]:  # read once finished
        return list(self.running_token_ids)

    @property
    def block_trace(self) -> list[dict[str, Any]]:  # optional: the one block's state, per step
        masked = sum(1 for t in self.running_token_ids if t == self.mask_token_id)
        return [{"block_id": 0, "active": not self.is_finished, "dummy": False, "masked_count": masked,
                 "mask_ratio": masked / self.block_size, "progress": 1 - masked / self.block_size,
                 "status": "finished" if self.is_finished else "active"}]


# --------------------------------------------------------------------------- files the demo writes


def _vocabulary(size: int) -> list[str]:
    """Tokens for ids ``0 .. size - 1``: pad, unk, eos, words, and the mask token last."""
    if size < 8:
        raise DiffulexError(f"the model has {size} embedding rows; the demo's tokenizer needs at least 8")
    words = list(dict.fromkeys(_WORDS))[:size - 4]
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
    vocab = _vocabulary(vocab_size)
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

    from diffulex_core.files.headers import find_checkpoint_files, read_records
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


# --------------------------------------------------------------------------- decoding


def _has_tokenizer(directory: Path) -> bool:
    return any((directory / name).is_file() for name in TOKENIZER_FILES)


def _mask_token(tokenizer: Any, config: dict, rows: int) -> tuple[int, str]:
    """(id, where it came from): the tokenizer's mask token, else config ``mask_token_id``, else the
    last id of the model's vocabulary (``rows - 1``); an id the model has no row for does not count."""
    mask_id = getattr(tokenizer, "mask_token_id", None)
    if isinstance(mask_id, int) and 0 <= mask_id < rows:
        return mask_id, f"the tokenizer's mask token {tokenizer.mask_token!r}"
    mask_id = config.get("mask_token_id")
    if isinstance(mask_id, int) and not isinstance(mask_id, bool) and 0 <= mask_id < rows:
        return mask_id, "config.json mask_token_id"
    return rows - 1, "the last vocabulary id (neither the tokenizer nor config.json names a mask token the model has)"


def _eos_ids(tokenizer: Any, config: dict) -> tuple[int, ...]:
    eos = getattr(tokenizer, "eos_token_id", None)
    if eos is None:
        eos = config.get("eos_token_id")
    eos = eos if isinstance(eos, (list, tuple)) else [eos]
    return tuple(int(e) for e in eos if isinstance(e, int) and not isinstance(e, bool))


def _token_texts(tokenizer: Any, ids: list[int], mask_id: int) -> list[str]:
    from diffulex_core.generation.outputs import decode_token_ids_robust

    shown = []
    for t in ids:
        text = "[MASK]" if t == mask_id else decode_token_ids_robust(tokenizer, [t])
        shown.append(text.strip() if text.strip().isprintable() and text.strip() else ascii(text) if text else f"<{t}>")
    return shown


def decode(model: Any, tokenizer: Any, prompts: tuple[str, ...], *, mask_id: int, eos_ids: tuple[int, ...],
           vocab_limit: int, device: Any, gen_length: int = GEN_LENGTH,
           per_step: int = TOKENS_PER_STEP) -> tuple[Any, list[dict[str, Any]]]:
    """Masked-diffusion decoding with confidence-based unmasking: each prompt gets ``gen_length``
    mask tokens; each step runs the model on each sequence, and unmasks the ``per_step`` masked
    positions whose argmax is most confident (softmax). Every step is recorded in a
    ``GenerationOutputs`` (returned with a per-request log of the steps)."""
    import torch

    from diffulex_core.generation.outputs import GenerationOutputs

    outputs = GenerationOutputs(len(prompts))
    prompt_ids = []
    for prompt in prompts:
        ids = [int(t) for t in tokenizer(prompt)["input_ids"]]
        if not ids:
            raise DiffulexError(f"the tokenizer encodes the prompt {prompt!r} as no tokens")
        if max(ids) >= vocab_limit:
            raise DiffulexError(f"the tokenizer encodes {prompt!r} with id {max(ids)}, beyond the model's "
                                f"{vocab_limit} embedding rows")
        prompt_ids.append(ids)
    reqs = [DemoRequest(req_id=i, num_prompt_tokens=len(ids), running_token_ids=[mask_id] * gen_length,
                        eos_token_ids=eos_ids, mask_token_id=mask_id) for i, ids in enumerate(prompt_ids)]
    log = [{"prompt": p, "prompt_token_ids": ids, "steps": []} for p, ids in zip(prompts, prompt_ids)]
    step = 0
    with torch.no_grad():
        while not all(r.is_finished for r in reqs):
            running = [r for r in reqs if not r.is_finished]
            start = time.perf_counter()
            for req in running:
                ids = torch.tensor([prompt_ids[req.req_id] + req.running_token_ids], device=device)
                logits = model(ids)[0, -gen_length:].float()
                logits[:, mask_id] = float("-inf")  # never "predict" the mask itself
                logits[:, vocab_limit:] = float("-inf")  # nor a padding row the tokenizer cannot decode
                confidence, predicted = logits.softmax(-1).max(-1)
                response = torch.tensor(req.running_token_ids, device=device)
                masked = response == mask_id
                chosen = confidence.masked_fill(~masked, float("-inf")).topk(min(per_step, int(masked.sum()))).indices
                response[chosen] = predicted[chosen]
                req.running_token_ids = response.tolist()
                req.num_generated_tokens = len(chosen)
                req.is_finished = mask_id not in req.running_token_ids
                if req.is_finished:
                    req.completion_reason = "eos" if any(t in eos_ids for t in req.running_token_ids) else "max_tokens"
            step_time = time.perf_counter() - start
            outputs.record_step(running, step_time)
            for req in running:
                log[req.req_id]["steps"].append({
                    "step": step, "prefill": req.is_prefill, "step_time": step_time,
                    "unmasked": req.num_generated_tokens, "running_token_ids": list(req.running_token_ids),
                    "tokens": _token_texts(tokenizer, req.running_token_ids, mask_id)})
                req.is_prefill = False  # the first step read the prompt: the rest decode
            step += 1
    return outputs, log


# --------------------------------------------------------------------------- the demo


def _main_metrics(outputs: Any) -> dict[str, dict[str, Any]]:
    """The headline figures under both names (docs/metrics.md): Diffulex's first, then ours."""
    return {
        "TPF": {"tpf": outputs.tpf, "decode_tpf": outputs.decode_tpf, "unit": "tokens/forward"},
        "TTFT": {"ttft": outputs.ttft, "batch_ttft": outputs.batch_ttft, "unit": "s"},
        "TPOT": {"tpot": outputs.tpot, "batch_tpot": outputs.batch_tpot, "unit": "s"},
        "throughput": {"throughput": outputs.throughput, "wall_throughput": outputs.wall_throughput,
                       "unit": "tokens/s"},
    }


def _family_and_example(family: str | None, plugins: Any) -> tuple[str, tuple[str, Any]]:
    """(family, (where its example came from, FamilyExample)). The tiny model is built from the
    example its plugin gives ``diffulex check``: a family's defaults may be full size (a GPT-2
    family's are 86M parameters), and only the plugin knows a small config that works. Without
    ``--family``: the first family, alphabetically, that has one."""
    from diffulex_core.errors import FamilyError
    from diffulex_core.plugins.examples import family_example

    if family is not None:
        found = family_example(family)
        if found is None:
            entry = plugins.registry.entry(family)
            raise FamilyError(f"family {family!r} of {entry.owner} gives no example config "
                              f"(diffulex_family_examples or factory.example_config), so the demo cannot tell "
                              f"which small config builds it; add one (see docs/writing-a-plugin.md), or run "
                              f"the demo on a checkpoint: diffulex demo --checkpoint DIR --family {family}")
        return family, found
    names = plugins.registry.names()
    if not names:
        raise DiffulexError("no model family is installed; install a family plugin such as plugins/diffulex-llada")
    for name in names:
        try:
            found = family_example(name)
        except DiffulexError:  # a broken plugin: the next family may still run
            continue
        if found is not None:
            return name, found
    raise FamilyError(f"no installed family gives an example config (diffulex_family_examples or "
                      f"factory.example_config): {', '.join(names)}; pass --checkpoint DIR --family NAME")


def run_demo(*, family: str | None = None, checkpoint: str | Path | None = None, lora: str | Path | None = None,
             dtype: str | None = None, device: str = "cpu") -> dict[str, Any]:
    """Run the demo and return everything it found, JSON-ready (see the module docstring)."""
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="diffulex-demo-") as scratch:
        result = _run(Path(scratch), family, checkpoint, lora, dtype, device)
    result["seconds"] = time.perf_counter() - started
    return result


def _run(scratch: Path, family: str | None, checkpoint: str | Path | None, lora: str | Path | None,
         dtype: str | None, device: str) -> dict[str, Any]:
    import torch

    from diffulex_core.generation.outputs import decode_token_ids_robust
    from diffulex_core.loader import load_checkpoint, plan_checkpoint
    from diffulex_core.loading.family_models import build_for_checkpoint, checkpoint_config
    from diffulex_core.lora.adapters import prepare_lora
    from diffulex_core.plugins import get_plugins
    from diffulex_core.tokenizer import auto_tokenizer_from_pretrained

    plugins = get_plugins()
    chosen = "--family" if family else "the first installed family, alphabetically, with an example config"
    example = None
    if checkpoint is None:
        family, example = _family_and_example(family, plugins)
    elif family is None:
        raise DiffulexError("demo --checkpoint DIR needs --family NAME")
    entry = plugins.registry.entry(family)
    factory = plugins.registry.get(family)
    result: dict[str, Any] = {
        "mode": "embedded default" if checkpoint is None else "checkpoint",
        "family": family, "family_chosen_by": chosen, "factory": entry.factory_name, "owner": entry.owner,
        "families": plugins.registry.names(), "plugins": plugins.to_dict(),
        "plugin_failures": [f.describe() for f in plugins.failures],
        "warning": RANDOM_WARNING if checkpoint is None else None,
    }  # fmt: skip

    # 1. the files: the embedded default writes a checkpoint, a tokenizer and an adapter
    source = None
    if checkpoint is None:
        torch.manual_seed(0)
        config_source, example = example
        vocab = _vocabulary(len(_WORDS) + 4)
        config = {**example.config, "vocab_size": len(vocab), "mask_token_id": len(vocab) - 1,
                  "eos_token_id": vocab.index(EOS_TOKEN), "pad_token_id": vocab.index(PAD_TOKEN), "dtype": "float32"}
        source = factory(dict(config)).eval()
        rows = first_embedding_rows(source)  # a family may ignore vocab_size: the tokenizer fits what it built
        config.update(vocab_size=rows, mask_token_id=min(rows, len(vocab)) - 1)
        to_checkpoint = example.to_checkpoint
        path = scratch / "checkpoint"
        from diffulex_core.files.writer import write_checkpoint

        write_checkpoint(path, source, shards=2, config=config, to_checkpoint=to_checkpoint)
        tokenizer_dir, tokenizer_source = write_demo_tokenizer(scratch / "tokenizer", rows), "written by the demo"
        own_tokenizer = True
        lora_dir, lora_targets = write_demo_lora(scratch / "lora", path)
        result["checkpoint"] = {
            "path": str(path), "written_by_demo": True, "shards": 2, "config": config,
            "config_source": config_source,
            "names": (f"{to_checkpoint.__module__}.{to_checkpoint.__name__}" if to_checkpoint
                      else "the model's state_dict"),
            "files": sorted(p.name for p in path.iterdir()),
        }  # fmt: skip
        result["lora_note"] = (f"adapter written by the demo on {len(lora_targets)} q_proj/v_proj projection(s), "
                               f"r={LORA_RANK}, lora_alpha={LORA_ALPHA:g}" if lora_dir else
                               "none: the checkpoint has no 2-D q_proj/v_proj weight for the demo's adapter to target")
    else:
        path = Path(checkpoint)
        config = checkpoint_config(path) if path.exists() else {}
        lora_dir = Path(lora) if lora else None
        lora_targets = []
        tokenizer_dir, tokenizer_source, own_tokenizer = None, None, False
        result["checkpoint"] = {"path": str(path), "written_by_demo": False}
        result["lora_note"] = f"adapter {lora_dir}" if lora_dir else "no --lora: no adapter"

    # 2. the model on the meta device, in the checkpoint's dtype, and the plan
    model, dtype_note = build_for_checkpoint(family, path, "meta", dtype)
    model.eval()
    result["model"] = {"class": type(model).__qualname__, "device": device, "dtype": dtype_note}
    result["parameters"] = sum(p.numel() for p in model.parameters())
    plan = plan_checkpoint(model, path, family=family).report
    result["plan"] = {"summary": plan.summary(), "ok": plan.ok, "loaded_by_source": plan.loaded_by_source,
                      "problems": plan.problems, "tensors": [p.to_dict() for p in plan.placements]}

    # 3. the adapter checked and added before the base load, then the load, then the adapter's tensors
    prepared = prepare_lora(model, lora_dir, merge=False) if lora_dir else None
    report = load_checkpoint(model, path, family=family, device=device)
    if prepared is not None:
        report.lora = prepared.apply()
    result["load"] = report.summary()
    load = report.to_dict()
    load.pop("tensors")  # the plan lists them
    result["load_report"] = load
    result["lora"] = report.lora.to_dict() if report.lora is not None else None

    # 4. the tokenizer, through the robust path
    rows = first_embedding_rows(model)
    if tokenizer_dir is None:
        directory = path if path.is_dir() else path.parent
        if _has_tokenizer(directory):
            tokenizer_dir, tokenizer_source = directory, "the checkpoint's"
        else:
            tokenizer_dir, own_tokenizer = write_demo_tokenizer(scratch / "tokenizer", rows), True
            tokenizer_source = f"written by the demo: {directory} has no tokenizer files"
    # The demo's own directory holds no code (its auto_map dangles on purpose): trusting it runs
    # nothing, and is what makes plain AutoTokenizer fail there. A user's tokenizer is not trusted.
    tokenizer = auto_tokenizer_from_pretrained(tokenizer_dir, trust_remote_code=own_tokenizer)
    vocab_limit = min(rows, len(tokenizer))
    mask_id, mask_source = _mask_token(tokenizer, config, rows)
    eos_ids = _eos_ids(tokenizer, config)
    result["tokenizer"] = {"path": str(tokenizer_dir), "source": tokenizer_source, "class": type(tokenizer).__name__,
                           "vocab_size": len(tokenizer), "model_rows": rows,
                           "fixups": list(getattr(tokenizer, "diffulex_fixups", ()))}
    mask_text = decode_token_ids_robust(tokenizer, [mask_id])
    result["mask_token"] = {"id": mask_id, "token": mask_text or None, "source": mask_source}
    result["eos_token_ids"] = list(eos_ids)

    # the loaded model against its source: the same adapter added to the source the same way
    if source is not None:
        source = source.to(device=device, dtype=next(model.parameters()).dtype)
        if lora_dir is not None:
            prepare_lora(source, lora_dir, merge=False).apply()
        check = torch.arange(8, device=device).remainder(rows).unsqueeze(0)
        with torch.no_grad():
            expected, got = source(check), model(check)
        result["logits_shape"] = list(got.shape)
        result["source_has_adapter"] = lora_dir is not None
        result["identical_to_source"] = bool(torch.equal(expected, got))
    else:
        result["logits_shape"], result["identical_to_source"], result["source_has_adapter"] = None, None, None

    # 5. decoding, recorded step by step
    outputs, log = decode(model, tokenizer, PROMPTS, mask_id=mask_id, eos_ids=eos_ids, vocab_limit=vocab_limit,
                          device=device)
    outputs.convert_to_text(tokenizer)
    for entry_log, traj in zip(log, outputs.trajectories):
        entry_log.update(text=traj.text, full_text=traj.full_text, token_ids=list(traj.token_ids),
                         completion_reason=traj.completion_reason)
    result["decoding"] = {"gen_length": GEN_LENGTH, "tokens_per_step": TOKENS_PER_STEP,
                          "steps": outputs.num_steps, "requests": log}
    result["metrics"] = {"main": _main_metrics(outputs), "all": outputs.metrics(), "summary": outputs.summary()}
    result["benchmark"] = outputs.to_benchmark_format()
    result["ok"] = report.ok and result["identical_to_source"] is not False
    return result


# --------------------------------------------------------------------------- printing


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1e3:.3f} ms"


def _num(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def print_text(result: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out)

    if result["warning"]:
        say(f"NOTE: {result['warning']}.")
    say(f"diffulex demo, {result['mode']}: family {result['family']} "
        f"(factory {result['factory']} from {result['owner']}; chosen by {result['family_chosen_by']})")
    say()
    plugins = result["plugins"]
    say(f"plugins ({len(plugins['plugins'])} loaded, {len(plugins['failures'])} failed):")
    for info in plugins["plugins"]:
        say(f"  {info['name']}  {info['distribution']} {info['version']}  families: "
            f"{', '.join(info['families']) or '-'}")
    for failure in result["plugin_failures"]:
        say(f"  FAILED {failure}")
    ckpt = result["checkpoint"]
    say()
    if ckpt["written_by_demo"]:
        say(f"checkpoint written by the demo: {ckpt['path']}")
        say(f"  {ckpt['shards']} shards under {ckpt['names']} names: {', '.join(ckpt['files'])}")
        say(f"  model config from {ckpt['config_source']}, with the demo's vocabulary, special-token ids and dtype")
        say(f"  config.json: {json.dumps(ckpt['config'])}")
    else:
        say(f"checkpoint: {ckpt['path']}")
    say(f"LoRA: {result['lora_note']}")
    say()
    say(f"plan (headers only, {result['model']['class']} on the meta device):")
    say(f"  {result['plan']['summary']}")
    say()
    say(f"model built on the meta device in {result['model']['dtype']}, "
        f"{result['parameters']:,} parameters; loaded on {result['model']['device']}:")
    load = result["load_report"]
    for note in load["notes"]:
        say(f"  note: {note}")
    for problem in load["problems"]:
        say(f"  problem: {problem}")
    for line in result["load"].splitlines():
        say(f"  {line}")
    if result["lora"] is not None:
        say("  LoRA adapters per module:")
        for module, adapters in result["lora"]["modules"].items():
            for a in adapters:
                shard = f" [shard {a['shard_id']!r}]" if a["shard_id"] is not None else ""
                say(f"    {a['adapter']} -> {module}{shard}  r={a['r']} alpha={a['lora_alpha']:g} "
                    f"scaling={a['scaling']:.4g}")
    if result["identical_to_source"] is not None:
        adapter = " (+ the same adapter on the source)" if result.get("source_has_adapter") else ""
        say(f"  loaded model{adapter} reproduces the source's logits "
            f"{tuple(result['logits_shape'])} exactly: {result['identical_to_source']}")
    tok = result["tokenizer"]
    say()
    say(f"tokenizer ({tok['source']}): {tok['class']}, {tok['vocab_size']} tokens "
        f"(the model has {tok['model_rows']} embedding rows)")
    say(f"  fixups applied by auto_tokenizer_from_pretrained: {', '.join(tok['fixups']) or 'none needed'}")
    mask = result["mask_token"]
    token = f"{mask['token']!r} " if mask["token"] else ""
    say(f"  mask token {token}(id {mask['id']}) from {mask['source']}")
    decoding = result["decoding"]
    say()
    say(f"masked-diffusion decoding: {decoding['gen_length']} mask tokens per prompt, the "
        f"{decoding['tokens_per_step']} most confident unmasked per step, {decoding['steps']} steps:")
    for i, req in enumerate(decoding["requests"]):
        say(f"  prompt {i}: {req['prompt']!r} -> token ids {req['prompt_token_ids']}")
        for step in req["steps"]:
            kind = "prefill" if step["prefill"] else "decode"
            say(f"    step {step['step']} ({kind}, +{step['unmasked']}): {' '.join(step['tokens'])}")
        say(f"    text: {req['text']!r}  ({req['completion_reason']})")
    main = result["metrics"]["main"]
    say()
    say("metrics (Diffulex's names; this package's definitions in parentheses, see docs/metrics.md):")
    say(f"  TPF         {_num(main['TPF']['tpf'])} tokens/forward  (decode_tpf {_num(main['TPF']['decode_tpf'])})")
    say(f"  TTFT        {_ms(main['TTFT']['ttft'])}  (batch_ttft {_ms(main['TTFT']['batch_ttft'])})")
    say(f"  TPOT        {_ms(main['TPOT']['tpot'])}  (batch_tpot {_ms(main['TPOT']['batch_tpot'])})")
    say(f"  throughput  {_num(main['throughput']['throughput'])} tokens/s  "
        f"(wall_throughput {_num(main['throughput']['wall_throughput'])} tokens/s)")
    say()
    say("benchmark format (GenerationOutputs.to_benchmark_format()):")
    say("[\n" + ",\n".join(f"  {json.dumps(entry)}" for entry in result["benchmark"]) + "\n]")
    say()
    if result["warning"]:
        say(f"NOTE: {result['warning']}.")
    say(f"demo finished in {result['seconds']:.2f} s")


def main(args: argparse.Namespace) -> int:
    """``diffulex demo``: run it and print text or, with ``--json``, one JSON object."""
    if args.checkpoint and not args.family:
        print("diffulex: demo --checkpoint DIR needs --family NAME (see `diffulex plugins`)", file=sys.stderr)
        return 2
    if args.lora and not args.checkpoint:
        print("diffulex: demo --lora needs --checkpoint DIR (the embedded default writes its own adapter)",
              file=sys.stderr)
        return 2
    result = run_demo(family=args.family, checkpoint=args.checkpoint, lora=args.lora, dtype=args.dtype,
                      device=args.device)
    if args.json:
        json.dump(result, sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        print_text(result)
    return 0 if result["ok"] else 1
