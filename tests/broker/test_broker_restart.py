"""Killed at any step of a spawn or a delete, a restarted broker loses no run, orphans nothing
and creates nothing twice: its state is in the cluster and on GitHub.

The broker runs as its own process (`python -m gpu_runners.broker`, with KUBECONFIG naming the
fake API server). A hook on the fakes SIGKILLs it at the chosen request; a new process then
serves the client's next request (a re-POST or a DELETE), or its reaper alone cleans up, and
the fakes are counted: one pod, one Secret holding the one registration's config, or nothing.
"""

from __future__ import annotations

import base64
import contextlib
import signal
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_runners import broker_api, contract
from tests.broker.broker_harness import (
    BrokerProcess,
    broker_environ,
    delete,
    spawn,
    spawn_until_cut,
)
from tests.fakes.github_api import FakeGitHub, RecordedRequest
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import bring_runners_online, wait_until

PODS = r"/api/v1/namespaces/[^/]+/pods"
SECRETS = r"/api/v1/namespaces/[^/]+/secrets"
RUN = "gpu-123-1"


@pytest.fixture
def fake_kube(make_fake_kube: Callable[..., FakeKubernetes]) -> FakeKubernetes:
    """Pods take a second to terminate, so a delete meets the Secret still there."""
    return make_fake_kube(termination_delay=1.0)


@pytest.fixture
def brokers(fake_kube: FakeKubernetes, fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
            tmp_path: Path) -> Iterator[Callable[..., BrokerProcess]]:
    """Starts broker processes on one environment (same port: a restart, not a second)."""
    bring_runners_online(fake_kube, fake_github)
    env = broker_environ(fake_kube, fake_github, fake_oidc, tmp_path)
    started: list[BrokerProcess] = []

    def start(**overrides: str) -> BrokerProcess:
        broker = BrokerProcess({**env, **overrides}, tmp_path / "broker.log").start()
        started.append(broker)
        return broker

    yield start
    for broker in started:
        broker.stop()


def _assert_one_runner(kube: FakeKubernetes, github: FakeGitHub) -> None:
    """One pod, one Secret owned by it holding the config of the one registration."""
    pods = kube.pods()
    assert [p["metadata"]["name"] for p in pods] == [RUN]
    secrets = kube.secrets()
    assert [s["metadata"]["name"] for s in secrets] == [f"{RUN}-jit"]
    assert secrets[0]["metadata"]["ownerReferences"][0]["uid"] == pods[0]["metadata"]["uid"]
    runners = list(github.runners.values())
    assert [r["name"] for r in runners] == [RUN]
    config = base64.b64decode(secrets[0]["data"][contract.JIT_SECRET_KEY]).decode()
    assert config == github.jit_configs[runners[0]["id"]]


def _assert_nothing_left(kube: FakeKubernetes, github: FakeGitHub) -> None:
    wait_until(lambda: kube.pods() == [] and kube.secrets() == [], timeout=15,
               what="the pod and Secret to go")
    assert github.runners == {}


def _kill_on_kube(kube: FakeKubernetes, broker: BrokerProcess, method: str, path: str,
                  *, after: bool) -> list[str]:
    killed: list[str] = []

    def kill(method: str, path: str) -> None:
        killed.append(f"{method} {path}")
        broker.kill()

    kube.on_request(method, path, kill, after=after)
    return killed


SPAWN_STEPS: dict[str, tuple[str, str, bool]] = {
    "after the pod create": ("POST", PODS, True),
    "after the JIT mint, before the Secret": ("POST", SECRETS, False),
    "after the Secret create": ("POST", SECRETS, True),
}


@pytest.mark.parametrize("recovery", ["re-POST", "DELETE"])
@pytest.mark.parametrize("step", [*sorted(SPAWN_STEPS), "while waiting for the runner"])
def test_a_broker_killed_mid_spawn_is_recovered_by_the_next_request(
    step: str, recovery: str, brokers: Callable[..., BrokerProcess],
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
) -> None:
    broker = brokers()
    killed: list[str] = []
    if step in SPAWN_STEPS:
        method, path, after = SPAWN_STEPS[step]
        killed = _kill_on_kube(fake_kube, broker, method, path, after=after)
    else:
        fake_kube.runner_connect_delay = 1.0

        def kill(pod: dict[str, Any]) -> None:
            killed.append(pod["metadata"]["name"])
            broker.kill()

        fake_kube.on_pod_running(kill)

    cut = spawn_until_cut(broker.url, fake_oidc.mint())
    assert broker.wait_killed() == -9
    assert killed, f"the broker was not killed {step}"
    assert cut is None or cut.last.event != broker_api.READY

    fake_kube.runner_connect_delay = 0.0
    restarted = brokers()
    if recovery == "re-POST":
        answer = spawn(restarted.url, fake_oidc.mint())
        assert answer.last.event == broker_api.READY, answer.events
        _assert_one_runner(fake_kube, fake_github)
        assert sum(1 for r in fake_kube.requests if r.method == "POST"
                   and r.path.endswith("/pods") and r.status == 201) == 1
    else:
        assert delete(restarted.url, fake_oidc.mint()).status == 200
        _assert_nothing_left(fake_kube, fake_github)


DELETE_STEPS: dict[str, tuple[str, str, bool]] = {
    "after the pod delete": ("DELETE", rf"{PODS}/{RUN}", True),
    "after the Secret delete": ("DELETE", rf"{SECRETS}/{RUN}-jit", True),
}


def _kill_before_registration_delete(github: FakeGitHub, broker: BrokerProcess) -> list[str]:
    killed: list[str] = []

    def kill(request: RecordedRequest) -> None:
        if request.method == "DELETE" and "/actions/runners/" in request.path and not killed:
            killed.append(request.path)
            broker.kill()
            raise ConnectionAbortedError("the broker died before this request was applied")

    github.on_request(kill)
    return killed


@pytest.mark.parametrize("recovery", ["DELETE", "reaper"])
@pytest.mark.parametrize("step", [*sorted(DELETE_STEPS), "before the registration delete"])
def test_a_broker_killed_mid_delete_is_recovered_by_a_delete_or_the_reaper(
    step: str, recovery: str, brokers: Callable[..., BrokerProcess],
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
) -> None:
    broker = brokers()
    assert spawn(broker.url, fake_oidc.mint()).last.event == broker_api.READY
    if step in DELETE_STEPS:
        method, path, after = DELETE_STEPS[step]
        killed = _kill_on_kube(fake_kube, broker, method, path, after=after)
    else:
        killed = _kill_before_registration_delete(fake_github, broker)

    with contextlib.suppress(OSError):  # the broker dies mid-request, as intended
        delete(broker.url, fake_oidc.mint())
    assert broker.wait_killed() == -9
    assert killed, f"the broker was not killed {step}"

    if recovery == "DELETE":
        restarted = brokers()
        assert delete(restarted.url, fake_oidc.mint()).status == 200
    else:
        # What GitHub shows once the job is over and the runner process has gone.
        fake_github.set_run_status(123, "completed", "success")
        if fake_github.runner_named(RUN) is not None:
            fake_github.set_runner_status(RUN, "offline")
        brokers(**{contract.ENV_REAPER_INTERVAL_SECONDS: "1"})
        wait_until(lambda: fake_github.runners == {}, timeout=15,
                   what="the reaper to remove the registration")
    _assert_nothing_left(fake_kube, fake_github)


def test_the_broker_logs_one_line_per_request_and_never_a_token_or_credential(
    brokers: Callable[..., BrokerProcess], fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
) -> None:
    broker = brokers()
    token = fake_oidc.mint()
    assert spawn(broker.url, token).last.event == broker_api.READY
    assert spawn(broker.url, "forged." + token.split(".", 1)[1]).status == 401
    broker.terminate()

    log = broker.log_text()
    assert log.count('"POST /v1/runner HTTP/1.1" 200') == 1
    assert log.count('"POST /v1/runner HTTP/1.1" 401') == 1
    for secret in (token, token.split(".")[1], token.split(".")[2], fake_github.token,
                   *fake_github.jit_configs.values()):
        assert secret not in log


def test_sigterm_ends_open_streams_and_cleans_up_nothing(
    brokers: Callable[..., BrokerProcess], fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
) -> None:
    broker = brokers()
    fake_kube.runner_connect_delay = float("inf")
    answers: list[Any] = []
    thread = threading.Thread(
        target=lambda: answers.append(spawn_until_cut(broker.url, fake_oidc.mint())))
    thread.start()
    wait_until(lambda: len(fake_kube.secrets()) == 1, timeout=15, what="the spawn's Secret")

    # uvicorn shuts down gracefully, then re-raises SIGTERM so the process ends by it.
    assert broker.terminate() == -signal.SIGTERM
    thread.join(15)

    assert answers[0] is not None
    assert answers[0].last.event == broker_api.FAILED
    assert answers[0].last.error == broker_api.UNAVAILABLE
    assert [p["metadata"]["name"] for p in fake_kube.pods()] == [RUN]
    assert [r["name"] for r in fake_github.runners.values()] == [RUN]
