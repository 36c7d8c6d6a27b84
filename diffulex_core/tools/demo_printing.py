"""How ``diffulex demo`` prints what it found, section by section (``--json`` prints the result whole)."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any

__all__ = ["print_text"]


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value * 1e3:.3f} ms"


def _num(value: float | None, unit: str = "") -> str:
    return "n/a" if value is None else f"{value:.2f}{unit}"


def _header(result: dict[str, Any], say: Callable[..., None]) -> None:
    """The mode, the family and the plugins."""
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


def _checkpoint(result: dict[str, Any], say: Callable[..., None]) -> None:
    """The files and the plan."""
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


def _load(result: dict[str, Any], say: Callable[..., None]) -> None:
    """The model, the load report and the adapter."""
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


def _tokenizer(result: dict[str, Any], say: Callable[..., None]) -> None:
    """The tokenizer and its special tokens."""
    tok = result["tokenizer"]
    say()
    say(f"tokenizer ({tok['source']}): {tok['class']}, {tok['vocab_size']} tokens "
        f"(the model has {tok['model_rows']} embedding rows)")
    say(f"  fixups applied by auto_tokenizer_from_pretrained: {', '.join(tok['fixups']) or 'none needed'}")
    mask = result["mask_token"]
    token = f"{mask['token']!r} " if mask["token"] else ""
    say(f"  mask token {token}(id {mask['id']}) from {mask['source']}")


def _decoding(result: dict[str, Any], say: Callable[..., None]) -> None:
    """Each prompt's steps and text."""
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


def _metrics(result: dict[str, Any], say: Callable[..., None]) -> None:
    """The headline metrics and the benchmark format."""
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


def print_text(result: dict[str, Any], out: Any = None) -> None:
    out = out or sys.stdout

    def say(text: str = "") -> None:
        print(text, file=out)

    for section in (_header, _checkpoint, _load, _tokenizer, _decoding, _metrics):
        section(result, say)
