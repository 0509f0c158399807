"""reap against the fake servers: what a cancelled or crashed run left goes, live runs stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpu_runners.github_api import GitHubClient
from gpu_runners.kube import KubeClient
from gpu_runners.pod_spec import build_gpu_pod
from gpu_runners.progress import ProgressLog
from gpu_runners.reap import reap
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.runtime.fake_wiring import spawn_request

NAMESPACE = "github-runners"
NOW = datetime.now(UTC)


def gpu_pod(run_id: int, *, phase: str = "Running", reason: str | None = None,
            started: datetime = NOW, deadline_seconds: int = 6 * 3600) -> dict[str, Any]:
    """A pod as spawn creates it, in the given state."""
    request = spawn_request(run_id=run_id, max_runtime_seconds=deadline_seconds)
    pod: dict[str, Any] = build_gpu_pod(request.identity, request.pod, "nvidia-l4").model_dump(
        by_alias=True, exclude_none=True, mode="json"
    )
    pod["metadata"]["creationTimestamp"] = started.isoformat().replace("+00:00", "Z")
    pod["status"] = {"phase": phase, **({"reason": reason} if reason else {})}
    return pod


@pytest.fixture
def leftovers(fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> None:
    """A namespace and a runner list after some runs ended badly and others still run."""
    fake_kube.seed(
        gpu_pod(1, phase="Succeeded"),
        gpu_pod(2, phase="Failed", reason="DeadlineExceeded"),
        gpu_pod(3, phase="Pending", started=NOW - timedelta(hours=10), deadline_seconds=3600),
        gpu_pod(4),
        gpu_pod(5),
        gpu_pod(6),
    )
    fake_github.set_run_status(4, "completed", "cancelled")
    fake_github.set_run_status(5, "in_progress")
    # run 6: GitHub does not know it (404)
    fake_github.set_run_status(9, "completed", "success")
    fake_github.set_run_status(10, "queued")
    fake_github.add_runner("gpu-4-1", ["gpu-4-1"], status="online")
    fake_github.add_runner("gpu-5-1", ["gpu-5-1"], status="online", busy=True)
    fake_github.add_runner("gpu-9-1", ["gpu-9-1"], status="offline")
    fake_github.add_runner("gpu-10-1", ["gpu-10-1"], status="offline")
    fake_github.add_runner("gpu-11-1", ["gpu-11-1"], status="online")
    fake_github.add_runner("gpu-box", ["gpu"], status="offline")
    fake_github.add_runner("base-runner-7d9f", ["base-runner"], status="offline")


def pod_names(fake_kube: FakeKubernetes) -> list[str]:
    return [pod["metadata"]["name"] for pod in fake_kube.pods()]


@pytest.mark.usefixtures("leftovers")
def test_reap_removes_finished_expired_and_completed_runs_and_keeps_live_ones(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log)

    assert pod_names(fake_kube) == ["gpu-5-1", "gpu-6-1"]
    assert sorted(r["name"] for r in fake_github.runners.values()) == [
        "base-runner-7d9f", "gpu-10-1", "gpu-11-1", "gpu-5-1", "gpu-box",
    ]
    assert {(a.kind, a.name): a.reason for a in report.removed} == {
        ("pod", "gpu-1-1"): "finished (Succeeded)",
        ("pod", "gpu-2-1"): "finished (Failed: DeadlineExceeded)",
        ("pod", "gpu-3-1"): "past its deadline (started 10h00m ago, max runtime 1h00m)",
        ("pod", "gpu-4-1"): "workflow run 4 completed (cancelled)",
        ("registration", "gpu-4-1"): "its pod is reaped",
        ("registration", "gpu-9-1"): "offline, no pod",
    }
    assert {(a.name, a.reason) for a in report.kept} == {
        ("gpu-5-1", "run in_progress"), ("gpu-6-1", "run status unknown"),
    }
    assert report.failures == []
    assert log.lines[-1].endswith(
        "removed 4 of 6 pods and 2 of 5 runner registrations; kept 2 pods of runs in progress "
        "or unknown"
    )
    assert sum("removing pod " in line for line in log.lines) == 4


@pytest.mark.usefixtures("leftovers")
def test_reap_dry_run_reports_the_same_and_removes_nothing(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, dry_run=True)

    assert len(fake_kube.pods()) == 6
    assert len(fake_github.runners) == 7
    assert len(report.removed) == 6
    assert "would remove pod gpu-1-1: finished (Succeeded)" in "\n".join(log.lines)
    assert log.lines[-1].split("] ", 1)[1].startswith("would remove 4 of 6 pods and 2 of 5")
    assert fake_github.requests_to(r"/runners/\d+$", "DELETE") == []


def test_reap_lists_pods_page_by_page(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(*(gpu_pod(run_id, phase="Succeeded") for run_id in range(1, 6)))

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, page_size=2)

    lists = [r for r in fake_kube.requests
             if r.method == "GET" and r.path.endswith("/pods") and r.query.get("watch") != "true"]
    assert [r.query.get("limit") for r in lists] == ["2", "2", "2"]
    assert report.pods_seen == 5 and report.count("pod") == 5
    assert fake_kube.pods() == []


def test_reap_keeps_what_it_cannot_judge_when_github_fails(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(gpu_pod(5))
    fake_github.set_run_status(5, "completed", "success")
    fake_github.inject("GET", r"/actions/runs/5$", 503, times=10)

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log)

    assert pod_names(fake_kube) == ["gpu-5-1"]
    assert [failure.split(" (")[0] for failure in report.failures] == ["the status of run 5"]
