"""What ``diffulex check`` reports: one ``Check`` per line, gathered in a ``CheckResult``."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from diffulex_core.plugins.outcome import label_of

__all__ = ["FAIL", "MAX_LISTED", "NO_EXAMPLE", "PASS", "SKIP", "Check", "CheckResult", "describe_error", "listed"]

PASS, FAIL, SKIP = "pass", "fail", "skip"
NO_EXAMPLE = ("no example config: build, round trip not tested; "
              "add diffulex_family_examples or factory.example_config")
MAX_LISTED = 8  # names listed in one detail before "... and N more"


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
        return label_of(self.plugin, self.distribution, self.version)

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


def describe_error(exc: BaseException) -> str:
    return f"{type(exc).__name__}: {exc}"


def listed(names: list[str]) -> str:
    shown = ", ".join(names[:MAX_LISTED])
    return shown + (f", ... and {len(names) - MAX_LISTED} more" if len(names) > MAX_LISTED else "")
