"""``diffulex check PLUGIN``: does an installed plugin work with diffulex-core?

For the plugin named (entry-point or distribution name, normalised as ``DIFFULEX_PLUGINS`` is):

1. hooks: the plugin imports, its hookimpls fit the hook specs (names and arguments, as in
   discovery), no ``diffulex_*`` function lacks its marker, and discovery reported nothing for it;
2. families: each family it registers has a factory that imports and builds a
   ``torch.nn.Module`` on the meta device from the family's example config;
3. round trip, per family, on the CPU: a seeded model with random-normal weights is written as a
   two-shard safetensors checkpoint through the family's export, planned into a meta-built twin
   (nothing unexpected, missing or rejected), loaded, and must then hold exactly the source's
   weights and give exactly its outputs (``torch.equal``) on the example inputs.

Example configs come from the ``diffulex_family_examples`` hook (a config mapping or a
:class:`FamilyExample` per family) or from a factory's ``example_config`` attribute (and
optionally ``to_checkpoint``). A family without one is reported as skipped, with the reason:
that is not a failure.

Importing this module is cheap (no torch). Plugins import :class:`FamilyExample` from
``diffulex_core.plugin_api``.
"""

from __future__ import annotations

import json
import sys
import tempfile
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import argparse

    from torch import Tensor, nn

    from diffulex_core.plugins import PluginInfo, Plugins

from diffulex_core.plugin_api import FamilyExample

__all__ = ["Check", "CheckResult", "check_plugin", "cmd_check", "family_example", "family_export"]

PASS, FAIL, SKIP = "pass", "fail", "skip"
NO_EXAMPLE = ("no example config: build, round trip not tested; "
              "add diffulex_family_examples or factory.example_config")
_MAX_LISTED = 8  # names listed in one detail before "... and N more"


@dataclass(frozen=True)
class Check:
    """One line of the result: a check of the plugin (``family=None``) or of one of its families."""

    family: str | None
    name: str
    status: str  # "pass" | "fail" | "skip"
    detail: str

    def to_dict(self) -> dict[str, Any]:
        return {"family": self.family, "check": self.name, "status": self.status, "detail": self.detail}


@dataclass
class CheckResult:
    """What ``check_plugin`` found. ``ok``: no check failed (skips are not failures)."""

    plugin: str
    distribution: str | None
    version: str | None
    checks: list[Check] = field(default_factory=list)

    @property
    def label(self) -> str:
        dist = f"{self.distribution} {self.version}" if self.distribution else "no distribution"
        return f"plugin {self.plugin!r} ({dist})"

    @property
    def ok(self) -> bool:
        return not any(c.status == FAIL for c in self.checks)

    @property
    def problems(self) -> list[str]:
        """Each failure as one line naming the plugin, the family (if any), the check and what is wrong."""
        return [f"{self.label}{f', family {c.family!r}' if c.family is not None else ''}: {c.name}: {c.detail}"
                for c in self.checks if c.status == FAIL]

    def add(self, family: str | None, name: str, status: str, detail: str) -> None:
        lines = [line.strip() for line in str(detail).splitlines() if line.strip()]  # one line per check
        self.checks.append(Check(family, name, status, "; ".join(lines)))

    def to_dict(self) -> dict[str, Any]:
        return {
            "plugin": self.plugin, "distribution": self.distribution, "version": self.version, "ok": self.ok,
            "checks": [c.to_dict() for c in self.checks], "problems": self.problems,
        }


# --------------------------------------------------------------------------- helpers


def _error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def _listed(names: list[str]) -> str:
    shown = ", ".join(names[:_MAX_LISTED])
    return shown + (f", ... and {len(names) - _MAX_LISTED} more" if len(names) > _MAX_LISTED else "")


def _find(name: str) -> tuple[list[tuple[PluginInfo, Any]], list[PluginInfo]]:
    """(entry points matching ``name``, every installed plugin). An exact entry-point name wins over
    a distribution name, so a distribution holding several plugins can still name each."""
    from diffulex_core.plugins.discovery import installed_plugins, matches, normalize_name

    found = installed_plugins()
    wanted = normalize_name(name)
    exact = [pair for pair in found if normalize_name(pair[0].name) == wanted]
    return exact or [pair for pair in found if matches(pair[0], {wanted})], [info for info, _ in found]


def _discover() -> Plugins:
    """The process-wide outcome; under ``DIFFULEX_STRICT_PLUGINS=1`` with failures (which would raise
    on every use), a lenient discovery of the same plugins that the check installs for its duration."""
    from diffulex_core.errors import PluginLoadError
    from diffulex_core.plugins.discovery import discover, get_plugins

    try:
        return get_plugins()
    except PluginLoadError:
        return discover(strict=False)


def _conflict(plugins: Plugins, family: str) -> str:
    try:
        plugins.registry.entry(family)
    except Exception as exc:  # DuplicateFamilyError, naming every plugin that registers it
        return str(exc)
    return f"family {family!r} is registered by several plugins"


# --------------------------------------------------------------------------- plugin-level checks


def _check_hooks(result: CheckResult, info: PluginInfo, ep: Any) -> bool:
    """import and hooks; True when both pass."""
    import pluggy

    from diffulex_core.plugins.validation import hook_names, validate_plugin

    try:
        obj = ep.load()
    except Exception as exc:
        result.add(None, "import", FAIL, f"cannot import {info.value!r}: {_error(exc)}")
        result.add(None, "hooks", SKIP, "not checked: the plugin does not import")
        return False
    result.add(None, "import", PASS, f"imported {info.value!r}")
    try:
        validate_plugin(obj, info)
    except pluggy.PluginValidationError as exc:
        result.add(None, "hooks", FAIL, str(exc))
        return False
    except Exception as exc:  # an object pluggy cannot even inspect
        result.add(None, "hooks", FAIL, f"registering {info.value!r} with pluggy raised {_error(exc)}")
        return False
    names = hook_names(obj)
    result.add(None, "hooks", PASS, f"hookimpls fit the specs: {', '.join(names) or 'none'}")
    return True


def _check_discovery(result: CheckResult, info: PluginInfo, plugins: Plugins, hooks_ok: bool) -> bool:
    """What discovery said about this plugin; True when it is loaded (its families can be checked)."""
    from diffulex_core.plugins import ENV_ALLOW, ENV_BLOCK

    same = lambda other: (other.name, other.distribution) == (info.name, info.distribution)  # noqa: E731
    if any(same(p) for p in plugins.disabled):
        result.add(None, "discovery", FAIL, f"disabled in this environment by {ENV_ALLOW}/{ENV_BLOCK}: "
                                            f"nothing it provides is used; its families are not checked")
        return False
    # a family conflict is reported per family (for every plugin in it), below
    failures = [f for f in plugins.failures if same(f.plugin) and f.stage != "family_conflict"]
    if not hooks_ok:  # the import or hooks check above already says why discovery refused it
        failures = [f for f in failures if f.stage not in ("import", "validate")]
    for failure in failures:
        result.add(None, "discovery", FAIL, f"failed at {failure.stage}: {failure.message}")
    loaded = next((p for p in plugins.loaded if same(p)), None)
    if loaded is None:
        if not failures and hooks_ok:
            result.add(None, "discovery", FAIL, "discovery did not load it")
        result.add(None, "families", SKIP, "not checked: the plugin is not loaded (see the failure above)")
        return False
    if not failures:
        families = ", ".join(loaded.families) or "none"
        result.add(None, "discovery", PASS, f"loaded; usable families: {families}")
    return True


def _examples(result: CheckResult, info: PluginInfo, plugins: Plugins) -> dict[str, tuple[str, Any]]:
    """This plugin's own examples ``{family: (source, example)}``; its answers for families it does
    not own are problems. Other plugins' answers for its families are their problems, not used here."""
    from diffulex_core.plugins.hook_calls import plugin_answers

    owners = {e.name: e for e in plugins.registry.entries()}
    mine: dict[str, tuple[str, Any]] = {}
    try:
        answers = plugin_answers(plugins.manager, "diffulex_family_examples", info.name)
    except Exception as exc:
        result.add(None, "examples", FAIL, f"diffulex_family_examples failed: {exc}")
        answers = []
    for answer in answers:
        if not isinstance(answer, Mapping):
            result.add(None, "examples", FAIL, f"diffulex_family_examples returned {type(answer).__name__}, "
                                               f"expected a mapping {{family: config or FamilyExample}}")
            continue
        for family, example in answer.items():
            entry = owners.get(family)
            if entry is None and family in plugins.registry.conflicts():
                result.add(family, "examples", SKIP, f"family {family!r} is registered by several plugins and "
                                                     f"unusable (see its registration check); its example is not used")
            elif entry is None:
                known = ", ".join(sorted(owners)) or "(none)"
                result.add(family, "examples", FAIL, f"diffulex_family_examples answers for family {family!r}, "
                                                     f"which no plugin registers; known families: {known}")
            elif entry.owner != info.label:
                if entry.override:
                    result.add(family, "examples", SKIP, f"family {family!r} is overridden by {entry.owner}; "
                                                         f"this plugin's example for it is not used")
                else:
                    result.add(family, "examples", FAIL, f"diffulex_family_examples answers for family {family!r}, "
                                                         f"which {entry.owner} registers; answer for this "
                                                         f"plugin's own families only")
            else:
                mine[family] = ("diffulex_family_examples", example)
    return mine


# --------------------------------------------------------------------------- family-level checks


def _as_example(source: str, example: Any) -> FamilyExample:
    if isinstance(example, FamilyExample):
        return example
    if isinstance(example, Mapping):
        return FamilyExample(dict(example))
    raise TypeError(f"{source} gave {type(example).__name__}, expected a config mapping or a FamilyExample")


def _factory_example(factory: Any) -> tuple[str, Any] | None:
    config = getattr(factory, "example_config", None)
    if config is None:
        return None
    if not isinstance(config, Mapping):
        raise TypeError(f"factory.example_config is {type(config).__name__}, expected a mapping")
    return "factory.example_config", FamilyExample(config, to_checkpoint=getattr(factory, "to_checkpoint", None))


def family_example(name: str) -> tuple[str, FamilyExample] | None:
    """Family ``name``'s example as its plugin declares it for this check (its own
    ``diffulex_family_examples`` answer, else ``factory.example_config``) and where it came from;
    None when it has none. ``diffulex demo`` builds its tiny model from it."""
    from diffulex_core.errors import FamilyError
    from diffulex_core.plugins import get_plugins
    from diffulex_core.plugins.hook_calls import plugin_answers

    plugins = get_plugins()
    entry = plugins.registry.entry(name)
    owner = next((p.name for p in plugins.loaded if p.label == entry.owner), None)
    try:
        for answer in plugin_answers(plugins.manager, "diffulex_family_examples", owner) if owner else ():
            if name in answer:
                source = f"the diffulex_family_examples answer of {entry.owner}"
                return source, _as_example("diffulex_family_examples", answer[name])
        found = _factory_example(plugins.registry.get(name))
    except TypeError as exc:  # an answer of the wrong type: a plugin bug, named
        raise FamilyError(f"family {name!r} of {entry.owner}: its example is unusable: {exc}") from None
    return None if found is None else (f"{entry.factory_name}.example_config", found[1])


def family_export(name: str) -> Callable[[nn.Module], Mapping[str, Tensor]] | None:
    """Family ``name``'s export to checkpoint names, as its plugin declares it for this check (its
    own ``diffulex_family_examples`` answer, else ``factory.to_checkpoint``); None: the model's
    ``state_dict`` names are its checkpoint names."""
    from diffulex_core.registry import get_family

    found = family_example(name)
    return found[1].to_checkpoint if found is not None else getattr(get_family(name), "to_checkpoint", None)


def _meta_build(factory: Any, config: Mapping[str, Any]) -> Any:
    import torch

    with torch.device("meta"):
        return factory(dict(config))


def _empty_build(factory: Any, config: Mapping[str, Any]) -> Any:
    """The model as our tools build it for a load: parameters on meta, buffers computed."""
    from diffulex_core.empty_weights import init_empty_weights

    with init_empty_weights():
        return factory(dict(config))


def _check_family(result: CheckResult, name: str, plugins: Plugins, given: tuple[str, Any] | None, seed: int) -> None:
    import torch

    entry = plugins.registry.entry(name)
    try:
        factory = plugins.registry.get(name)
    except Exception as exc:
        result.add(name, "factory", FAIL, str(exc))
        return
    result.add(name, "factory", PASS, entry.factory_name)
    try:
        found = given or _factory_example(factory)
        if found is None:
            result.add(name, "example", SKIP, NO_EXAMPLE)
            return
        source_name, example = found[0], _as_example(*found)
    except TypeError as exc:
        result.add(name, "example", FAIL, str(exc))
        return
    result.add(name, "example", PASS, f"from {source_name}")
    try:
        twin = _meta_build(factory, example.config)
    except Exception as exc:
        result.add(name, "build (meta)", FAIL, f"factory(config) on the meta device raised {_error(exc)}")
        return
    if not isinstance(twin, torch.nn.Module):
        result.add(name, "build (meta)", FAIL, f"factory(config) returned {type(twin).__name__}, not a torch.nn.Module")
        return
    off_meta = [n for n, t in (*twin.named_parameters(), *twin.named_buffers()) if not t.is_meta]
    if off_meta:
        result.add(name, "build (meta)", FAIL, f"factory(config) ignores the meta device: {_listed(off_meta)} "
                                               f"not on meta (build on the current default device)")
        return
    count = sum(p.numel() for p in twin.parameters())
    result.add(name, "build (meta)", PASS, f"{type(twin).__qualname__}, {count:,} parameters")
    with torch.random.fork_rng(devices=[]):
        _round_trip(result, name, factory, example, _empty_build(factory, example.config), seed)


def _round_trip(result: CheckResult, name: str, factory: Any, example: FamilyExample, twin: Any, seed: int) -> None:
    import torch

    from diffulex_core.errors import LoadPlanError
    from diffulex_core.files.writer import write_checkpoint
    from diffulex_core.loader import load_checkpoint, plan_checkpoint

    fail = lambda detail: result.add(name, "round trip", FAIL, detail)  # noqa: E731
    torch.manual_seed(seed)
    try:
        source = factory(dict(example.config))
        with torch.no_grad():
            for p in source.parameters():
                if p.is_floating_point():
                    p.normal_()  # random everywhere: a tensor in the wrong place changes the weights
    except Exception as exc:
        return fail(f"factory(config) on the CPU raised {_error(exc)}")
    source.eval()
    with tempfile.TemporaryDirectory(prefix="diffulex-check-") as directory:
        try:
            tensors = example.to_checkpoint(source) if example.to_checkpoint is not None else source.state_dict()
            shards = min(2, max(1, len(tensors)))
            write_checkpoint(directory, tensors, shards=shards, config=example.config)
        except Exception as exc:
            how = "to_checkpoint(model)" if example.to_checkpoint is not None else "the state_dict"
            return fail(f"writing the checkpoint from {how} raised {_error(exc)}")
        try:
            report = plan_checkpoint(twin, directory, family=name).report
        except Exception as exc:
            return fail(f"planning the checkpoint into the meta-built model raised {_error(exc)}")
        if report.unexpected or report.missing or report.problems:
            return fail(_plan_problems(report))
        try:
            load_checkpoint(twin, directory, family=name, device="cpu")
        except LoadPlanError as exc:
            return fail(_plan_problems(exc.report))
        except Exception as exc:
            return fail(f"loading the checkpoint raised {_error(exc)}")
    twin.eval()
    wrong = _weights_differ(source, twin, report)
    if wrong:
        return fail(f"loaded weights differ from the source's: {'; '.join(wrong[:_MAX_LISTED])}"
                    + (f"; ... and {len(wrong) - _MAX_LISTED} more" if len(wrong) > _MAX_LISTED else ""))
    result.add(name, "round trip", PASS, f"{len(report.placements)} checkpoint tensors in {shards} shard(s): "
                                         f"planned clean, loaded on cpu, every weight equals the source's")
    _check_outputs(result, name, example, source, twin)


def _plan_problems(report: Any) -> str:
    parts = [f"checkpoint tensor {n} is unexpected (nothing in the model takes it)" for n in report.unexpected]
    parts += [f"{n} is missing (no checkpoint tensor writes it)" for n in report.missing]
    parts += [p for p, kind in zip(report.problems, report.problem_kinds) if kind not in ("unexpected", "missing")]
    more = f"; ... and {len(parts) - _MAX_LISTED} more" if len(parts) > _MAX_LISTED else ""
    return "the load plan is not clean: " + "; ".join(parts[:_MAX_LISTED]) + more


def _weights_differ(source: Any, twin: Any, report: Any) -> list[str]:
    """Each state_dict entry of ``twin`` that is not bit-equal to the source's, with the checkpoint
    tensors the plan put there."""
    import torch

    fed: dict[str, list[str]] = {}
    for p in report.placements:
        if p.target:
            shard = f" (shard {p.shard_id!r})" if p.shard_id is not None else ""
            fed.setdefault(p.target, []).append(f"{p.name}{shard}")
    want, got = source.state_dict(), twin.state_dict()
    wrong = []
    for key, expected in want.items():
        actual = got.get(key)
        if actual is None:
            wrong.append(f"{key} is absent from the loaded model")
            continue
        if actual.shape != expected.shape or actual.dtype != expected.dtype:
            wrong.append(f"{key} is {_kind(actual)}, the source's {_kind(expected)}")
        elif not torch.equal(actual, expected):
            sources = fed.get(key)
            origin = f"written from checkpoint tensor(s) {', '.join(sources)}" if sources else "no checkpoint tensor"
            rows = ""
            if actual.dim() >= 1:
                bad = (actual != expected).reshape(actual.shape[0], -1).any(dim=1).nonzero().flatten().tolist()
                rows = f"; rows {_ranges(bad)} of {actual.shape[0]} differ"
            wrong.append(f"{key} does not hold the source's values ({origin}{rows})")
    return wrong


def _kind(tensor: Any) -> str:
    return f"{tensor.dtype}{list(tensor.shape)}"


def _ranges(indices: list[int]) -> str:
    spans, start = [], None
    for i, index in enumerate(indices):
        if start is None:
            start = index
        if i + 1 == len(indices) or indices[i + 1] != index + 1:
            spans.append(f"{start}" if start == index else f"{start}-{index}")
            start = None
    return ", ".join(spans)


def _default_inputs(model: Any) -> tuple:
    import torch

    embedding = next((m for m in model.modules() if isinstance(m, torch.nn.Embedding)), None)
    if embedding is None:
        raise LookupError("the model has no nn.Embedding to take token ids from; "
                          "give FamilyExample(inputs=...) to test its outputs")
    generator = torch.Generator().manual_seed(0)
    return (torch.randint(0, embedding.num_embeddings, (2, 8), generator=generator),)


def _copy(value: Any) -> Any:
    import torch

    if isinstance(value, torch.Tensor):
        return value.clone()
    if isinstance(value, (list, tuple)):
        copies = [_copy(v) for v in value]
        return type(value)(*copies) if hasattr(value, "_fields") else type(value)(copies)
    if isinstance(value, dict):
        return {k: _copy(v) for k, v in value.items()}
    return value


def _differences(expected: Any, actual: Any, where: str = "output") -> list[str]:
    import torch

    if isinstance(expected, torch.Tensor) or isinstance(actual, torch.Tensor):
        if not (isinstance(expected, torch.Tensor) and isinstance(actual, torch.Tensor)):
            return [f"{where} is {type(actual).__name__}, the source's {type(expected).__name__}"]
        if expected.shape != actual.shape or expected.dtype != actual.dtype:
            return [f"{where} is {_kind(actual)}, the source's {_kind(expected)}"]
        same = expected.isnan() == actual.isnan() if expected.is_floating_point() else None
        if torch.equal(expected, actual) or (same is not None and bool(same.all())
                                             and torch.equal(expected.nan_to_num(), actual.nan_to_num())):
            return []
        diff = (expected.double() - actual.double()).abs()
        count = int((expected != actual).sum())
        return [f"{where} differs in {count} of {expected.numel()} elements (max abs difference "
                f"{float(diff.nan_to_num(float('inf')).max()):.3g})"]
    if isinstance(expected, Mapping) and isinstance(actual, Mapping):
        if set(expected) != set(actual):
            return [f"{where} has keys {sorted(map(str, actual))}, the source's {sorted(map(str, expected))}"]
        return [d for k in expected for d in _differences(expected[k], actual[k], f"{where}[{k!r}]")]
    if isinstance(expected, (list, tuple)) and isinstance(actual, (list, tuple)):
        if len(expected) != len(actual):
            return [f"{where} has {len(actual)} items, the source's {len(expected)}"]
        return [d for i, (e, a) in enumerate(zip(expected, actual)) for d in _differences(e, a, f"{where}[{i}]")]
    if hasattr(expected, "__dict__") and type(expected) is type(actual) and not callable(expected):
        return _differences(vars(expected), vars(actual), where)
    try:
        return [] if expected == actual else [f"{where} is {actual!r}, the source's {expected!r}"]
    except Exception as exc:  # an unverifiable output must not pass as equal
        return [f"{where} ({type(actual).__name__}) cannot be compared with the source's: {_error(exc)}"]


def _check_outputs(result: CheckResult, name: str, example: FamilyExample, source: Any, twin: Any) -> None:
    import torch

    try:
        inputs = example.inputs(source) if example.inputs is not None else _default_inputs(source)
        if not isinstance(inputs, tuple):
            raise TypeError(f"inputs(model) returned {type(inputs).__name__}, expected a tuple of forward arguments")
    except LookupError as exc:
        result.add(name, "outputs", SKIP, f"not tested: {exc}")
        return
    except Exception as exc:
        result.add(name, "outputs", FAIL, f"making the example inputs raised {_error(exc)}")
        return
    try:
        with torch.no_grad():
            expected = source(*_copy(inputs))
            actual = twin(*_copy(inputs))
    except Exception as exc:
        result.add(name, "outputs", FAIL, f"the forward on the example inputs raised {_error(exc)}")
        return
    differences = _differences(expected, actual)
    if differences:
        buffers = dict(source.named_buffers())
        stale = [n for n, b in twin.named_buffers()
                 if n in buffers and (b.shape != buffers[n].shape or not torch.equal(b, buffers[n].to(b.device)))]
        hint = f"; buffers that differ from the source's: {_listed(stale)}" if stale else ""
        result.add(name, "outputs", FAIL, "the loaded model's outputs differ from the source's though its weights "
                                          f"are equal: {'; '.join(differences[:_MAX_LISTED])}{hint}")
        return
    shapes = ", ".join(str(list(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
    result.add(name, "outputs", PASS, f"forward on inputs {shapes or '(no tensors)'}: outputs equal (torch.equal)")


# --------------------------------------------------------------------------- the doors


def check_plugin(name: str, *, seed: int = 0) -> CheckResult:
    """Check the installed plugin ``name`` (entry-point or distribution name): its hooks, the
    families it registers and a checkpoint round trip per family. Never raises for what the plugin
    does wrong: every problem is a failed check in the result (``.ok``, ``.problems``)."""
    from diffulex_core.plugins import using_plugins

    matches, installed = _find(name)
    if len(matches) != 1:
        result = CheckResult(name, None, None)
        if not matches:
            listed = ", ".join(f"{i.name} ({i.distribution or 'no distribution'} {i.version or ''})".replace(" )", ")")
                               for i in installed) or "(none)"
            result.add(None, "installed", FAIL, f"no plugin named {name!r} is installed; installed plugins: {listed}")
        else:
            listed = ", ".join(i.name for i, _ in matches)
            result.add(None, "installed", FAIL, f"distribution {name!r} provides several plugins ({listed}); "
                                                f"check each by its entry-point name")
        return result
    info, ep = matches[0]
    result = CheckResult(info.name, info.distribution, info.version)
    hooks_ok = _check_hooks(result, info, ep)
    plugins = _discover()
    with using_plugins(plugins):  # the loads below see the very outcome checked here
        if not _check_discovery(result, info, plugins, hooks_ok):
            return result
        families = [e.name for e in plugins.registry.entries() if e.owner == info.label]
        for family, entries in sorted(plugins.registry.conflicts().items()):
            if any(e.owner == info.label for e in entries):
                result.add(family, "registration", FAIL, _conflict(plugins, family))
        examples = _examples(result, info, plugins)
        if not families and not any(c.name == "registration" for c in result.checks):
            result.add(None, "families", SKIP, "the plugin registers no model family: nothing to build")
        for family in families:
            try:
                _check_family(result, family, plugins, examples.get(family), seed)
            except Exception as exc:  # a bug of ours, or plugin code failing where we did not expect it
                result.add(family, "family", FAIL, f"checking the family raised {_error(exc)}")
    return result


def _print_table(result: CheckResult) -> None:
    rows = [(c.family or "-", c.name, c.status.upper(), c.detail) for c in result.checks]
    widths = [max([len(h), *(len(r[i]) for r in rows)]) for i, h in enumerate(("family", "check", "status"))]
    dist = f"{result.distribution} {result.version}" if result.distribution else "not installed"
    print(f"diffulex check {result.plugin} ({dist})")
    for row in [("family", "check", "status", "detail"), *rows]:
        print("  " + "  ".join(cell.ljust(w) for cell, w in zip(row[:3], widths)) + "  " + row[3])
    counts = {s: sum(c.status == s for c in result.checks) for s in (PASS, FAIL, SKIP)}
    summary = f"{counts[PASS]} passed, {counts[FAIL]} failed, {counts[SKIP]} skipped"
    if result.ok:
        print(f"OK: {summary}")
    else:
        print(f"FAILED: {summary}")
        for problem in result.problems:
            print(f"  - {problem}")


def cmd_check(args: argparse.Namespace) -> int:
    """``diffulex check PLUGIN [--json]``: print the checks (a table, or JSON); 1 if any failed."""
    from diffulex_core.errors import PluginWarning

    with warnings.catch_warnings():  # discovery's warnings repeat what the checks report
        warnings.simplefilter("ignore", PluginWarning)
        result = check_plugin(args.plugin)
    if getattr(args, "json", False):
        json.dump(result.to_dict(), sys.stdout, indent=2)
        sys.stdout.write("\n")
    else:
        _print_table(result)
    return 0 if result.ok else 1
