"""The Kubernetes layer against the fake API server: configuration, errors, watches."""

from __future__ import annotations

from pathlib import Path

import pytest

from gpu_runners.errors import AlreadyExistsError, KubernetesError, QuotaExceededError
from gpu_runners.kube import KubeClient, WatchFeed, load_api_client
from gpu_runners.pod_spec import build_gpu_pod
from tests.fakes.kube_api import FakeKubernetes
from tests.runtime.fake_wiring import spawn_request

NAMESPACE = "github-runners"


def status(code: int, reason: str, message: str) -> dict[str, object]:
    return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
            "message": message, "reason": reason, "code": code}


def test_no_cluster_and_no_kubeconfig_is_an_error_naming_both_options(tmp_path: Path) -> None:
    with pytest.raises(KubernetesError) as error:
        load_api_client(environ={"KUBECONFIG": str(tmp_path / "missing")})

    assert "KUBERNETES_SERVICE_HOST unset" in str(error.value)
    assert "--kubeconfig" in str(error.value)


def test_refusals_name_the_verb_the_namespace_and_the_role_to_fix(
    fake_kube: FakeKubernetes, kube: KubeClient
) -> None:
    fake_kube.inject("POST", "/api/v1/namespaces/*/pods", 403, body=status(
        403, "Forbidden", 'pods is forbidden: User "system:serviceaccount:github-runners:'
        'base-runner" cannot create resource "pods" in API group "" in the namespace '
        '"github-runners"'))
    pod = build_gpu_pod(spawn_request().identity, spawn_request().pod, None)

    with pytest.raises(KubernetesError) as error:
        kube.create_pod(NAMESPACE, pod)

    assert str(error.value).startswith("not allowed to create pods in namespace github-runners")
    assert "the Role bound to the base runner's ServiceAccount (base-runner)" in str(error.value)
    assert error.value.status == 403


def test_quota_refusal_and_name_clash_are_told_apart(
    fake_kube: FakeKubernetes, kube: KubeClient
) -> None:
    request = spawn_request()
    pod = build_gpu_pod(request.identity, request.pod, None)
    fake_kube.inject("POST", "/api/v1/namespaces/*/pods", 403, body=status(
        403, "Forbidden", 'pods "gpu-123-1" is forbidden: exceeded quota: gpu-quota, requested: '
        "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=4, limited: "
        "requests.nvidia.com/gpu=4"))

    with pytest.raises(QuotaExceededError, match="exceeded quota: gpu-quota"):
        kube.create_pod(NAMESPACE, pod)
    kube.create_pod(NAMESPACE, pod)
    with pytest.raises(AlreadyExistsError, match='pods "gpu-123-1" already exists'):
        kube.create_pod(NAMESPACE, pod)


def test_reads_and_deletes_of_missing_objects_are_not_errors(kube: KubeClient) -> None:
    assert kube.read_pod(NAMESPACE, "gpu-9-9") is None
    assert kube.delete_pod(NAMESPACE, "gpu-9-9") is False
    assert kube.delete_secret(NAMESPACE, "gpu-9-9-jit") is False


def test_watch_feed_replays_the_current_state_after_its_history_expired(
    fake_kube: FakeKubernetes, kube: KubeClient
) -> None:
    request = spawn_request()
    kube.create_pod(NAMESPACE, build_gpu_pod(request.identity, request.pod, None))

    with WatchFeed(kube, NAMESPACE, window_seconds=1) as feed:
        feed.watch_pods("pod", field_selector="metadata.name=gpu-123-1")
        first = feed.get(timeout=5)
        fake_kube.expire_watch_history()  # the next watch from the old version gets 410 Gone
        replayed = None
        while replayed is None or replayed.event is None or replayed.event.type != "ADDED":
            replayed = feed.get(timeout=5)
            assert replayed is not None, "no event after the history expired"

    assert first is not None and first.event is not None and first.event.type == "ADDED"
    assert replayed.event.object.metadata.name == "gpu-123-1"
    watches = [r for r in fake_kube.requests if r.query.get("watch") == "true"]
    assert len(watches) >= 2
    assert "resourceVersion" not in watches[0].query  # first watch: current state, no list
    assert "resourceVersion" not in watches[-1].query  # after the 410: afresh


def test_watch_refused_by_rbac_is_reported_once_through_the_feed(
    fake_kube: FakeKubernetes, kube: KubeClient
) -> None:
    fake_kube.inject("GET", "/api/v1/namespaces/*/events", 403, body=status(
        403, "Forbidden", 'events is forbidden: cannot watch resource "events"'))

    with WatchFeed(kube, NAMESPACE) as feed:
        feed.watch_events("event", field_selector="involvedObject.name=gpu-1-1")
        item = feed.get(timeout=5)

    assert item is not None and item.error is not None
    assert str(item.error).startswith("not allowed to watch events in namespace github-runners")
