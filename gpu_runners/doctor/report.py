"""The doctor's results: one line per check, each failure with the one thing to do about it."""

from __future__ import annotations

import enum
import json
from dataclasses import dataclass, field


class Status(enum.Enum):
    """How a check ended. Only FAIL makes the exit code non-zero."""

    PASS = "pass"  # noqa: S105 - a check's outcome, not a password
    WARN = "warn"  # works now, but needs attention soon (e.g. a runner update due)
    FAIL = "fail"
    SKIP = "skip"  # could not be checked; `detail` says why


@dataclass(frozen=True)
class CheckResult:
    """One check's outcome.

    Attributes:
        check: What was checked, short and stable (scripts key on it).
        status: The outcome.
        detail: What was seen, one line.
        fix: For WARN and FAIL: the one thing to do, one line.
    """

    check: str
    status: Status
    detail: str
    fix: str = ""

    def __post_init__(self) -> None:
        if self.status in (Status.FAIL, Status.WARN) and not self.fix:
            raise ValueError(f"check {self.check!r}: a {self.status.value} needs its fix")


@dataclass(frozen=True)
class ColdStart:
    """Where one smoke pod's cold start went.

    Attributes:
        pool: The GPU pool's accelerator.
        stages: (stage, seconds since the pod was created), in the order reached.
        outcome: "passed", or why the pod did not get to run `nvidia-smi`.
        gpu: What `nvidia-smi` reported (name, driver, memory), if it ran.
    """

    pool: str
    stages: tuple[tuple[str, float], ...]
    outcome: str
    gpu: str = ""


@dataclass(frozen=True)
class Examination:
    """Everything one doctor run found."""

    results: tuple[CheckResult, ...]
    cold_starts: tuple[ColdStart, ...] = field(default_factory=tuple)

    @property
    def failed(self) -> bool:
        """Whether any check failed."""
        return any(result.status is Status.FAIL for result in self.results)

    @property
    def exit_code(self) -> int:
        """1 if any check failed, else 0."""
        return 1 if self.failed else 0


def render_table(examination: Examination) -> str:
    """The human report: a pass/fail table, the fixes under it, then the cold starts."""
    results = examination.results
    width = max((len(result.check) for result in results), default=5)
    lines = [f"{'STATUS':<6}  {'CHECK':<{width}}  DETAIL"]
    for result in results:
        lines.append(f"{result.status.value.upper():<6}  {result.check:<{width}}  {result.detail}")
    needing = [result for result in results if result.fix]
    if needing:
        lines += ["", "To fix:"]
        lines += [f"  {result.check}: {result.fix}" for result in needing]
    for cold in examination.cold_starts:
        lines += ["", f"Cold start of the {cold.pool} smoke pod: {cold.outcome}"]
        lines += [f"  {seconds:7.1f}s  {stage}" for stage, seconds in cold.stages]
        if cold.gpu:
            lines.append(f"  nvidia-smi: {cold.gpu}")
    failed = sum(result.status is Status.FAIL for result in results)
    lines += ["", f"{failed} check(s) failed." if failed else "Every check passed."]
    return "\n".join(lines) + "\n"


def render_json(examination: Examination) -> str:
    """The report for scripts: {"ok", "checks": [...], "cold_starts": [...]}."""
    document = {
        "ok": not examination.failed,
        "checks": [
            {"check": r.check, "status": r.status.value, "detail": r.detail, "fix": r.fix}
            for r in examination.results
        ],
        "cold_starts": [
            {
                "pool": cold.pool,
                "outcome": cold.outcome,
                "gpu": cold.gpu,
                "stages": [{"stage": stage, "seconds": round(seconds, 1)}
                           for stage, seconds in cold.stages],
            }
            for cold in examination.cold_starts
        ],
    }
    return json.dumps(document, indent=2) + "\n"

