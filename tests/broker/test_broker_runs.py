"""Spawn and delete are idempotent per run, cancellable, and held to the repository's GPU cap.

Over real HTTP against the broker on the fakes; every count (pods created, JIT configs minted,
registrations) is read from the fakes.
"""

from __future__ import annotations

import http.client
import json
import math
import threading
import urllib.parse
from collections.abc import Callable
from pathlib import Path

from gpu_runners import broker_api, contract
from tests.broker.broker_harness import (
    Answer,
    ServedBroker,
    broker_environ,
    delete,
    serve_broker,
    spawn,
)
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import bring_runners_online, wait_until

JIT_PATH = r"/generate-jitconfig$"


def _in_background(work: Callable[[], Answer]) -> tuple[threading.Thread, list[Answer]]:
    answers: list[Answer] = []
    thread = threading.Thread(target=lambda: answers.append(work()), daemon=True)
    thread.start()
    return thread, answers


def _pod_creates(kube: FakeKubernetes) -> int:
    return sum(1 for r in kube.requests if r.method == "POST" and r.path.endswith("/pods")
               and r.status == 201)


def test_concurrent_posts_for_one_run_make_one_pod_secret_and_registration(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    fake_kube.runner_connect_delay = 0.5  # both requests arrive while the first waits
    tokens = [fake_oidc.mint() for _ in range(2)]
    first, first_answers = _in_background(lambda: spawn(broker.url, tokens[0]))
    wait_until(lambda: fake_kube.pod("gpu-123-1") is not None, what="the first pod")
    second, second_answers = _in_background(lambda: spawn(broker.url, tokens[1]))
    first.join(30)
    second.join(30)

    results = [answers[0].last for answers in (first_answers, second_answers)]
    assert [r.event for r in results] == [broker_api.READY, broker_api.READY]
    assert results[0].result == results[1].result
    assert results[0].result is not None and results[0].result.label == "gpu-123-1"
    # The second request replayed the stream from its start: the same lines, in order.
    assert second_answers[0].progress == first_answers[0].progress
    assert _pod_creates(fake_kube) == 1
    assert [s["metadata"]["name"] for s in fake_kube.secrets()] == ["gpu-123-1-jit"]
    assert len(fake_github.requests_to(JIT_PATH, "POST")) == 1
    assert [r["name"] for r in fake_github.runners.values()] == ["gpu-123-1"]


def test_a_post_after_success_adopts_the_pod_and_registration(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    first = spawn(broker.url, fake_oidc.mint())
    pod = fake_kube.pod("gpu-123-1")
    again = spawn(broker.url, fake_oidc.mint())

    assert first.last.result is not None and not first.last.result.reused
    assert again.last.result is not None and again.last.result.reused
    assert again.last.result.label == first.last.result.label
    adopted = fake_kube.pod("gpu-123-1")
    assert pod is not None and adopted is not None
    assert adopted["metadata"]["uid"] == pod["metadata"]["uid"]
    assert _pod_creates(fake_kube) == 1
    assert len(fake_github.requests_to(JIT_PATH, "POST")) == 1
    assert any("reusing runner registration gpu-123-1" in line for line in again.progress)


def test_delete_during_a_spawn_cancels_it_and_cleans_up(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    fake_kube.runner_connect_delay = math.inf  # the runner never connects: spawn waits
    thread, answers = _in_background(lambda: spawn(broker.url, fake_oidc.mint()))
    wait_until(lambda: fake_github.runner_named("gpu-123-1") is not None
               and len(fake_kube.secrets()) == 1, what="the spawn's registration and Secret")

    removed = delete(broker.url, fake_oidc.mint())
    thread.join(30)

    assert removed.status == 200
    assert answers[0].last.event == broker_api.FAILED
    assert answers[0].last.error == broker_api.CANCELLED
    wait_until(lambda: fake_kube.pods() == [] and fake_kube.secrets() == [],
               what="the pod and Secret to go")
    assert fake_github.runners == {}
    wait_until(lambda: len(broker.operations.busy_runs()) == 0, what="no run in flight")


def test_a_second_delete_is_a_no_op_success(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    assert spawn(broker.url, fake_oidc.mint()).last.event == broker_api.READY

    first = delete(broker.url, fake_oidc.mint())
    second = delete(broker.url, fake_oidc.mint())

    assert first.body == {"pods": ["gpu-123-1"], "secrets": ["gpu-123-1-jit"],
                          "registrations": ["gpu-123-1"], "recoveries": []}
    assert second.status == 200
    assert second.body == {"pods": [], "secrets": [], "registrations": [],
                            "recoveries": []}
    assert fake_github.runners == {}


def test_a_client_that_disconnects_does_not_cancel_its_spawn(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    fake_kube.runner_connect_delay = 0.5
    parts = urllib.parse.urlsplit(broker.url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=10)
    connection.request("POST", broker_api.RUNNER_PATH, body=b"{}",
                       headers={"Authorization": f"Bearer {fake_oidc.mint()}"})
    response = connection.getresponse()
    assert json.loads(response.readline())["event"] == broker_api.PROGRESS
    connection.close()

    wait_until(lambda: (fake_github.runner_named("gpu-123-1") or {}).get("status") == "online",
               timeout=15, what="the runner to come online without its client")
    again = spawn(broker.url, fake_oidc.mint())
    assert again.last.event == broker_api.READY
    assert _pod_creates(fake_kube) == 1


def test_a_spawn_over_the_repository_gpu_cap_waits_until_gpus_are_released(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    env[contract.ENV_GPU_CAP_PER_REPOSITORY] = "1"
    broker = make_broker(env)
    assert spawn(broker.url, fake_oidc.mint(run_id="1")).last.event == broker_api.READY

    thread, answers = _in_background(lambda: spawn(broker.url, fake_oidc.mint(run_id="2")))
    wait_until(lambda: b'kind="cap"' in _metrics(broker), what="a cap wait")
    assert [p["metadata"]["name"] for p in fake_kube.pods()] == ["gpu-1-1"]
    delete(broker.url, fake_oidc.mint(run_id="1"))
    thread.join(30)

    assert answers[0].last.event == broker_api.READY
    assert any("holds 1 GPU(s) of its cap of 1" in line for line in answers[0].progress)
    assert [p["metadata"]["name"] for p in fake_kube.pods()] == ["gpu-2-1"]


def test_concurrent_spawns_of_one_repository_never_exceed_its_gpu_cap(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes,
) -> None:
    env[contract.ENV_GPU_CAP_PER_REPOSITORY] = "1"
    broker = make_broker(env)
    runs = [str(run) for run in range(10, 16)]
    tokens = {run: fake_oidc.mint(run_id=run) for run in runs}

    def ask(run: str) -> Callable[[], Answer]:
        return lambda: spawn(broker.url, tokens[run], {"timeoutSeconds": 2})

    started = [_in_background(ask(run)) for run in runs]
    for thread, _ in started:
        thread.join(30)

    outcomes = sorted(answers[0].last.event for _, answers in started)
    assert outcomes.count(broker_api.READY) == 1
    assert outcomes.count(broker_api.FAILED) == len(runs) - 1
    assert {answers[0].last.error for _, answers in started
            if answers[0].last.event == broker_api.FAILED} == {broker_api.TIMEOUT}
    assert _pod_creates(fake_kube) == 1


def _metrics(broker: ServedBroker) -> bytes:
    parts = urllib.parse.urlsplit(broker.url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port, timeout=5)
    try:
        connection.request("GET", broker_api.METRICS_PATH)
        return connection.getresponse().read()
    finally:
        connection.close()


def test_a_quiet_stream_sends_heartbeats_until_the_runner_is_online(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes,
) -> None:
    broker = make_broker(env, heartbeat_seconds=0.1)
    fake_kube.runner_connect_delay = 1.0

    answer = spawn(broker.url, fake_oidc.mint())

    kinds = [event.event for event in answer.events or ()]
    assert kinds.count(broker_api.HEARTBEAT) >= 3
    assert kinds[-1] == broker_api.READY
    assert kinds.index(broker_api.HEARTBEAT) > kinds.index(broker_api.PROGRESS)


def test_a_delete_is_served_while_every_spawn_thread_is_taken(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    broker = make_broker(env, spawn_threads=1, heartbeat_seconds=0.1)
    fake_kube.runner_connect_delay = math.inf  # the first spawn holds the only thread
    first, first_answers = _in_background(lambda: spawn(broker.url, fake_oidc.mint(run_id="1")))
    wait_until(lambda: fake_github.runner_named("gpu-1-1") is not None, what="the first spawn")
    second, second_answers = _in_background(
        lambda: spawn(broker.url, fake_oidc.mint(run_id="2")))
    wait_until(lambda: len(broker.operations.runs_in_flight()) == 2, what="the second run")
    fake_kube.runner_connect_delay = 0.0

    removed = delete(broker.url, fake_oidc.mint(run_id="1"))
    first.join(30)
    second.join(30)

    assert removed.status == 200
    assert first_answers[0].last.error == broker_api.CANCELLED
    assert second_answers[0].last.event == broker_api.READY
    assert [p["metadata"]["name"] for p in fake_kube.pods()] == ["gpu-2-1"]


def test_a_finished_runner_pod_no_longer_counts_against_the_gpu_cap(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes,
) -> None:
    env[contract.ENV_GPU_CAP_PER_REPOSITORY] = "1"
    broker = make_broker(env)
    assert spawn(broker.url, fake_oidc.mint(run_id="1")).last.event == broker_api.READY
    fake_kube.finish_pod("gpu-1-1")  # its one job is done; the pod stays until reaped

    answer = spawn(broker.url, fake_oidc.mint(run_id="2"), {"timeoutSeconds": 10})

    assert answer.last.event == broker_api.READY
    assert sorted(p["metadata"]["name"] for p in fake_kube.pods()) == ["gpu-1-1", "gpu-2-1"]


def test_delete_of_a_spawn_waiting_for_the_cap_stops_it_with_nothing_created(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    env[contract.ENV_GPU_CAP_PER_REPOSITORY] = "1"
    broker = make_broker(env)
    assert spawn(broker.url, fake_oidc.mint(run_id="1")).last.event == broker_api.READY
    thread, answers = _in_background(lambda: spawn(broker.url, fake_oidc.mint(run_id="2")))
    wait_until(lambda: b'kind="cap"' in _metrics(broker), what="the second run to wait")

    removed = delete(broker.url, fake_oidc.mint(run_id="2"))
    thread.join(10)

    assert not thread.is_alive()
    assert removed.body == {"pods": [], "secrets": [], "registrations": [],
                            "recoveries": []}
    assert answers[0].last.error == broker_api.CANCELLED
    assert [p["metadata"]["name"] for p in fake_kube.pods()] == ["gpu-1-1"]
    assert [r["name"] for r in fake_github.runners.values()] == ["gpu-1-1"]


def test_a_spawn_refused_by_the_resource_quota_waits_and_is_counted(
    make_fake_kube: Callable[..., FakeKubernetes], fake_github: FakeGitHub,
    fake_oidc: FakeOidcIssuer, tmp_path: Path,
) -> None:
    quota_kube = make_fake_kube(gpu_quota=1)
    bring_runners_online(quota_kube, fake_github)
    served = serve_broker(broker_environ(quota_kube, fake_github, fake_oidc, tmp_path),
                          quota_kube, fake_github, reconcile=False)
    try:
        assert spawn(served.url, fake_oidc.mint(run_id="1")).last.event == broker_api.READY
        thread, answers = _in_background(
            lambda: spawn(served.url, fake_oidc.mint(run_id="2"), {"timeoutSeconds": 30}))
        wait_until(lambda: b'kind="quota"' in _metrics(served), what="a quota wait")
        delete(served.url, fake_oidc.mint(run_id="1"))
        thread.join(30)
    finally:
        served.stop()

    assert answers[0].last.event == broker_api.READY
    assert any("waiting for GPU quota" in line and "exceeded quota" in line
               for line in answers[0].progress)
