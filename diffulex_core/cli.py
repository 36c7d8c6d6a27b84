"""The ``diffulex`` command line: ``plugins`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any, Sequence

from .errors import DiffulexError


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def cmd_plugins(args: argparse.Namespace) -> int:
    from .plugins import get_plugins

    plugins = get_plugins()
    if args.json:
        _print_json(plugins.to_dict())
        return 0
    print(f"plugins ({len(plugins.loaded)} loaded, {len(plugins.failures)} failed, {len(plugins.disabled)} disabled)")
    entries = {e.name: e for e in plugins.registry.entries()}
    for info in plugins.loaded:
        print(f"  {info.name}  {info.distribution} {info.version}  hooks: {', '.join(info.hooks) or '-'}")
        for family in info.families:
            print(f"    family {family} -> {entries[family].factory_name}")
    for info in plugins.disabled:
        print(f"  {info.name}  {info.distribution} {info.version}  disabled by DIFFULEX_PLUGINS/DIFFULEX_DISABLE_PLUGINS")
    for failure in plugins.failures:
        print(f"  FAILED {failure.describe()}")
    return 0


def _first_embedding_rows(model: Any) -> int:
    import torch

    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            return module.num_embeddings
    raise DiffulexError(f"{type(model).__qualname__} has no nn.Embedding; the demo cannot make a prompt for it")


def cmd_demo(args: argparse.Namespace) -> int:
    """Discover plugins, build a family's model on the meta device and for real, run it once."""
    import torch

    from .plugins import get_plugins

    plugins = get_plugins()
    family = args.family or next(iter(plugins.registry.names()), None)
    if family is None:
        raise DiffulexError("no model family is installed; install a family plugin such as plugins/diffulex-llada")
    entry = plugins.registry.entry(family)
    factory = plugins.registry.get(family)
    with torch.device("meta"):
        dry = factory({})
    params = {id(p): p for p in dry.parameters()}.values()  # tied parameters once
    n_params = sum(p.numel() for p in params)
    n_bytes = sum(p.numel() * p.element_size() for p in params)
    torch.manual_seed(0)
    model = factory({}).eval()
    vocab = _first_embedding_rows(model)
    prompt = torch.arange(8).remainder(vocab).unsqueeze(0)
    with torch.no_grad():
        logits = model(prompt)
    result = {
        "families": plugins.registry.names(),
        "family": family,
        "factory": entry.factory_name,
        "owner": entry.owner,
        "parameters": n_params,
        "parameter_bytes": n_bytes,
        "prompt": prompt[0].tolist(),
        "logits_shape": list(logits.shape),
        "next_tokens": logits.argmax(-1)[0].tolist(),
        "plugin_failures": [f.describe() for f in plugins.failures],
    }
    if args.json:
        _print_json(result)
        return 0
    print(f"families installed: {', '.join(result['families'])}")
    print(f"family {family}: factory {entry.factory_name} from {entry.owner}")
    print(f"dry run on the meta device: {n_params:,} parameters, {n_bytes:,} bytes, no memory allocated")
    print(f"forward on prompt {result['prompt']}: logits {tuple(logits.shape)}, argmax {result['next_tokens']}")
    for failure in result["plugin_failures"]:
        print(f"warning: {failure}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffulex", description="diffulex-core: checkpoint loading for diffusion LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed plugins, their hooks and families, and every failure")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("demo", help="build a family's tiny default model and run it once")
    p.add_argument("--family", help="family name (default: the first installed, alphabetically)")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except DiffulexError as exc:
        print(f"diffulex: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
