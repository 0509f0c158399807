"""The `list` table of GPU runners, as plain text; pure, so the thin client needs no cluster.

`listing` builds the rows from pods (in the broker), the client from the broker's
`RunnerView`s; both print them with `format_table`.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from gpu_runners.broker_api import RunnerView

COLUMNS = ("NAME", "RUN", "ATTEMPT", "PHASE", "NODE", "GPU TYPE", "AGE")


@dataclass(frozen=True)
class RunnerPodRow:
    """One GPU runner pod as `list` shows it."""

    name: str
    run_id: str
    attempt: str
    phase: str
    node: str
    gpu_type: str
    age: str


def format_age(seconds: float) -> str:
    """Age the way kubectl prints it: 45s, 12m, 3h, 2d."""
    seconds = max(0, int(seconds))
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds // size}{unit}"
    return f"{seconds}s"


def row_of_view(view: RunnerView) -> RunnerPodRow:
    """The table row of a runner as the broker describes it (0 and "" shown as unknown)."""
    return RunnerPodRow(
        name=view.name or "?",
        run_id=str(view.run_id) if view.run_id else "?",
        attempt=str(view.attempt) if view.attempt else "?",
        phase=view.phase or "Unknown",
        node=view.node or "<none>",
        gpu_type=view.gpu_type or "?",
        age=format_age(view.age_seconds),
    )


def format_table(rows: Sequence[RunnerPodRow]) -> str:
    """The rows as an aligned plain-text table with a header, like `kubectl get`."""
    cells = [COLUMNS] + [
        (r.name, r.run_id, r.attempt, r.phase, r.node, r.gpu_type, r.age) for r in rows
    ]
    widths = [max(len(row[i]) for row in cells) for i in range(len(COLUMNS))]
    return "\n".join(
        "   ".join(value.ljust(width) for value, width in zip(row, widths, strict=True)).rstrip()
        for row in cells
    )
