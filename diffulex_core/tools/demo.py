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

The files it writes are made in ``demo_files``, the decoding loop is ``demo_decoding`` and the printing
``demo_printing``. Importing this module is cheap (the standard library only): ``diffulex_core.tools.cli``
imports it to build its parser; torch, transformers and the plugins are imported when the demo runs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

from diffulex_core.errors import DiffulexError
from diffulex_core.tools.demo_decoding import (
    GEN_LENGTH,
    PROMPTS,
    TOKENS_PER_STEP,
    decode,
    find_eos_ids,
    find_mask_token,
    first_embedding_rows,
)
from diffulex_core.tools.demo_files import (
    EOS_TOKEN,
    LORA_ALPHA,
    LORA_RANK,
    PAD_TOKEN,
    WORDS,
    has_tokenizer,
    vocabulary,
    write_demo_lora,
    write_demo_tokenizer,
)
from diffulex_core.tools.demo_printing import print_text

__all__ = ["add_arguments", "main", "run_demo"]

RANDOM_WARNING = ("the weights are random (a tiny model made up on the spot), so the decoded text is noise: "
                  "the demo shows the path, not a language model")


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

    from diffulex_core.files.writer import write_checkpoint
    from diffulex_core.generation.decoding import decode_token_ids_robust
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
        vocab = vocabulary(len(WORDS) + 4)
        config = {**example.config, "vocab_size": len(vocab), "mask_token_id": len(vocab) - 1,
                  "eos_token_id": vocab.index(EOS_TOKEN), "pad_token_id": vocab.index(PAD_TOKEN), "dtype": "float32"}
        source = factory(dict(config)).eval()
        rows = first_embedding_rows(source)  # a family may ignore vocab_size: the tokenizer fits what it built
        config.update(vocab_size=rows, mask_token_id=min(rows, len(vocab)) - 1)
        to_checkpoint = example.to_checkpoint
        path = scratch / "checkpoint"
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
        if has_tokenizer(directory):
            tokenizer_dir, tokenizer_source = directory, "the checkpoint's"
        else:
            tokenizer_dir, own_tokenizer = write_demo_tokenizer(scratch / "tokenizer", rows), True
            tokenizer_source = f"written by the demo: {directory} has no tokenizer files"
    # The demo's own directory holds no code (its auto_map dangles on purpose): trusting it runs
    # nothing, and is what makes plain AutoTokenizer fail there. A user's tokenizer is not trusted.
    tokenizer = auto_tokenizer_from_pretrained(tokenizer_dir, trust_remote_code=own_tokenizer)
    vocab_limit = min(rows, len(tokenizer))
    mask_id, mask_source = find_mask_token(tokenizer, config, rows)
    eos_ids = find_eos_ids(tokenizer, config)
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
    for entry_log, traj in zip(log, outputs.trajectories, strict=True):
        entry_log.update(text=traj.text, full_text=traj.full_text, token_ids=list(traj.token_ids),
                         completion_reason=traj.completion_reason)
    result["decoding"] = {"gen_length": GEN_LENGTH, "tokens_per_step": TOKENS_PER_STEP,
                          "steps": outputs.num_steps, "requests": log}
    result["metrics"] = {"main": _main_metrics(outputs), "all": outputs.metrics(), "summary": outputs.summary()}
    result["benchmark"] = outputs.to_benchmark_format()
    result["ok"] = report.ok and result["identical_to_source"] is not False
    return result


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
