"""The checks ``diffulex check`` runs per family: it builds on the meta device from its example
config, and a seeded random model round-trips through a two-shard checkpoint into a meta-built twin
(planned clean, loaded, the same weights and the same outputs, ``torch.equal``)."""

from __future__ import annotations

import tempfile
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from diffulex_core.plugin_api import FamilyExample
from diffulex_core.plugins.examples import as_example, factory_example
from diffulex_core.tools.check_results import (
    FAIL,
    MAX_LISTED,
    NO_EXAMPLE,
    PASS,
    SKIP,
    CheckResult,
    describe_error,
    listed,
)

if TYPE_CHECKING:
    from diffulex_core.plugins import Plugins

__all__ = ["check_family"]


def _meta_build(factory: Any, config: Mapping[str, Any]) -> Any:
    import torch

    with torch.device("meta"):
        return factory(dict(config))


def _empty_build(factory: Any, config: Mapping[str, Any]) -> Any:
    """The model as our tools build it for a load: parameters on meta, buffers computed."""
    from diffulex_core.empty_weights import init_empty_weights

    with init_empty_weights():
        return factory(dict(config))


def check_family(result: CheckResult, name: str, plugins: Plugins, given: tuple[str, Any] | None, seed: int) -> None:
    import torch

    entry = plugins.registry.entry(name)
    try:
        factory = plugins.registry.get(name)
    except Exception as exc:
        result.add(name, "factory", FAIL, str(exc))
        return
    result.add(name, "factory", PASS, entry.factory_name)
    try:
        found = given or factory_example(factory)
        if found is None:
            result.add(name, "example", SKIP, NO_EXAMPLE)
            return
        source_name, example = found[0], as_example(*found)
    except TypeError as exc:
        result.add(name, "example", FAIL, str(exc))
        return
    result.add(name, "example", PASS, f"from {source_name}")
    try:
        twin = _meta_build(factory, example.config)
    except Exception as exc:
        result.add(name, "build (meta)", FAIL, f"factory(config) on the meta device raised {describe_error(exc)}")
        return
    if not isinstance(twin, torch.nn.Module):
        result.add(name, "build (meta)", FAIL, f"factory(config) returned {type(twin).__name__}, not a torch.nn.Module")
        return
    off_meta = [n for n, t in (*twin.named_parameters(), *twin.named_buffers()) if not t.is_meta]
    if off_meta:
        result.add(name, "build (meta)", FAIL, f"factory(config) ignores the meta device: {listed(off_meta)} "
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
        return fail(f"factory(config) on the CPU raised {describe_error(exc)}")
    source.eval()
    with tempfile.TemporaryDirectory(prefix="diffulex-check-") as directory:
        try:
            tensors = example.to_checkpoint(source) if example.to_checkpoint is not None else source.state_dict()
            shards = min(2, max(1, len(tensors)))
            write_checkpoint(directory, tensors, shards=shards, config=example.config)
        except Exception as exc:
            how = "to_checkpoint(model)" if example.to_checkpoint is not None else "the state_dict"
            return fail(f"writing the checkpoint from {how} raised {describe_error(exc)}")
        try:
            report = plan_checkpoint(twin, directory, family=name).report
        except Exception as exc:
            return fail(f"planning the checkpoint into the meta-built model raised {describe_error(exc)}")
        if report.unexpected or report.missing or report.problems:
            return fail(_plan_problems(report))
        try:
            load_checkpoint(twin, directory, family=name, device="cpu")
        except LoadPlanError as exc:
            return fail(_plan_problems(exc.report))
        except Exception as exc:
            return fail(f"loading the checkpoint raised {describe_error(exc)}")
    twin.eval()
    wrong = _weights_differ(source, twin, report)
    if wrong:
        return fail(f"loaded weights differ from the source's: {'; '.join(wrong[:MAX_LISTED])}"
                    + (f"; ... and {len(wrong) - MAX_LISTED} more" if len(wrong) > MAX_LISTED else ""))
    result.add(name, "round trip", PASS, f"{len(report.placements)} checkpoint tensors in {shards} shard(s): "
                                         f"planned clean, loaded on cpu, every weight equals the source's")
    _check_outputs(result, name, example, source, twin)


def _plan_problems(report: Any) -> str:
    parts = [f"checkpoint tensor {n} is unexpected (nothing in the model takes it)" for n in report.unexpected]
    parts += [f"{n} is missing (no checkpoint tensor writes it)" for n in report.missing]
    parts += [p for p, kind in zip(report.problems, report.problem_kinds, strict=True)
              if kind not in ("unexpected", "missing")]
    more = f"; ... and {len(parts) - MAX_LISTED} more" if len(parts) > MAX_LISTED else ""
    return "the load plan is not clean: " + "; ".join(parts[:MAX_LISTED]) + more


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
        return [d for i, (e, a) in enumerate(zip(expected, actual, strict=True))
                for d in _differences(e, a, f"{where}[{i}]")]
    if hasattr(expected, "__dict__") and type(expected) is type(actual) and not callable(expected):
        return _differences(vars(expected), vars(actual), where)
    try:
        return [] if expected == actual else [f"{where} is {actual!r}, the source's {expected!r}"]
    except Exception as exc:  # an unverifiable output must not pass as equal
        return [f"{where} ({type(actual).__name__}) cannot be compared with the source's: {describe_error(exc)}"]


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
        result.add(name, "outputs", FAIL, f"making the example inputs raised {describe_error(exc)}")
        return
    try:
        with torch.no_grad():
            expected = source(*_copy(inputs))
            actual = twin(*_copy(inputs))
    except Exception as exc:
        result.add(name, "outputs", FAIL, f"the forward on the example inputs raised {describe_error(exc)}")
        return
    differences = _differences(expected, actual)
    if differences:
        buffers = dict(source.named_buffers())
        stale = [n for n, b in twin.named_buffers()
                 if n in buffers and (b.shape != buffers[n].shape or not torch.equal(b, buffers[n].to(b.device)))]
        hint = f"; buffers that differ from the source's: {listed(stale)}" if stale else ""
        result.add(name, "outputs", FAIL, "the loaded model's outputs differ from the source's though its weights "
                                          f"are equal: {'; '.join(differences[:MAX_LISTED])}{hint}")
        return
    shapes = ", ".join(str(list(t.shape)) for t in inputs if isinstance(t, torch.Tensor))
    result.add(name, "outputs", PASS, f"forward on inputs {shapes or '(no tensors)'}: outputs equal (torch.equal)")
