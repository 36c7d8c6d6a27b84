"""The plugin author's test kit, also a pytest plugin (entry point ``pytest11``: ``diffulex``).

Helpers: ``isolated_plugins`` (only the plugins a test names, no entry points read),
``write_checkpoint`` (safetensors, one file or sharded with an index, from tensors or a model),
``write_lora_adapter`` (PEFT's adapter format), ``assert_clean_load`` (a strict load with every
tensor placed by the rule the test expects) and ``check_plugin`` (``diffulex check`` as a
function). Fixtures: ``diffulex_plugins``, ``diffulex_checkpoint`` and ``diffulex_lora_adapter``.

Importing this module costs nothing: torch and the loader are imported when a helper runs, and
the plugin defines fixtures only (no hooks, nothing autouse), so a pytest session that does not
ask for them runs exactly as without it.
"""

from __future__ import annotations

import contextlib
import fnmatch
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any

from diffulex_core.files.writer import write_checkpoint
from diffulex_core.lora.writer import write_lora_adapter

__all__ = ["assert_clean_load", "check_plugin", "isolated_plugins", "write_checkpoint", "write_lora_adapter"]


@contextlib.contextmanager
def isolated_plugins(**plugins: Any) -> Iterator[Any]:
    """Within the block, the process sees only ``plugins`` (``name=module_or_object``) and the
    core's built-in hooks: families, loads and tokenizers use them; no entry point is read. Yields
    the ``Plugins`` outcome (check ``.failures``: a plugin that fails to register is reported, not
    raised, as in discovery)."""
    from diffulex_core.plugins import plugins_from, using_plugins

    with using_plugins(plugins_from(plugins)) as outcome:
        yield outcome


def assert_clean_load(model: Any, checkpoint: str | Path, *, family: str | None = None,
                      rules: Mapping[str, str] | None = None, device: Any = "cpu", **load_kwargs: Any) -> Any:
    """Load ``checkpoint`` into ``model`` strictly and return the report; fail unless it is clean.

    Clean: nothing unexpected, missing, rejected or skipped, and, for each ``fnmatch`` pattern in
    ``rules``, every tensor it matches placed by that rule (``"packed_mapping"``, ``"exact"``,
    ``"module:<prefix>"``, ``"plugin:<name>"``, ``"packed_mapping:root"``; a pattern ending in
    ``*`` on the rule side matches a prefix). Tensors no pattern matches may use any rule.
    """
    from diffulex_core.errors import LoadPlanError
    from diffulex_core.loader import load_checkpoint

    is_meta = any(p.is_meta for p in model.parameters())
    try:
        report = load_checkpoint(model, checkpoint, family=family, device=device if is_meta else None, **load_kwargs)
    except LoadPlanError as exc:
        raise AssertionError(f"the load of {checkpoint} is not clean:\n{exc}") from None
    problems = [f"skipped {name}: {why}" for name, why in report.skipped.items()]
    for placement in report.placements:
        for pattern, rule in (rules or {}).items():
            if fnmatch.fnmatchcase(placement.name, pattern) and not fnmatch.fnmatchcase(placement.rule, rule):
                problems.append(f"{placement.name} was placed by rule {placement.rule!r} ({placement.kind} "
                                f"{placement.target}), not {rule!r} as {pattern!r} expects")
    for pattern in rules or {}:
        if not any(fnmatch.fnmatchcase(p.name, pattern) for p in report.placements):
            problems.append(f"rule pattern {pattern!r} matches no tensor of {checkpoint}")
    if problems:
        raise AssertionError(f"the load of {checkpoint} is not clean:\n  - " + "\n  - ".join(problems))
    return report


def check_plugin(name: str, **kwargs: Any) -> Any:
    """``diffulex check NAME`` as a function: the conformance result (``.ok``, ``.problems``)."""
    from diffulex_core.tools.check import check_plugin as check

    return check(name, **kwargs)


# --------------------------------------------------------------------------- pytest fixtures

try:
    import pytest
except ImportError:  # the helpers work without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def diffulex_plugins():
        """``diffulex_plugins(llada=diffulex_llada, mine=my_plugin)``: only these plugins for the rest
        of the test (see ``isolated_plugins``); returns the ``Plugins`` outcome."""
        with contextlib.ExitStack() as stack:
            yield lambda **plugins: stack.enter_context(isolated_plugins(**plugins))

    @pytest.fixture
    def diffulex_checkpoint(tmp_path):
        """``diffulex_checkpoint(tensors_or_model, shards=2, config={...})``: a checkpoint directory
        under the test's ``tmp_path`` (see ``write_checkpoint``)."""
        count = iter(range(1_000_000))
        return lambda source, **kwargs: write_checkpoint(tmp_path / f"checkpoint{next(count)}", source, **kwargs)

    @pytest.fixture
    def diffulex_lora_adapter(tmp_path):
        """``diffulex_lora_adapter({"model.layers.0.self_attn.q_proj": (A, B)}, lora_alpha=8)``: a
        PEFT-format adapter directory under ``tmp_path`` (see ``write_lora_adapter``)."""
        count = iter(range(1_000_000))
        return lambda adapters, **kwargs: write_lora_adapter(tmp_path / f"adapter{next(count)}", adapters, **kwargs)
