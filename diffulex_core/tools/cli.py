"""The ``diffulex`` command line: ``plugins``, ``plan``, ``load``, ``check`` and ``demo``."""

from __future__ import annotations

import argparse
import json
import sys
import traceback
import warnings
from typing import Any, Sequence

from diffulex_core.errors import DiffulexError

__all__ = ["build_parser", "main"]


def _print_json(data: Any) -> None:
    json.dump(data, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def cmd_plugins(args: argparse.Namespace) -> int:
    from diffulex_core.plugins import get_plugins

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
        print(f"  {info.name}  {info.distribution} {info.version}  disabled by "
              "DIFFULEX_PLUGINS/DIFFULEX_DISABLE_PLUGINS")
    for failure in plugins.failures:
        print(f"  FAILED {failure.describe()}")
    return 0


def _demo_arguments(parser: argparse.ArgumentParser) -> None:
    from diffulex_core.tools.demo import add_arguments  # the standard library only: cheap

    add_arguments(parser)


def cmd_demo(args: argparse.Namespace) -> int:
    """The whole path on a tiny random model (or ``--checkpoint``): see ``diffulex_core.tools.demo``."""
    from diffulex_core.loader import check_device
    from diffulex_core.tools.demo import main

    check_device(args.device)  # before anything is built
    return main(args)


def _failure(args: argparse.Namespace, exc: BaseException) -> dict[str, Any]:
    """The one JSON object a failed ``--json`` command prints, so a caller never parses stderr."""
    return {"ok": False, "command": args.command, "error": {"type": type(exc).__name__, "message": str(exc)}}


def _problems(report, outcome: str) -> dict[str, Any]:
    """A report's problems as the error a strict load raises for them (``--json`` of a plan, or of
    a ``--no-strict`` load, that found some)."""
    from diffulex_core.loading.applying import problem_message

    return {"type": "LoadPlanError", "message": problem_message(report, outcome=outcome)}


def _model_info(family: str, model, device: str, dtype_note: str) -> dict[str, Any]:
    """The model a command built: its dtype and where that came from, as the text output says."""
    built, _, source = dtype_note.removesuffix(")").partition(" (from ")
    dtype = next((str(p.dtype).removeprefix("torch.") for p in model.parameters() if p.is_floating_point()), None)
    return {"family": family, "class": type(model).__qualname__, "device": device, "dtype": dtype,
            "dtype_source": source if built != "the family default" else f"the family default ({source})"}


def _transform(p) -> str:
    """`` [transform: NAME]`` for a placement whose tensor goes through a transform (`` [transform]``
    for a lambda), so it is not mistaken for a plain copy."""
    if not getattr(p, "transform", None):
        return ""
    return " [transform]" if p.transform == "<lambda>" else f" [transform: {p.transform}]"


def _print_report(report, *, show_tensors: bool) -> None:
    if show_tensors:
        for p in report.placements:
            target = p.target or p.note or "-"
            shard = f" [shard {p.shard_id!r}]" if p.shard_id is not None else ""
            note = f"; {p.note}" if p.note and p.target else ""
            print(f"  {p.name}  {p.dtype}{list(p.shape)}  -> {p.kind} {target}{shard}{_transform(p)}  ({p.rule}{note})")
    for note in report.notes:
        print(f"note: {note}")
    for problem in report.problems:
        print(f"problem: {problem}")
    for module, adapters in (report.lora.modules if report.lora is not None else {}).items():
        for a in adapters:
            shard = f" [shard {a['shard_id']!r}]" if a["shard_id"] is not None else ""
            print(f"  lora {a['adapter']} -> {module}{shard}  r={a['r']} alpha={a['lora_alpha']:g} "
                  f"scaling={a['scaling']:.4g}")
    print(report.summary())


def cmd_plan(args: argparse.Namespace) -> int:
    """Build the family's model on the meta device and plan the load from headers alone."""
    from diffulex_core.loader import plan_checkpoint
    from diffulex_core.loading.family_models import build_for_checkpoint

    model, dtype_note = build_for_checkpoint(args.family, args.checkpoint, "meta", None)
    report = plan_checkpoint(model, args.checkpoint, family=args.family).report
    if args.json:
        data = {"model": _model_info(args.family, model, "meta", dtype_note), **report.to_dict()}
        if not report.ok:  # what a strict load of this checkpoint would raise
            data["error"] = _problems(report, "a load would fail")
        _print_json(data)
    else:
        print(f"plan for {args.checkpoint} into family {args.family} ({type(model).__qualname__}, meta device, "
              f"{dtype_note}):")
        _print_report(report, show_tensors=True)
    return 0 if report.ok else 1


def cmd_load(args: argparse.Namespace) -> int:
    """Build the family's model on the meta device, then load (materializing it on --device)."""
    from diffulex_core.errors import LoadPlanError
    from diffulex_core.loader import check_device, load_checkpoint
    from diffulex_core.loading.family_models import build_for_checkpoint
    from diffulex_core.lora.adapters import prepare_lora

    if args.merge and not args.lora:
        print("diffulex: --merge needs --lora DIR", file=sys.stderr)
        return 2
    check_device(args.device)
    model, dtype_note = build_for_checkpoint(args.family, args.checkpoint, "meta", args.dtype)
    info = _model_info(args.family, model, args.device, dtype_note)
    # The adapter is checked (and its adapters added, on the meta device) before the base load.
    prepared = prepare_lora(model, args.lora, merge=args.merge) if args.lora else None
    try:
        report = load_checkpoint(model, args.checkpoint, family=args.family, device=args.device,
                                 strict=not args.no_strict)
    except LoadPlanError as exc:
        if args.json:
            _print_json({"model": info, **exc.report.to_dict(), **_failure(args, exc)})
        print(f"diffulex: LoadPlanError: {exc}", file=sys.stderr)
        return 1
    if prepared is not None:
        report.lora = prepared.apply()
    if args.json:
        data = {"model": info, **report.to_dict()}
        if not report.ok:
            data["error"] = _problems(report, "the rest was loaded (--no-strict)")
        _print_json(data)
    else:
        print(f"{args.family} model built on {args.device} in {dtype_note}")
        _print_report(report, show_tensors=False)
    return 0 if report.ok else 1


def cmd_check(args: argparse.Namespace) -> int:
    """``diffulex check PLUGIN [--json]``: hooks, and per family a meta build and a checkpoint round
    trip, printed as a table or JSON; 1 if any check failed."""
    from diffulex_core.errors import PluginWarning
    from diffulex_core.tools.check import check_plugin

    with warnings.catch_warnings():  # discovery's warnings repeat what the checks report
        warnings.simplefilter("ignore", PluginWarning)
        result = check_plugin(args.plugin)
    if getattr(args, "json", False):
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_check_table(result)
    return 0 if result.ok else 1


def _print_check_table(result: Any) -> None:
    from diffulex_core.tools.check_results import FAIL, PASS, SKIP

    rows = [(c.family or "-", c.name, c.status.upper(), c.detail) for c in result.checks]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("family", "check", "status"))]
    dist = f"{result.distribution} {result.version}" if result.distribution else "not installed"
    print(f"diffulex check {result.plugin} ({dist})")
    for row in [("family", "check", "status", "detail"), *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths, strict=True)) + "  " + row[3])
    counts = {s: sum(c.status == s for c in result.checks) for s in (PASS, FAIL, SKIP)}
    summary = f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped"
    if result.ok:
        print(f"OK: {summary}")
    else:
        print(f"FAILED: {summary}")
        for problem in result.problems:
            print(f"  - {problem}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="diffulex", description="diffulex-core: checkpoint loading for diffusion LMs")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("plugins", help="list installed plugins, their hooks and families, and every failure")
    p.add_argument("--json", action="store_true", help="print JSON")
    p.set_defaults(func=cmd_plugins)
    p = sub.add_parser("demo", help="the whole path on a tiny random model: checkpoint, plan, load, LoRA, tokenizer, "
                                    "diffusion decoding, metrics (or on --checkpoint DIR --family NAME)")
    _demo_arguments(p)
    p.set_defaults(func=cmd_demo)
    p = sub.add_parser("check", help="check an installed plugin: its hooks, and per family a meta build and a "
                                     "checkpoint round trip")
    p.add_argument("plugin", help="the plugin's entry-point or distribution name (see `diffulex plugins`)")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    p.set_defaults(func=cmd_check)
    p = sub.add_parser("plan", help="plan a load from headers alone: every tensor's destination and rule")
    p.add_argument("checkpoint", help="checkpoint file or directory")
    p.add_argument("--family", required=True, help="model family (see `diffulex plugins`)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_plan)
    p = sub.add_parser("load", help="load a checkpoint into the family's model and print the report")
    p.add_argument("checkpoint", help="checkpoint file or directory")
    p.add_argument("--family", required=True, help="model family (see `diffulex plugins`)")
    p.add_argument("--device", default="cpu", help="where the parameters go (default: cpu)")
    p.add_argument("--dtype", help="parameter dtype, e.g. bfloat16 (default: the checkpoint's: config.json "
                                  "dtype/torch_dtype, else its tensors')")
    p.add_argument("--no-strict", action="store_true", help="load what fits and report the rest instead of failing")
    p.add_argument("--lora", metavar="DIR", help="a PEFT LoRA adapter directory to load on top (checked first)")
    p.add_argument("--merge", action="store_true", help="with --lora: merge the adapters into the weights")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=cmd_load)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    """Run one command. A failure is a message on stderr and status 1 (no traceback for our typed
    errors); with ``--json`` it is also one JSON object on stdout, whatever raised (a bad device
    fails inside torch), so a caller never has to parse stderr."""
    args = build_parser().parse_args(argv)
    as_json = getattr(args, "json", False)
    try:
        return args.func(args)
    except Exception as exc:
        if not (as_json or isinstance(exc, DiffulexError)):
            raise  # not ours and not asked for JSON: the traceback is the useful report
        if not isinstance(exc, DiffulexError):
            traceback.print_exc()  # on stderr: stdout stays one JSON object
        print(f"diffulex: {type(exc).__name__}: {exc}", file=sys.stderr)
        if as_json:
            _print_json(_failure(args, exc))
        return 1
