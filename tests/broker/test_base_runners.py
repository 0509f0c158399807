"""Single-use base runners: one JIT config per pod through TokenReview, and replaced pods.

The base runner pods are the stack's own: their template is the rendered base runner
Deployment (tests/golden/dev), run by the fake cluster's ReplicaSet stand-in, which admits them
(strict schema, Pod Security `restricted`) and replaces a deleted pod with a new one (new name,
new uid, new empty volumes). Each pod's token is what its projected volume asks the kubelet
for (audience, lifetime). The broker is served over HTTP on the fakes, with exactly its rights:
its Role in the runner namespace and TokenReview create.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from gpu_runners import broker_api, contract
from gpu_runners.broker import base_runners
from gpu_runners.broker.base_runners import BaseRunnerConfigs
from tests.broker.broker_harness import ServedBroker, call
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.harness.mock_stack import REPO_ROOT

GOLDEN_DEPLOYMENT = REPO_ROOT / "tests/golden/dev/deployment-github-runners-base-runner.yaml"
#: A ReplicaSet of the base runner Deployment: <deployment>-<template hash>.
REPLICA_SET = "base-runner-7c9d5b8f6"
CONFIG = broker_api.BASE_RUNNER_CONFIG_PATH


def base_runner_template() -> dict[str, Any]:
    """The pod template of the stack's base runner Deployment, as rendered."""
    deployment = yaml.safe_load(GOLDEN_DEPLOYMENT.read_text())
    template: dict[str, Any] = deployment["spec"]["template"]
    return template


def pod_token(kube: FakeKubernetes, name: str) -> str:
    """The token the kubelet writes into the pod's projected volume (its audience, its TTL)."""
    pod = kube.pod(name)
    assert pod is not None, name
    (source,) = [source["serviceAccountToken"] for volume in pod["spec"]["volumes"]
                 if "projected" in volume for source in volume["projected"]["sources"]]
    return kube.projected_token(name, audience=source["audience"],
                                expiration_seconds=source["expirationSeconds"])


def wait_for(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(0.02)


def running(kube: FakeKubernetes, name: str) -> bool:
    pod = kube.pod(name)
    return pod is not None and pod["status"].get("phase") == "Running"


@pytest.fixture
def fake_kube(make_fake_kube: Callable[..., FakeKubernetes], tmp_path: Path) -> FakeKubernetes:
    """The cluster, keeping each pod's emptyDir volumes as directories."""
    return make_fake_kube(volume_root=tmp_path / "volumes", termination_delay=0.01)


@pytest.fixture
def base_runner_pods(fake_kube: FakeKubernetes) -> list[str]:
    """Two base runner pods of the stack's Deployment, running."""
    pods = fake_kube.replicate(REPLICA_SET, base_runner_template(), replicas=2)
    names = sorted(pod["metadata"]["name"] for pod in pods)
    for name in names:
        wait_for(functools.partial(running, fake_kube, name), f"{name} running")
    return names


def base_runners_of(broker: ServedBroker) -> BaseRunnerConfigs:
    configs: BaseRunnerConfigs = broker.app.state.base_runners
    return configs


def test_a_base_runner_pod_gets_one_jit_config_named_after_it(
    broker: ServedBroker, env: dict[str, str], fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    base_runner_pods: list[str], caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    name = base_runner_pods[0]
    token = pod_token(fake_kube, name)

    answer = call(broker.url, "POST", CONFIG, token=token)

    assert answer.status == 200, answer.body
    assert answer.body["runner_name"] == name
    assert answer.body["labels"] == ["self-hosted", contract.BASE_RUNNER_LABEL]
    runner = fake_github.runner_named(name)
    assert runner is not None and runner["id"] == answer.body["runner_id"]
    # JIT adds no label of its own: the registration has exactly the two workflows target.
    assert sorted(label["name"] for label in runner["labels"]) == [
        contract.BASE_RUNNER_LABEL, "self-hosted"]
    config = fake_github.decode_jit_config(answer.body["encoded_jit_config"])
    assert config
    # The review names the broker's audience: without it the API server's would be checked.
    (review,) = [r for r in fake_kube.requests if r.path.endswith("/tokenreviews")]
    assert review.body["spec"]["audiences"] == [
        contract.base_runner_audience(env[contract.ENV_BROKER_AUDIENCE])]
    # The config is a credential: no log line of the broker holds it.
    assert answer.body["encoded_jit_config"] not in caplog.text

    # Its token gets no second one, whoever in the pod asks (a job on the runner, say).
    again = call(broker.url, "POST", CONFIG, token=pod_token(fake_kube, name))
    assert again.status == 409
    assert again.body["error"] == broker_api.ALREADY_SERVED
    assert len([r for r in fake_github.runners.values() if r["name"] == name]) == 1
    # The other pod gets its own.
    other = call(broker.url, "POST", CONFIG, token=pod_token(fake_kube, base_runner_pods[1]))
    assert other.status == 200 and other.body["runner_name"] == base_runner_pods[1]


def test_the_projected_token_gets_no_gpu_runner_and_no_runner_list(
    broker: ServedBroker, fake_kube: FakeKubernetes, base_runner_pods: list[str],
) -> None:
    token = pod_token(fake_kube, base_runner_pods[0])

    spawn = call(broker.url, "POST", broker_api.RUNNER_PATH, token=token, body=b"{}")
    listing = call(broker.url, "GET", broker_api.RUNNERS_PATH, token=token)

    # The job API takes GitHub OIDC tokens only; a pod's token names no run.
    assert spawn.status == 401 and spawn.body["error"] == broker_api.UNAUTHORIZED
    assert listing.status == 401
    assert [p["metadata"]["name"] for p in fake_kube.pods()] == base_runner_pods


def test_tokens_for_other_audiences_pods_and_accounts_are_refused(
    broker: ServedBroker, fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    fake_oidc: FakeOidcIssuer, base_runner_pods: list[str],
) -> None:
    name = base_runner_pods[0]
    template = base_runner_template()
    # A pod with the base runner's account and labels that no base runner ReplicaSet owns
    # (anyone allowed to create pods could make one), and a GPU runner's account.
    stray = {"metadata": {**template["metadata"], "name": "base-runner-stray"},
             "spec": template["spec"]}
    other_account = {"metadata": {**template["metadata"], "name": "base-runner-gpu-account"},
                     "spec": {**template["spec"],
                              "serviceAccountName": contract.GPU_RUNNER_SERVICE_ACCOUNT}}
    fake_kube.seed({"kind": "Pod", **stray, "status": {"phase": "Running"}},
                   {"kind": "Pod", **other_account, "status": {"phase": "Running"}})
    gone = fake_kube.replicate("base-runner-66b8c7d5f4", base_runner_template())[0]
    gone_token = pod_token(fake_kube, gone["metadata"]["name"])
    wait_for(lambda: running(fake_kube, gone["metadata"]["name"]), "the third pod running")
    fake_kube.finish_pod(gone["metadata"]["name"])
    expiring = pod_token(fake_kube, name)
    audience = contract.base_runner_audience(fake_oidc.audience)

    cases = {
        "the jobs' OIDC audience": (fake_kube.projected_token(name, audience=fake_oidc.audience),
                                    401),
        "the API server's audience": (fake_kube.projected_token(name), 401),
        "not a token": ("not-a-token", 401),
        "a pod no base runner ReplicaSet owns": (
            fake_kube.projected_token("base-runner-stray", audience=audience), 403),
        "another ServiceAccount": (
            fake_kube.projected_token("base-runner-gpu-account", audience=audience), 403),
    }
    for case, (token, status) in cases.items():
        answer = call(broker.url, "POST", CONFIG, token=token)
        assert answer.status == status, (case, answer.body)
    assert call(broker.url, "POST", CONFIG).status == 401

    # A used pod is deleted: its token dies with it.
    base_runners_of(broker).replace_used()
    wait_for(lambda: fake_kube.pod(gone["metadata"]["name"]) is None, "the used pod gone")
    assert call(broker.url, "POST", CONFIG, token=gone_token).status == 401
    # And a token past its expiry proves nothing either.
    fake_kube.advance_token_clock(contract.BASE_RUNNER_TOKEN_SECONDS)
    assert call(broker.url, "POST", CONFIG, token=expiring).status == 401
    assert [r["name"] for r in fake_github.runners.values()] == []


def test_a_restarted_broker_gives_no_second_config_to_a_pod_that_had_one(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, base_runner_pods: list[str],
) -> None:
    name = base_runner_pods[0]
    first = make_broker(env)
    assert call(first.url, "POST", CONFIG, token=pod_token(fake_kube, name)).status == 200
    first.stop()

    second = make_broker(env)  # remembers nothing of the first
    # While the runner lives, its registration stands for the config it got.
    refused = call(second.url, "POST", CONFIG, token=pod_token(fake_kube, name))
    assert refused.status == 409 and "registered already" in refused.body["message"]
    # After its job GitHub removes the registration and the container exits; the kubelet
    # would restart it: its restart count says it had its config.
    fake_github.finish_job(name)
    fake_kube.finish_pod(name, exit_code=0)
    restarted = call(second.url, "POST", CONFIG, token=pod_token(fake_kube, name))
    assert restarted.status == 409 and restarted.body["error"] == broker_api.ALREADY_SERVED
    assert fake_github.runner_named(name) is None


def test_a_used_base_runner_pod_is_replaced_and_the_next_job_starts_from_empty_volumes(
    broker: ServedBroker, fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    base_runner_pods: list[str],
) -> None:
    first, idle = base_runner_pods
    assert call(broker.url, "POST", CONFIG, token=pod_token(fake_kube, first)).status == 200
    # The job writes into its work directory and /tmp, then the runner exits (run.sh: 0).
    (fake_kube.empty_dir(first, "work") / "checkout-of-a-feature-branch").write_text("x")
    (fake_kube.empty_dir(first, "tmp") / "left-behind").write_text("y")
    fake_github.set_runner_status(first, "offline")
    fake_kube.finish_pod(first, exit_code=0)
    (status,) = (fake_kube.pod(first) or {})["status"]["containerStatuses"]
    assert status["state"]["waiting"]["reason"] == "CrashLoopBackOff"

    report = base_runners_of(broker).replace_used()

    # The pod goes, with its registration, instead of a restart with a consumed config.
    assert report.pods == [first] and report.registrations == [first]
    assert fake_github.runner_named(first) is None
    wait_for(lambda: fake_kube.pod(first) is None, "the used pod gone")
    wait_for(lambda: len(fake_kube.pods()) == 2, "its replacement")
    (fresh,) = [p["metadata"]["name"] for p in fake_kube.pods()
                if p["metadata"]["name"] != idle]
    assert fresh != first
    wait_for(lambda: running(fake_kube, fresh), "the replacement running")
    for volume in ("work", "tmp"):
        assert list(fake_kube.empty_dir(fresh, volume).iterdir()) == [], volume
    # The idle pod was left alone; the fresh one gets its own config.
    assert fake_kube.pod(idle) is not None
    answer = call(broker.url, "POST", CONFIG, token=pod_token(fake_kube, fresh))
    assert answer.status == 200 and answer.body["runner_name"] == fresh


def test_a_used_pod_whose_runner_github_still_shows_busy_waits_for_the_next_pass(
    broker: ServedBroker, fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    base_runner_pods: list[str],
) -> None:
    name = base_runner_pods[0]
    assert call(broker.url, "POST", CONFIG, token=pod_token(fake_kube, name)).status == 200
    fake_github.set_runner_status(name, "online", busy=True)
    fake_kube.finish_pod(name, exit_code=1)

    assert base_runners_of(broker).replace_used().pods == []
    assert fake_kube.pod(name) is not None

    fake_github.set_runner_status(name, "offline")
    assert base_runners_of(broker).replace_used().pods == [name]


def test_registrations_of_base_runner_pods_that_are_gone_are_removed(
    broker: ServedBroker, fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    base_runner_pods: list[str],
) -> None:
    for name in base_runner_pods:
        assert call(broker.url, "POST", CONFIG, token=pod_token(fake_kube, name)).status == 200
    configs = base_runners_of(broker)
    assert configs.replace_used().registrations == []  # sees both pods, live: nothing to do
    # A rollout deletes a pod (its ReplicaSet's successor makes another); its runner never
    # took a job, and cannot deregister itself without a credential.
    gone = base_runner_pods[0]
    configs.kube.delete_pod(fake_kube.namespace, gone)
    wait_for(lambda: fake_kube.pod(gone) is None, "the pod gone")

    assert configs.replace_used().registrations == [gone]
    assert fake_github.runner_named(gone) is None
    assert fake_github.runner_named(base_runner_pods[1]) is not None


def test_a_sweep_removes_every_base_runner_registration_without_a_pod_and_nothing_else(
    broker: ServedBroker, fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    base_runner_pods: list[str],
) -> None:
    live = base_runner_pods[0]
    assert call(broker.url, "POST", CONFIG, token=pod_token(fake_kube, live)).status == 200
    # Left by a broker that stopped before its pass, or by a base runner of an older release.
    fake_github.add_runner("base-runner-5f6d7c8b9-q2w3e", ["self-hosted", "base-runner"],
                           status="offline")
    fake_github.add_runner("base-runner-5f6d7c8b9-busy1", ["self-hosted", "base-runner"],
                           status="online", busy=True)
    fake_github.add_runner("gpu-4242-1", ["gpu-4242-1"], status="offline")
    fake_github.add_runner("base-runner-laptop", ["self-hosted", "macOS"], status="offline")

    report = base_runners_of(broker).replace_used(sweep=True)

    assert report.registrations == ["base-runner-5f6d7c8b9-q2w3e"]
    assert sorted(r["name"] for r in fake_github.runners.values()) == sorted([
        "base-runner-5f6d7c8b9-busy1", "base-runner-laptop", "gpu-4242-1", live])


def test_a_stopping_broker_removes_the_registrations_of_base_runners_already_gone(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_github: FakeGitHub,
    fake_kube: FakeKubernetes,
) -> None:
    # Destroy removes the base runner Deployment (and waits for its pods) before the broker.
    broker = make_broker(env, reconcile=True)
    wait_for(lambda: bool(fake_github.requests_to(r"/actions/runners$", "GET")),
             "the broker's first sweep")
    fake_github.add_runner("base-runner-7c9d5b8f6-z9x8c", ["self-hosted", "base-runner"],
                           status="offline")

    broker.stop()

    assert fake_github.runner_named("base-runner-7c9d5b8f6-z9x8c") is None


def test_the_broker_replaces_a_used_pod_by_itself_within_seconds(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, base_runner_pods: list[str],
) -> None:
    broker = make_broker(env, reconcile=True)
    used = base_runner_pods[0]
    assert call(broker.url, "POST", CONFIG, token=pod_token(fake_kube, used)).status == 200
    fake_github.finish_job(used)
    started = time.monotonic()
    fake_kube.finish_pod(used, exit_code=0)

    # Far sooner than the kubelet's back-off would restart the container (10 s, 20 s, ...
    # up to 300 s), and with a fresh pod instead of a consumed config.
    wait_for(lambda: fake_kube.pod(used) is None, "the used pod replaced", timeout=15)
    wait_for(lambda: len(fake_kube.pods()) == 2, "a fresh pod", timeout=5)
    assert time.monotonic() - started < base_runners.REPLACE_INTERVAL_SECONDS + 5
