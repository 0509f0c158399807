"""The runner and broker images: built from docker/, pushed to GHCR by digest, or taken prebuilt."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from components.container_image import (
    BROKER_IMAGE,
    REPO_ROOT,
    RUNNER_IMAGE,
    content_tag,
    dockerconfigjson,
    runner_version,
)
from gpu_runners import contract
from tests.harness.mock_stack import FAKE_DIGEST, TEST_SECRETS, ProgramRun, run_program

IMAGE = "docker-build:index:Image"
REPOSITORY = "ghcr.io/acme-ml/vision-models/github-runner"
BROKER_REPOSITORY = "ghcr.io/acme-ml/vision-models/gpu-runners-broker"
RUNNER = "runner-image-image"
BROKER = "broker-image-image"


@pytest.fixture(scope="module")
def dev() -> ProgramRun:
    return run_program("dev")


def test_image_is_pushed_to_a_lowercased_ghcr_name(dev: ProgramRun) -> None:
    image = dev.one(IMAGE, RUNNER).inputs
    assert image["push"] is True
    assert image["tags"] == [f"{REPOSITORY}:{runner_version()}",
                             f"{REPOSITORY}:{content_tag(RUNNER_IMAGE.sources)}"]
    assert image["platforms"] == ["linux/amd64"]
    assert image["dockerfile"]["location"].endswith("docker/Dockerfile")
    assert image["buildArgs"] == {"GITHUB_REPOSITORY": "Acme-ML/Vision-Models"}
    assert image["labels"]["org.opencontainers.image.source"] == (
        "https://github.com/Acme-ML/Vision-Models")


def test_broker_image_is_built_from_its_own_dockerfile_next_to_the_runner_image(
        dev: ProgramRun) -> None:
    image = dev.one(IMAGE, BROKER).inputs
    assert image["push"] is True
    assert image["tags"] == [f"{BROKER_REPOSITORY}:{content_tag(BROKER_IMAGE.sources)}"]
    assert image["dockerfile"]["location"].endswith("docker/broker.Dockerfile")
    assert image["platforms"] == ["linux/amd64"]
    assert dev.outputs["brokerImage"] == f"{BROKER_REPOSITORY}@{FAKE_DIGEST}"
    broker = dev.one("kubernetes:apps/v1:Deployment", "broker-deployment").manifest()
    (container,) = broker["spec"]["template"]["spec"]["containers"]
    assert container["image"] == dev.outputs["brokerImage"]


def test_runner_image_keeps_its_former_component_type_as_an_alias(dev: ProgramRun) -> None:
    # Renaming RunnerImage to ContainerImage must not rebuild and re-push the runner image.
    runner = next(r for r in dev.resources if r.name == "runner-image")
    assert runner.typ == "gpu-runners:index:ContainerImage"
    assert [a["spec"]["type"] for a in runner.aliases] == ["gpu-runners:index:RunnerImage"]


@pytest.mark.parametrize("image", [RUNNER, BROKER])
def test_registry_login_uses_the_github_token_as_a_secret(dev: ProgramRun, image: str) -> None:
    registered = dev.one(IMAGE, image)
    (registry,) = registered.inputs["registries"]
    assert registry["address"] == "ghcr.io"
    assert registry["password"] == TEST_SECRETS["githubToken"]
    assert registered.is_secret("registries.0.password")


@pytest.mark.parametrize("image", [RUNNER, BROKER])
def test_no_build_cache_comes_from_a_mutable_registry_tag(dev: ProgramRun, image: str) -> None:
    # Whoever can push a cache tag could plant layers the next build reuses unverified.
    inputs = dev.one(IMAGE, image).inputs
    assert inputs.get("cacheFrom") in (None, [])
    assert inputs.get("cacheTo") in (None, [])


def test_build_skips_preview_by_default(dev: ProgramRun) -> None:
    assert [i.inputs["buildOnPreview"] for i in dev.of_type(IMAGE)] == [False, False]
    run = run_program("dev", {"buildImageOnPreview": True})
    assert [i.inputs["buildOnPreview"] for i in run.of_type(IMAGE)] == [True, True]


def test_digest_pinned_ref_flows_to_every_pod(dev: ProgramRun) -> None:
    ref = f"{REPOSITORY}@{FAKE_DIGEST}"
    assert dev.outputs["runnerImage"] == ref
    deployment = dev.one("kubernetes:apps/v1:Deployment", "runners-base-runner").manifest()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == ref
    # The broker gives GPU runner pods the same image.
    broker = dev.one("kubernetes:apps/v1:Deployment", "broker-deployment").manifest()
    (container,) = broker["spec"]["template"]["spec"]["containers"]
    assert {e["name"]: e["value"] for e in container["env"]}[contract.ENV_IMAGE] == ref


def test_prebuilt_images_skip_their_builds() -> None:
    prebuilt = "ghcr.io/acme-ml/prebuilt-runner@sha256:" + "d" * 64
    run = run_program("dev", {"runnerImage": prebuilt})
    assert [i.name for i in run.of_type(IMAGE)] == [BROKER]
    deployment = run.one("kubernetes:apps/v1:Deployment", "runners-base-runner").manifest()
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == prebuilt
    broker_prebuilt = "ghcr.io/acme-ml/prebuilt-broker@sha256:" + "e" * 64
    run = run_program("dev", {"runnerImage": prebuilt, "brokerImage": broker_prebuilt})
    assert run.of_type(IMAGE) == []
    broker = run.one("kubernetes:apps/v1:Deployment", "broker-deployment").manifest()
    assert broker["spec"]["template"]["spec"]["containers"][0]["image"] == broker_prebuilt


def test_pull_secret_config_authenticates_to_ghcr() -> None:
    document = json.loads(dockerconfigjson("Acme-ML", "ghp_pull"))
    # base64("Acme-ML:ghp_pull")
    assert document == {"auths": {"ghcr.io": {"username": "Acme-ML",
                                              "auth": "QWNtZS1NTDpnaHBfcHVsbA=="}}}


def test_runner_version_is_read_from_the_dockerfile_pin(tmp_path: Path) -> None:
    dockerfile = tmp_path / "Dockerfile"
    dockerfile.write_text("FROM ubuntu:24.04\nARG RUNNER_VERSION=2.330.0\n")
    assert runner_version(dockerfile) == "2.330.0"
    dockerfile.write_text("FROM ubuntu:24.04\nARG RUNNER_VERSION\n")
    with pytest.raises(ValueError, match="RUNNER_VERSION"):
        runner_version(dockerfile)


def test_content_tag_changes_exactly_when_an_image_source_changes(tmp_path: Path) -> None:
    for source in ("docker", "gpu_runners"):
        (tmp_path / source).mkdir()
    (tmp_path / "docker" / "entrypoint.sh").write_text("#!/bin/bash\n")
    (tmp_path / "docker" / "broker.Dockerfile").write_text("FROM python\n")
    (tmp_path / "gpu_runners" / "cli.py").write_text("print('x')\n")
    (tmp_path / "README.md").write_text("not in the image\n")
    sources = ("docker/entrypoint.sh", "gpu_runners")
    first = content_tag(sources, tmp_path)
    (tmp_path / "README.md").write_text("changed, still not in the image\n")
    (tmp_path / "docker" / "broker.Dockerfile").write_text("FROM python:3.12\n")
    assert content_tag(sources, tmp_path) == first
    (tmp_path / "gpu_runners" / "cli.py").write_text("print('y')\n")
    second = content_tag(sources, tmp_path)
    assert second != first
    (tmp_path / "docker" / "entrypoint.sh").write_text("#!/bin/bash\nexit 0\n")
    assert content_tag(sources, tmp_path) not in (first, second)


@pytest.mark.parametrize("definition", [RUNNER_IMAGE, BROKER_IMAGE], ids=lambda d: d.name)
def test_each_images_sources_are_what_its_dockerignore_lets_in(definition: Any) -> None:
    # What the build context holds is what the content tag hashes: no rebuild is missed, and
    # the other image's files do not trigger one.
    ignore = Path(f"{definition.dockerfile}.dockerignore").read_text().splitlines()
    included = sorted(line[1:].rstrip("/") for line in ignore if line.startswith("!"))
    dockerfile_and_ignore = {definition.dockerfile.relative_to(REPO_ROOT).as_posix(),
                             f"{definition.dockerfile.relative_to(REPO_ROOT).as_posix()}"
                             ".dockerignore"}
    assert sorted(set(definition.sources) - dockerfile_and_ignore) == included
