"""What `spawn` leaves for the rest of the workflow: step outputs and a step summary.

`$GITHUB_OUTPUT` gets `label=gpu-<run_id>-<attempt>` (what the GPU job puts in `runs-on`)
and `name`, `pod`, `namespace`, `node`; `$GITHUB_STEP_SUMMARY` gets a small Markdown table.
Outside Actions (no such variables) nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path

from gpu_runners import contract
from gpu_runners.broker_api import SpawnResult


def _append(path: str, text: str) -> None:
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(text)


def _cell(text: str) -> str:
    """A value made safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


def write_spawn_outputs(result: SpawnResult, environ: Mapping[str, str]) -> None:
    """Appends the spawn's step outputs and summary table to the files Actions names.

    Args:
        result: The started runner.
        environ: The process environment (GITHUB_OUTPUT, GITHUB_STEP_SUMMARY).
    """
    output = environ.get(contract.ENV_GITHUB_OUTPUT)
    if output:
        values = {
            "label": result.label,
            "name": result.label,
            "pod": result.pod_name,
            "namespace": result.namespace,
            "node": result.node or "",
        }
        _append(output, "".join(f"{key}={value}\n" for key, value in values.items()))
    summary = environ.get(contract.ENV_STEP_SUMMARY)
    if summary:
        rows = [
            ("Runner label", f"`{result.label}`"),
            ("Pod", f"`{result.namespace}/{result.pod_name}`"),
            ("GPUs", f"{result.gpu_count} x {result.gpu_type}"),
            ("Node", (result.node or "?") + (" (added by the autoscaler)" if result.node_added
                                             else "")),
            ("Ready after", f"{result.seconds:.1f} s" + (" (reused)" if result.reused else "")),
        ]
        table = "".join(f"| {_cell(key)} | {_cell(value)} |\n" for key, value in rows)
        _append(summary, f"### GPU runner\n\n| | |\n|---|---|\n{table}\n")


def write_failure_summary(command: str, reason: str, environ: Mapping[str, str]) -> None:
    """Appends a one-row failure table to the step summary, when Actions provides one."""
    summary = environ.get(contract.ENV_STEP_SUMMARY)
    if summary:
        _append(summary, f"### GPU runner\n\n| | |\n|---|---|\n| `{command}` failed | "
                         f"{_cell(reason)} |\n\n")
