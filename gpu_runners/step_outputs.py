"""What `spawn` leaves for the rest of the workflow: step outputs and a step summary.

`$GITHUB_OUTPUT` gets `label=gpu-<run_id>-<attempt>` (what the GPU job puts in `runs-on`)
and `name`, `pod`, `namespace`, `node`; `$GITHUB_STEP_SUMMARY` gets a small Markdown table,
with where the cold start went: the autoscaler's decision, the new node turning Ready, its GPU
driver, the image (cached, streamed or pulled in full) and the runner connecting.
Outside Actions (no such variables) nothing is written.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path

from gpu_runners import contract
from gpu_runners.broker_api import SpawnResult


def _append(path: str, text: str) -> None:
    with Path(path).open("a", encoding="utf-8") as handle:
        handle.write(text)


def _cell(text: str) -> str:
    """A value made safe for one Markdown table cell."""
    return " ".join(text.split()).replace("|", "\\|")


#: How SpawnResult.image_pull reads in the summary.
_IMAGE_PULL_WORDS = {
    "cached": "already on the node",
    "streamed": "streamed from Artifact Registry (GKE image streaming)",
    "pulled": "pulled in full",
}


def _interval(stages: Mapping[str, float], start: str, end: str) -> float | None:
    if start in stages and end in stages:
        return max(0.0, stages[end] - stages[start])
    return None


def cold_start_rows(result: SpawnResult) -> list[tuple[str, str]]:
    """Where the seconds to "runner online" went, one row per phase that happened.

    The phases follow the pod, named as `doctor` names them: the autoscaler deciding on a node
    ("Scale-up decision": created -> scale-up triggered), the new node booting until its
    kubelet reports Ready ("Node ready": -> node ready, from the Node's Ready time), GKE
    installing the GPU driver until the device plugin advertises nvidia.com/gpu, which is when
    the scheduler binds the pod ("Driver ready": -> driver ready), the image (image pulling ->
    image pulled), and the runner connecting to GitHub (container running -> runner online).

    Shown as known: when the node could not be read (a broker without the `get nodes` right,
    or one older than the split) its two phases are one row, "Node ready with GPU driver"
    (scale-up triggered -> scheduled); on an existing node there are none, only the wait for
    "Scheduling". A result from an older broker, without the node stages, reads the same way.
    """
    stages = result.stage_seconds
    rows = [("New node", "yes, added by the autoscaler" if result.node_added
             else "no, an existing node")]
    decision = _interval(stages, "created", "scale-up triggered")
    if decision is not None:
        rows.append(("Scale-up decision", f"{decision:.1f} s"))
    node_ready = _interval(stages, "scale-up triggered", "node ready")
    driver_ready = _interval(stages, "node ready", "driver ready")
    combined = _interval(stages, "scale-up triggered", "scheduled")
    if node_ready is not None and driver_ready is not None:
        rows.append(("Node ready", f"{node_ready:.1f} s"))
        rows.append(("Driver ready", f"{driver_ready:.1f} s"))
    elif combined is not None:
        rows.append(("Node ready with GPU driver", f"{combined:.1f} s"))
    elif (waited := _interval(stages, "created", "scheduled")) is not None:
        rows.append(("Scheduling", f"{waited:.1f} s"))
    pull = _interval(stages, "image pulling", "image pulled")
    how = _IMAGE_PULL_WORDS.get(result.image_pull, "")
    if pull is not None or how:
        rows.append(("Image pull", ", ".join(
            part for part in (f"{pull:.1f} s" if pull is not None else "", how) if part)))
    online = _interval(stages, "container running", "runner online")
    if online is not None:
        rows.append(("Runner online", f"{online:.1f} s after its container started"))
    return rows


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
            *([] if result.reused else cold_start_rows(result)),
            *(("Preempted", line) for line in result.preemptions),
        ]
        table = "".join(f"| {_cell(key)} | {_cell(value)} |\n" for key, value in rows)
        _append(summary, f"### GPU runner\n\n| | |\n|---|---|\n{table}\n")


def write_preemption_notes(lines: Sequence[str], environ: Mapping[str, str]) -> None:
    """Tells what Spot preemption did to this run: a notice annotation per line (shown on the
    run's page) and a summary table, when Actions provides one. Nothing when `lines` is empty.
    """
    if not lines:
        return
    for line in lines:
        # Workflow command data: %, CR and LF escaped as the runner expects.
        data = line.replace("%", "%25").replace("\r", "%0D").replace("\n", "%0A")
        print(f"::notice title=GPU runner preempted::{data}", flush=True)
    summary = environ.get(contract.ENV_STEP_SUMMARY)
    if summary:
        table = "".join(f"| {_cell(line)} |\n" for line in lines)
        _append(summary, f"### GPU runner: Spot preemption\n\n| What happened |\n|---|\n"
                         f"{table}\n")


def write_failure_summary(command: str, reason: str, environ: Mapping[str, str]) -> None:
    """Appends a one-row failure table to the step summary, when Actions provides one."""
    summary = environ.get(contract.ENV_STEP_SUMMARY)
    if summary:
        _append(summary, f"### GPU runner\n\n| | |\n|---|---|\n| `{command}` failed | "
                         f"{_cell(reason)} |\n\n")
