"""The broker's registry client against the fake OCI registry over HTTP: what a real registry
does that the policy tests do not reach (storage redirects, credentials, platforms)."""

from __future__ import annotations

import pytest

from gpu_runners.broker.image_registry import (
    ImageResolutionError,
    RegistryClient,
    RegistryCredentials,
)
from gpu_runners.image_refs import parse_image_reference
from tests.fakes.oci_registry import FakeOciRegistry

ENV = {"PATH": "/opt/conda/bin:/usr/bin:/bin", "NVIDIA_VISIBLE_DEVICES": "all"}


def client_for(registry: FakeOciRegistry, credentials: str | None = None) -> RegistryClient:
    return RegistryClient(
        RegistryCredentials.from_dockerconfigjson(credentials) if credentials else None,
        endpoints={"ghcr.io": registry.url})


def test_a_tag_resolves_to_its_index_digest_and_the_amd64_config(
    fake_registry: FakeOciRegistry,
) -> None:
    digest = fake_registry.add_image("acme/trainer", "1", env=ENV, user="1000:1000")

    resolved = client_for(fake_registry).resolve(parse_image_reference("ghcr.io/acme/trainer:1"))

    assert resolved.reference == f"ghcr.io/acme/trainer@{digest}"
    assert dict(resolved.env) == ENV
    assert resolved.user == "1000:1000" and not resolved.runs_as_root


def test_a_blob_redirect_to_another_host_is_followed_without_the_registry_token(
    fake_registry: FakeOciRegistry,
) -> None:
    fake_registry.add_image("acme/trainer", "1", env=ENV)
    fake_registry.redirect_blobs_to_storage()

    resolved = client_for(fake_registry).resolve(parse_image_reference("ghcr.io/acme/trainer:1"))

    storage = [r for r in fake_registry.requests if r.path.startswith("/storage/")]
    assert dict(resolved.env) == ENV
    assert [(r.authorization, r.status) for r in storage] == [("", 200)]


def test_private_repositories_get_a_token_only_with_the_pull_secrets_credentials(
    fake_registry: FakeOciRegistry,
) -> None:
    digest = fake_registry.add_image("acme/private", "1", private=True)
    image = parse_image_reference(f"{fake_registry.host}/acme/private:1")

    with pytest.raises(ImageResolutionError, match=r"refused access \(401 from its token"):
        RegistryClient().resolve(image)
    resolved = RegistryClient(RegistryCredentials.from_dockerconfigjson(
        fake_registry.credentials_json())).resolve(image)

    assert resolved.digest == digest
    token_requests = [r for r in fake_registry.requests if r.path == "/token"]
    assert token_requests[-1].authorization.startswith("Basic ")


def test_a_repository_the_registry_does_not_have_is_named_in_the_refusal(
    fake_registry: FakeOciRegistry,
) -> None:
    with pytest.raises(ImageResolutionError) as refused:
        client_for(fake_registry).resolve(parse_image_reference("ghcr.io/acme/nothing:1"))

    assert str(refused.value) == (
        "ghcr.io/acme/nothing:1: registry ghcr.io has no manifest 1 (a tag that does not "
        "resolve, or a wrong name)")


def test_an_unreachable_registry_is_refused_naming_it() -> None:
    client = RegistryClient(endpoints={"ghcr.io": "http://127.0.0.1:9"}, timeout=2.0)

    with pytest.raises(ImageResolutionError, match="cannot reach registry ghcr.io"):
        client.resolve(parse_image_reference("ghcr.io/acme/trainer:1"))


def test_registries_are_reached_over_https_except_on_loopback() -> None:
    client = RegistryClient()

    assert client.base_url("docker.io") == "https://registry-1.docker.io"
    assert client.base_url("nvcr.io") == "https://nvcr.io"
    assert client.base_url("localhost:5000") == "http://localhost:5000"
    assert client.base_url("127.0.0.1:5000") == "http://127.0.0.1:5000"
