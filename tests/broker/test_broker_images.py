"""The image policy over real HTTP: the broker, the fake OCI registry, Kubernetes and GitHub.

An asked image is matched against `allowedImages` in its full form, then pinned to the digest
its registry serves (token flow included); every refusal comes before any pod, Secret or
registration exists, and a refusal by pattern or by the digest rule before any registry call.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

import pytest
from kubernetes.client import V1ObjectMeta, V1Secret

from gpu_runners import broker_api, contract
from gpu_runners.broker.image_registry import PullSecretRegistry
from gpu_runners.broker.settings import BrokerSettings, SettingsError
from tests.broker.broker_harness import ServedBroker, spawn
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oci_registry import FakeOciRegistry
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import IMAGE, kube_client_for

TRAINER_ENV = {"PATH": "/opt/conda/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/bin",
               "LD_LIBRARY_PATH": "/usr/local/cuda/compat/lib"}

BrokerFor = Callable[..., ServedBroker]


@pytest.fixture
def broker_for(make_broker: Callable[..., ServedBroker], env: dict[str, str],
               fake_registry: FakeOciRegistry) -> BrokerFor:
    """A broker with `allowedImages` (and more settings) whose ghcr.io is the fake registry."""

    def make(allowed: str, **settings: str) -> ServedBroker:
        env[contract.ENV_ALLOWED_IMAGES] = allowed
        env.update(settings)
        return make_broker(env, images=PullSecretRegistry(
            lambda: None, endpoints={"ghcr.io": fake_registry.url}))

    return make


def nothing_created(kube: FakeKubernetes, github: FakeGitHub) -> None:
    assert kube.pods() == []
    assert kube.secrets() == []
    assert github.runners == {}
    assert [r for r in github.requests if r.method in ("POST", "DELETE")] == []


def progress_lines(answer: Any) -> list[str]:
    """The stream's progress lines without their elapsed-time stamp."""
    return [re.sub(r"^\[\s*\d+\.\d+s\] ", "", event.line) for event in answer.events
            if event.event == broker_api.PROGRESS]


def test_a_tag_is_resolved_to_its_digest_and_the_job_runs_it_with_the_runner_injected(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_registry: FakeOciRegistry,
) -> None:
    digest = fake_registry.add_image("acme/trainer", "2.4-cuda12", env=TRAINER_ENV, user="1000")
    broker = broker_for('["ghcr.io/acme/*"]')

    answer = spawn(broker.url, fake_oidc.mint(), {"image": "ghcr.io/acme/trainer:2.4-cuda12"})

    assert answer.last.event == "ready", answer.body
    pod = fake_kube.pod("gpu-123-1")
    assert pod is not None
    (job,) = pod["spec"]["containers"]
    (init,) = pod["spec"]["initContainers"]
    assert job["image"] == f"ghcr.io/acme/trainer@{digest}"
    assert init["image"] == IMAGE  # the stack's runner image brings the runner
    env = {item["name"]: item.get("value") for item in job["env"]}
    # The image's own PATH (conda first) with the driver appended; its compat library first.
    assert env["PATH"] == TRAINER_ENV["PATH"] + ":/usr/local/nvidia/bin"
    assert env["LD_LIBRARY_PATH"] == (
        "/usr/local/cuda/compat/lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib")
    assert (f"image ghcr.io/acme/trainer:2.4-cuda12 runs as ghcr.io/acme/trainer@{digest}, "
            "the runner injected") in progress_lines(answer)
    # The anonymous token flow: a 401 with the realm, a token, then the manifests.
    statuses = [(r.path, r.status) for r in fake_registry.requests]
    assert statuses[:3] == [("/v2/acme/trainer/manifests/2.4-cuda12", 401), ("/token", 200),
                            ("/v2/acme/trainer/manifests/2.4-cuda12", 200)]


def test_an_image_outside_allowed_images_is_refused_before_any_registry_call(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, fake_registry: FakeOciRegistry,
) -> None:
    fake_registry.add_image("evil/miner", "latest")
    broker = broker_for('["ghcr.io/acme/*"]')

    answer = spawn(broker.url, fake_oidc.mint(), {"image": "ghcr.io/evil/miner:latest"})

    assert answer.status == 403
    assert answer.body["error"] == broker_api.FORBIDDEN
    assert "not allowed by the stack (allowedImages: ghcr.io/acme/*)" in answer.body["message"]
    assert fake_registry.requests == []
    nothing_created(fake_kube, fake_github)


def test_a_short_docker_hub_name_cannot_pass_a_pattern_written_for_another_registry(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    broker = broker_for('["ghcr.io/*"]')

    answer = spawn(broker.url, fake_oidc.mint(), {"image": "pytorch/pytorch:latest"})

    assert answer.status == 403
    assert "(docker.io/pytorch/pytorch:latest) is not allowed" in answer.body["message"]
    nothing_created(fake_kube, fake_github)


def test_a_tag_that_does_not_resolve_is_refused_before_any_pod(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, fake_registry: FakeOciRegistry,
) -> None:
    fake_registry.add_image("acme/trainer", "2.4")
    broker = broker_for('["ghcr.io/acme/*"]')

    answer = spawn(broker.url, fake_oidc.mint(), {"image": "ghcr.io/acme/trainer:2.5"})

    assert answer.status == 403
    assert answer.body["message"] == (
        "image: ghcr.io/acme/trainer:2.5: registry ghcr.io has no manifest 2.5 (a tag that "
        "does not resolve, or a wrong name)")
    nothing_created(fake_kube, fake_github)


def test_a_registry_serving_other_bytes_under_the_asked_digest_is_refused(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, fake_registry: FakeOciRegistry,
) -> None:
    digest = fake_registry.add_image("acme/trainer", "2.4")
    fake_registry.tamper(digest)
    broker = broker_for('["ghcr.io/acme/*"]')

    answer = spawn(broker.url, fake_oidc.mint(), {"image": f"ghcr.io/acme/trainer@{digest}"})

    assert answer.status == 403
    assert f"not the {digest} asked for; refusing it" in answer.body["message"]
    nothing_created(fake_kube, fake_github)


def test_a_digest_header_that_does_not_match_the_manifest_is_refused(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, fake_registry: FakeOciRegistry,
) -> None:
    fake_registry.add_image("acme/trainer", "2.4")
    fake_registry.announce_wrong_digest()
    broker = broker_for('["ghcr.io/acme/*"]')

    answer = spawn(broker.url, fake_oidc.mint(), {"image": "ghcr.io/acme/trainer:2.4"})

    assert answer.status == 403
    assert "announced digest sha256:ffff" in answer.body["message"]
    nothing_created(fake_kube, fake_github)


def test_a_stack_requiring_digests_refuses_a_tag_without_asking_the_registry(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, fake_registry: FakeOciRegistry,
) -> None:
    fake_registry.add_image("acme/trainer", "2.4")
    broker = broker_for('["ghcr.io/acme/*"]', **{contract.ENV_REQUIRE_IMAGE_DIGESTS: "true"})

    answer = spawn(broker.url, fake_oidc.mint(), {"image": "ghcr.io/acme/trainer:2.4"})

    assert answer.status == 403
    assert answer.body["message"] == (
        "image: 'ghcr.io/acme/trainer:2.4' names a tag; this stack requires a digest "
        "(requireImageDigests): ask for ghcr.io/acme/trainer@sha256:<digest>")
    assert fake_registry.requests == []
    nothing_created(fake_kube, fake_github)


def test_a_stack_requiring_digests_runs_an_image_asked_by_digest(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_registry: FakeOciRegistry,
) -> None:
    digest = fake_registry.add_image("acme/trainer", "2.4")
    broker = broker_for('["ghcr.io/acme/*"]', **{contract.ENV_REQUIRE_IMAGE_DIGESTS: "true"})

    answer = spawn(broker.url, fake_oidc.mint(), {"image": f"ghcr.io/acme/trainer@{digest}"})

    assert answer.last.event == "ready"
    pod = fake_kube.pod("gpu-123-1")
    assert pod is not None and pod["spec"]["containers"][0]["image"] == (
        f"ghcr.io/acme/trainer@{digest}")


def test_an_image_without_a_user_is_told_that_its_job_runs_as_uid_1000(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_registry: FakeOciRegistry,
) -> None:
    fake_registry.add_image("acme/trainer", "root", user="")
    broker = broker_for('["ghcr.io/acme/*"]')

    answer = spawn(broker.url, fake_oidc.mint(), {"image": "ghcr.io/acme/trainer:root"})

    assert answer.last.event == "ready"
    assert any("declares USER root (none set); the job runs as uid 1000 instead" in line
               for line in progress_lines(answer))


def test_a_private_image_is_resolved_with_the_stacks_pull_secret(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, fake_registry: FakeOciRegistry,
) -> None:
    digest = fake_registry.add_image("acme/private", "1", private=True)
    env[contract.ENV_ALLOWED_IMAGES] = f'["{fake_registry.host}/acme/*"]'
    env[contract.ENV_IMAGE_PULL_SECRET] = contract.IMAGE_PULL_SECRET_NAME
    image = f"{fake_registry.host}/acme/private:1"
    # The broker's default resolver: the real registry client, the pull Secret read from the
    # runner namespace, plain HTTP only because the registry is on loopback.
    broker = make_broker(env)

    refused = spawn(broker.url, fake_oidc.mint(), {"image": image})
    kube_client_for(fake_kube).core.create_namespaced_secret(fake_kube.namespace, V1Secret(
        metadata=V1ObjectMeta(name=contract.IMAGE_PULL_SECRET_NAME),
        type="kubernetes.io/dockerconfigjson",
        string_data={".dockerconfigjson": fake_registry.credentials_json()}))
    accepted = spawn(broker.url, fake_oidc.mint(), {"image": image})

    assert refused.status == 403
    assert refused.body["message"] == (
        f"image: {image}: registry {fake_registry.host} refused access (401 from its token "
        f"service): it may be private: the stack's image pull Secret needs credentials for "
        f"{fake_registry.host}")
    assert accepted.last.event == "ready"
    pod = fake_kube.pod("gpu-123-1")
    assert pod is not None
    assert pod["spec"]["containers"][0]["image"] == f"{fake_registry.host}/acme/private@{digest}"
    assert fake_registry.password not in str(refused.body)


def test_a_resolved_image_is_pulled_through_the_stacks_mirror_of_its_registry(
    broker_for: BrokerFor, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_registry: FakeOciRegistry,
) -> None:
    digest = fake_registry.add_image("acme/trainer", "2.4")
    mirror = "us-central1-docker.pkg.dev/acme-ml-ci/gpu-runners-dev-ghcr-io"
    broker = broker_for('["ghcr.io/acme/*"]', **{
        contract.ENV_REGISTRY_MIRRORS: json.dumps({"ghcr.io": mirror})})

    answer = spawn(broker.url, fake_oidc.mint(), {"image": "ghcr.io/acme/trainer:2.4"})

    assert answer.last.event == "ready"
    pod = fake_kube.pod("gpu-123-1")
    assert pod is not None
    # Resolved at ghcr.io, pulled (and streamed) from the mirror under the same digest.
    assert pod["spec"]["containers"][0]["image"] == f"{mirror}/acme/trainer@{digest}"
    assert fake_registry.requests[0].path == "/v2/acme/trainer/manifests/2.4"


def test_malformed_image_settings_are_refused_naming_their_variables(env: dict[str, str]) -> None:
    broken = {**env, contract.ENV_REQUIRE_IMAGE_DIGESTS: "yes",
              contract.ENV_REGISTRY_MIRRORS: '["ghcr.io"]'}

    with pytest.raises(SettingsError) as refused:
        BrokerSettings.from_environ(broken)

    assert refused.value.problems == [
        f"{contract.ENV_REQUIRE_IMAGE_DIGESTS}: 'yes' is not true or false",
        f"""{contract.ENV_REGISTRY_MIRRORS}: '["ghcr.io"]' is not a JSON object of non-empty """
        "strings",
    ]
