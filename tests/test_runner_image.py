"""The runner image: built from docker/, pushed to GHCR by digest, or taken prebuilt."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from components.runner_image import content_tag, dockerconfigjson, runner_version
from gpu_runners import contract
from tests.harness.mock_stack import FAKE_DIGEST, TEST_SECRETS, ProgramRun, run_program

IMAGE = "docker-build:index:Image"
REPOSITORY = "ghcr.io/acme-ml/vision-models/github-runner"


@pytest.fixture(scope="module")
def dev() -> ProgramRun:
    return run_program("dev")


def test_image_is_pushed_to_a_lowercased_ghcr_name(dev: ProgramRun) -> None:
    image = dev.one(IMAGE).inputs
    assert image["push"] is True
    assert image["tags"] == [f"{REPOSITORY}:{runner_version()}", f"{REPOSITORY}:{content_tag()}"]
    assert image["platforms"] == ["linux/amd64"]
    assert image["dockerfile"]["location"].endswith("docker/Dockerfile")
    assert image["buildArgs"] == {"GITHUB_REPOSITORY": "Acme-ML/Vision-Models"}
    assert image["labels"]["org.opencontainers.image.source"] == (
        "https://github.com/Acme-ML/Vision-Models")


def test_registry_login_uses_the_github_token_as_a_secret(dev: ProgramRun) -> None:
    image = dev.one(IMAGE)
    (registry,) = image.inputs["registries"]
    assert registry["address"] == "ghcr.io"
    assert registry["password"] == TEST_SECRETS["githubToken"]
    assert image.is_secret("registries.0.password")


def test_build_uses_a_registry_cache_and_skips_preview_by_default(dev: ProgramRun) -> None:
    image = dev.one(IMAGE).inputs
    assert image["cacheFrom"] == [{"registry": {"ref": f"{REPOSITORY}:buildcache"}}]
    assert image["cacheTo"][0]["registry"]["ref"] == f"{REPOSITORY}:buildcache"
    assert image["buildOnPreview"] is False
    run = run_program("dev", {"buildImageOnPreview": True})
    assert run.one(IMAGE).inputs["buildOnPreview"] is True


def test_digest_pinned_ref_flows_to_every_pod(dev: ProgramRun) -> None:
    ref = f"{REPOSITORY}@{FAKE_DIGEST}"
    assert dev.outputs["runnerImage"] == ref
    deployment = dev.one("kubernetes:apps/v1:Deployment").manifest()
    (container,) = deployment["spec"]["template"]["spec"]["containers"]
    assert container["image"] == ref
    assert {e["name"]: e["value"] for e in container["env"]}[contract.ENV_IMAGE] == ref
    cron = dev.one("kubernetes:batch/v1:CronJob").manifest()
    (reaper,) = cron["spec"]["jobTemplate"]["spec"]["template"]["spec"]["containers"]
    assert reaper["image"] == ref


def test_prebuilt_image_skips_the_build() -> None:
    prebuilt = "ghcr.io/acme-ml/prebuilt-runner@sha256:" + "d" * 64
    run = run_program("dev", {"runnerImage": prebuilt})
    assert run.of_type(IMAGE) == []
    deployment = run.one("kubernetes:apps/v1:Deployment").manifest()
    assert deployment["spec"]["template"]["spec"]["containers"][0]["image"] == prebuilt


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
    (tmp_path / "gpu_runners" / "cli.py").write_text("print('x')\n")
    (tmp_path / "README.md").write_text("not in the image\n")
    first = content_tag(tmp_path)
    (tmp_path / "README.md").write_text("changed, still not in the image\n")
    assert content_tag(tmp_path) == first
    (tmp_path / "gpu_runners" / "cli.py").write_text("print('y')\n")
    assert content_tag(tmp_path) != first
