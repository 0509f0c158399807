"""Image streaming in GKE mode: the Artifact Registry mirrors, their readers, streaming on the
pools, and the images pulled through them (under mocks); absent when off or not on GKE."""

from __future__ import annotations

import json
from typing import Any

import pytest

from gpu_runners import contract
from gpu_runners.image_refs import mirrored_reference
from tests.harness.mock_stack import ProgramRun, run_program
from tests.test_broker_component import broker_env
from tests.test_config import config_problems

REPOSITORY = "gcp:artifactregistry/repository:Repository"
READER = "gcp:artifactregistry/repositoryIamMember:RepositoryIamMember"
SECRET_ACCESS = "gcp:secretmanager/secretIamMember:SecretIamMember"
NODE_POOL = "gcp:container/nodePool:NodePool"
NODE_SA = "gcp:serviceaccount/account:Account"
GHCR_MIRROR = "us-central1-docker.pkg.dev/acme-ml-ci/gpu-runners-dev-ghcr-io"
NGC_VERSION = "projects/acme-ml-ci/secrets/ngc-key/versions/1"


@pytest.fixture(scope="module")
def dev() -> ProgramRun:
    return run_program("dev")


def repositories(run: ProgramRun) -> dict[str, dict[str, Any]]:
    return {r.inputs["repositoryId"]: r.inputs for r in run.of_type(REPOSITORY)}


def test_gke_mode_mirrors_ghcr_in_the_clusters_region_by_default(dev: ProgramRun) -> None:
    (mirror,) = repositories(dev).values()

    assert mirror["repositoryId"] == "gpu-runners-dev-ghcr-io"
    assert (mirror["format"], mirror["mode"]) == ("DOCKER", "REMOTE_REPOSITORY")
    # The zonal dev cluster (us-central1-a) pulls from its region.
    assert mirror["location"] == "us-central1"
    assert mirror["remoteRepositoryConfig"]["dockerRepository"] == {
        "customRepository": {"uri": "https://ghcr.io"}}
    assert "upstreamCredentials" not in mirror["remoteRepositoryConfig"]


def test_the_nodes_service_account_reads_each_mirror(dev: ProgramRun) -> None:
    (reader,) = dev.of_type(READER)
    node_account = dev.one(NODE_SA, "gke-nodes").outputs["email"]

    assert reader.inputs["role"] == "roles/artifactregistry.reader"
    assert reader.inputs["member"] == f"serviceAccount:{node_account}"
    assert reader.inputs["location"] == "us-central1"


def test_streaming_has_its_api_and_the_nodes_may_use_it(dev: ProgramRun) -> None:
    services = {r.inputs["service"] for r in dev.of_type("gcp:projects/service:Service")}
    node_account = dev.one(NODE_SA, "gke-nodes").outputs["email"]
    roles = {(r.inputs["role"], r.inputs["member"])
             for r in dev.of_type("gcp:projects/iAMMember:IAMMember")}

    assert {"artifactregistry.googleapis.com", "containerfilesystem.googleapis.com"} <= services
    assert ("roles/serviceusage.serviceUsageConsumer", f"serviceAccount:{node_account}") in roles


def test_every_pool_streams_images(dev: ProgramRun) -> None:
    pools = dev.of_type(NODE_POOL)

    assert len(pools) >= 2  # the CPU pool and the GPU pools
    assert all(p.inputs["nodeConfig"]["gcfsConfig"] == {"enabled": True} for p in pools)


def test_job_images_are_pulled_through_the_mirror_named_to_the_broker(dev: ProgramRun) -> None:
    assert json.loads(broker_env(dev)[contract.ENV_REGISTRY_MIRRORS]) == {"ghcr.io": GHCR_MIRROR}
    assert dev.outputs["imageMirrors"] == {"ghcr.io": GHCR_MIRROR}


def test_a_public_runner_image_is_pulled_through_the_mirror() -> None:
    run = run_program("dev", {"imagePrivate": False})

    image = broker_env(run)[contract.ENV_IMAGE]
    assert image.startswith(f"{GHCR_MIRROR}/acme-ml/vision-models/")
    deployments = [r.manifest() for r in run.kubernetes_objects()
                   if r.inputs["kind"] == "Deployment"]
    images = {c["image"] for d in deployments for c in d["spec"]["template"]["spec"]["containers"]}
    assert image in images  # the base runner pulls it from the mirror too


def test_a_private_runner_image_without_mirror_credentials_is_pulled_directly(
    dev: ProgramRun,
) -> None:
    assert broker_env(dev)[contract.ENV_IMAGE].startswith("ghcr.io/")


def test_private_upstreams_use_a_secret_manager_password_the_service_agent_may_read() -> None:
    run = run_program("dev", {
        "imageMirrorUpstreams": ["ghcr.io", "docker.io", "nvcr.io"],
        "imageMirrorCredentials": {"nvcr.io": {"username": "$oauthtoken",
                                               "passwordSecretVersion": NGC_VERSION}}})
    mirrors = repositories(run)
    (access,) = run.of_type(SECRET_ACCESS)

    assert mirrors["gpu-runners-dev-docker-io"]["remoteRepositoryConfig"]["dockerRepository"] == {
        "publicRepository": "DOCKER_HUB"}
    assert mirrors["gpu-runners-dev-nvcr-io"]["remoteRepositoryConfig"][
        "upstreamCredentials"] == {"usernamePasswordCredentials": {
            "username": "$oauthtoken", "passwordSecretVersion": NGC_VERSION}}
    assert (access.inputs["secretId"], access.inputs["role"]) == (
        "ngc-key", "roles/secretmanager.secretAccessor")
    assert access.inputs["member"] == (
        "serviceAccount:service-123456789012@gcp-sa-artifactregistry.iam.gserviceaccount.com")
    assert len(run.of_type(READER)) == 3


def test_image_streaming_off_leaves_no_mirror_and_no_streaming() -> None:
    run = run_program("dev", {"imageStreaming": False})

    assert run.of_type(REPOSITORY) == [] and run.of_type(READER) == []
    assert "containerfilesystem.googleapis.com" not in {
        r.inputs["service"] for r in run.of_type("gcp:projects/service:Service")}
    assert all("gcfsConfig" not in p.inputs["nodeConfig"] for p in run.of_type(NODE_POOL))
    assert json.loads(broker_env(run)[contract.ENV_REGISTRY_MIRRORS]) == {}


def test_existing_cluster_mode_pulls_directly() -> None:
    run = run_program("dev", {"clusterMode": "existing", "kubeconfigContext": "onprem",
                              "gpuQuota": 2})

    assert run.of_type(REPOSITORY) == [] and run.of_type(NODE_POOL) == []
    assert json.loads(broker_env(run)[contract.ENV_REGISTRY_MIRRORS]) == {}
    assert "imageMirrors" not in run.outputs


@pytest.mark.parametrize(("overrides", "key"), [
    ({"imageMirrorUpstreams": ["quay.io"]}, "imageMirrorUpstreams[0]"),
    ({"imageMirrorCredentials": {"nvcr.io": {"username": "u",
                                             "passwordSecretVersion": NGC_VERSION}}},
     "imageMirrorCredentials.nvcr.io"),
    ({"imageMirrorCredentials": {"ghcr.io": {"username": "bot",
                                             "passwordSecretVersion": "hunter2"}}},
     "imageMirrorCredentials.ghcr.io.passwordSecretVersion"),
])
def test_mirror_settings_are_refused_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    problems = config_problems(overrides)

    assert any(problem.startswith(key) for problem in problems), problems
    assert not any("hunter2" in problem for problem in problems)


def test_a_mirrored_reference_keeps_its_path_and_digest() -> None:
    digest = "sha256:" + "c" * 64
    prefixes = {"docker.io": "us-central1-docker.pkg.dev/p/r-docker-io"}

    assert mirrored_reference(f"docker.io/library/python@{digest}", prefixes) == (
        f"us-central1-docker.pkg.dev/p/r-docker-io/library/python@{digest}")
    assert mirrored_reference(f"ghcr.io/acme/train@{digest}", prefixes) == (
        f"ghcr.io/acme/train@{digest}")
