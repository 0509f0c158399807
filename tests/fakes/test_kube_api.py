"""The fake Kubernetes API answers the official client as a real API server would.

Every test drives the fake through `kubernetes.client.CoreV1Api` configured by
`config.load_kube_config` from the kubeconfig the fake writes, and `kubernetes.watch.Watch`, so
the client's own serialization, deserialization and HTTP paths run against it. Tests read the
client's models through `to_dict()` (the models' attribute names, snake_case): every field is
optional in the models, and the dict keeps the assertions short.
"""

from __future__ import annotations

import json
import math
import re
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any, Protocol, cast

import pytest
import urllib3
from kubernetes import client, config, watch

from gpu_runners.contract import (
    DEFAULT_NAMESPACE,
    GKE_ACCELERATOR_LABEL,
    GPU_RESOURCE,
    GPU_TAINT_KEY,
    JIT_MOUNT_DIR,
    JIT_SECRET_KEY,
    LABEL_MANAGED_BY,
    MANAGED_BY,
    NODE_GPU_LABEL,
    PSA_ENFORCE_LABEL,
    PSA_LEVEL,
    RUNNER_UID,
)
from tests.fakes.kube_api import (
    RUNNER_START_LINES,
    FakeKubernetes,
    FakeNode,
    FakeNodePool,
    PodScript,
    parse_label_selector,
)
from tests.harness.kubernetes_labels import (
    INVALID_KEYS,
    INVALID_VALUES,
    VALID_KEYS,
    VALID_VALUES,
)

NS = DEFAULT_NAMESPACE
IMAGE = "ghcr.io/acme/runner:1.0"
Obj = dict[str, Any]
MakeFake = Callable[..., FakeKubernetes]


class Model(Protocol):
    def to_dict(self) -> Obj: ...


def attrs(model: Model) -> Obj:
    """A client model as a dict of its attributes (nested models included)."""
    return model.to_dict()


def names(listing: Model) -> list[str]:
    """The object names in a list response, in the order the server sent them."""
    return [item["metadata"]["name"] for item in attrs(listing)["items"]]


def api_for(fake: FakeKubernetes) -> client.CoreV1Api:
    """A CoreV1Api configured from the fake's kubeconfig (without touching global config)."""
    assert fake.kubeconfig_path is not None
    configuration = client.Configuration()
    config.load_kube_config(
        config_file=str(fake.kubeconfig_path), client_configuration=configuration
    )
    return client.CoreV1Api(client.ApiClient(configuration))


@pytest.fixture
def core(fake_kube: FakeKubernetes) -> client.CoreV1Api:
    return api_for(fake_kube)


def runner_pod_json(
    name: str,
    *,
    gpus: int = 0,
    accelerator: str | None = None,
    labels: dict[str, str] | None = None,
    deadline: int | None = None,
    secret_volume: str | None = None,
) -> Obj:
    """A pod the restricted Pod Security level admits; a GPU pod selects and tolerates GPUs."""
    container: Obj = {
        "name": "runner",
        "image": IMAGE,
        "securityContext": {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}},
    }
    spec: Obj = {
        "restartPolicy": "Never",
        "automountServiceAccountToken": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUNNER_UID,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
    }
    if gpus:
        container["resources"] = {"limits": {GPU_RESOURCE: str(gpus)}}
        spec["nodeSelector"] = {NODE_GPU_LABEL: "true"}
        spec["tolerations"] = [{"key": GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    if accelerator:
        spec.setdefault("nodeSelector", {})[GKE_ACCELERATOR_LABEL] = accelerator
    if deadline is not None:
        spec["activeDeadlineSeconds"] = deadline
    if secret_volume:
        spec["volumes"] = [{"name": "jit", "secret": {"secretName": secret_volume}}]
        container["volumeMounts"] = [{"name": "jit", "mountPath": "/jit", "readOnly": True}]
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels or {}},
        "spec": spec,
    }


def as_pod(body: Obj) -> client.V1Pod:
    pod = client.V1Pod.from_dict(body)
    assert pod is not None
    return pod


def runner_pod(name: str, **options: Any) -> client.V1Pod:
    return as_pod(runner_pod_json(name, **options))


def secret_json(name: str, labels: dict[str, str] | None = None, **metadata: Any) -> Obj:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "labels": labels or {}, **metadata},
        "stringData": {"jitconfig": "opaque"},
    }


def secret(name: str, labels: dict[str, str] | None = None, **metadata: Any) -> client.V1Secret:
    model = client.V1Secret.from_dict(secret_json(name, labels, **metadata))
    assert model is not None
    return model


def owner(pod: Obj) -> list[Obj]:
    """ownerReferences naming `pod`, as gpu_runners sets them on a JIT config Secret."""
    metadata = pod["metadata"]
    return [{"apiVersion": "v1", "kind": "Pod", "name": metadata["name"], "uid": metadata["uid"]}]


def watch_pod(
    core: client.CoreV1Api, name: str, until: Callable[[Obj], bool], timeout: int = 5
) -> list[Obj]:
    """The pod's states as a watch sees them, up to the first one satisfying `until`."""
    seen: list[Obj] = []
    stream = watch.Watch()
    for event in stream.stream(
        core.list_namespaced_pod,
        NS,
        field_selector=f"metadata.name={name}",
        timeout_seconds=timeout,
    ):
        seen.append(attrs(event["object"]))
        if until(seen[-1]):
            stream.stop()
            return seen
    phases = [pod["status"]["phase"] for pod in seen]
    raise AssertionError(f"pod {name} never reached the awaited state; phases seen: {phases}")


def pod_events(core: client.CoreV1Api, pod: str) -> list[Obj]:
    """The pod's events, in creation order."""
    listing = attrs(core.list_namespaced_event(NS, field_selector=f"involvedObject.name={pod}"))
    return sorted(listing["items"], key=lambda e: int(e["metadata"]["resource_version"]))


def watch_events(
    core: client.CoreV1Api, pod: str, until_reason: str, timeout: int = 5
) -> list[Obj]:
    """The pod's events in creation order, once one with `until_reason` has been recorded."""
    stream = watch.Watch()
    for event in stream.stream(
        core.list_namespaced_event,
        NS,
        field_selector=f"involvedObject.kind=Pod,involvedObject.name={pod}",
        timeout_seconds=timeout,
    ):
        if event["object"].reason == until_reason:
            stream.stop()
            return pod_events(core, pod)
    raise AssertionError(f"no {until_reason} event for pod {pod}")


def reasons(events: list[Obj]) -> list[str]:
    return [event["reason"] for event in events]


def status_of(error: client.ApiException) -> Obj:
    """The Kubernetes Status object an API error carried."""
    status: Obj = json.loads(error.body or "null")
    assert status["kind"] == "Status" and status["status"] == "Failure"
    assert status["code"] == error.status
    return status


def phase_is(phase: str) -> Callable[[Obj], bool]:
    return lambda pod: bool(pod["status"]["phase"] == phase)


running = phase_is("Running")


# --- CRUD, errors and object metadata ----------------------------------------------------------


def test_secret_round_trip_through_create_get_list_and_delete(core: client.CoreV1Api) -> None:
    created = attrs(core.create_namespaced_secret(NS, secret("jit-1", {"run": "1"})))

    assert created["type"] == "Opaque"
    assert created["data"] == {"jitconfig": "b3BhcXVl"}  # stringData stored base64-encoded
    assert created["string_data"] is None
    uid = created["metadata"]["uid"]
    assert uid and created["metadata"]["creation_timestamp"] is not None
    assert attrs(core.read_namespaced_secret("jit-1", NS))["metadata"]["uid"] == uid
    assert names(core.list_namespaced_secret(NS)) == ["jit-1"]
    status = core.delete_namespaced_secret("jit-1", NS)  # the client returns this Status as a dict
    assert isinstance(status, dict)
    assert status["status"] == "Success"
    assert status["details"] == {"name": "jit-1", "kind": "secrets", "uid": uid}
    with pytest.raises(client.ApiException) as missing:
        core.read_namespaced_secret("jit-1", NS)
    assert missing.value.status == 404
    assert status_of(missing.value)["reason"] == "NotFound"
    assert status_of(missing.value)["message"] == 'secrets "jit-1" not found'


def test_creating_a_taken_name_is_409_already_exists(core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("jit-1"))

    with pytest.raises(client.ApiException) as taken:
        core.create_namespaced_secret(NS, secret("jit-1"))

    assert taken.value.status == 409
    assert status_of(taken.value)["reason"] == "AlreadyExists"
    assert status_of(taken.value)["message"] == 'secrets "jit-1" already exists'


def test_a_request_hook_after_sees_the_object_applied_and_runs_once(
    fake_kube: FakeKubernetes, core: client.CoreV1Api,
) -> None:
    seen: list[tuple[str, str, list[str]]] = []
    fake_kube.on_request("POST", r"/api/v1/namespaces/[^/]+/secrets", lambda method, path: (
        seen.append((method, path, [s["metadata"]["name"] for s in fake_kube.secrets()]))))

    core.create_namespaced_secret(NS, secret("jit-1"))
    core.create_namespaced_secret(NS, secret("jit-2"))

    assert seen == [("POST", f"/api/v1/namespaces/{NS}/secrets", ["jit-1"])]


def test_a_request_hook_before_that_raises_leaves_the_request_unapplied(
    fake_kube: FakeKubernetes, core: client.CoreV1Api,
) -> None:
    def refuse(method: str, path: str) -> None:
        raise ConnectionAbortedError(f"{method} {path}")

    fake_kube.on_request("POST", r"/api/v1/namespaces/[^/]+/secrets", refuse, after=False)

    with pytest.raises(client.ApiException) as failed:
        core.create_namespaced_secret(NS, secret("jit-1"))

    assert failed.value.status == 500
    assert fake_kube.secrets() == []
    fake_kube.errors.clear()  # the raised callback is reported there, as the test intends


def test_deleting_a_missing_pod_is_404_not_found(core: client.CoreV1Api) -> None:
    with pytest.raises(client.ApiException) as missing:
        core.delete_namespaced_pod("gpu-9-1", NS)

    assert missing.value.status == 404
    assert status_of(missing.value)["message"] == 'pods "gpu-9-1" not found'


def test_creating_in_a_namespace_that_does_not_exist_is_404(core: client.CoreV1Api) -> None:
    with pytest.raises(client.ApiException) as missing:
        core.create_namespaced_secret("no-such-namespace", secret("jit-1"))

    assert missing.value.status == 404
    assert status_of(missing.value)["message"] == 'namespaces "no-such-namespace" not found'


def test_resource_versions_increase_across_kinds(core: client.CoreV1Api) -> None:
    first = attrs(core.create_namespaced_secret(NS, secret("a")))
    pod = attrs(core.create_namespaced_pod(NS, runner_pod("p")))
    second = attrs(core.create_namespaced_secret(NS, secret("b")))

    versions = [int(o["metadata"]["resource_version"]) for o in (first, pod, second)]
    assert versions == sorted(versions) and len(set(versions)) == 3
    listed = attrs(core.list_namespaced_secret(NS))
    assert int(listed["metadata"]["resource_version"]) >= versions[-1]


def test_generate_name_gets_a_random_suffix(core: client.CoreV1Api) -> None:
    body = secret("")
    body.metadata = client.V1ObjectMeta(generate_name="jit-")

    created = {attrs(core.create_namespaced_secret(NS, body))["metadata"]["name"] for _ in "abc"}

    assert len(created) == 3
    assert all(name.startswith("jit-") and len(name) == 9 for name in created)


def test_a_wrong_bearer_token_is_401(fake_kube: FakeKubernetes) -> None:
    configuration = client.Configuration(host=fake_kube.url)
    configuration.api_key = {"authorization": "Bearer wrong"}

    with pytest.raises(client.ApiException) as denied:
        client.CoreV1Api(client.ApiClient(configuration)).list_namespaced_pod(NS)

    assert denied.value.status == 401


def test_pods_are_defaulted_like_the_api_server(core: client.CoreV1Api) -> None:
    body = runner_pod_json("p", gpus=1)
    del body["spec"]["automountServiceAccountToken"]

    pod = attrs(core.create_namespaced_pod(NS, as_pod(body)))

    runner = pod["spec"]["containers"][0]
    assert runner["resources"]["requests"] == {GPU_RESOURCE: "1"}  # requests default to limits
    assert runner["image_pull_policy"] == "IfNotPresent"
    assert pod["spec"]["service_account_name"] == "default"
    assert pod["status"]["phase"] == "Pending"
    assert [m["mount_path"] for m in runner["volume_mounts"]] == [
        "/var/run/secrets/kubernetes.io/serviceaccount"
    ]


def test_automount_false_leaves_no_service_account_token(core: client.CoreV1Api) -> None:
    pod = attrs(core.create_namespaced_pod(NS, runner_pod("p")))

    assert pod["spec"]["volumes"] is None
    assert pod["spec"]["containers"][0]["volume_mounts"] is None


def test_pods_of_every_namespace_list_at_api_v1_pods(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.seed(
        {"kind": "Pod", "metadata": {"name": "a", "namespace": NS}},
        {"kind": "Pod", "metadata": {"name": "b", "namespace": "default"}},
    )

    pods = attrs(core.list_pod_for_all_namespaces())["items"]

    assert sorted((p["metadata"]["namespace"], p["metadata"]["name"]) for p in pods) == [
        ("default", "b"),
        (NS, "a"),
    ]


def test_nodes_list_with_a_label_selector(core: client.CoreV1Api) -> None:
    cpu = attrs(core.list_node(label_selector=f"{NODE_GPU_LABEL}=false"))["items"]

    assert len(cpu) == 3
    assert all(node["metadata"]["labels"][NODE_GPU_LABEL] == "false" for node in cpu)
    assert names(core.list_node(label_selector=f"{NODE_GPU_LABEL}=true")) == []


def test_the_runner_namespace_enforces_pod_security_restricted(core: client.CoreV1Api) -> None:
    namespace = attrs(core.read_namespace(NS))

    assert namespace["metadata"]["labels"][PSA_ENFORCE_LABEL] == PSA_LEVEL


# --- Selectors ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("selector", "expected"),
    [
        ("app=x", ["a"]),
        ("app==y", ["b"]),
        ("app!=x", ["b", "c"]),
        ("app in (x, y)", ["a", "b"]),
        ("app notin (x)", ["b", "c"]),
        ("app", ["a", "b"]),
        ("!app", ["c"]),
        ("app=x,tier=gpu", ["a"]),
        ("app=x,tier!=gpu", []),
        ("", ["a", "b", "c"]),
    ],
)
def test_label_selectors_select_as_the_api_server(
    core: client.CoreV1Api, selector: str, expected: list[str]
) -> None:
    core.create_namespaced_secret(NS, secret("a", {"app": "x", "tier": "gpu"}))
    core.create_namespaced_secret(NS, secret("b", {"app": "y"}))
    core.create_namespaced_secret(NS, secret("c"))

    assert names(core.list_namespaced_secret(NS, label_selector=selector)) == expected


def test_label_selector_integer_comparisons() -> None:
    selector = parse_label_selector("attempt>1,attempt<4")

    matched = [selector.matches({"attempt": str(n)}) for n in range(6)]

    assert matched == [False, False, True, True, False, False]
    assert not selector.matches({})


@pytest.mark.parametrize("selector", ["app in x", "app=(", "app notin (x"])
def test_a_malformed_label_selector_is_400(core: client.CoreV1Api, selector: str) -> None:
    with pytest.raises(client.ApiException) as bad:
        core.list_namespaced_secret(NS, label_selector=selector)

    assert bad.value.status == 400
    assert status_of(bad.value)["reason"] == "BadRequest"
    assert status_of(bad.value)["message"].startswith("unable to parse requirement")


def test_pod_field_selectors_on_name_and_phase(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.seed(
        *(
            {"kind": "Pod", "metadata": {"name": name}, "status": {"phase": phase}}
            for name, phase in [("p1", "Running"), ("p2", "Succeeded"), ("p3", "Failed")]
        )
    )

    def selected(selector: str) -> list[str]:
        return names(core.list_namespaced_pod(NS, field_selector=selector))

    assert selected("status.phase=Succeeded") == ["p2"]
    assert selected("status.phase!=Running") == ["p2", "p3"]
    assert selected("metadata.name=p1") == ["p1"]
    assert selected("metadata.name=p1,status.phase=Failed") == []


def test_unsupported_field_selector_is_400(core: client.CoreV1Api) -> None:
    with pytest.raises(client.ApiException) as bad:
        core.list_namespaced_pod(NS, field_selector="spec.containers=x")

    assert bad.value.status == 400
    assert status_of(bad.value)["message"] == 'field label not supported: "spec.containers"'


def test_event_field_selector_on_the_involved_object(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    core.create_namespaced_pod(NS, runner_pod("gpu-2-1"))

    events = watch_events(core, "gpu-1-1", "Started")

    involved = {(e["involved_object"]["kind"], e["involved_object"]["name"]) for e in events}
    assert involved == {("Pod", "gpu-1-1")}


# --- Pagination --------------------------------------------------------------------------------


def test_pages_of_the_limit_return_every_pod_once_from_a_consistent_snapshot(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.seed(*({"kind": "Pod", "metadata": {"name": f"p-{i:04d}"}} for i in range(1200)))

    pages = [attrs(core.list_namespaced_pod(NS, limit=500))]
    # Created mid-listing: a consistent list from the first page's snapshot must not show it.
    fake_kube.seed({"kind": "Pod", "metadata": {"name": "p-0999x"}})
    while token := pages[-1]["metadata"]["_continue"]:
        pages.append(attrs(core.list_namespaced_pod(NS, limit=500, _continue=token)))

    assert [len(page["items"]) for page in pages] == [500, 500, 200]
    assert [page["metadata"]["remaining_item_count"] for page in pages] == [700, 200, None]
    listed = [pod["metadata"]["name"] for page in pages for pod in page["items"]]
    assert listed == [f"p-{i:04d}" for i in range(1200)]


def test_an_unknown_continue_token_is_410_expired(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.seed(*({"kind": "Pod", "metadata": {"name": f"p-{i}"}} for i in range(3)))
    token = attrs(core.list_namespaced_pod(NS, limit=1))["metadata"]["_continue"]
    fake_kube.expire_watch_history()  # also drops list snapshots, as etcd compaction does

    with pytest.raises(client.ApiException) as expired:
        core.list_namespaced_pod(NS, limit=1, _continue=token)

    assert expired.value.status == 410
    assert status_of(expired.value)["reason"] == "Expired"


# --- Watch -------------------------------------------------------------------------------------


def list_version(core: client.CoreV1Api) -> str:
    version: str = attrs(core.list_namespaced_pod(NS))["metadata"]["resource_version"]
    return version


def test_watch_sees_a_pod_added_modified_and_deleted(core: client.CoreV1Api) -> None:
    start = list_version(core)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    types: list[str] = []
    stream = watch.Watch()
    for event in stream.stream(
        core.list_namespaced_pod, NS, resource_version=start, timeout_seconds=5
    ):
        types.append(event["type"])
        if event["type"] == "MODIFIED" and running(attrs(event["object"])):
            core.delete_namespaced_pod("gpu-1-1", NS, grace_period_seconds=0)
        if event["type"] == "DELETED":
            stream.stop()

    assert types[0] == "ADDED" and types[-1] == "DELETED"
    assert set(types[1:-1]) == {"MODIFIED"}


def test_watch_without_resource_version_starts_with_the_current_objects(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.seed({"kind": "Pod", "metadata": {"name": "old"}})

    stream = watch.Watch()
    first = next(iter(stream.stream(core.list_namespaced_pod, NS, timeout_seconds=5)))
    stream.stop()

    assert (first["type"], first["object"].metadata.name) == ("ADDED", "old")


def test_watch_with_a_label_selector_sees_only_matching_pods(core: client.CoreV1Api) -> None:
    start = list_version(core)
    core.create_namespaced_pod(NS, runner_pod("other", labels={"run": "2"}))
    core.create_namespaced_pod(NS, runner_pod("mine", labels={"run": "1"}))

    stream = watch.Watch()
    seen = set()
    for event in stream.stream(
        core.list_namespaced_pod,
        NS,
        label_selector="run=1",
        resource_version=start,
        timeout_seconds=5,
    ):
        pod = attrs(event["object"])
        seen.add(pod["metadata"]["name"])
        if running(pod):
            stream.stop()

    assert seen == {"mine"}


def test_watch_from_a_compacted_resource_version_is_410_gone(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    old = list_version(core)
    core.create_namespaced_secret(NS, secret("s"))
    fake_kube.expire_watch_history()

    with pytest.raises(client.ApiException) as gone:
        for _ in watch.Watch().stream(
            core.list_namespaced_pod, NS, resource_version=old, timeout_seconds=5
        ):
            pass

    assert gone.value.status == 410


def test_watch_ends_after_timeout_seconds(core: client.CoreV1Api) -> None:
    began = time.monotonic()

    events = list(watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=1))

    assert events == []
    assert 1.0 <= time.monotonic() - began < 4.0


def test_stop_ends_an_open_watch_cleanly(make_fake_kube: MakeFake) -> None:
    fake = make_fake_kube()
    core = api_for(fake)
    ended = threading.Event()
    failures: list[BaseException] = []

    def consume() -> None:
        try:
            for _ in watch.Watch().stream(core.list_namespaced_pod, NS, timeout_seconds=30):
                pass
        except BaseException as error:
            failures.append(error)
        ended.set()

    threading.Thread(target=consume, daemon=True).start()
    deadline = time.monotonic() + 5
    while not any(r.query.get("watch") == "true" for r in fake.requests):
        assert time.monotonic() < deadline, "the watch request never arrived"
        time.sleep(0.01)

    fake.stop()

    assert ended.wait(5), "the watch did not end when the server stopped"
    assert failures == []


# --- Pod scripts: what the scheduler, autoscaler and kubelet do -------------------------------


def test_run_schedules_pulls_starts_and_readies_the_pod(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))

    states = watch_pod(core, "gpu-1-1", running)

    pod = states[-1]
    assert states[0]["status"]["phase"] == "Pending"
    node = pod["spec"]["node_name"]
    assert node.startswith("gke-fake-cpu-pool-")
    assert {c["type"]: c["status"] for c in pod["status"]["conditions"]} == {
        "PodScheduled": "True",
        "Initialized": "True",
        "PodReadyToStartContainers": "True",
        "ContainersReady": "True",
        "Ready": "True",
    }
    runner = pod["status"]["container_statuses"][0]
    assert runner["ready"] and runner["started"]
    assert runner["state"]["running"]["started_at"] is not None
    events = watch_events(core, "gpu-1-1", "Started")
    assert [(e["reason"], e["source"]["component"], e["message"]) for e in events] == [
        ("Scheduled", "default-scheduler", f"Successfully assigned {NS}/gpu-1-1 to {node}"),
        ("Pulling", "kubelet", f'Pulling image "{IMAGE}"'),
        (
            "Pulled",
            "kubelet",
            f'Successfully pulled image "{IMAGE}" in 812ms (812ms including waiting). Image '
            "size: 1523478112 bytes.",
        ),
        ("Created", "kubelet", "Created container: runner"),
        ("Started", "kubelet", "Started container runner"),
    ]
    assert events[3]["involved_object"]["field_path"] == "spec.containers{runner}"


def test_scale_up_adds_a_gpu_node_for_a_gpu_pod(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", gpus=1, accelerator="nvidia-l4"))

    pod = watch_pod(core, "gpu-1-1", running)[-1]

    events = watch_events(core, "gpu-1-1", "Started")
    assert reasons(events)[:3] == ["FailedScheduling", "TriggeredScaleUp", "Scheduled"]
    failed, triggered = events[0], events[1]
    assert (failed["type"], failed["source"]["component"]) == ("Warning", "default-scheduler")
    assert failed["message"] == (
        "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector. "
        "preemption: 0/3 nodes are available: 3 Preemption is not helpful for scheduling."
    )
    assert (triggered["type"], triggered["source"]["component"]) == ("Normal", "cluster-autoscaler")
    assert triggered["message"] == (
        "pod triggered scale-up: [{https://www.googleapis.com/compute/v1/projects/fake-project/"
        "zones/us-central1-a/instanceGroups/gke-fake-gpu-nvidia-l4-grp 0->1 (max: 3)}]"
    )
    node = attrs(core.read_node(pod["spec"]["node_name"]))
    assert node["metadata"]["labels"][GKE_ACCELERATOR_LABEL] == "nvidia-l4"
    assert node["status"]["allocatable"][GPU_RESOURCE] == "1"


def test_a_new_node_registers_not_ready_turns_ready_and_offers_its_gpu_once_the_driver_is_in(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(scheduler=lambda pod: PodScript.scale_up(
        scale_up_delay=1.2, node_not_ready_seconds=1.0, driver_delay=1.0))
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", gpus=1, accelerator="nvidia-l4"))
    states: list[Obj] = []
    stream = watch.Watch()
    for event in stream.stream(core.list_node, label_selector=f"{GKE_ACCELERATOR_LABEL}",
                               timeout_seconds=10):
        states.append(attrs(event["object"]))
        if states[-1]["status"]["allocatable"].get(GPU_RESOURCE):
            stream.stop()

    def ready(node: Obj) -> Obj:
        (condition,) = node["status"]["conditions"]
        return cast(Obj, condition)

    registered, readied, advertised = states
    assert ready(registered)["status"] == "False"
    assert ready(registered)["reason"] == "KubeletNotReady"
    assert {"key": "node.kubernetes.io/not-ready", "effect": "NoSchedule", "value": None,
            "time_added": None} in registered["spec"]["taints"]
    assert GPU_RESOURCE not in registered["status"]["allocatable"]
    assert ready(readied)["status"] == "True"
    assert [t["key"] for t in readied["spec"]["taints"]] == [GPU_TAINT_KEY]
    assert GPU_RESOURCE not in readied["status"]["allocatable"]
    assert advertised["status"]["capacity"][GPU_RESOURCE] == "1"
    # Timestamps have the API server's one-second resolution.
    created = registered["metadata"]["creation_timestamp"]
    ready_at = ready(advertised)["last_transition_time"]
    assert 0 <= (ready_at - created).total_seconds() <= 2
    pod = watch_pod(core, "gpu-1-1", running)[-1]
    assert pod["spec"]["node_name"] == advertised["metadata"]["name"]
    scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert 0 <= (scheduled["last_transition_time"] - ready_at).total_seconds() <= 2


def test_a_node_is_read_by_name_only_with_a_cluster_role_granting_get(
    make_fake_kube: MakeFake,
) -> None:
    pods = [{"api_groups": [""], "resources": ["pods"], "verbs": ["create", "get"]}]
    node_get = [{"api_groups": [""], "resources": ["nodes"], "verbs": ["get"]}]
    granted = make_fake_kube(rbac_rules=pods, cluster_rules=node_get)
    assert attrs(api_for(granted).read_node("gke-fake-cpu-pool-0"))["metadata"]["name"] == (
        "gke-fake-cpu-pool-0")
    with pytest.raises(client.ApiException) as unlisted:
        api_for(granted).list_node()
    assert unlisted.value.status == 403
    assert granted.forbidden == ["list nodes"]

    role_only = make_fake_kube(rbac_rules=[*pods, *node_get])
    with pytest.raises(client.ApiException) as refused:
        api_for(role_only).read_node("gke-fake-cpu-pool-0")
    assert refused.value.status == 403
    assert 'cannot get resource "nodes" in API group "" at the cluster scope' in status_of(
        refused.value)["message"]


def test_an_accelerator_no_pool_offers_is_unschedulable_without_scale_up(
    core: client.CoreV1Api,
) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", gpus=1, accelerator="nvidia-a100-80gb"))

    events = watch_events(core, "gpu-1-1", "NotTriggerScaleUp")

    assert reasons(events) == ["FailedScheduling", "NotTriggerScaleUp"]
    assert events[1]["source"]["component"] == "cluster-autoscaler"
    assert events[1]["message"] == (
        "pod didn't trigger scale-up: 1 node(s) didn't match Pod's node affinity/selector"
    )
    pod = attrs(core.read_namespaced_pod("gpu-1-1", NS))
    assert pod["status"]["phase"] == "Pending" and pod["spec"]["node_name"] is None
    scheduled = next(c for c in pod["status"]["conditions"] if c["type"] == "PodScheduled")
    assert (scheduled["status"], scheduled["reason"], scheduled["message"]) == (
        "False",
        "Unschedulable",
        events[0]["message"],
    )


def test_gpu_nodes_without_a_free_gpu_report_insufficient_gpu(make_fake_kube: MakeFake) -> None:
    full = [FakeNode(f"gpu-{i}", {NODE_GPU_LABEL: "true"}, gpus=0) for i in range(3)]
    core = api_for(make_fake_kube(nodes=full, node_pools=[]))
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", gpus=1))

    events = watch_events(core, "gpu-1-1", "NotTriggerScaleUp")

    assert events[0]["message"] == (
        "0/3 nodes are available: 3 Insufficient nvidia.com/gpu. preemption: 0/3 nodes are "
        "available: 3 No preemption victims found for incoming pod."
    )
    assert events[1]["message"] == (
        "pod didn't trigger scale-up (it wouldn't fit if a new node is added)"
    )


def test_a_pool_at_its_maximum_does_not_scale_up(make_fake_kube: MakeFake) -> None:
    pool = FakeNodePool("gpu-l4", {NODE_GPU_LABEL: "true"}, gpus_per_node=1, max_nodes=1)
    core = api_for(make_fake_kube(node_pools=[pool]))
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", gpus=1))
    watch_pod(core, "gpu-1-1", running)

    core.create_namespaced_pod(NS, runner_pod("gpu-2-1", gpus=1))
    events = watch_events(core, "gpu-2-1", "NotTriggerScaleUp")

    assert events[1]["message"] == "pod didn't trigger scale-up: 1 max node group size reached"
    assert "1 Insufficient nvidia.com/gpu" in events[0]["message"]  # the one GPU node is full


def test_a_gpu_pod_without_the_toleration_is_unschedulable(core: client.CoreV1Api) -> None:
    body = runner_pod_json("gpu-1-1", gpus=1)
    del body["spec"]["tolerations"]
    core.create_namespaced_pod(NS, as_pod(body))

    events = watch_events(core, "gpu-1-1", "NotTriggerScaleUp")

    assert events[1]["message"] == (
        "pod didn't trigger scale-up: 1 node(s) had untolerated taint {nvidia.com/gpu: present}"
    )


def test_image_pull_error_leaves_the_pod_in_image_pull_back_off(make_fake_kube: MakeFake) -> None:
    core = api_for(make_fake_kube(scheduler=lambda pod: PodScript.image_pull_error()))
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))

    def waiting_reason(pod: Obj) -> str | None:
        statuses = pod["status"]["container_statuses"] or [{"state": {"waiting": None}}]
        waiting = statuses[0]["state"]["waiting"]
        return waiting["reason"] if waiting else None

    states = watch_pod(core, "gpu-1-1", lambda p: waiting_reason(p) == "ImagePullBackOff")

    waiting = [waiting_reason(state) for state in states]
    assert waiting.index("ErrImagePull") < waiting.index("ImagePullBackOff")
    assert states[-1]["status"]["phase"] == "Pending"
    # The kubelet records the events before the status update that ended the watch.
    assert [(e["type"], e["reason"], e["message"]) for e in pod_events(core, "gpu-1-1")][1:] == [
        ("Normal", "Pulling", f'Pulling image "{IMAGE}"'),
        (
            "Warning",
            "Failed",
            f'Failed to pull image "{IMAGE}": rpc error: code = NotFound desc = failed to pull '
            f'and unpack image "{IMAGE}": failed to resolve reference "{IMAGE}": {IMAGE}: '
            "not found",
        ),
        ("Warning", "Failed", "Error: ErrImagePull"),
        ("Normal", "BackOff", f'Back-off pulling image "{IMAGE}"'),
        ("Warning", "Failed", "Error: ImagePullBackOff"),
    ]


def test_crash_fails_the_pod_with_the_exit_code(make_fake_kube: MakeFake) -> None:
    core = api_for(make_fake_kube(scheduler=lambda pod: PodScript.crash(exit_code=3)))
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))

    pod = watch_pod(core, "gpu-1-1", phase_is("Failed"))[-1]

    terminated = pod["status"]["container_statuses"][0]["state"]["terminated"]
    assert (terminated["exit_code"], terminated["reason"]) == (3, "Error")
    ready = next(c for c in pod["status"]["conditions"] if c["type"] == "Ready")
    assert (ready["status"], ready["reason"]) == ("False", "PodFailed")


def test_succeed_completes_the_pod(make_fake_kube: MakeFake) -> None:
    core = api_for(make_fake_kube(scheduler=lambda pod: PodScript.succeed()))
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))

    states = watch_pod(core, "gpu-1-1", phase_is("Succeeded"))

    assert "Running" in [state["status"]["phase"] for state in states]
    terminated = states[-1]["status"]["container_statuses"][0]["state"]["terminated"]
    assert (terminated["exit_code"], terminated["reason"]) == (0, "Completed")


def test_finish_pod_ends_a_running_pod_as_its_runner_exiting(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", running)

    fake_kube.finish_pod("gpu-1-1", exit_code=0)

    assert attrs(core.read_namespaced_pod("gpu-1-1", NS))["status"]["phase"] == "Succeeded"


def test_a_pod_past_its_active_deadline_fails_with_deadline_exceeded(
    make_fake_kube: MakeFake,
) -> None:
    core = api_for(make_fake_kube(deadline_scale=0.00002))  # 3600 s pass in 72 ms
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", deadline=3600))

    pod = watch_pod(core, "gpu-1-1", phase_is("Failed"))[-1]

    assert pod["status"]["reason"] == "DeadlineExceeded"
    assert pod["status"]["message"] == (
        "Pod was active on the node longer than the specified deadline"
    )
    terminated = pod["status"]["container_statuses"][0]["state"]["terminated"]
    assert (terminated["exit_code"], terminated["reason"]) == (137, "Error")
    assert "DeadlineExceeded" in reasons(watch_events(core, "gpu-1-1", "DeadlineExceeded"))


def test_a_pod_waits_in_failed_mount_until_its_secret_exists(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", secret_volume="gpu-1-1-jit"))

    events = watch_events(core, "gpu-1-1", "FailedMount")
    core.create_namespaced_secret(NS, secret("gpu-1-1-jit"))
    watch_pod(core, "gpu-1-1", running)

    assert events[-1]["message"] == (
        'MountVolume.SetUp failed for volume "jit" : secret "gpu-1-1-jit" not found'
    )


def test_on_pod_running_calls_back_once_with_the_running_pod(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    seen: list[tuple[str, str]] = []
    called = threading.Event()

    def flip_online(pod: Obj) -> None:
        seen.append((pod["metadata"]["name"], pod["status"]["phase"]))
        called.set()

    fake_kube.on_pod_running(flip_online)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))

    assert called.wait(5)
    fake_kube.finish_pod("gpu-1-1")  # a later change does not call back again
    assert seen == [("gpu-1-1", "Running")]


def test_a_custom_scheduler_sees_the_stored_pod(make_fake_kube: MakeFake) -> None:
    seen: list[str] = []

    def scheduler(pod: Obj) -> PodScript:
        seen.append(pod["metadata"]["uid"])
        return PodScript.run()

    core = api_for(make_fake_kube(scheduler=scheduler))
    created = attrs(core.create_namespaced_pod(NS, runner_pod("gpu-1-1", gpus=1)))

    assert seen == [created["metadata"]["uid"]]


# --- Deletion and garbage collection -----------------------------------------------------------


def test_deleting_a_running_pod_is_graceful_then_it_is_gone(core: client.CoreV1Api) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", running)
    start = list_version(core)

    terminating = attrs(core.delete_namespaced_pod("gpu-1-1", NS))

    assert terminating["metadata"]["deletion_timestamp"] is not None
    assert terminating["metadata"]["deletion_grace_period_seconds"] == 30
    types: list[str] = []
    stream = watch.Watch()
    for event in stream.stream(
        core.list_namespaced_pod, NS, resource_version=start, timeout_seconds=5
    ):
        types.append(event["type"])
        if event["type"] == "DELETED":
            stream.stop()
    assert types == ["MODIFIED", "DELETED"]  # marked terminating, then gone
    assert "Killing" in reasons(pod_events(core, "gpu-1-1"))


def test_deleting_a_pod_garbage_collects_the_secrets_it_owns(core: client.CoreV1Api) -> None:
    pod = attrs(core.create_namespaced_pod(NS, runner_pod("gpu-1-1")))
    other = attrs(core.create_namespaced_pod(NS, runner_pod("gpu-2-1")))
    core.create_namespaced_secret(NS, secret("gpu-1-1-jit", owner_references=owner(pod)))
    core.create_namespaced_secret(NS, secret("gpu-2-1-jit", owner_references=owner(other)))

    core.delete_namespaced_pod("gpu-1-1", NS, grace_period_seconds=0)

    assert names(core.list_namespaced_secret(NS)) == ["gpu-2-1-jit"]


def test_orphan_propagation_keeps_the_owned_secret(core: client.CoreV1Api) -> None:
    pod = attrs(core.create_namespaced_pod(NS, runner_pod("gpu-1-1")))
    core.create_namespaced_secret(NS, secret("gpu-1-1-jit", owner_references=owner(pod)))

    core.delete_namespaced_pod("gpu-1-1", NS, grace_period_seconds=0, propagation_policy="Orphan")

    kept = attrs(core.read_namespaced_secret("gpu-1-1-jit", NS))
    assert kept["metadata"]["owner_references"] is None


def test_a_secret_whose_owner_never_existed_is_collected(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    ghost = {"metadata": {"name": "ghost", "uid": "0000-not-a-pod"}}
    core.create_namespaced_secret(NS, secret("orphan", owner_references=owner(ghost)))

    deadline = time.monotonic() + 5
    while fake_kube.secrets():
        assert time.monotonic() < deadline, "the garbage collector kept a Secret with no owner"
        time.sleep(0.01)


def test_delete_collection_removes_only_the_selected_secrets(core: client.CoreV1Api) -> None:
    core.create_namespaced_secret(NS, secret("a", {LABEL_MANAGED_BY: MANAGED_BY}))
    core.create_namespaced_secret(NS, secret("b"))

    core.delete_collection_namespaced_secret(NS, label_selector=f"{LABEL_MANAGED_BY}={MANAGED_BY}")

    assert names(core.list_namespaced_secret(NS)) == ["b"]


# --- ResourceQuota -------------------------------------------------------------------------------


def test_gpu_quota_forbids_a_pod_beyond_it_and_frees_when_a_pod_is_deleted(
    make_fake_kube: MakeFake,
) -> None:
    core = api_for(make_fake_kube(gpu_quota=2))
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", gpus=1))
    core.create_namespaced_pod(NS, runner_pod("gpu-2-1", gpus=1))

    with pytest.raises(client.ApiException) as forbidden:
        core.create_namespaced_pod(NS, runner_pod("gpu-3-1", gpus=1))

    assert forbidden.value.status == 403
    assert status_of(forbidden.value)["reason"] == "Forbidden"
    assert status_of(forbidden.value)["message"] == (
        'pods "gpu-3-1" is forbidden: exceeded quota: gpu-quota, requested: '
        "requests.nvidia.com/gpu=1, used: requests.nvidia.com/gpu=2, limited: "
        "requests.nvidia.com/gpu=2"
    )
    core.delete_namespaced_pod("gpu-1-1", NS, grace_period_seconds=0)
    core.create_namespaced_pod(NS, runner_pod("gpu-3-1", gpus=1))
    quota = attrs(core.read_namespaced_resource_quota("gpu-quota", NS))
    assert quota["status"]["used"] == {"requests.nvidia.com/gpu": "2"}


def test_quota_frees_when_a_pod_finishes(make_fake_kube: MakeFake) -> None:
    core = api_for(make_fake_kube(pod_quota=1, scheduler=lambda pod: PodScript.succeed()))
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    with pytest.raises(client.ApiException) as forbidden:
        core.create_namespaced_pod(NS, runner_pod("gpu-2-1"))
    assert status_of(forbidden.value)["message"].endswith(
        "exceeded quota: gpu-quota, requested: pods=1, used: pods=1, limited: pods=1"
    )

    watch_pod(core, "gpu-1-1", phase_is("Succeeded"))

    created = attrs(core.create_namespaced_pod(NS, runner_pod("gpu-2-1")))
    assert created["metadata"]["name"] == "gpu-2-1"


def test_a_pod_without_gpus_is_not_held_by_the_gpu_quota(make_fake_kube: MakeFake) -> None:
    core = api_for(make_fake_kube(gpu_quota=0))

    created = attrs(core.create_namespaced_pod(NS, runner_pod("cpu-only")))

    assert created["metadata"]["name"] == "cpu-only"


# --- Validation and admission ------------------------------------------------------------------


def post_raw(fake: FakeKubernetes, path: str, body: Obj) -> tuple[int, Any]:
    """POSTs a body as given. The client's pydantic models refuse unknown fields before sending,
    so an unknown field reaches a server only through a raw request (or another client)."""
    request = urllib.request.Request(
        fake.url + path,
        data=json.dumps(body).encode(),
        method="POST",
        headers={"Authorization": f"Bearer {fake.token}", "Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        return error.code, json.loads(error.read())


def test_a_valid_pod_and_secret_leave_no_validation_errors(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", gpus=1, secret_volume="jit"))
    core.create_namespaced_secret(NS, secret("jit"))

    assert fake_kube.validation_errors == []


def test_strict_validation_rejects_an_unknown_field_with_422(fake_kube: FakeKubernetes) -> None:
    body = runner_pod_json("gpu-1-1")
    body["spec"]["nodeSelectr"] = {"gpu": "true"}

    code, status = post_raw(fake_kube, f"/api/v1/namespaces/{NS}/pods", body)

    assert (code, status["reason"]) == (422, "Invalid")
    assert status["message"] == (
        "Pod \"gpu-1-1\" is invalid: spec: Additional properties are not allowed ('nodeSelectr' "
        "was unexpected)"
    )
    assert fake_kube.validation_errors == [
        "Pod gpu-1-1: spec: Additional properties are not allowed ('nodeSelectr' was unexpected)"
    ]
    assert fake_kube.pods() == []


def test_strict_validation_rejects_a_wrong_type_in_a_secret(fake_kube: FakeKubernetes) -> None:
    body = secret_json("jit")
    body["immutable"] = "yes"

    code, status = post_raw(fake_kube, f"/api/v1/namespaces/{NS}/secrets", body)

    assert code == 422
    assert "immutable: 'yes' is not of type 'boolean', 'null'" in status["message"]
    assert fake_kube.secrets() == []


def test_validation_can_be_turned_off_for_unknown_fields(make_fake_kube: MakeFake) -> None:
    fake = make_fake_kube(validate=False)
    body = runner_pod_json("gpu-1-1")
    body["spec"]["nodeSelectr"] = {"gpu": "true"}

    code, _ = post_raw(fake, f"/api/v1/namespaces/{NS}/pods", body)

    assert code == 201
    assert fake.validation_errors == []


def rename_pod(body: Obj) -> None:
    body["metadata"]["name"] = "GPU_1"


def long_label(body: Obj) -> None:
    body["metadata"]["labels"] = {"run": "x" * 64}


def capitalised_container(body: Obj) -> None:
    body["spec"]["containers"][0]["name"] = "Runner"


def gpu_request_above_limit(body: Obj) -> None:
    limits = {GPU_RESOURCE: "1"}
    body["spec"]["containers"][0]["resources"] = {"limits": limits, "requests": {GPU_RESOURCE: "2"}}


def mount_without_volume(body: Obj) -> None:
    body["spec"]["containers"][0]["volumeMounts"] = [{"name": "jit", "mountPath": "/jit"}]


def zero_deadline(body: Obj) -> None:
    body["spec"]["activeDeadlineSeconds"] = 0


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (rename_pod, 'metadata.name: Invalid value: "GPU_1": a lowercase RFC 1123 subdomain'),
        (long_label, f'metadata.labels: Invalid value: "{"x" * 64}": must be no more than 63'),
        (
            capitalised_container,
            'spec.containers[0].name: Invalid value: "Runner": a lowercase RFC 1123 label',
        ),
        (
            gpu_request_above_limit,
            'spec.containers[0].resources.requests[nvidia.com/gpu]: Invalid value: "2": must be '
            "equal to nvidia.com/gpu limit of 1",
        ),
        (mount_without_volume, 'spec.containers[0].volumeMounts[0].name: Not found: "jit"'),
        (
            zero_deadline,
            "spec.activeDeadlineSeconds: Invalid value: 0: must be between 1 and 2147483647",
        ),
    ],
)
def test_invalid_pods_are_422_with_the_api_server_message(
    core: client.CoreV1Api, change: Callable[[Obj], None], message: str
) -> None:
    body = runner_pod_json("gpu-1-1")
    change(body)

    with pytest.raises(client.ApiException) as invalid:
        core.create_namespaced_pod(NS, as_pod(body))

    assert invalid.value.status == 422
    assert status_of(invalid.value)["reason"] == "Invalid"
    assert message in status_of(invalid.value)["message"]


def label_outcomes(fake: FakeKubernetes, labels: list[tuple[str, str]]) -> dict[str, int]:
    """Creates one Secret per (key, value) and returns the status code of each, by case."""
    outcomes: dict[str, int] = {}
    for index, (key, value) in enumerate(labels):
        code, _ = post_raw(fake, f"/api/v1/namespaces/{NS}/secrets",
                           secret_json(f"label-{index}", {key: value}))
        outcomes[f"{key!r}={value!r}"] = code
    return outcomes


@pytest.mark.parametrize(
    ("labels", "expected"),
    [
        ([(key, "v") for key in VALID_KEYS], 201),
        ([(key, "v") for key in INVALID_KEYS], 422),
        ([("team", value) for value in VALID_VALUES], 201),
        ([("team", value) for value in INVALID_VALUES], 422),
    ],
    ids=["valid-keys", "invalid-keys", "valid-values", "invalid-values"],
)
def test_label_keys_and_values_are_checked_by_kubernetes_rules(
    fake_kube: FakeKubernetes, labels: list[tuple[str, str]], expected: int
) -> None:
    outcomes = label_outcomes(fake_kube, labels)

    assert {case: code for case, code in outcomes.items() if code != expected} == {}


def test_a_label_prefix_with_an_empty_part_is_422_naming_the_prefix(
    core: client.CoreV1Api,
) -> None:
    with pytest.raises(client.ApiException) as invalid:
        core.create_namespaced_pod(NS, runner_pod("gpu-1-1", labels={"example..com/team": "ml"}))

    assert invalid.value.status == 422
    assert 'metadata.labels: Invalid value: "example..com/team": prefix part a lowercase RFC ' \
        "1123 subdomain" in status_of(invalid.value)["message"]


def test_pod_security_restricted_forbids_a_pod_without_a_security_context(
    core: client.CoreV1Api,
) -> None:
    body = runner_pod_json("gpu-1-1")
    body["spec"].pop("securityContext")
    body["spec"]["containers"][0].pop("securityContext")

    with pytest.raises(client.ApiException) as forbidden:
        core.create_namespaced_pod(NS, as_pod(body))

    assert forbidden.value.status == 403
    assert status_of(forbidden.value)["message"] == (
        'pods "gpu-1-1" is forbidden: violates PodSecurity "restricted:latest": '
        'allowPrivilegeEscalation != false (container "runner" must set '
        "securityContext.allowPrivilegeEscalation=false), unrestricted capabilities (container "
        '"runner" must set securityContext.capabilities.drop=["ALL"]), runAsNonRoot != true (pod '
        'or container "runner" must set securityContext.runAsNonRoot=true), seccompProfile (pod '
        'or container "runner" must set securityContext.seccompProfile.type to "RuntimeDefault" '
        'or "Localhost")'
    )


# --- Injected faults -----------------------------------------------------------------------------


def test_an_injected_status_fails_the_next_matching_request_only(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.inject("POST", "/api/v1/namespaces/*/secrets", 503)

    with pytest.raises(client.ApiException) as unavailable:
        core.create_namespaced_secret(NS, secret("jit"))
    created = attrs(core.create_namespaced_secret(NS, secret("jit")))

    assert unavailable.value.status == 503
    assert status_of(unavailable.value)["reason"] == "ServiceUnavailable"
    assert created["metadata"]["name"] == "jit"
    assert [(r.method, r.status) for r in fake_kube.requests] == [("POST", 503), ("POST", 201)]


def test_an_injected_body_is_answered_as_given(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    etcd_down = {"kind": "Status", "code": 500, "message": "etcdserver: request timed out"}
    fake_kube.inject("GET", "/api/v1/namespaces/*/pods/gpu-1-1", 500, body=etcd_down)

    with pytest.raises(client.ApiException) as failed:
        core.read_namespaced_pod("gpu-1-1", NS)

    assert failed.value.status == 500
    assert json.loads(failed.value.body or "null") == etcd_down


def test_a_dropped_get_is_retried_by_the_client(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.inject("GET", "/api/v1/namespaces/*/pods", None, drop=True)

    assert names(core.list_namespaced_pod(NS)) == []
    assert [r.status for r in fake_kube.requests] == [0, 200]  # urllib3 retried the GET


def test_a_dropped_post_reaches_the_caller(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.inject("POST", "/api/v1/namespaces/*/pods", None, drop=True)

    with pytest.raises(urllib3.exceptions.ProtocolError):
        core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))

    assert fake_kube.pods() == []


def test_an_injected_delay_outlasts_the_client_timeout(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    fake_kube.inject("POST", "/api/v1/namespaces/*/secrets", None, delay=2.0)

    with pytest.raises(urllib3.exceptions.ReadTimeoutError):
        core.create_namespaced_secret(NS, secret("jit"), _request_timeout=0.2)


def test_inject_rejects_a_fault_that_does_nothing(fake_kube: FakeKubernetes) -> None:
    with pytest.raises(ValueError, match="give a status, a delay or drop=True"):
        fake_kube.inject("GET", "/api/v1/*", None)
    with pytest.raises(ValueError, match="times must be >= 1"):
        fake_kube.inject("GET", "/api/v1/*", 500, times=0)


def test_rbac_rules_refuse_what_the_role_does_not_grant(
    make_fake_kube: Callable[..., FakeKubernetes],
) -> None:
    fake = make_fake_kube(rbac_rules=[
        {"api_groups": [""], "resources": ["pods"], "verbs": ["get", "list"]},
    ])
    core = api_for(fake)
    assert core.list_namespaced_pod(fake.namespace).items == []
    with pytest.raises(client.ApiException) as refused:
        core.list_namespaced_secret(fake.namespace)
    assert refused.value.status == 403
    message = json.loads(refused.value.body or "{}")["message"]
    assert 'cannot list resource "secrets" in API group ""' in message
    with pytest.raises(client.ApiException) as refused:
        core.delete_collection_namespaced_pod(fake.namespace)
    assert refused.value.status == 403
    assert fake.forbidden == ["list secrets", "deletecollection pods"]


# --- Pod logs ----------------------------------------------------------------------------------

LISTENING = re.compile(r"\d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ: Listening for Jobs")


def container_status_is(state: str) -> Callable[[Obj], bool]:
    """The runner container has a status in `state` (waiting, running, terminated)."""

    def check(pod: Obj) -> bool:
        statuses = pod["status"]["container_statuses"] or []
        return any(s["state"][state] is not None for s in statuses)

    return check


def read_log(core: client.CoreV1Api, pod: str, **query: Any) -> str:
    text: str = core.read_namespaced_pod_log(pod, NS, container="runner", **query)
    return text


def follow_log(core: client.CoreV1Api, pod: str, lines: list[str], **query: Any) -> threading.Event:
    """Follows the runner container's log in a thread; `lines` fills as they arrive. The
    returned event is set when the server ends the stream."""
    # Without preloading, the client returns the raw response (its annotation says str).
    response = cast(urllib3.HTTPResponse, core.read_namespaced_pod_log(
        pod, NS, container="runner", follow=True, _preload_content=False, **query
    ))
    assert response.headers["Content-Type"] == "text/plain"
    ended = threading.Event()

    def consume() -> None:
        buffer = b""
        for chunk in response.stream(amt=None, decode_content=False):
            buffer += chunk
            *complete, buffer = buffer.split(b"\n")
            lines.extend(line.decode() for line in complete)
        ended.set()

    threading.Thread(target=consume, daemon=True).start()
    return ended


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.01)


def test_the_log_of_a_container_still_creating_is_400_with_the_kubelets_message(
    core: client.CoreV1Api,
) -> None:
    # Its Secret volume never appears, so the container stays in ContainerCreating.
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1", secret_volume="gpu-1-1-jit"))
    watch_pod(core, "gpu-1-1", container_status_is("waiting"))

    with pytest.raises(client.ApiException) as error:
        read_log(core, "gpu-1-1", follow=True)

    assert error.value.status == 400
    assert status_of(error.value)["message"] == (
        'container "runner" in pod "gpu-1-1" is waiting to start: ContainerCreating'
    )
    assert status_of(error.value)["reason"] == "BadRequest"


def test_the_log_of_a_container_whose_image_fails_to_pull_is_400(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(scheduler=lambda pod: PodScript.image_pull_error())
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", lambda pod: any(
        (s["state"]["waiting"] or {}).get("reason") == "ImagePullBackOff"
        for s in pod["status"]["container_statuses"] or []))

    with pytest.raises(client.ApiException) as error:
        read_log(core, "gpu-1-1")

    assert (error.value.status, status_of(error.value)["message"]) == (
        400, 'container "runner" in pod "gpu-1-1" is waiting to start: trying and failing to '
        "pull image")


def test_the_log_of_an_unknown_pod_is_404_and_of_an_unknown_container_400(
    core: client.CoreV1Api,
) -> None:
    with pytest.raises(client.ApiException) as missing:
        read_log(core, "gpu-9-9")
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    with pytest.raises(client.ApiException) as wrong:
        core.read_namespaced_pod_log("gpu-1-1", NS, container="sidecar")

    assert (missing.value.status, status_of(missing.value)["message"]) == (
        404, 'pods "gpu-9-9" not found')
    assert (wrong.value.status, status_of(wrong.value)["message"]) == (
        400, "container sidecar is not valid for pod gpu-1-1")


def test_a_runner_logs_its_start_then_listening_for_jobs_once_connected(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(runner_connect_delay=0.3)
    core = api_for(fake)
    log_at_connect: list[str] = []
    connected = threading.Event()

    def on_listening(pod: Obj) -> None:
        log_at_connect.append(fake.log_text(pod["metadata"]["name"]))
        connected.set()

    fake.on_runner_listening(on_listening)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", running)
    started = time.monotonic()
    before = read_log(core, "gpu-1-1")
    assert connected.wait(5)
    connected_after = time.monotonic() - started
    wait_for(lambda: bool(LISTENING.fullmatch(read_log(core, "gpu-1-1").splitlines()[-1])),
             "the Listening for Jobs line")
    after = read_log(core, "gpu-1-1").splitlines()

    assert before == f"{RUNNER_START_LINES[0]}\n"
    assert RUNNER_START_LINES[0].endswith(f"{JIT_MOUNT_DIR}/{JIT_SECRET_KEY}")
    assert 0.2 <= connected_after < 2.0
    # The callback (the runner going online on GitHub) comes before the line, as for real.
    assert log_at_connect == [before]
    assert after[1:4] == ["\u221a Connected to GitHub", "", "Current runner version: '2.328.0'"]
    assert len(after) == 5


def test_a_runner_scripted_never_to_connect_prints_no_listening_line(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(scheduler=lambda pod: PodScript.run(connect_delay=math.inf))
    called: list[Obj] = []
    fake.on_runner_listening(called.append)
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", running)
    wait_for(lambda: read_log(core, "gpu-1-1") != "", "the line written at start")
    fake.append_log(NS, "gpu-1-1", "marker: the log is read in order")

    lines = read_log(core, "gpu-1-1").splitlines()

    assert lines[-1] == "marker: the log is read in order"
    assert not any("Listening for Jobs" in line for line in lines)
    assert called == []


def test_follow_streams_appended_lines_and_ends_when_the_container_terminates(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(runner_connect_delay=math.inf)
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", running)
    lines: list[str] = []

    ended = follow_log(core, "gpu-1-1", lines)
    wait_for(lambda: len(lines) == 1, "the line written at start")
    fake.append_log(NS, "gpu-1-1", "first")
    wait_for(lambda: lines[-1:] == ["first"], "an appended line")
    fake.append_log(NS, "gpu-1-1", "second")
    wait_for(lambda: lines[-1:] == ["second"], "a second appended line")
    assert not ended.is_set()
    fake.finish_pod("gpu-1-1", exit_code=0)

    assert ended.wait(5), "the stream did not end when the container terminated"
    assert lines[1:] == ["first", "second"]
    follows = [r for r in fake.requests if r.path.endswith("/gpu-1-1/log")]
    assert [(r.status, r.query["follow"], r.query["container"]) for r in follows] == [
        (200, "true", "runner")]


def test_follow_ends_when_the_server_stops(make_fake_kube: MakeFake) -> None:
    fake = make_fake_kube(runner_connect_delay=math.inf)
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", running)
    lines: list[str] = []
    ended = follow_log(core, "gpu-1-1", lines)
    wait_for(lambda: len(lines) == 1, "the line written at start")

    fake.stop()

    assert ended.wait(5), "the stream did not end when the server stopped"


def test_tail_lines_and_since_seconds_choose_where_the_log_starts(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(runner_connect_delay=math.inf)
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", running)
    # The runner's start line follows the Running status; the lines below must come after it.
    wait_for(lambda: read_log(core, "gpu-1-1") != "", "the line written at start")
    fake.append_log(NS, "gpu-1-1", "an hour ago", at=time.time() - 3600)
    fake.append_log(NS, "gpu-1-1", "just now")
    fake.append_log(NS, "gpu-1-1", "now")

    assert read_log(core, "gpu-1-1", tail_lines=2) == "just now\nnow\n"
    assert read_log(core, "gpu-1-1", since_seconds=60) == "just now\nnow\n"
    assert read_log(core, "gpu-1-1", since_seconds=7200).count("\n") == 4
    lines: list[str] = []
    follow_log(core, "gpu-1-1", lines, tail_lines=1)
    wait_for(lambda: lines == ["now"], "the last line")
    fake.append_log(NS, "gpu-1-1", "later")
    wait_for(lambda: lines == ["now", "later"], "the line appended after")


def test_the_log_needs_get_on_pods_log_under_rbac(make_fake_kube: MakeFake) -> None:
    fake = make_fake_kube(rbac_rules=[{"api_groups": [""], "resources": ["pods"],
                                       "verbs": ["create", "get"]}])
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))

    with pytest.raises(client.ApiException) as error:
        read_log(core, "gpu-1-1")

    assert error.value.status == 403
    assert fake.forbidden == ["get pods/log"]
    fake.forbidden.clear()  # refused as intended; make_fake_kube checks nothing else was


def test_end_log_streams_ends_open_follows_while_the_container_runs(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(runner_connect_delay=math.inf)
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-1-1"))
    watch_pod(core, "gpu-1-1", running)
    lines: list[str] = []
    ended = follow_log(core, "gpu-1-1", lines)
    wait_for(lambda: len(lines) == 1, "the line written at start")

    fake.end_log_streams()

    assert ended.wait(5), "the follow did not end"
    pod = fake.pod("gpu-1-1")
    assert pod is not None and pod["status"]["phase"] == "Running"
    again: list[str] = []
    follow_log(core, "gpu-1-1", again)  # a new follow is served as before
    wait_for(lambda: again == lines, "the log from a new follow")


# --- apps/v1 Deployments (read-only, seeded) -------------------------------------------------


def apps_for(fake: FakeKubernetes) -> client.AppsV1Api:
    """An AppsV1Api configured from the fake's kubeconfig."""
    return client.AppsV1Api(api_for(fake).api_client)


def test_a_seeded_deployment_reads_back_through_apps_v1_with_its_status(
    fake_kube: FakeKubernetes,
) -> None:
    fake_kube.seed({
        "kind": "Deployment",
        "metadata": {"name": "broker", "namespace": "tools", "labels": {"app": "broker"}},
        "spec": {"replicas": 1, "selector": {"matchLabels": {"app": "broker"}},
                 "template": {"metadata": {"labels": {"app": "broker"}},
                              "spec": {"containers": [{"name": "b", "image": IMAGE}]}}},
        "status": {"availableReplicas": 1, "conditions": [
            {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable"}]},
    })
    apps = apps_for(fake_kube)

    deployment = attrs(apps.read_namespaced_deployment("broker", "tools"))
    listed = attrs(apps.list_namespaced_deployment("tools", label_selector="app=broker"))

    assert deployment["api_version"] == "apps/v1"
    assert deployment["status"]["available_replicas"] == 1
    assert deployment["status"]["conditions"][0]["type"] == "Available"
    assert [item["metadata"]["name"] for item in listed["items"]] == ["broker"]


def test_deployments_are_not_served_under_the_core_group_nor_pods_under_apps(
    fake_kube: FakeKubernetes,
) -> None:
    fake_kube.seed({"kind": "Deployment", "metadata": {"name": "broker"}})
    headers = {"Authorization": f"Bearer {fake_kube.token}"}

    def status_of(path: str) -> int:
        request = urllib.request.Request(fake_kube.url + path, headers=headers)
        try:
            with urllib.request.urlopen(request, timeout=5) as answer:
                return int(answer.status)
        except urllib.error.HTTPError as e:
            return e.code

    assert status_of(f"/apis/apps/v1/namespaces/{NS}/deployments/broker") == 200
    assert status_of(f"/api/v1/namespaces/{NS}/deployments/broker") == 404
    assert status_of(f"/apis/apps/v1/namespaces/{NS}/pods") == 404


def test_a_missing_deployment_is_404_and_deployments_are_read_only(
    fake_kube: FakeKubernetes,
) -> None:
    apps = apps_for(fake_kube)
    create = urllib.request.Request(
        f"{fake_kube.url}/apis/apps/v1/namespaces/{NS}/deployments", method="POST",
        data=json.dumps({"metadata": {"name": "x"}}).encode(),
        headers={"Authorization": f"Bearer {fake_kube.token}",
                 "Content-Type": "application/json"})

    with pytest.raises(client.ApiException) as missing:
        apps.read_namespaced_deployment("broker", NS)
    with pytest.raises(urllib.error.HTTPError) as created:
        urllib.request.urlopen(create, timeout=5)

    assert missing.value.status == 404
    assert created.value.code == 405


def test_rbac_checks_deployments_in_the_apps_group(make_fake_kube: MakeFake) -> None:
    fake = make_fake_kube(rbac_rules=[
        {"api_groups": [""], "resources": ["deployments"], "verbs": ["get"]}])
    fake.seed({"kind": "Deployment", "metadata": {"name": "broker"}})

    with pytest.raises(client.ApiException) as refused:
        apps_for(fake).read_namespaced_deployment("broker", NS)

    assert refused.value.status == 403
    assert 'in API group "apps"' in json.loads(str(refused.value.body))["message"]
    assert fake.forbidden == ["get deployments"]


# --- Projected ServiceAccount tokens and TokenReview -------------------------------------------

BROKER_AUDIENCE = "gpu-runners-broker/base-runner"
TOKEN_REVIEW_RULES = [{"api_groups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
                       "verbs": ["create"]}]


def review(fake: FakeKubernetes, token: str, audiences: list[str] | None = None) -> Obj:
    """A TokenReview through the official client, as the broker sends it."""
    authentication = client.AuthenticationV1Api(api_for(fake).api_client)
    body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=audiences))
    status: Obj = attrs(authentication.create_token_review(body))["status"]
    return status


def pod_with_account(core: client.CoreV1Api, name: str, account: str) -> Obj:
    body = runner_pod_json(name)
    body["spec"]["serviceAccountName"] = account
    body["spec"]["automountServiceAccountToken"] = False
    return attrs(core.create_namespaced_pod(NS, as_pod(body)))


def test_token_review_authenticates_a_pod_bound_token_for_its_audience(
    fake_kube: FakeKubernetes, core: client.CoreV1Api,
) -> None:
    pod = pod_with_account(core, "base-runner-abc12", "base-runner")
    token = fake_kube.projected_token("base-runner-abc12", audience=BROKER_AUDIENCE,
                                      expiration_seconds=600)

    status = review(fake_kube, token, [BROKER_AUDIENCE, "someone-else"])

    assert status["authenticated"] is True
    # The intersection of the audiences asked for and the token's: the caller checks its own.
    assert status["audiences"] == [BROKER_AUDIENCE]
    user = status["user"]
    assert user["username"] == f"system:serviceaccount:{NS}:base-runner"
    assert user["groups"] == ["system:serviceaccounts", f"system:serviceaccounts:{NS}",
                              "system:authenticated"]
    assert user["extra"]["authentication.kubernetes.io/pod-name"] == ["base-runner-abc12"]
    assert user["extra"]["authentication.kubernetes.io/pod-uid"] == [pod["metadata"]["uid"]]


def test_token_review_without_audiences_checks_the_api_servers_audience(
    fake_kube: FakeKubernetes, core: client.CoreV1Api,
) -> None:
    pod_with_account(core, "base-runner-abc12", "base-runner")
    broker_token = fake_kube.projected_token("base-runner-abc12", audience=BROKER_AUDIENCE)
    api_token = fake_kube.projected_token("base-runner-abc12")

    # The pitfall: a review that names no audience accepts API-server tokens only.
    refused = review(fake_kube, broker_token)
    assert not refused.get("authenticated")
    assert "is invalid for the target audiences" in refused["error"]
    assert review(fake_kube, api_token)["authenticated"] is True
    # And an API-server token is no token for the broker.
    assert not review(fake_kube, api_token, [BROKER_AUDIENCE]).get("authenticated")


def test_token_review_refuses_expired_unknown_and_deleted_pods_tokens(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(termination_delay=0)
    core = api_for(fake)
    pod_with_account(core, "base-runner-old", "base-runner")
    pod_with_account(core, "base-runner-new", "base-runner")
    expiring = fake.projected_token("base-runner-new", audience=BROKER_AUDIENCE,
                                    expiration_seconds=600)
    of_deleted = fake.projected_token("base-runner-old", audience=BROKER_AUDIENCE)
    core.delete_namespaced_pod("base-runner-old", NS, grace_period_seconds=0)

    fake.advance_token_clock(599)
    assert review(fake, expiring, [BROKER_AUDIENCE])["authenticated"] is True
    fake.advance_token_clock(1)
    expired = review(fake, expiring, [BROKER_AUDIENCE])
    assert not expired.get("authenticated") and "expired" in expired["error"]
    gone = review(fake, of_deleted, [BROKER_AUDIENCE])
    assert not gone.get("authenticated") and "not found" in gone["error"]
    assert not review(fake, "not-a-token", [BROKER_AUDIENCE]).get("authenticated")
    with pytest.raises(ValueError, match="at least 600"):
        fake.projected_token("base-runner-new", expiration_seconds=599)


def test_a_token_for_a_deleted_pod_stays_invalid_when_a_pod_of_its_name_returns(
    make_fake_kube: MakeFake,
) -> None:
    fake = make_fake_kube(termination_delay=0)
    core = api_for(fake)
    pod_with_account(core, "base-runner-abc12", "base-runner")
    token = fake.projected_token("base-runner-abc12", audience=BROKER_AUDIENCE)
    core.delete_namespaced_pod("base-runner-abc12", NS, grace_period_seconds=0)
    pod_with_account(core, "base-runner-abc12", "base-runner")

    status = review(fake, token, [BROKER_AUDIENCE])

    assert not status.get("authenticated") and "does not match the UID" in status["error"]


def test_token_review_names_the_pods_service_account(
    fake_kube: FakeKubernetes, core: client.CoreV1Api,
) -> None:
    pod_with_account(core, "gpu-42-1", "gpu-runner")
    token = fake_kube.projected_token("gpu-42-1", audience=BROKER_AUDIENCE)

    status = review(fake_kube, token, [BROKER_AUDIENCE])

    assert status["user"]["username"] == f"system:serviceaccount:{NS}:gpu-runner"


def test_token_reviews_need_a_cluster_role_a_role_cannot_grant_them(
    make_fake_kube: MakeFake,
) -> None:
    pods = [{"api_groups": [""], "resources": ["pods"], "verbs": ["create", "get"]}]
    role_only = make_fake_kube(rbac_rules=[*pods, *TOKEN_REVIEW_RULES])
    with pytest.raises(client.ApiException) as refused:
        review(role_only, "some-token", [BROKER_AUDIENCE])
    assert refused.value.status == 403
    assert 'cannot create resource "tokenreviews" in API group "authentication.k8s.io" at ' \
           "the cluster scope" in status_of(refused.value)["message"]
    assert role_only.forbidden == ["create tokenreviews"]

    granted = make_fake_kube(rbac_rules=pods, cluster_rules=TOKEN_REVIEW_RULES)
    assert not review(granted, "some-token", [BROKER_AUDIENCE]).get("authenticated")
    assert granted.forbidden == []


def test_token_reviews_are_create_only(fake_kube: FakeKubernetes) -> None:
    request = urllib.request.Request(
        f"{fake_kube.url}/apis/authentication.k8s.io/v1/tokenreviews",
        headers={"Authorization": f"Bearer {fake_kube.token}"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(request, timeout=5)
    assert refused.value.code == 405


# --- ReplicaSets, emptyDir volumes and restarts ------------------------------------------------


def replicated_template() -> Obj:
    """A Deployment-like pod template: restartPolicy Always, a work directory on emptyDir."""
    body = runner_pod_json("unused", labels={"app.kubernetes.io/name": "base-runner"})
    spec = body["spec"]
    spec["restartPolicy"] = "Always"
    spec["volumes"] = [{"name": "work", "emptyDir": {}}]
    spec["containers"][0]["volumeMounts"] = [{"name": "work", "mountPath": "/work"}]
    return {"metadata": {"labels": body["metadata"]["labels"]}, "spec": spec}


def test_an_exited_container_under_restart_policy_always_backs_off_instead_of_succeeding(
    fake_kube: FakeKubernetes,
) -> None:
    (pod,) = fake_kube.replicate("base-runner-5d8f", replicated_template())
    name = pod["metadata"]["name"]
    wait_for(lambda: (fake_kube.pod(name) or {}).get("status", {}).get("phase") == "Running",
             "the pod running")

    after = fake_kube.finish_pod(name, exit_code=0)

    assert after["status"]["phase"] == "Running"
    (status,) = after["status"]["containerStatuses"]
    assert status["restartCount"] == 1
    assert status["state"]["waiting"]["reason"] == "CrashLoopBackOff"
    assert status["lastState"]["terminated"]["exitCode"] == 0
    assert fake_kube.finish_pod(name)["status"]["containerStatuses"][0]["restartCount"] == 2


def test_a_replica_set_replaces_a_deleted_pod_at_once_with_new_empty_volumes(
    make_fake_kube: MakeFake, tmp_path: Path,
) -> None:
    fake = make_fake_kube(volume_root=tmp_path / "volumes", termination_delay=0.01)
    core = api_for(fake)
    (first,) = fake.replicate("base-runner-5d8f", replicated_template())
    first_name = first["metadata"]["name"]
    assert first_name.startswith("base-runner-5d8f-")
    assert first["metadata"]["ownerReferences"][0]["kind"] == "ReplicaSet"
    work = fake.empty_dir(first_name, "work")
    assert list(work.iterdir()) == []
    (work / "left-by-job-1").write_text("secret of a feature branch")

    core.delete_namespaced_pod(first_name, NS)

    def replaced() -> bool:
        return [p["metadata"]["name"] for p in fake.pods() if p["metadata"]["name"] != first_name
                and not p["metadata"].get("deletionTimestamp")] != []

    wait_for(replaced, "a replacement pod")
    wait_for(lambda: fake.pod(first_name) is None, "the first pod gone")
    (second,) = fake.pods()
    assert second["metadata"]["uid"] != first["metadata"]["uid"]
    assert list(fake.empty_dir(second["metadata"]["name"], "work").iterdir()) == []
    assert not work.exists()


# --- ConfigMaps --------------------------------------------------------------------------------


def config_map(name: str, data: dict[str, str], labels: dict[str, str] | None = None
               ) -> client.V1ConfigMap:
    model = client.V1ConfigMap.from_dict(
        {"apiVersion": "v1", "kind": "ConfigMap",
         "metadata": {"name": name, "labels": labels or {}}, "data": data})
    assert model is not None
    return model


def test_config_map_round_trip_through_create_read_list_and_delete(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    created = attrs(core.create_namespaced_config_map(
        NS, config_map("preempted-gpu-7", {"attempts": "1"}, {"app": "broker"})))
    core.create_namespaced_config_map(NS, config_map("other", {"x": "y"}))

    assert created["data"] == {"attempts": "1"}
    uid = created["metadata"]["uid"]
    assert attrs(core.read_namespaced_config_map("preempted-gpu-7", NS))["metadata"]["uid"] == uid
    listing = attrs(core.list_namespaced_config_map(NS, label_selector="app=broker"))
    assert [item["metadata"]["name"] for item in listing["items"]] == ["preempted-gpu-7"]
    assert int(listing["metadata"]["resource_version"]) == fake_kube.resource_version
    # The root CA publisher's ConfigMap is in every namespace, as in a real cluster.
    assert names(core.list_namespaced_config_map(NS)) == [
        "kube-root-ca.crt", "other", "preempted-gpu-7"]
    assert [c["metadata"]["name"] for c in fake_kube.configmaps()] == [
        "kube-root-ca.crt", "other", "preempted-gpu-7"]
    status = core.delete_namespaced_config_map("preempted-gpu-7", NS)
    assert isinstance(status, dict)
    assert status["details"] == {"name": "preempted-gpu-7", "kind": "configmaps", "uid": uid}
    with pytest.raises(client.ApiException) as missing:
        core.delete_namespaced_config_map("preempted-gpu-7", NS)
    assert missing.value.status == 404
    assert status_of(missing.value)["message"] == 'configmaps "preempted-gpu-7" not found'


def test_replacing_a_config_map_with_its_resource_version_succeeds_once(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    created = core.create_namespaced_config_map(NS, config_map("state", {"attempts": "1"}))
    assert created.metadata is not None
    first_version = created.metadata.resource_version

    created.data = {"attempts": "2"}
    replaced = attrs(core.replace_namespaced_config_map("state", NS, created))

    assert replaced["data"] == {"attempts": "2"}
    assert int(replaced["metadata"]["resource_version"]) > int(str(first_version))
    assert replaced["metadata"]["uid"] == created.metadata.uid
    created.data = {"attempts": "3"}  # still carries the first resourceVersion
    with pytest.raises(client.ApiException) as stale:
        core.replace_namespaced_config_map("state", NS, created)
    assert stale.value.status == 409
    assert status_of(stale.value)["reason"] == "Conflict"
    assert status_of(stale.value)["message"] == (
        'Operation cannot be fulfilled on configmaps "state": the object has been modified; '
        "please apply your changes to the latest version and try again"
    )
    assert status_of(stale.value)["details"] == {"name": "state", "kind": "configmaps"}
    assert fake_kube.configmaps()[-1]["data"] == {"attempts": "2"}


def test_a_replace_without_resource_version_is_unconditional_and_a_no_op_keeps_the_version(
    core: client.CoreV1Api,
) -> None:
    core.create_namespaced_config_map(NS, config_map("state", {"attempts": "1"}))

    replaced = attrs(core.replace_namespaced_config_map(
        "state", NS, config_map("state", {"attempts": "5"})))
    again = attrs(core.replace_namespaced_config_map(
        "state", NS, config_map("state", {"attempts": "5"})))

    assert replaced["data"] == {"attempts": "5"}
    assert again["metadata"]["resource_version"] == replaced["metadata"]["resource_version"]
    with pytest.raises(client.ApiException) as missing:
        core.replace_namespaced_config_map("absent", NS, config_map("absent", {}))
    assert missing.value.status == 404
    with pytest.raises(client.ApiException) as renamed:
        core.replace_namespaced_config_map("state", NS, config_map("other", {}))
    assert renamed.value.status == 400


def test_config_maps_patch_by_strategic_merge_json_merge_and_json_patch(
    core: client.CoreV1Api,
) -> None:
    core.create_namespaced_config_map(NS, config_map("state", {"a": "1", "b": "2"}))

    strategic = attrs(core.patch_namespaced_config_map(
        "state", NS, {"data": {"b": None, "c": "3"}}))
    merged = attrs(core.patch_namespaced_config_map(
        "state", NS, {"metadata": {"labels": {"x": "y"}}, "data": {"a": "9"}},
        _content_type="application/merge-patch+json"))
    patched = attrs(core.patch_namespaced_config_map(
        "state", NS, [{"op": "test", "path": "/data/a", "value": "9"},
                      {"op": "replace", "path": "/data/c", "value": "4"}]))

    assert strategic["data"] == {"a": "1", "c": "3"}
    assert merged["data"] == {"a": "9", "c": "3"}
    assert merged["metadata"]["labels"] == {"x": "y"}
    assert patched["data"] == {"a": "9", "c": "4"}
    with pytest.raises(client.ApiException) as failed_test:
        core.patch_namespaced_config_map(
            "state", NS, [{"op": "test", "path": "/data/a", "value": "1"}])
    assert failed_test.value.status == 422


def test_a_patch_naming_a_stale_resource_version_is_409(core: client.CoreV1Api) -> None:
    created = core.create_namespaced_config_map(NS, config_map("state", {"a": "1"}))
    assert created.metadata is not None
    core.patch_namespaced_config_map("state", NS, {"data": {"a": "2"}})

    with pytest.raises(client.ApiException) as stale:
        core.patch_namespaced_config_map(
            "state", NS,
            {"metadata": {"resourceVersion": created.metadata.resource_version},
             "data": {"a": "3"}},
            _content_type="application/merge-patch+json")

    assert stale.value.status == 409
    assert status_of(stale.value)["reason"] == "Conflict"


def test_invalid_config_maps_are_422(fake_kube: FakeKubernetes, core: client.CoreV1Api) -> None:
    too_big = {"a": "x" * (600 * 1024), "b": "y" * (600 * 1024)}
    with pytest.raises(client.ApiException) as large:
        core.create_namespaced_config_map(NS, config_map("big", too_big))
    with pytest.raises(client.ApiException) as bad_key:
        core.create_namespaced_config_map(NS, config_map("keys", {"no/slash": "1"}))
    with pytest.raises(client.ApiException) as bad_name:
        core.create_namespaced_config_map(NS, config_map("Upper", {}))
    number, _ = post_raw(fake_kube, f"/api/v1/namespaces/{NS}/configmaps", {
        "apiVersion": "v1", "kind": "ConfigMap", "metadata": {"name": "n"}, "data": {"a": 1}})

    assert (large.value.status, bad_key.value.status, bad_name.value.status) == (422, 422, 422)
    assert "Too long: may not be more than 1048576 bytes" in status_of(large.value)["message"]
    assert "a valid config key must consist of" in status_of(bad_key.value)["message"]
    assert number == 422
    created = core.create_namespaced_config_map(NS, config_map("state", {"a": "1"}))
    created.data = too_big
    with pytest.raises(client.ApiException) as grown:
        core.replace_namespaced_config_map("state", NS, created)
    assert grown.value.status == 422


def test_an_immutable_config_map_refuses_data_changes(core: client.CoreV1Api) -> None:
    body = config_map("frozen", {"a": "1"})
    body.immutable = True
    core.create_namespaced_config_map(NS, body)

    with pytest.raises(client.ApiException) as refused:
        core.patch_namespaced_config_map("frozen", NS, {"data": {"a": "2"}})
    labelled = attrs(core.patch_namespaced_config_map(
        "frozen", NS, {"metadata": {"labels": {"k": "v"}}}))

    assert refused.value.status == 422
    assert "field is immutable when `immutable` is set" in status_of(refused.value)["message"]
    assert labelled["metadata"]["labels"] == {"k": "v"}


def test_config_maps_are_checked_by_rbac(make_fake_kube: MakeFake) -> None:
    fake = make_fake_kube(rbac_rules=[
        {"api_groups": [""], "resources": ["configmaps"], "verbs": ["get", "create", "update"]},
    ])
    core = api_for(fake)
    core.create_namespaced_config_map(NS, config_map("state", {"a": "1"}))
    core.replace_namespaced_config_map("state", NS, config_map("state", {"a": "2"}))

    with pytest.raises(client.ApiException) as refused:
        core.patch_namespaced_config_map("state", NS, {"data": {"a": "3"}})
    with pytest.raises(client.ApiException):
        core.delete_namespaced_config_map("state", NS)

    assert refused.value.status == 403
    assert fake.forbidden == ["patch configmaps", "delete configmaps"]


# --- Preemption, node loss and genuine failures ------------------------------------------------


def changes_since(
    list_call: Callable[..., Any], version: str, count: int, *args: Any
) -> list[tuple[str, Obj]]:
    """The first `count` watch events after `version`, as (type, object as a dict)."""
    seen: list[tuple[str, Obj]] = []
    stream = watch.Watch()
    for event in stream.stream(list_call, *args, resource_version=version, timeout_seconds=5):
        seen.append((event["type"], attrs(event["object"])))
        if len(seen) == count:
            stream.stop()
    return seen


def condition(pod: Obj, kind: str) -> Obj:
    return next(c for c in pod["status"]["conditions"] if c["type"] == kind)


SHUTDOWN = "Pod was terminated in response to imminent node shutdown."


def test_preempting_a_running_pod_fails_it_as_graceful_node_shutdown_and_removes_its_node(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-7-1", gpus=1))
    pod = watch_pod(core, "gpu-7-1", running)[-1]
    node = pod["spec"]["node_name"]
    lines: list[str] = []
    ended = follow_log(core, "gpu-7-1", lines)
    start = list_version(core)

    fake_kube.preempt_pod("gpu-7-1")

    [(kind, failed)] = changes_since(core.list_namespaced_pod, start, 1, NS)
    assert kind == "MODIFIED"
    status = failed["status"]
    assert (status["phase"], status["reason"], status["message"]) == (
        "Failed", "Terminated", SHUTDOWN)
    target = condition(failed, "DisruptionTarget")
    assert (target["status"], target["reason"], target["message"]) == (
        "True", "TerminationByKubelet", SHUTDOWN)
    assert condition(failed, "Ready")["status"] == "False"
    container = status["container_statuses"][0]
    assert container["ready"] is False
    terminated = container["state"]["terminated"]
    assert (terminated["exit_code"], terminated["reason"]) == (143, "Error")
    [(node_change, gone)] = changes_since(core.list_node, start, 1)
    assert (node_change, gone["metadata"]["name"]) == ("DELETED", node)
    assert node not in [n["metadata"]["name"] for n in fake_kube.nodes()]
    assert ended.wait(5), "the log follow did not end with the container"
    assert "Killing" in reasons(pod_events(core, "gpu-7-1"))


def test_a_pod_preempted_while_its_containers_wait_reports_them_never_started(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    # Its Secret volume never appears: scheduled, admitted, containers in ContainerCreating.
    core.create_namespaced_pod(NS, runner_pod("gpu-7-1", secret_volume="absent"))
    watch_pod(core, "gpu-7-1", container_status_is("waiting"))

    preempted = fake_kube.preempt_pod("gpu-7-1")

    pod = attrs(core.read_namespaced_pod("gpu-7-1", NS))
    assert pod["status"]["phase"] == preempted["status"]["phase"] == "Failed"
    terminated = pod["status"]["container_statuses"][0]["state"]["terminated"]
    assert (terminated["exit_code"], terminated["reason"], terminated["message"]) == (
        137, "ContainerStatusUnknown",
        "The container could not be located when the pod was terminated")
    time.sleep(0.1)  # the rest of its script does not revive it
    assert attrs(core.read_namespaced_pod("gpu-7-1", NS))["status"]["phase"] == "Failed"


def test_a_preempted_gpu_frees_its_gpu_on_a_kept_node_and_its_pool_regrows_when_removed(
    make_fake_kube: MakeFake,
) -> None:
    pool = FakeNodePool("gpu-l4", {NODE_GPU_LABEL: "true"}, gpus_per_node=1, max_nodes=1)
    fake = make_fake_kube(node_pools=[pool])
    core = api_for(fake)
    core.create_namespaced_pod(NS, runner_pod("gpu-7-1", gpus=1))
    first = watch_pod(core, "gpu-7-1", running)[-1]["spec"]["node_name"]

    fake.preempt_pod("gpu-7-1", keep_node=True)
    core.create_namespaced_pod(NS, runner_pod("gpu-7-2", gpus=1))
    second = watch_pod(core, "gpu-7-2", running)[-1]["spec"]["node_name"]
    fake.preempt_pod("gpu-7-2")  # the pool's one node goes: the autoscaler may add one again
    core.create_namespaced_pod(NS, runner_pod("gpu-7-3", gpus=1))
    third = watch_pod(core, "gpu-7-3", running)[-1]["spec"]["node_name"]

    assert second == first  # the GPU was free again on the kept node
    assert third != second
    assert [n["metadata"]["name"] for n in fake.nodes() if "gpu-l4" in n["metadata"]["name"]] == [
        third]


def test_a_pod_not_yet_on_a_node_cannot_be_preempted(make_fake_kube: MakeFake) -> None:
    fake = make_fake_kube(scheduler=lambda pod: PodScript.unschedulable())
    api_for(fake).create_namespaced_pod(NS, runner_pod("gpu-7-1"))

    with pytest.raises(ValueError, match="not scheduled on a node yet"):
        fake.preempt_pod("gpu-7-1")
    with pytest.raises(ValueError, match="not scheduled on a node yet"):
        fake.lose_pod_with_node("gpu-7-1")
    with pytest.raises(LookupError):
        fake.preempt_pod("absent")


def test_a_pod_whose_node_is_lost_is_failed_then_deleted_by_pod_gc_with_its_secrets(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    pod = attrs(core.create_namespaced_pod(NS, runner_pod("gpu-7-1", gpus=1)))
    core.create_namespaced_secret(NS, secret("gpu-7-1-jit", owner_references=owner(pod)))
    node = watch_pod(core, "gpu-7-1", running)[-1]["spec"]["node_name"]
    start = list_version(core)

    fake_kube.lose_pod_with_node("gpu-7-1")

    [(node_change, gone)] = changes_since(core.list_node, start, 1)
    assert (node_change, gone["metadata"]["name"]) == ("DELETED", node)
    (first, failed), (second, deleted) = changes_since(core.list_namespaced_pod, start, 2, NS)
    assert (first, second) == ("MODIFIED", "DELETED")
    assert failed["status"]["phase"] == "Failed"
    target = condition(failed, "DisruptionTarget")
    assert (target["status"], target["reason"], target["message"]) == (
        "True", "DeletionByPodGC", "PodGC: node no longer exists")
    assert deleted["metadata"]["uid"] == pod["metadata"]["uid"]
    assert fake_kube.pods() == [] and fake_kube.secrets() == []


def test_pod_gc_after_a_preemption_only_deletes_the_failed_pod(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-7-1", gpus=1))
    watch_pod(core, "gpu-7-1", running)
    fake_kube.preempt_pod("gpu-7-1")
    start = list_version(core)

    fake_kube.lose_pod_with_node("gpu-7-1")

    [(kind, deleted)] = changes_since(core.list_namespaced_pod, start, 1, NS)
    assert kind == "DELETED"
    assert condition(deleted, "DisruptionTarget")["reason"] == "TerminationByKubelet"


def test_finish_pod_reports_an_oom_kill(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-7-1"))
    watch_pod(core, "gpu-7-1", running)

    fake_kube.finish_pod("gpu-7-1", exit_code=137, reason="OOMKilled")

    pod = attrs(core.read_namespaced_pod("gpu-7-1", NS))
    assert pod["status"]["phase"] == "Failed"
    assert pod["status"]["reason"] is None
    assert all(c["type"] != "DisruptionTarget" for c in pod["status"]["conditions"])
    terminated = pod["status"]["container_statuses"][0]["state"]["terminated"]
    assert (terminated["exit_code"], terminated["reason"]) == (137, "OOMKilled")


def test_exceed_deadline_fails_a_running_pod_as_active_deadline_seconds_would(
    fake_kube: FakeKubernetes, core: client.CoreV1Api
) -> None:
    core.create_namespaced_pod(NS, runner_pod("gpu-7-1"))
    watch_pod(core, "gpu-7-1", running)

    fake_kube.exceed_deadline("gpu-7-1")

    pod = attrs(core.read_namespaced_pod("gpu-7-1", NS))
    assert (pod["status"]["phase"], pod["status"]["reason"], pod["status"]["message"]) == (
        "Failed", "DeadlineExceeded",
        "Pod was active on the node longer than the specified deadline")
    assert pod["status"]["container_statuses"][0]["state"]["terminated"]["exit_code"] == 137
    assert "DeadlineExceeded" in reasons(pod_events(core, "gpu-7-1"))
    with pytest.raises(ValueError, match="already finished"):
        fake_kube.exceed_deadline("gpu-7-1")
