"""The spawn's step summary: where the cold start went (pure: a SpawnResult in, Markdown out)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from gpu_runners import contract
from gpu_runners.broker_api import SpawnResult
from gpu_runners.step_outputs import cold_start_rows, write_preemption_notes, write_spawn_outputs

#: A cold start on a new L4 node: the seconds from the start at which each stage was reached.
COLD = {"created": 0.4, "scale-up triggered": 9.1, "scheduled": 251.6, "image pulling": 252.0,
        "image pulled": 263.5, "container running": 264.2, "runner online": 270.9}


def result(**overrides: Any) -> SpawnResult:
    fields: dict[str, Any] = {
        "label": "gpu-123-1", "namespace": "github-runners", "pod_name": "gpu-123-1",
        "node": "gke-gpu-l4-7", "gpu_type": "nvidia-l4", "gpu_count": 1, "node_added": True,
        "reused": False, "seconds": 271.0, "stage_seconds": COLD, "image_pull": "streamed",
        **overrides}
    return SpawnResult(**fields)


def test_a_cold_start_on_a_new_node_is_split_into_its_phases() -> None:
    assert cold_start_rows(result()) == [
        ("New node", "yes, added by the autoscaler"),
        ("Scale-up decision", "8.7 s"),
        ("Node ready with GPU driver", "242.5 s"),
        ("Image pull", "11.5 s, streamed from Artifact Registry (GKE image streaming)"),
        ("Runner online", "6.7 s after its container started"),
    ]


def test_a_broker_that_read_the_new_node_splits_node_ready_from_driver_ready() -> None:
    split = {**COLD, "node ready": 181.3, "driver ready": 251.6}

    assert cold_start_rows(result(stage_seconds=split)) == [
        ("New node", "yes, added by the autoscaler"),
        ("Scale-up decision", "8.7 s"),
        ("Node ready", "172.2 s"),
        ("Driver ready", "70.3 s"),
        ("Image pull", "11.5 s, streamed from Artifact Registry (GKE image streaming)"),
        ("Runner online", "6.7 s after its container started"),
    ]


def test_a_result_without_the_node_stages_keeps_the_combined_row() -> None:
    # An older broker, or one that could not read the node: what it knows, as one row. The
    # wire's stage_seconds is an open mapping, so either side may know stages the other does
    # not.
    wire = result(stage_seconds={**COLD, "some later stage": 1.0}).to_json()

    rows = cold_start_rows(SpawnResult.from_json(wire))

    assert ("Node ready with GPU driver", "242.5 s") in rows
    assert not {"Node ready", "Driver ready"} & {name for name, _ in rows}


def test_a_warm_start_on_an_existing_node_with_the_image_cached() -> None:
    warm = {"created": 0.1, "scheduled": 0.3, "image pulling": 0.5, "image pulled": 0.6,
            "container running": 1.0, "runner online": 4.2}

    rows = cold_start_rows(result(node_added=False, stage_seconds=warm, image_pull="cached"))

    assert rows == [
        ("New node", "no, an existing node"),
        ("Scheduling", "0.2 s"),
        ("Image pull", "0.1 s, already on the node"),
        ("Runner online", "3.2 s after its container started"),
    ]


def test_an_image_pulled_in_full_says_so() -> None:
    (pull,) = [row for row in cold_start_rows(result(image_pull="pulled")) if row[0] ==
               "Image pull"]

    assert pull == ("Image pull", "11.5 s, pulled in full")


def test_the_summary_table_carries_the_phases(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"

    write_spawn_outputs(result(), {contract.ENV_STEP_SUMMARY: str(summary)})

    text = summary.read_text()
    assert "| Scale-up decision | 8.7 s |" in text
    assert "| Node ready with GPU driver | 242.5 s |" in text
    assert "| Image pull | 11.5 s, streamed from Artifact Registry (GKE image streaming) |" in text


def test_a_reused_runner_has_no_cold_start_to_explain(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"

    write_spawn_outputs(result(reused=True), {contract.ENV_STEP_SUMMARY: str(summary)})

    assert "Scale-up decision" not in summary.read_text()
    assert "| Ready after | 271.0 s (reused) |" in summary.read_text()


def test_a_preempted_runs_summary_has_a_row_per_preemption(tmp_path: Path) -> None:
    summary = tmp_path / "summary.md"
    line = ("preempted on attempt 1 (while starting: image pulling) on pool l4-spot: its node "
            "shut down (a Spot VM reclaimed); retried on pool l4-on-demand")
    write_spawn_outputs(result(preemptions=(line,)),
                        {contract.ENV_STEP_SUMMARY: str(summary)})
    assert f"| Preempted | {line} |" in summary.read_text()


def test_the_cleanup_tells_what_preemption_did_as_notices_and_a_table(
        tmp_path: Path, capsys: Any) -> None:
    summary = tmp_path / "summary.md"
    lines = ["preempted on attempt 1 (during the job) on pool l4-spot: its node shut down (a "
             "Spot VM reclaimed); retried on pool l4-on-demand", "100% of it | piped"]
    write_preemption_notes(lines, {contract.ENV_STEP_SUMMARY: str(summary)})

    printed = capsys.readouterr().out.splitlines()
    assert printed == [f"::notice title=GPU runner preempted::{lines[0]}",
                       "::notice title=GPU runner preempted::100%25 of it | piped"]
    text = summary.read_text()
    assert text.startswith("### GPU runner: Spot preemption\n\n| What happened |\n|---|\n")
    assert f"| {lines[0]} |" in text
    assert "| 100% of it \\| piped |" in text


def test_nothing_is_written_when_nothing_was_preempted(tmp_path: Path, capsys: Any) -> None:
    summary = tmp_path / "summary.md"
    write_preemption_notes([], {contract.ENV_STEP_SUMMARY: str(summary)})
    assert capsys.readouterr().out == ""
    assert not summary.exists()
