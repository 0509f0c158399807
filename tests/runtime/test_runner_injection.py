"""A job in the team's own image: the runner injected by an init container (pure + over HTTP)."""

from __future__ import annotations

from typing import Any

import pytest
from kubernetes.client import ApiClient

from gpu_runners import contract
from gpu_runners.errors import PodFailedError
from gpu_runners.github_api import GitHubClient
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.pod_spec import build_gpu_pod
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import RunIdentity
from gpu_runners.runner_injection import (
    INIT_CONTAINER,
    INJECTED_HOME,
    INJECTED_RUNNER_DIR,
    INJECTED_VOLUME_DIR,
    search_path,
)
from gpu_runners.spawn import spawn
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, PodScript
from tests.harness.kubernetes_schema import strict_errors
from tests.runtime.fake_wiring import IMAGE, bring_runners_online, kube_client_for, spawn_request

IDENTITY = RunIdentity("acme/models", 4242, 3)
JOB_IMAGE = "docker.io/pytorch/pytorch@sha256:" + "b" * 64
#: What the pytorch/pytorch images declare (their Dockerfile's ENV), as the broker reads it.
PYTORCH_ENV = {
    "PATH": "/opt/conda/bin:/usr/local/nvidia/bin:/usr/local/cuda/bin:/usr/local/sbin:"
            "/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
    "LD_LIBRARY_PATH": "/usr/local/nvidia/lib:/usr/local/nvidia/lib64",
}


def injected_pod(**overrides: Any) -> dict[str, Any]:
    options = RunnerPodOptions(**{
        "namespace": "github-runners", "image": JOB_IMAGE, "runner_image": IMAGE,
        "cpu": "4", "memory": "16Gi", **overrides})
    data: dict[str, Any] = ApiClient().sanitize_for_serialization(
        build_gpu_pod(IDENTITY, options, "nvidia-l4"))
    return data


def job_container(pod: dict[str, Any]) -> dict[str, Any]:
    (container,) = pod["spec"]["containers"]
    assert container["name"] == contract.GPU_RUNNER_CONTAINER
    return dict(container)


def plain_env(container: dict[str, Any]) -> dict[str, str]:
    return {item["name"]: item["value"] for item in container["env"] if "value" in item}


def test_the_runner_image_itself_gets_no_init_container() -> None:
    pod = injected_pod(image=IMAGE)

    assert "initContainers" not in pod["spec"]
    assert job_container(pod)["image"] == IMAGE


def test_an_injected_runner_pod_validates_strictly_against_the_kubernetes_schema() -> None:
    assert strict_errors(injected_pod()) == []


def test_the_init_container_copies_the_runner_from_the_runner_image_into_an_empty_dir() -> None:
    pod = injected_pod()
    (init,) = pod["spec"]["initContainers"]
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount for mount in init["volumeMounts"]}

    assert init["name"] == INIT_CONTAINER
    assert init["image"] == IMAGE
    assert init["command"] == ["cp", "-a", "/home/runner", "/__runner/runner"]
    assert volumes[mounts[INJECTED_VOLUME_DIR]["name"]]["emptyDir"] == {}
    # The Secret mount holds the pod until spawn has created the Secret.
    assert volumes[mounts[contract.JIT_MOUNT_DIR]["name"]]["secret"]["secretName"] == (
        "gpu-4242-3-jit")
    # The job's size, no GPU: the pod reserves the larger of the two, so this costs nothing,
    # and it stays Guaranteed.
    assert init["resources"] == {"limits": {"cpu": "4", "memory": "16Gi"},
                                 "requests": {"cpu": "4", "memory": "16Gi"}}


def test_the_job_container_runs_the_teams_image_and_execs_the_listener_without_a_shell() -> None:
    container = job_container(injected_pod())

    assert container["image"] == JOB_IMAGE
    assert container["command"] == ["/__runner/runner/bin/Runner.Listener", "run"]
    assert container["args"] == []  # the image's CMD must not be appended
    assert container["workingDir"] == INJECTED_RUNNER_DIR


def test_the_jit_config_reaches_the_listener_from_the_secret_in_its_env_never_in_argv() -> None:
    container = job_container(injected_pod())
    (config,) = [item for item in container["env"]
                 if item["name"] == contract.ENV_RUNNER_JITCONFIG]

    assert config["valueFrom"] == {"secretKeyRef": {
        "name": "gpu-4242-3-jit", "key": contract.JIT_SECRET_KEY, "optional": False}}
    assert not any("jit" in part.lower() for part in container["command"] + container["args"])
    # No file of the config in the job container: job steps could read it there.
    assert contract.JIT_MOUNT_DIR not in [m["mountPath"] for m in container["volumeMounts"]]


def test_home_and_the_work_directory_are_on_empty_dirs_and_the_runner_needs_no_icu() -> None:
    pod = injected_pod()
    container = job_container(pod)
    volumes = {volume["name"]: volume for volume in pod["spec"]["volumes"]}
    mounts = {mount["mountPath"]: mount["name"] for mount in container["volumeMounts"]}
    env = plain_env(container)

    assert env["HOME"] == INJECTED_HOME
    assert volumes[mounts[INJECTED_HOME]]["emptyDir"] == {}
    # The runner's _work directory is inside the copied runner folder, on the emptyDir.
    assert INJECTED_RUNNER_DIR.startswith(INJECTED_VOLUME_DIR + "/")
    assert volumes[mounts[INJECTED_VOLUME_DIR]]["emptyDir"] == {}
    assert env["DOTNET_SYSTEM_GLOBALIZATION_INVARIANT"] == "1"


def test_the_pod_runs_as_uid_1000_under_restricted_whatever_the_images_user() -> None:
    pod = injected_pod()
    restricted = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]},
                  "runAsNonRoot": True}

    assert pod["spec"]["securityContext"]["runAsUser"] == contract.RUNNER_UID
    assert pod["spec"]["securityContext"]["runAsNonRoot"] is True
    assert job_container(pod)["securityContext"] == restricted
    assert pod["spec"]["initContainers"][0]["securityContext"] == restricted
    assert pod["spec"]["automountServiceAccountToken"] is False


def test_the_images_own_path_is_kept_with_the_gke_driver_appended() -> None:
    env = plain_env(job_container(injected_pod(image_env=PYTORCH_ENV)))

    # conda's python stays first; the driver was already on it, so it is not added twice.
    assert env["PATH"] == PYTORCH_ENV["PATH"]
    assert env["LD_LIBRARY_PATH"] == (
        "/usr/local/nvidia/lib:/usr/local/nvidia/lib64")


def test_an_image_without_cuda_variables_gets_the_driver_after_its_own_directories() -> None:
    slim_env = {"PATH": "/usr/local/bin:/usr/local/sbin:/usr/sbin:/usr/bin:/sbin:/bin"}

    env = plain_env(job_container(injected_pod(image_env=slim_env)))

    assert env["PATH"] == f"{slim_env['PATH']}:/usr/local/nvidia/bin"
    assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64:/usr/local/nvidia/lib"


def test_an_image_whose_environment_is_unknown_gets_the_runtimes_default_path() -> None:
    env = plain_env(job_container(injected_pod()))

    assert env["PATH"] == (
        "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin:/usr/local/nvidia/bin")


def test_an_ngc_style_compat_library_directory_stays_first() -> None:
    assert search_path("/usr/local/cuda/compat/lib:/usr/local/nvidia/lib64",
                       ("/usr/local/nvidia/lib64", "/usr/local/nvidia/lib")) == (
        "/usr/local/cuda/compat/lib:/usr/local/nvidia/lib64:/usr/local/nvidia/lib")


# --- over HTTP: the fake cluster admits the pod under `restricted` and runs it ------------------


def test_spawn_in_a_teams_image_is_admitted_under_restricted_and_comes_online(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    fake_kube: FakeKubernetes = make_fake_kube()
    bring_runners_online(fake_kube, fake_github)

    result = spawn(spawn_request(image=JOB_IMAGE, runner_image=IMAGE),
                   kube=kube_client_for(fake_kube), github=github, log=log)

    (pod,) = fake_kube.pods()
    assert result.label == "gpu-123-1"
    assert pod["spec"]["containers"][0]["image"] == JOB_IMAGE
    assert pod["spec"]["initContainers"][0]["image"] == IMAGE
    assert fake_kube.validation_errors == []


def test_a_job_image_that_cannot_run_the_runner_is_reported_with_what_the_image_must_provide(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    # What an image whose programs need root, or a musl image, does: the container exits at
    # once (128: the runtime could not start the listener at all).
    fake_kube: FakeKubernetes = make_fake_kube(
        scheduler=lambda pod: PodScript.crash(exit_code=128))

    with pytest.raises(PodFailedError) as failure:
        spawn(spawn_request(image=JOB_IMAGE, runner_image=IMAGE),
              kube=kube_client_for(fake_kube), github=github, log=log)

    message = str(failure.value)
    assert "runner container exited with code 128 (Error)" in message
    assert f"the job image {JOB_IMAGE} could not run the injected runner" in message
    assert "must run as uid 1000" in message
    assert "glibc 2.28 or newer" in message
    assert fake_kube.pods() == [] and fake_github.runners == {}


def test_a_crash_of_the_runner_image_itself_is_not_blamed_on_a_job_image(
    make_fake_kube: Any, fake_github: FakeGitHub, github: GitHubClient, log: ProgressLog,
) -> None:
    fake_kube: FakeKubernetes = make_fake_kube(
        scheduler=lambda pod: PodScript.crash(exit_code=3))

    with pytest.raises(PodFailedError) as failure:
        spawn(spawn_request(runner_image=IMAGE), kube=kube_client_for(fake_kube),
              github=github, log=log)

    assert "exited with code 3" in str(failure.value)
    assert "could not run the injected runner" not in str(failure.value)
