"""reap against the fake servers: what a cancelled or crashed run left goes, live runs stay."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from gpu_runners import contract
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


def at_now() -> datetime:
    """The clock reap reads: the moment the seeded ages count from, however slow the run."""
    return NOW


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
    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now)

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
        "removed 4 of 6 pods and 2 of 5 runner registrations; kept 2 pods"
    )
    assert sum("removing pod " in line for line in log.lines) == 4


@pytest.mark.usefixtures("leftovers")
def test_reap_dry_run_reports_the_same_and_removes_nothing(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now, dry_run=True)

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

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now, page_size=2)

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

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now)

    assert pod_names(fake_kube) == ["gpu-5-1"]
    assert [failure.split(" (")[0] for failure in report.failures] == [
        "could not read the status of run 5"
    ]


# --- runs the broker is working on --------------------------------------------------------------


def jit_secret(pod: dict[str, Any]) -> dict[str, Any]:
    """The JIT Secret of a seeded pod, owned by it as spawn makes it."""
    metadata = pod["metadata"]
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {
            "name": f"{metadata['name']}{contract.JIT_SECRET_SUFFIX}",
            "labels": dict(metadata["labels"]),
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": metadata["name"],
                                 "uid": metadata["uid"]}],
        },
        "data": {contract.JIT_SECRET_KEY: "ZW5jb2RlZA=="},
    }


def deletions(fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> list[str]:
    kube = [r.path for r in fake_kube.requests if r.method == "DELETE"]
    github = [r.path for r in fake_github.requests if r.method == "DELETE"]
    return kube + github


def test_reap_touches_nothing_of_a_run_with_an_operation_in_flight(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    # Each would go by one rule: finished, expired, waiting for a missing Secret, run completed.
    finished, expired, secretless, completed = fake_kube.seed(
        gpu_pod(1, phase="Succeeded"),
        gpu_pod(2, phase="Pending", started=NOW - timedelta(hours=10), deadline_seconds=3600),
        gpu_pod(3, phase="Pending", started=NOW - timedelta(minutes=30)),
        gpu_pod(4),
    )
    fake_kube.seed(jit_secret(finished), jit_secret(completed))
    fake_github.set_run_status(4, "completed", "cancelled")
    fake_github.set_run_status(8, "completed", "success")
    fake_github.add_runner("gpu-1-1", ["gpu-1-1"], status="offline")
    fake_github.add_runner("gpu-8-1", ["gpu-8-1"], status="offline")  # no pod, run completed

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now,
                  busy_runs={(1, 1), (2, 1), (3, 1), (4, 1), (8, 1)})

    assert pod_names(fake_kube) == ["gpu-1-1", "gpu-2-1", "gpu-3-1", "gpu-4-1"]
    assert sorted(secret["metadata"]["name"] for secret in fake_kube.secrets()) == [
        "gpu-1-1-jit", "gpu-4-1-jit",
    ]
    assert sorted(r["name"] for r in fake_github.runners.values()) == ["gpu-1-1", "gpu-8-1"]
    assert deletions(fake_kube, fake_github) == []
    assert report.removed == []
    assert {(a.name, a.reason) for a in report.kept} == {
        (f"gpu-{run}-1", "an operation on its run is in flight") for run in (1, 2, 3, 4)
    }
    assert (expired["metadata"]["name"], secretless["metadata"]["name"]) == ("gpu-2-1", "gpu-3-1")


def test_a_run_that_becomes_busy_while_github_is_asked_keeps_its_pod(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(gpu_pod(4))
    fake_github.set_run_status(4, "completed", "cancelled")
    busy: set[tuple[int, int]] = set()

    def spawn_begins(request: Any) -> None:
        if request.path.endswith("/actions/runs/4"):
            busy.add((4, 1))  # the broker starts an operation on run 4 meanwhile

    fake_github.on_request(spawn_begins)

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now,
                  busy_runs=busy)

    assert pod_names(fake_kube) == ["gpu-4-1"]
    assert report.removed == []
    assert [(a.name, a.reason) for a in report.kept] == [
        ("gpu-4-1", "an operation on its run began")
    ]


def test_a_busy_attempt_protects_only_that_attempt(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(gpu_pod(1, phase="Succeeded"), gpu_pod(2, phase="Succeeded"))

    reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now,
         busy_runs={(1, 2), (2, 1)})

    assert pod_names(fake_kube) == ["gpu-2-1"]


# --- a pod whose Secret never came --------------------------------------------------------------


def test_a_pod_left_waiting_for_a_secret_that_never_came_is_reaped_with_its_registration(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    # A broker killed between creating the pod and its Secret: the kubelet would hold the pod,
    # and its GPU node, until the deadline.
    moment = datetime.now(UTC).replace(microsecond=0)
    fake_kube.seed(gpu_pod(3, phase="Pending", started=moment - timedelta(minutes=12)))
    fake_github.set_run_status(3, "in_progress")
    fake_github.add_runner("gpu-3-1", ["gpu-3-1"], status="offline")

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=lambda: moment)

    assert pod_names(fake_kube) == []
    assert fake_github.runners == {}
    ((kind, name, reason), registration) = [(a.kind, a.name, a.reason) for a in report.removed]
    assert (kind, name) == ("pod", "gpu-3-1")
    assert reason == "waited 12m00s for its JIT config Secret gpu-3-1-jit, which does not exist"
    assert (registration[0], registration[2]) == ("registration", "its pod is reaped")
    assert report.failures == []


def test_pods_with_their_secret_or_within_the_grace_or_started_are_kept_and_cost_one_read(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    with_secret, _young, _started = fake_kube.seed(
        gpu_pod(1, phase="Pending", started=NOW - timedelta(minutes=30)),
        gpu_pod(2, phase="Pending", started=NOW - timedelta(minutes=5)),
        gpu_pod(3, phase="Running", started=NOW - timedelta(minutes=30)),
    )
    fake_kube.seed(jit_secret(with_secret))
    for run_id in (1, 2, 3):
        fake_github.set_run_status(run_id, "in_progress")

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now)

    assert pod_names(fake_kube) == ["gpu-1-1", "gpu-2-1", "gpu-3-1"]
    assert report.removed == []
    # Only the pod past the grace and not started was worth asking about its Secret.
    reads = [r.path for r in fake_kube.requests if r.method == "GET" and "/secrets" in r.path]
    assert reads == [f"/api/v1/namespaces/{NAMESPACE}/secrets/gpu-1-1-jit"]


def test_the_secret_grace_is_the_callers_to_choose(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(gpu_pod(2, phase="Pending", started=NOW - timedelta(minutes=5)))
    fake_github.set_run_status(2, "in_progress")

    reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now,
         secret_grace=timedelta(minutes=2))

    assert pod_names(fake_kube) == []


def test_a_reaped_pod_takes_its_secret_with_it(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    (pod,) = fake_kube.seed(gpu_pod(1, phase="Succeeded"))
    fake_kube.seed(jit_secret(pod))

    reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now)

    # The garbage collector removes the Secret of a deleted owner; reap never lists Secrets.
    assert fake_kube.secrets() == []
    assert [r.path for r in fake_kube.requests if "/secrets" in r.path] == []


# --- GitHub down or answering nonsense ----------------------------------------------------------


def test_with_github_down_what_needs_only_kubernetes_is_still_reaped(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(
        gpu_pod(1, phase="Succeeded"),
        gpu_pod(2, phase="Pending", started=NOW - timedelta(hours=10), deadline_seconds=3600),
        gpu_pod(3, phase="Pending", started=NOW - timedelta(minutes=30)),
        gpu_pod(4),
    )
    fake_github.set_run_status(4, "completed", "success")
    fake_github.add_runner("gpu-9-1", ["gpu-9-1"], status="offline")
    fake_github.inject("*", r".*", 503, times=1000)

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now)

    assert pod_names(fake_kube) == ["gpu-4-1"]
    assert {a.name for a in report.removed} == {"gpu-1-1", "gpu-2-1", "gpu-3-1"}
    assert {(a.name, a.reason) for a in report.kept} == {("gpu-4-1", "GitHub not asked")}
    assert [f.split(" (")[0] for f in report.failures] == [
        "could not list the runner registrations"
    ]
    assert report.failures[0].endswith("; skipped the rules that need GitHub")
    assert report.registrations_seen is None
    assert [r["name"] for r in fake_github.runners.values()] == ["gpu-9-1"]
    # One listing tried (with its retries); no run lookup spent on a GitHub that is down.
    assert fake_github.requests_to(r"/actions/runs/") == []
    assert log.lines[-1].endswith(
        "removed 3 of 4 pods; runner registrations not listed; kept 1 pods; 1 failures"
    )


def test_one_malformed_runner_in_githubs_answer_is_skipped_alone(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(gpu_pod(1, phase="Succeeded"))
    leftover = fake_github.add_runner("gpu-9-1", ["gpu-9-1"], status="offline")
    fake_github.set_run_status(9, "completed", "success")
    fake_github.inject("GET", r"/actions/runners$", 200, body={
        "total_count": 3,
        "runners": [
            {"name": "gpu-7-1", "status": "offline", "busy": False, "labels": []},  # no id
            "gpu-8-1",
            dict(leftover),
        ],
    })

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now)

    assert pod_names(fake_kube) == []
    assert fake_github.runners == {}
    assert {(a.kind, a.name) for a in report.removed} == {
        ("pod", "gpu-1-1"), ("registration", "gpu-9-1"),
    }
    assert report.registrations_seen == 1
    assert report.failures == [
        "skipped one runner registration: GitHub's answer to GET "
        "/repos/acme/models/actions/runners holds a malformed runner: the entry named "
        "'gpu-7-1' has no integer id",
        "skipped one runner registration: GitHub's answer to GET "
        "/repos/acme/models/actions/runners holds a malformed runner: an entry is a JSON str, "
        "not an object",
    ]
    assert [line.split("] ", 1)[1] for line in log.lines[-3:-1]] == report.failures


def test_a_runner_list_that_is_not_a_list_skips_the_github_rules(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(gpu_pod(1, phase="Succeeded"), gpu_pod(4))
    fake_github.inject("GET", r"/actions/runners$", 200, body={"message": "hello"})

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now)

    assert pod_names(fake_kube) == ["gpu-4-1"]
    assert report.failures == [
        "could not list the runner registrations (GitHub's answer to GET "
        "/repos/acme/models/actions/runners holds no list of runners); skipped the rules that "
        "need GitHub"
    ]


def test_a_malformed_run_status_keeps_that_runs_pod_and_reaps_the_rest(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.seed(gpu_pod(4), gpu_pod(5))
    fake_github.set_run_status(4, "completed", "success")
    fake_github.set_run_status(5, "completed", "success")
    fake_github.inject("GET", r"/actions/runs/5$", 200, body=["not", "a", "run"])

    report = reap(namespace=NAMESPACE, kube=kube, github=github, log=log, now=at_now)

    assert pod_names(fake_kube) == ["gpu-5-1"]
    assert report.failures == [
        "could not read the status of run 5 (GitHub's answer about run 5 of acme/models has no "
        "status string); its objects are kept"
    ]
