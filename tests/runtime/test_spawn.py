"""spawn against the fake cluster and the fake GitHub, through the real clients over HTTP.

Every test ends with `fake_kube.validation_errors == []`: everything spawn sent validated
against the strict Kubernetes 1.33 schema.
"""

from __future__ import annotations

import base64
import json
import math
import re
import threading
import time
from typing import Any

import pytest

from gpu_runners import contract
from gpu_runners.broker_api import SpawnResult
from gpu_runners.delete import delete_run
from gpu_runners.errors import (
    GitHubAuthError,
    ImagePullError,
    NoCapacityError,
    PodFailedError,
    WaitTimeoutError,
)
from gpu_runners.github_api import GitHubClient
from gpu_runners.kube import KubeClient, KubeTimeouts
from gpu_runners.progress import ProgressLog
from gpu_runners.spawn import spawn
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, FakeNode, PodScript, Taint
from tests.runtime.fake_wiring import (
    api_requests,
    bring_runners_online,
    kube_client_for,
    spawn_request,
    wait_until,
)

JIT = r"/actions/runners/generate-jitconfig$"


def assert_nothing_left(fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> None:
    assert fake_kube.pods() == []
    assert fake_kube.secrets() == []
    assert fake_github.runners == {}
    assert fake_kube.validation_errors == []


def stage_texts(log: ProgressLog) -> list[str]:
    """The progress lines without their elapsed-time stamp."""
    return [re.sub(r"^\[\s*\d+\.\d+s\] ", "", line) for line in log.lines]


# --- the way it should go -------------------------------------------------------------------


def test_spawn_scales_up_a_gpu_node_and_returns_once_the_runner_is_online(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    # A scale-up that takes a while, as on GKE: the autoscaler's event comes well before
    # the node (on its own watch stream, so it could otherwise race the binding).
    fake_kube: FakeKubernetes = make_fake_kube(
        scheduler=lambda pod: PodScript.scale_up(scale_up_delay=0.3)
    )
    bring_runners_online(fake_kube, fake_github)

    result = spawn(spawn_request(gpu_types=("nvidia-l4",)), kube=kube_client_for(fake_kube),
                   github=github, log=log)

    node = fake_kube.pods()[0]["spec"]["nodeName"]
    assert result.label == "gpu-123-1"
    assert (result.node, result.node_added, result.gpu_type) == (node, True, "nvidia-l4")
    assert node.startswith("gke-fake-gpu-nvidia-l4-")
    runner = fake_github.runner_named("gpu-123-1")
    assert runner is not None and runner["status"] == "online"
    assert [label["name"] for label in runner["labels"]] == ["gpu-123-1"]
    texts = stage_texts(log)
    assert texts[:3] == [
        "spawning GPU runner gpu-123-1 for "
        "https://github.com/acme/models/actions/runs/123/attempts/1",
        "created pod gpu-123-1 in namespace github-runners (1 x nvidia-l4)",
        f"registered JIT runner gpu-123-1 (id {runner['id']}, labels gpu-123-1)",
    ]
    assert texts[3].startswith("waiting for nvidia-l4 GPU capacity: 0/3 nodes are available")
    assert texts[4].startswith("autoscaler is adding a GPU node: pod triggered scale-up: [{")
    assert texts[5] == f"scheduled on node {node} (a node the autoscaler added)"
    # The kubelet's Pulled event may be read before or after the pod turns Running.
    assert texts[6].startswith("image pulled")
    assert texts[7:] == ["container running", "runner online"]
    stages = ["created", "scale-up triggered", "node ready", "driver ready", "scheduled",
              "image pulling", "image pulled", "container running", "runner online"]
    assert set(result.stage_seconds) == set(stages)
    # Reached in that order (the event and pod streams may tie, never invert).
    times = [result.stage_seconds[stage] for stage in stages]
    assert times == sorted(times)
    assert result.image_pull == "pulled"  # the fake's kubelet downloads the whole image
    assert result.stage_seconds["scheduled"] >= 0.3
    assert fake_kube.validation_errors == []


@pytest.mark.usefixtures("runners_come_online")
def test_pod_owns_the_secret_holding_the_config_github_issued_and_no_token(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    spawn(spawn_request(), kube=kube, github=github, log=log)

    (pod,) = fake_kube.pods()
    (secret,) = fake_kube.secrets()
    runner = fake_github.runner_named("gpu-123-1")
    assert runner is not None
    assert secret["metadata"]["name"] == "gpu-123-1-jit"
    assert secret["metadata"]["ownerReferences"] == [
        {"apiVersion": "v1", "kind": "Pod", "name": "gpu-123-1", "uid": pod["metadata"]["uid"]}
    ]
    issued = fake_github.jit_configs[runner["id"]]
    assert base64.b64decode(secret["data"]["jitconfig"]).decode() == issued
    assert fake_github.token not in json.dumps(pod)
    assert fake_github.token not in json.dumps(secret)
    assert fake_kube.validation_errors == []


@pytest.mark.usefixtures("runners_come_online")
def test_the_registration_carries_only_the_runs_own_label_so_no_other_job_can_take_it(
    fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient, log: ProgressLog,
) -> None:
    spawn(spawn_request(), kube=kube, github=github, log=log)

    (request,) = fake_github.requests_to(JIT, "POST")
    assert isinstance(request.body, dict)
    assert request.body["labels"] == ["gpu-123-1"]
    runner = fake_github.runner_named("gpu-123-1")
    assert runner is not None
    # What GitHub registered, as a job's `runs-on` is matched against: no `self-hosted`.
    assert [label["name"] for label in runner["labels"]] == ["gpu-123-1"]


@pytest.mark.usefixtures("runners_come_online")
def test_spawn_on_a_new_node_needs_five_requests_besides_its_watches(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    result = spawn(spawn_request(), kube=kube, github=github, log=log)

    runner = fake_github.runner_named("gpu-123-1")
    assert runner is not None
    # The node the autoscaler added is read once, for its Ready time.
    assert api_requests(fake_kube) == [
        ("POST", "/api/v1/namespaces/github-runners/pods"),
        ("POST", "/api/v1/namespaces/github-runners/secrets"),
        ("GET", f"/api/v1/nodes/{result.node}"),
    ]
    assert [(r.method, r.path) for r in fake_github.requests] == [
        ("POST", "/repos/acme/models/actions/runners/generate-jitconfig"),
        ("GET", f"/repos/acme/models/actions/runners/{runner['id']}"),
    ]


def test_spawn_on_a_free_gpu_node_reports_an_existing_node(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    gpu_node = FakeNode("gke-gpu-l4-ready", {"gpu": "true", contract.GKE_ACCELERATOR_LABEL:
                                             "nvidia-l4"}, gpus=1,
                        taints=(Taint("nvidia.com/gpu", "present"),))
    fake_kube: FakeKubernetes = make_fake_kube(nodes=[gpu_node])
    bring_runners_online(fake_kube, fake_github)

    result = spawn(spawn_request(), kube=kube_client_for(fake_kube), github=github, log=log)

    assert (result.node, result.node_added) == ("gke-gpu-l4-ready", False)
    assert "scheduled on node gke-gpu-l4-ready (an existing node)" in stage_texts(log)
    # No node stages, and no node read, for a node that was up before the pod.
    assert not {"node ready", "driver ready"} & set(result.stage_seconds)
    assert not any(r.path.startswith("/api/v1/nodes") for r in fake_kube.requests)


# --- noticing the runner online: its log first, GitHub as a fallback ----------------------------

RUNNER_GET = r"/actions/runners/\d+$"
LOG_PATH = "/api/v1/namespaces/*/pods/*/log"


def runner_lookups(fake_github: FakeGitHub) -> int:
    return len(fake_github.requests_to(RUNNER_GET, "GET"))


def test_a_runner_connecting_seconds_after_start_is_noticed_from_its_log_with_one_lookup(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    online_at = bring_runners_online(fake_kube, fake_github, connect_delay=1.5)

    result = spawn(spawn_request(), kube=kube, github=github, log=log)
    returned = time.monotonic()

    # The online flip and the "Listening for Jobs" line are one event of the fakes.
    assert 0.0 <= returned - online_at["gpu-123-1"] <= 0.5
    stages = result.stage_seconds
    assert stages["runner online"] - stages["container running"] >= 1.5
    runner = fake_github.runner_named("gpu-123-1")
    assert runner is not None
    # 5 requests besides streams (target <= 6): no polling while the runner connects.
    assert api_requests(fake_kube) == [
        ("POST", "/api/v1/namespaces/github-runners/pods"),
        ("POST", "/api/v1/namespaces/github-runners/secrets"),
        ("GET", f"/api/v1/nodes/{result.node}"),
    ]
    assert [(r.method, r.path) for r in fake_github.requests] == [
        ("POST", "/repos/acme/models/actions/runners/generate-jitconfig"),
        ("GET", f"/repos/acme/models/actions/runners/{runner['id']}"),
    ]
    follows = [r for r in fake_kube.requests if r.path.endswith("/pods/gpu-123-1/log")]
    assert [(r.status, r.query.get("container"), r.query.get("follow")) for r in follows] == [
        (200, contract.GPU_RUNNER_CONTAINER, "true")]
    # The log is the job's output too: matched, never printed.
    assert not any("Listening for Jobs" in line or "entrypoint:" in line for line in log.lines)


@pytest.mark.parametrize(("status", "drop", "told"), [
    (403, False, 'cannot read the runner\'s log (403: injected fault: 403 on GET '
                 '/api/v1/namespaces/github-runners/pods/gpu-123-1/log)'),
    (500, False, "cannot read the runner's log (500: injected fault: 500 on GET "),
    (None, True, "cannot read the runner's log (MaxRetryError: "),
], ids=["forbidden", "server-error", "dropped-connections"])
def test_a_log_that_cannot_be_read_falls_back_to_polling_github(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog, status: int | None, drop: bool, told: str,
) -> None:
    online_at = bring_runners_online(fake_kube, fake_github, connect_delay=0.6)
    # Every log request fails for the whole spawn (urllib3 itself retries a dropped one).
    fake_kube.inject("GET", LOG_PATH, status, drop=drop, times=1000)

    result = spawn(spawn_request(online_poll_seconds=0.2), kube=kube, github=github, log=log)

    assert result.label == "gpu-123-1"
    assert time.monotonic() - online_at["gpu-123-1"] <= 0.5
    texts = stage_texts(log)
    assert any(text.startswith(told) for text in texts), texts
    assert any(text.endswith("asking GitHub every 0.2s whether it is online") for text in texts)
    assert runner_lookups(fake_github) >= 1
    assert fake_kube.validation_errors == []


def test_a_log_stream_that_ends_early_is_followed_again_from_its_tail(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    online_at = bring_runners_online(fake_kube, fake_github, connect_delay=1.0)
    results: list[SpawnResult] = []
    spawning = threading.Thread(target=lambda: results.append(
        spawn(spawn_request(), kube=kube, github=github, log=log)))
    spawning.start()

    def follows() -> list[dict[str, str]]:
        return [dict(r.query) for r in fake_kube.requests if r.path.endswith("/log")]

    wait_until(lambda: len(follows()) == 1 and fake_kube.open_log_follows == 1,
               what="the log follow to open")
    fake_kube.end_log_streams()  # before the runner connects
    spawning.join(timeout=10)

    assert [result.label for result in results] == ["gpu-123-1"]
    # Seen from the log, not from the fallback poll (every ONLINE_FALLBACK_INTERVAL, 5 s); the
    # margin is for a loaded machine.
    assert time.monotonic() - online_at["gpu-123-1"] <= 3.0
    # Followed again, from the tail (lines written between the two follows are not lost).
    assert [query.get("tailLines") for query in follows()] == [None, "200"]
    assert runner_lookups(fake_github) == 1
    assert not any("cannot read" in line for line in log.lines)


def test_the_refused_log_polls_github_at_the_fallback_interval(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    bring_runners_online(fake_kube, fake_github, connect_delay=1.0)
    fake_kube.inject("GET", LOG_PATH, 403, times=1000)

    result = spawn(spawn_request(online_poll_seconds=0.3), kube=kube, github=github, log=log)

    lookups = [r for r in fake_github.requests if re.search(RUNNER_GET, r.path)]
    # At once when the log is refused, then every 0.3 s until the runner connects at 1 s.
    assert 3 <= len(lookups) <= 5
    assert result.stage_seconds["runner online"] - result.stage_seconds["container running"] < 1.5


def test_a_runner_online_whose_log_never_says_so_is_found_after_the_silence_grace(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    # An image whose runner logs elsewhere: online at once, but no line in the pod log.
    fake_kube: FakeKubernetes = make_fake_kube(
        scheduler=lambda pod: PodScript.run(connect_delay=math.inf))

    def online(pod: dict[str, Any]) -> None:
        fake_github.set_runner_status(pod["metadata"]["name"], "online")

    fake_kube.on_pod_running(online)
    request = spawn_request(online_poll_seconds=0.2, log_silence_seconds=0.8)

    result = spawn(request, kube=kube_client_for(fake_kube), github=github, log=log)

    stages = result.stage_seconds
    assert 0.8 <= stages["runner online"] - stages["container running"] < 1.5
    assert runner_lookups(fake_github) == 1  # nothing asked during the grace
    assert not any("cannot read" in line for line in log.lines)


def test_a_runner_whose_line_never_comes_times_out_without_polling_and_is_removed(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    fake_kube: FakeKubernetes = make_fake_kube(
        scheduler=lambda pod: PodScript.run(connect_delay=math.inf))
    bring_runners_online(fake_kube, fake_github)

    with pytest.raises(WaitTimeoutError) as error:
        spawn(spawn_request(timeout=1.0), kube=kube_client_for(fake_kube), github=github,
              log=log)

    assert str(error.value) == (
        "runner gpu-123-1 not online after 1s (last stage: container running)"
    )
    assert runner_lookups(fake_github) == 0  # within the silence grace: GitHub never asked
    assert_nothing_left(fake_kube, fake_github)


# --- failing fast, and cleaning up ------------------------------------------------------------


def test_no_capacity_and_no_scale_up_fails_fast_and_removes_everything(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    # The cluster's only GPU pool is L4: nothing can ever take a T4 pod.
    request = spawn_request(gpu_types=("nvidia-tesla-t4",), timeout=30.0)

    with pytest.raises(NoCapacityError) as error:
        spawn(request, kube=kube, github=github, log=log)

    assert str(error.value).startswith(
        "no nvidia-tesla-t4 GPU capacity and no scale-up coming: pod didn't trigger scale-up"
    )
    assert log.elapsed() < 5.0  # the autoscaler's refusal, not the 30 s timeout, ended it
    assert_nothing_left(fake_kube, fake_github)
    assert stage_texts(log)[-1].startswith(
        "removed pod gpu-123-1, secret gpu-123-1-jit, runner registration gpu-123-1 after: no"
    )


@pytest.mark.usefixtures("runners_come_online")
def test_a_gpu_type_without_capacity_falls_back_to_the_next_one(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    request = spawn_request(gpu_types=("nvidia-tesla-t4", "nvidia-l4"))

    result = spawn(request, kube=kube, github=github, log=log)

    assert result.gpu_type == "nvidia-l4"
    (pod,) = fake_kube.pods()
    assert pod["spec"]["nodeSelector"][contract.GKE_ACCELERATOR_LABEL] == "nvidia-l4"
    assert any(text.endswith("; trying nvidia-l4 next") for text in stage_texts(log))
    # The first pod never ran, so its single-use config went to the second: one registration.
    assert len(fake_github.requests_to(JIT)) == 1
    assert len(fake_github.runners) == 1
    assert fake_kube.validation_errors == []


def test_every_gpu_type_without_capacity_names_each_refusal(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    request = spawn_request(gpu_types=("nvidia-tesla-t4", "nvidia-a100-80gb"))

    with pytest.raises(NoCapacityError) as error:
        spawn(request, kube=kube, github=github, log=log)

    assert "no nvidia-tesla-t4 GPU capacity" in str(error.value)
    assert "; no nvidia-a100-80gb GPU capacity" in str(error.value)
    assert_nothing_left(fake_kube, fake_github)


def test_an_image_that_cannot_be_pulled_fails_with_the_registry_error(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    fake_kube: FakeKubernetes = make_fake_kube(scheduler=lambda pod: PodScript.image_pull_error())

    with pytest.raises(ImagePullError) as error:
        spawn(spawn_request(), kube=kube_client_for(fake_kube), github=github, log=log)

    image = "ghcr.io/acme/models/github-runner@sha256:" + "a" * 64
    assert str(error.value) == (
        f"cannot pull image {image}: ImagePullBackOff: rpc error: code = NotFound desc = failed "
        'to pull and unpack image "<image>": failed to resolve reference "<image>": <image>: not '
        "found"
    )
    assert_nothing_left(fake_kube, fake_github)


def test_a_pod_that_fails_before_its_runner_is_online_reports_the_exit_code(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    fake_kube: FakeKubernetes = make_fake_kube(scheduler=lambda pod: PodScript.crash(exit_code=3))

    with pytest.raises(PodFailedError, match=r"exited with code 3 \(Error\)"):
        spawn(spawn_request(), kube=kube_client_for(fake_kube), github=github, log=log)

    assert_nothing_left(fake_kube, fake_github)


def test_a_runner_that_never_comes_online_times_out_and_is_removed(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    # No runners_come_online: the container runs but its runner never connects.
    with pytest.raises(WaitTimeoutError) as error:
        spawn(spawn_request(timeout=1.0), kube=kube, github=github, log=log)

    assert str(error.value) == (
        "runner gpu-123-1 not online after 1s (last stage: container running)"
    )
    assert 1.0 <= log.elapsed() < 3.0
    assert_nothing_left(fake_kube, fake_github)


# --- quota -------------------------------------------------------------------------------------


def test_exhausted_gpu_quota_is_waited_out_until_a_pod_finishes(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient,
) -> None:
    fake_kube: FakeKubernetes = make_fake_kube(gpu_quota=1)
    bring_runners_online(fake_kube, fake_github)
    kube = kube_client_for(fake_kube)
    spawn(spawn_request(run_id=1), kube=kube, github=github, log=ProgressLog(None))
    waiting = ProgressLog(None)
    results: list[SpawnResult] = []
    second = threading.Thread(target=lambda: results.append(
        spawn(spawn_request(run_id=2), kube=kube, github=github, log=waiting)))
    second.start()

    wait_until(lambda: any("waiting for GPU quota" in line for line in waiting.lines),
               what="the second spawn to wait for quota")
    assert fake_github.runner_named("gpu-2-1") is None  # nothing registered while waiting
    fake_kube.finish_pod("gpu-1-1")  # run 1's job is done: its GPU is free again
    second.join(timeout=10)

    assert [result.label for result in results] == ["gpu-2-1"]
    quota_line = next(line for line in waiting.lines if "waiting for GPU quota" in line)
    assert "exceeded quota: gpu-quota, requested: requests.nvidia.com/gpu=1" in quota_line
    assert fake_kube.validation_errors == []


def test_quota_that_never_frees_times_out_without_registering_a_runner(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    fake_kube: FakeKubernetes = make_fake_kube(gpu_quota=0)

    with pytest.raises(WaitTimeoutError, match="GPU quota still exhausted after 1s"):
        spawn(spawn_request(timeout=1.0), kube=kube_client_for(fake_kube), github=github,
              log=log)

    assert fake_github.requests_to(JIT) == []
    assert_nothing_left(fake_kube, fake_github)


# --- idempotency and faults --------------------------------------------------------------------


@pytest.mark.usefixtures("runners_come_online")
def test_spawning_twice_for_the_same_run_reuses_the_runner(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
) -> None:
    first = spawn(spawn_request(), kube=kube, github=github, log=ProgressLog(None))
    again_log = ProgressLog(None)

    again = spawn(spawn_request(), kube=kube, github=github, log=again_log)

    assert (first.reused, again.reused) == (False, True)
    assert again.label == first.label and again.node == first.node
    assert len(fake_kube.pods()) == 1 and len(fake_github.runners) == 1
    assert len(fake_github.requests_to(JIT)) == 1
    assert "reusing pod gpu-123-1 of an earlier spawn for this run" in stage_texts(again_log)


@pytest.mark.usefixtures("runners_come_online")
def test_a_stale_offline_registration_of_the_same_name_is_replaced(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    stale = fake_github.add_runner("gpu-123-1", ["gpu-123-1"], status="offline")

    spawn(spawn_request(), kube=kube, github=github, log=log)

    runner = fake_github.runner_named("gpu-123-1")
    assert runner is not None and runner["id"] != stale["id"] and runner["status"] == "online"
    assert f"removing stale runner registration gpu-123-1 (id {stale['id']})" in stage_texts(log)


@pytest.mark.usefixtures("runners_come_online")
def test_transient_api_failures_and_a_dropped_watch_are_survived(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_kube.inject("POST", "/api/v1/namespaces/*/pods", 500)
    fake_kube.inject("POST", "/api/v1/namespaces/*/secrets", 503)
    fake_kube.inject("GET", "/api/v1/namespaces/*/pods", None, drop=True)  # the pod watch
    fake_github.inject("POST", JIT, 502)

    result = spawn(spawn_request(), kube=kube, github=github, log=log)

    assert result.label == "gpu-123-1"
    assert api_requests(fake_kube).count(("POST", "/api/v1/namespaces/github-runners/pods")) == 2
    assert len(fake_github.requests_to(JIT)) == 2
    assert fake_kube.validation_errors == []


def test_two_concurrent_runs_never_touch_each_others_pods(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    runners_come_online: None,
) -> None:
    results: dict[int, SpawnResult] = {}

    def run(run_id: int) -> None:
        results[run_id] = spawn(spawn_request(run_id=run_id), kube=kube, github=github,
                                log=ProgressLog(None))

    threads = [threading.Thread(target=run, args=(run_id,)) for run_id in (501, 502)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=15)
    delete_run(spawn_request(run_id=501).identity, namespace="github-runners", kube=kube,
               github=github, log=ProgressLog(None))

    assert sorted(result.label for result in results.values()) == ["gpu-501-1", "gpu-502-1"]
    assert results[501].node != results[502].node  # one GPU per node: two nodes added
    # Run 501's pod terminates gracefully; run 502's stays, untouched.
    wait_until(lambda: [pod["metadata"]["name"] for pod in fake_kube.pods()] == ["gpu-502-1"],
               what="run 501's pod to terminate")
    assert "deletionTimestamp" not in fake_kube.pods()[0]["metadata"]
    assert [s["metadata"]["name"] for s in fake_kube.secrets()] == ["gpu-502-1-jit"]
    assert [runner["name"] for runner in fake_github.runners.values()] == ["gpu-502-1"]
    assert fake_kube.validation_errors == []


def test_a_github_refusal_after_the_pod_exists_removes_the_pod(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, kube: KubeClient, github: GitHubClient,
    log: ProgressLog,
) -> None:
    fake_github.inject("POST", JIT, 401, body={"message": "Bad credentials"})

    with pytest.raises(GitHubAuthError, match="rejected the token from the test token"):
        spawn(spawn_request(), kube=kube, github=github, log=log)

    assert_nothing_left(fake_kube, fake_github)


@pytest.mark.usefixtures("runners_come_online")
def test_a_kubernetes_api_answering_too_slowly_is_retried(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    impatient = kube_client_for(fake_kube).with_timeouts(
        KubeTimeouts(connect=1.0, read=0.3, attempts=3, backoff_base=0.01)
    )
    # Each first create is answered after 1 s: the client gives up at 0.3 s and sends it again.
    fake_kube.inject("POST", "/api/v1/namespaces/*/pods", None, delay=1.0)
    fake_kube.inject("POST", "/api/v1/namespaces/*/secrets", None, delay=1.0)

    result = spawn(spawn_request(), kube=impatient, github=github, log=log)

    assert result.label == "gpu-123-1"
    # The slow first requests are recorded once answered (409: the retries created both).
    wait_until(lambda: sorted(call for call in api_requests(fake_kube) if call[0] == "POST") == [
        ("POST", "/api/v1/namespaces/github-runners/pods"),
        ("POST", "/api/v1/namespaces/github-runners/pods"),
        ("POST", "/api/v1/namespaces/github-runners/secrets"),
        ("POST", "/api/v1/namespaces/github-runners/secrets"),
    ], what="the slow first creates to be answered")
    assert len(fake_kube.pods()) == 1 and len(fake_kube.secrets()) == 1
    assert fake_kube.validation_errors == []
