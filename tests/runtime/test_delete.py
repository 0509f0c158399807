"""delete against the fake servers: this run's objects go, nothing else is touched."""

from __future__ import annotations

from typing import Any

from gpu_runners import contract
from gpu_runners.delete import delete_run
from gpu_runners.github_api import GitHubClient
from gpu_runners.kube import KubeClient
from gpu_runners.pod_spec import build_gpu_pod
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import RunIdentity
from tests.fakes.github_api import FakeGitHub, RecordedRequest
from tests.fakes.kube_api import FakeKubernetes
from tests.runtime.fake_wiring import spawn_request, wait_until

NAMESPACE = "github-runners"


def seed_run_objects(fake_kube: FakeKubernetes, fake_github: FakeGitHub, run_id: int,
                     attempt: int, *, phase: str = "Running") -> None:
    """A run's pod (as spawn builds it), its Secret and its registration, stored as they are."""
    request = spawn_request(run_id=run_id, attempt=attempt)
    pod: dict[str, Any] = build_gpu_pod(request.identity, request.pod, "nvidia-l4").model_dump(
        by_alias=True, exclude_none=True, mode="json"
    )
    pod["status"] = {"phase": phase}
    (stored,) = fake_kube.seed(pod)
    identity = request.identity
    fake_kube.seed({
        "kind": "Secret",
        "metadata": {
            "name": identity.secret_name,
            "labels": stored["metadata"]["labels"],
            "ownerReferences": [{"apiVersion": "v1", "kind": "Pod", "name": identity.pod_name,
                                 "uid": stored["metadata"]["uid"]}],
        },
        "data": {"jitconfig": "ZW5jb2RlZA=="},
    })
    fake_github.add_runner(identity.runner_name, [identity.runner_name], status="offline")


def names(objects: list[dict[str, Any]]) -> list[str]:
    return [obj["metadata"]["name"] for obj in objects]


def test_delete_removes_this_runs_pod_secret_and_registration_only(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    seed_run_objects(fake_kube, fake_github, 77, 1)
    seed_run_objects(fake_kube, fake_github, 77, 2)  # the same run's re-run: not this attempt
    seed_run_objects(fake_kube, fake_github, 78, 1)  # another run
    identity = RunIdentity("acme/models", 77, 1)

    report = delete_run(identity, namespace=NAMESPACE, kube=kube, github=github, log=log)

    assert (report.pods, report.registrations) == (["gpu-77-1"], ["gpu-77-1"])
    wait_until(lambda: names(fake_kube.pods()) == ["gpu-77-2", "gpu-78-1"],
               what="the deleted pod to terminate")
    assert names(fake_kube.secrets()) == ["gpu-77-2-jit", "gpu-78-1-jit"]
    assert sorted(r["name"] for r in fake_github.runners.values()) == ["gpu-77-2", "gpu-78-1"]
    assert log.lines[-1].endswith("deleted runner registration gpu-77-1 (id 1)")


def test_delete_never_touches_a_pod_without_the_managed_by_label(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    # Someone's hand-made pod with the same run labels, but not created by gpu_runners.
    fake_kube.seed({"kind": "Pod", "metadata": {"name": "gpu-77-1-manual", "labels": {
        contract.LABEL_RUN_ID: "77", contract.LABEL_RUN_ATTEMPT: "1"}},
        "spec": {"containers": [{"name": "c", "image": "busybox"}]}})

    report = delete_run(RunIdentity("acme/models", 77, 1), namespace=NAMESPACE, kube=kube,
                        github=github, log=log)

    assert report.nothing_found
    assert names(fake_kube.pods()) == ["gpu-77-1-manual"]


def test_delete_of_what_is_already_gone_succeeds_and_says_so(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    report = delete_run(RunIdentity("acme/models", 77, 1), namespace=NAMESPACE, kube=kube,
                        github=github, log=log)

    assert report.nothing_found
    assert log.lines[-1].endswith(
        "nothing left of gpu-77-1: pod, secret and registration are gone"
    )


def test_delete_waits_for_a_busy_runner_to_stop_before_deregistering_it(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    runner = fake_github.add_runner("gpu-77-1", ["gpu-77-1"], status="online", busy=True)

    def job_stops_after_first_refusal(request: RecordedRequest) -> None:
        if request.method == "DELETE" and len(fake_github.requests_to("/runners/", "DELETE")) == 2:
            fake_github.set_runner_status("gpu-77-1", "offline")  # the pod's runner has exited

    fake_github.on_request(job_stops_after_first_refusal)

    report = delete_run(RunIdentity("acme/models", 77, 1), namespace=NAMESPACE, kube=kube,
                        github=github, log=log, sleep=lambda seconds: None)

    assert report.registrations == ["gpu-77-1"]
    assert fake_github.runners == {}
    deletes = fake_github.requests_to(f"/actions/runners/{runner['id']}$", "DELETE")
    assert len(deletes) == 2
    assert any("is finishing a job; waiting to deregister it" in line for line in log.lines)


def test_delete_removes_a_leftover_secret_whose_pod_is_gone(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    identity = RunIdentity("acme/models", 77, 1)
    fake_kube.seed({"kind": "Secret", "metadata": {
        "name": identity.secret_name, "labels": identity.selector_labels()}})

    report = delete_run(identity, namespace=NAMESPACE, kube=kube, github=github, log=log)

    assert (report.pods, report.secrets, report.registrations) == ([], ["gpu-77-1-jit"], [])
    assert fake_kube.secrets() == []
