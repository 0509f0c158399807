"""The GPU pod and its JIT Secret, as the pure builders produce them (no server involved)."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
from kubernetes.client import ApiClient, V1ObjectMeta, V1Pod

from gpu_runners import contract
from gpu_runners.errors import UsageError
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.pod_spec import build_gpu_pod, build_jit_secret
from gpu_runners.run_identity import RunIdentity
from tests.harness.kubernetes_schema import strict_errors
from tests.runtime.fake_wiring import IMAGE

IDENTITY = RunIdentity("acme/models", 4242, 3)
REPO_ROOT = Path(__file__).resolve().parents[2]


def wire(obj: object) -> dict[str, Any]:
    """The JSON the Kubernetes client would send for a model object."""
    data: dict[str, Any] = ApiClient().sanitize_for_serialization(obj)
    return data


def options(**overrides: Any) -> RunnerPodOptions:
    return RunnerPodOptions(**{"namespace": "github-runners", "image": IMAGE, **overrides})


def pod_json(gpu_type: str | None = "nvidia-l4", **overrides: Any) -> dict[str, Any]:
    return wire(build_gpu_pod(IDENTITY, options(**overrides), gpu_type))


def runner_container(pod: dict[str, Any]) -> dict[str, Any]:
    containers: list[dict[str, Any]] = pod["spec"]["containers"]
    assert len(containers) == 1
    return containers[0]


def test_pod_reserves_the_requested_gpus_with_equal_request_and_limit() -> None:
    resources = runner_container(pod_json(gpu_count=2, cpu="4", memory="32Gi"))["resources"]

    assert resources["limits"] == {"cpu": "4", "memory": "32Gi", "nvidia.com/gpu": "2"}
    assert resources["requests"] == resources["limits"]


def test_pod_lands_only_on_gpu_nodes_of_the_asked_type_and_tolerates_their_taint() -> None:
    spec = pod_json("nvidia-tesla-t4")["spec"]

    assert spec["nodeSelector"] == {
        "gpu": "true",
        "cloud.google.com/gke-accelerator": "nvidia-tesla-t4",
    }
    assert spec["tolerations"] == [
        {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
    ]


def test_pod_without_a_gpu_type_selects_any_gpu_pool_and_says_so_in_its_label() -> None:
    pod = pod_json(None)

    assert pod["spec"]["nodeSelector"] == {"gpu": "true"}
    assert pod["metadata"]["labels"][contract.LABEL_GPU_TYPE] == "any"


def test_pod_meets_the_restricted_pod_security_standard() -> None:
    pod = pod_json()
    pod_context = pod["spec"]["securityContext"]
    container_context = runner_container(pod)["securityContext"]

    assert pod_context == {
        "runAsNonRoot": True,
        "runAsUser": 1000,
        "runAsGroup": 1000,
        "fsGroup": 1000,
        "seccompProfile": {"type": "RuntimeDefault"},
    }
    assert container_context == {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "runAsNonRoot": True,
    }


def test_pod_has_no_serviceaccount_token_and_never_restarts() -> None:
    spec = pod_json()["spec"]

    assert spec["serviceAccountName"] == contract.GPU_RUNNER_SERVICE_ACCOUNT
    assert spec["automountServiceAccountToken"] is False
    assert spec["restartPolicy"] == "Never"
    assert spec["enableServiceLinks"] is False


def test_pod_is_killed_after_its_max_runtime() -> None:
    assert pod_json(max_runtime_seconds=5400)["spec"]["activeDeadlineSeconds"] == 5400


def test_shm_is_memory_backed_with_the_asked_size_limit() -> None:
    pod = pod_json(shm_size="6Gi", memory="24Gi")
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in runner_container(pod)["volumeMounts"]}

    assert volumes[mounts["/dev/shm"]]["emptyDir"] == {"medium": "Memory", "sizeLimit": "6Gi"}


def test_runner_reads_its_jit_config_from_the_run_secret_in_jit_mode() -> None:
    pod = pod_json()
    container = runner_container(pod)
    env = {item["name"]: item["value"] for item in container["env"]}
    mounts = {mount["name"]: mount for mount in container["volumeMounts"]}
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    jit_mount = next(m for m in mounts.values() if m["mountPath"] == contract.JIT_MOUNT_DIR)

    assert env["RUNNER_MODE"] == "jit"
    assert env["RUNNER_JITCONFIG_FILE"] == f"{contract.JIT_MOUNT_DIR}/{contract.JIT_SECRET_KEY}"
    assert contract.ENV_RUNNER_JITCONFIG not in env  # the entrypoint reads the file instead
    assert jit_mount["readOnly"] is True
    assert volumes[jit_mount["name"]]["secret"] == {
        "secretName": "gpu-4242-3-jit",
        "items": [{"key": "jitconfig", "path": "jitconfig"}],
        "defaultMode": 0o440,
        "optional": False,
    }


def container_env(pod: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in runner_container(pod)["env"]}


@pytest.mark.parametrize("image", [IMAGE, "nvcr.io/nvidia/pytorch:25.01-py3"])
def test_every_gpu_pod_finds_the_nvidia_driver_gke_mounts(image: str) -> None:
    env = container_env(pod_json(image=image))

    assert env["LD_LIBRARY_PATH"].split(":") == ["/usr/local/nvidia/lib64", "/usr/local/nvidia/lib"]
    path = env["PATH"].split(":")
    assert "/usr/local/nvidia/bin" in path
    assert "/usr/local/cuda/bin" in path
    # The standard directories stay, in their order, after the driver's and the toolkit's.
    standard = ["/usr/local/sbin", "/usr/local/bin", "/usr/sbin", "/usr/bin", "/sbin", "/bin"]
    assert path[-len(standard):] == standard
    assert path.index("/usr/local/nvidia/bin") < path.index("/usr/bin")


def test_the_pods_path_keeps_every_directory_the_runner_image_puts_on_path() -> None:
    # A pod's PATH replaces the image's; what docker/Dockerfile prepends must be named again.
    dockerfile = (REPO_ROOT / "docker" / "Dockerfile").read_text()
    (image_path,) = re.findall(r"^\s*PATH=(\S+)", dockerfile, flags=re.MULTILINE)
    prepended = [entry for entry in image_path.split(":") if entry != "${PATH}"]
    path = container_env(pod_json())["PATH"].split(":")

    assert prepended
    assert path[: len(prepended)] == prepended


def test_pod_carries_no_github_token_in_env_volumes_or_anywhere() -> None:
    pod = pod_json()
    text = json.dumps(pod)
    mount_paths = [mount["mountPath"] for mount in runner_container(pod)["volumeMounts"]]

    assert contract.PAT_SECRET_NAME not in text  # no volume or secretKeyRef of the PAT Secret
    for variable in (contract.ENV_PAT_SEED, contract.ENV_PAT_FILE, contract.ENV_GITHUB_TOKEN):
        assert variable not in text
    assert contract.PAT_MOUNT_DIR not in mount_paths


def test_pod_is_named_and_labelled_for_its_run_and_annotated_with_the_run_url() -> None:
    metadata = pod_json(extra_labels={"team": "vision"})["metadata"]

    assert metadata["name"] == "gpu-4242-3"
    assert metadata["labels"] == {
        "team": "vision",
        contract.LABEL_NAME: contract.GPU_RUNNER_APP,
        contract.LABEL_COMPONENT: "runner",
        contract.LABEL_PART_OF: contract.PART_OF,
        contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
        contract.LABEL_RUN_ID: "4242",
        contract.LABEL_RUN_ATTEMPT: "3",
        contract.LABEL_GPU_TYPE: "nvidia-l4",
    }
    assert metadata["annotations"] == {
        contract.ANNOTATION_RUN_URL: "https://github.com/acme/models/actions/runs/4242/attempts/3",
        contract.ANNOTATION_REPOSITORY: "acme/models",
        contract.ANNOTATION_RUNNER_NAME: "gpu-4242-3",
    }


def test_the_pod_and_its_secret_of_a_brokered_run_carry_the_repository_id() -> None:
    identity = RunIdentity("acme/models", 4242, 3, repository_id=74)
    pod = build_gpu_pod(identity, options(), "nvidia-l4")
    assert pod.metadata is not None
    pod.metadata.uid = "0b5e3c1a-3f0c-4a5e-9d59-5f1b1d1e2a77"
    secret = wire(build_jit_secret(identity, namespace="github-runners", owner=pod,
                                   jit_config="ZW5jb2RlZA=="))

    assert wire(pod)["metadata"]["labels"][contract.LABEL_REPOSITORY_ID] == "74"
    assert secret["metadata"]["labels"][contract.LABEL_REPOSITORY_ID] == "74"
    assert identity.owns(wire(pod)["metadata"]["labels"])
    assert identity.owns(secret["metadata"]["labels"])
    assert strict_errors(wire(pod)) == []


def test_a_run_without_a_repository_id_has_no_repository_id_label() -> None:
    assert contract.LABEL_REPOSITORY_ID not in pod_json()["metadata"]["labels"]


def test_image_pull_secret_is_referenced_only_when_one_is_configured() -> None:
    assert "imagePullSecrets" not in pod_json()["spec"]
    assert pod_json(image_pull_secret="ghcr-pull")["spec"]["imagePullSecrets"] == [
        {"name": "ghcr-pull"}
    ]


@pytest.mark.parametrize("gpu_type", ["nvidia-l4", None])
def test_pod_validates_against_the_strict_kubernetes_schema(gpu_type: str | None) -> None:
    pod = pod_json(gpu_type, image_pull_secret="ghcr-pull", extra_labels={"team": "vision"})

    assert strict_errors(pod) == []


def test_a_pod_pinned_to_a_node_pool_selects_it_by_gkes_pool_label() -> None:
    pod = pod_json("nvidia-l4", node_pool="l4-on-demand", image_pull_secret="ghcr-pull")

    assert pod["spec"]["nodeSelector"] == {
        "gpu": "true",
        "cloud.google.com/gke-accelerator": "nvidia-l4",
        "cloud.google.com/gke-nodepool": "l4-on-demand",
    }
    assert contract.GKE_NODEPOOL_LABEL == "cloud.google.com/gke-nodepool"
    assert strict_errors(pod) == []
    # Without a pool: any pool of the type, as before.
    assert contract.GKE_NODEPOOL_LABEL not in pod_json("nvidia-l4")["spec"]["nodeSelector"]


def test_a_first_attempt_stays_off_the_on_demand_fallback_pools_a_retry_pinned_there_does_not(
) -> None:
    first = pod_json("nvidia-l4", avoid_node_pools=("l4-on-demand",))
    assert first["spec"]["affinity"] == {"nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
            {"matchExpressions": [{"key": "cloud.google.com/gke-nodepool", "operator": "NotIn",
                                   "values": ["l4-on-demand"]}]}]}}}
    assert strict_errors(first) == []
    retry = pod_json("nvidia-l4", node_pool="l4-on-demand", avoid_node_pools=("l4-on-demand",))
    assert "affinity" not in retry["spec"]
    assert "affinity" not in pod_json("nvidia-l4")["spec"]


def owner_pod() -> V1Pod:
    pod = build_gpu_pod(IDENTITY, options(), "nvidia-l4")
    assert pod.metadata is not None
    pod.metadata.uid = "0b5e3c1a-3f0c-4a5e-9d59-5f1b1d1e2a77"
    return pod


def test_secret_is_owned_by_the_pod_and_holds_the_jit_config_immutably() -> None:
    secret = wire(build_jit_secret(IDENTITY, namespace="github-runners", owner=owner_pod(),
                                   jit_config="ZW5jb2RlZA=="))

    assert secret["metadata"]["name"] == "gpu-4242-3-jit"
    assert secret["metadata"]["ownerReferences"] == [{
        "apiVersion": "v1", "kind": "Pod", "name": "gpu-4242-3",
        "uid": "0b5e3c1a-3f0c-4a5e-9d59-5f1b1d1e2a77",
    }]
    assert secret["stringData"] == {"jitconfig": "ZW5jb2RlZA=="}
    assert secret["immutable"] is True
    assert IDENTITY.owns(secret["metadata"]["labels"])
    assert strict_errors(secret) == []


def test_secret_refuses_an_owner_the_api_server_has_not_returned() -> None:
    unsaved = V1Pod(metadata=V1ObjectMeta(name="gpu-4242-3"))

    with pytest.raises(ValueError, match="uid"):
        build_jit_secret(IDENTITY, namespace="github-runners", owner=unsaved, jit_config="x")


@pytest.mark.parametrize(
    ("overrides", "option"),
    [
        ({"memory": "16GB"}, "--memory"),
        ({"cpu": "two"}, "--cpu"),
        ({"shm_size": "8Gi", "memory": "8Gi"}, "--shm-size"),
        ({"gpu_count": 0}, "--gpus"),
        ({"max_runtime_seconds": 2**31}, "--max-runtime"),
        ({"image": " "}, "--image"),
        ({"extra_labels": {contract.LABEL_RUN_ID: "1"}}, "--label"),
        ({"extra_labels": {"bad key!": "x"}}, "--label"),
        ({"extra_labels": {"team": "no spaces"}}, "--label"),
        ({"node_pool": "l4 on demand"}, "node_pool"),
        ({"node_pool": ""}, "node_pool"),
        ({"avoid_node_pools": ("l4 on demand",)}, "avoid_node_pools"),
    ],
)
def test_bad_pod_options_are_refused_naming_the_option(
    overrides: dict[str, Any], option: str
) -> None:
    with pytest.raises(UsageError, match=f"^{option}"):
        options(**overrides)
