"""Every attack on the broker's API fails, over real HTTP, with nothing created.

Tokens come from the fake GitHub OIDC issuer (its discovery document and JWKS fetched over
HTTP by the broker's verifier); the broker acts on the fake Kubernetes API (with the broker's
Role enforced) and the fake GitHub. "Nothing created" is checked in both fakes: no pod, no
Secret, no runner registration, and no request that could create one.
"""

from __future__ import annotations

import base64
import json
import time
from collections.abc import Callable
from typing import Any

import pytest

from gpu_runners import broker_api, contract
from gpu_runners.broker.image_registry import PullSecretRegistry
from tests.broker.broker_harness import (
    MAX_RUNTIME_MINUTES,
    ServedBroker,
    call,
    spawn,
)
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oci_registry import FakeOciRegistry
from tests.fakes.oidc_issuer import FakeOidcIssuer, new_signing_key

ALLOWED_IMAGE = "ghcr.io/acme/cuda-trainer@sha256:" + "b" * 64


def _nothing_created(kube: FakeKubernetes, github: FakeGitHub) -> None:
    assert kube.pods() == []
    assert kube.secrets() == []
    assert github.runners == {}
    assert [r for r in kube.requests if r.method in ("POST", "DELETE")] == []
    assert [r for r in github.requests if r.method in ("POST", "DELETE")] == []


def _tampered(token: str, **claims: Any) -> str:
    """The token with payload claims changed and the original signature kept."""
    header, payload, signature = token.split(".")
    decoded = json.loads(base64.urlsafe_b64decode(payload + "=" * (-len(payload) % 4)))
    decoded.update(claims)
    forged = base64.urlsafe_b64encode(json.dumps(decoded).encode()).rstrip(b"=").decode()
    return f"{header}.{forged}.{signature}"


NOW = int(time.time())
#: Each forged or foreign token, and the status the broker must answer it with.
TOKEN_ATTACKS: dict[str, tuple[Callable[[FakeOidcIssuer], str], int]] = {
    "wrong audience": (lambda issuer: issuer.mint(aud="https://github.com/acme"), 401),
    "a second audience": (
        lambda issuer: issuer.mint(aud=[issuer.audience, "sts.amazonaws.com"]), 401),
    "wrong issuer": (lambda issuer: issuer.mint(iss="https://token.example.com"), 401),
    "expired": (lambda issuer: issuer.mint(iat=int(time.time()) - 600,
                                           exp=int(time.time()) - 300), 401),
    "nbf in the future": (lambda issuer: issuer.mint(nbf=int(time.time()) + 600), 401),
    "alg none": (lambda issuer: issuer.mint(algorithm="none"), 401),
    "HS256 keyed with the public key": (lambda issuer: issuer.mint(algorithm="HS256"), 401),
    "unknown kid": (lambda issuer: issuer.mint(signing_key=new_signing_key()), 401),
    "tampered payload": (lambda issuer: _tampered(issuer.mint(), run_id="999"), 401),
    "same repository name, another id": (lambda issuer: issuer.mint(repository_id="75"), 403),
    "another owner id": (lambda issuer: issuer.mint(repository_owner_id="66"), 403),
    "pull_request_target": (lambda issuer: issuer.mint(event_name="pull_request_target"), 403),
    "workflow_run": (lambda issuer: issuer.mint(event_name="workflow_run"), 403),
    "no token": (lambda issuer: "", 401),
}


@pytest.mark.parametrize("attack", sorted(TOKEN_ATTACKS))
def test_a_forged_or_foreign_token_is_refused_and_nothing_is_created(
    attack: str, broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    forge, status = TOKEN_ATTACKS[attack]
    answer = spawn(broker.url, forge(fake_oidc), {"gpus": 1})
    assert answer.status == status
    assert answer.body["error"] == (broker_api.UNAUTHORIZED if status == 401
                                    else broker_api.FORBIDDEN)
    _nothing_created(fake_kube, fake_github)


def test_a_replayed_token_is_refused_and_nothing_is_created(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    token = fake_oidc.mint()
    first = call(broker.url, "GET", broker_api.RUNNERS_PATH, token=token)
    assert first.status == 200 and first.body == []
    replay = spawn(broker.url, token)
    assert replay.status == 401
    assert "replay" in replay.body["message"] or "already" in replay.body["message"]
    _nothing_created(fake_kube, fake_github)


def test_a_body_naming_another_run_is_refused_and_the_victim_run_is_untouched(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    victim = spawn(broker.url, fake_oidc.mint(run_id="555"))
    assert victim.last.event == broker_api.READY
    before = fake_kube.pod("gpu-555-1")
    assert before is not None
    runners_before = json.dumps(fake_github.runners, sort_keys=True)

    for field in ("runId", "run_id", "runAttempt", "namespace", "repository"):
        answer = spawn(broker.url, fake_oidc.mint(run_id="777"),
                       {field: 555 if "run" in field else "acme/other", "image": ALLOWED_IMAGE})
        assert answer.status == 400, field
        assert answer.body["error"] == broker_api.USAGE
        assert field in answer.body["message"]

    after = fake_kube.pod("gpu-555-1")
    assert after is not None
    assert after["metadata"]["uid"] == before["metadata"]["uid"]
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert [s["metadata"]["name"] for s in fake_kube.secrets()] == ["gpu-555-1-jit"]
    assert json.dumps(fake_github.runners, sort_keys=True) == runners_before


def test_a_query_naming_another_run_is_ignored_the_token_s_run_is_acted_on(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    victim = spawn(broker.url, fake_oidc.mint(run_id="555"))
    assert victim.last.event == broker_api.READY
    before = fake_kube.pod("gpu-555-1")

    removed = call(broker.url, "DELETE", f"{broker_api.RUNNER_PATH}?run_id=555&runId=555",
                   token=fake_oidc.mint(run_id="777"))

    assert removed.status == 200
    assert removed.body == {"pods": [], "secrets": [], "registrations": [],
                            "recoveries": []}
    assert fake_kube.pod("gpu-555-1") == before
    assert fake_github.runner_named("gpu-555-1") is not None


def test_a_runtime_above_the_cap_is_clamped_and_the_stream_says_so(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
) -> None:
    answer = spawn(broker.url, fake_oidc.mint(), {"maxRuntimeSeconds": 2**31 - 1})

    assert answer.last.event == broker_api.READY
    pod = fake_kube.pod("gpu-123-1")
    assert pod is not None
    assert pod["spec"]["activeDeadlineSeconds"] == MAX_RUNTIME_MINUTES * 60
    assert any("above the stack's maximum" in line for line in answer.progress)


def test_a_runtime_within_the_cap_is_kept(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
) -> None:
    assert spawn(broker.url, fake_oidc.mint(), {"maxRuntimeSeconds": 600}).last.event == "ready"
    pod = fake_kube.pod("gpu-123-1")
    assert pod is not None and pod["spec"]["activeDeadlineSeconds"] == 600


def test_an_image_the_stack_does_not_allow_is_refused_before_anything(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    answer = spawn(broker.url, fake_oidc.mint(), {"image": "docker.io/attacker/miner:latest"})

    assert answer.status == 403
    assert answer.body["error"] == broker_api.FORBIDDEN
    assert "docker.io/attacker/miner:latest" in answer.body["message"]
    _nothing_created(fake_kube, fake_github)


def test_an_image_matching_an_allowed_pattern_is_used(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_registry: FakeOciRegistry,
) -> None:
    digest = fake_registry.add_image("acme/cuda-trainer", "12.4")
    env[contract.ENV_ALLOWED_IMAGES] = '["ghcr.io/acme/cuda-trainer@sha256:*"]'
    broker = make_broker(env, images=PullSecretRegistry(
        lambda: None, endpoints={"ghcr.io": fake_registry.url}))
    image = f"ghcr.io/acme/cuda-trainer@{digest}"

    assert spawn(broker.url, fake_oidc.mint(), {"image": image}).last.event == "ready"
    pod = fake_kube.pod("gpu-123-1")
    assert pod is not None
    assert pod["spec"]["containers"][0]["image"] == image


def test_an_oversized_body_is_refused_before_the_token_is_read(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    padding = "x" * (broker_api.MAX_BODY_BYTES + 1)
    fetches = fake_oidc.jwks_fetches
    answer = spawn(broker.url, fake_oidc.mint(), {"labels": {"team": padding}})

    assert answer.status == 413
    assert answer.body["error"] == broker_api.USAGE
    assert fake_oidc.jwks_fetches == fetches
    _nothing_created(fake_kube, fake_github)


def test_an_oversized_chunked_body_without_length_is_refused(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    chunks = iter([b"{" + b" " * broker_api.MAX_BODY_BYTES] * 3)
    answer = call(broker.url, "POST", broker_api.RUNNER_PATH, token=fake_oidc.mint(),
                  body=chunks, headers={"Transfer-Encoding": "chunked"})
    assert answer.status == 413
    _nothing_created(fake_kube, fake_github)


@pytest.mark.parametrize(("ask", "field"), [
    ({"gpus": 2}, "--gpus"),
    ({"gpuTypes": ["nvidia-h100"]}, "--gpu-type"),
    ({"gpus": 0}, "--gpus"),
    ({"gpus": True}, "gpus"),
    ({"timeoutSeconds": 7200}, "timeoutSeconds"),
    ({"labels": {contract.LABEL_RUN_ID: "555"}}, "--label"),
    ({"runnerGroup": "gpu-admins"}, "runnerGroup"),
])
def test_an_ask_outside_the_pools_or_the_limits_is_refused_before_anything(
    ask: dict[str, Any], field: str, broker: ServedBroker, fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    answer = spawn(broker.url, fake_oidc.mint(), ask)

    assert answer.status == 400
    assert answer.body["error"] == broker_api.USAGE
    assert field in answer.body["message"]
    _nothing_created(fake_kube, fake_github)


def test_more_gpus_than_the_repository_cap_alone_is_forbidden(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    env[contract.ENV_GPU_POOLS] = '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 8}]'
    env[contract.ENV_GPU_CAP_PER_REPOSITORY] = "2"
    broker = make_broker(env)

    answer = spawn(broker.url, fake_oidc.mint(), {"gpus": 4})

    assert answer.status == 403
    assert "cap" in answer.body["message"]
    _nothing_created(fake_kube, fake_github)
