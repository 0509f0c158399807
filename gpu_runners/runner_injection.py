"""The runner injected into a team's own image: the init container and the job container.

With `spawn --image IMAGE` the job runs in IMAGE (a CUDA or PyTorch image, say), not in the
runner image, and with no Docker daemon and no second pod. The runner comes from the stack's
runner image instead: an init container of that image copies the runner folder (its .NET
runtime is self-contained there, and so is the Node.js that JavaScript actions need) into an
emptyDir, and the job container, of IMAGE, executes the runner's listener from it directly.

No shell starts the runner: `bin/Runner.Listener run` is executed by the container runtime
itself, so an image without bash (or without any shell) still gets its runner. The listener
takes the single-use JIT config from ACTIONS_RUNNER_INPUT_JITCONFIG (filled from the run's
Secret by the kubelet, never on a command line) and drops it from the environment its jobs
inherit, as it does when run.sh starts it.

What IMAGE must provide (the README's table says which common images do):
- glibc at the standard x86-64 loader path (/lib64/ld-linux-x86-64.so.2), 2.28 or newer (the
  runner's bundled Node.js; its .NET runtime needs less); musl images (Alpine) cannot run it;
- libstdc++ and libssl (OpenSSL 1.1 or 3), which the .NET runtime loads; ICU is not needed:
  the listener runs in .NET's invariant globalization mode;
- a shell for `run:` steps (sh is enough with `shell: sh`; bash is `run:`'s default when the
  image has it) and git for actions/checkout (without git, checkout downloads a tarball of the
  commit through the API instead of cloning);
- to work as uid 1000 without root: the pod runs as uid/gid 1000 under `restricted`, whatever
  the image's USER; HOME and the work directory are on emptyDir, so they are writable.
"""

from __future__ import annotations

from collections.abc import Mapping

from kubernetes.client import (
    V1Capabilities,
    V1Container,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1EnvVarSource,
    V1ResourceRequirements,
    V1SecretKeySelector,
    V1SecurityContext,
    V1Volume,
    V1VolumeMount,
)

from gpu_runners import contract

#: Where the runner image keeps the runner folder (docker/Dockerfile copies it there; it is
#: the image's WORKDIR and the runner user's home).
RUNNER_IMAGE_RUNNER_DIR = "/home/runner"
#: Where the runner's emptyDir is mounted. Under `/__`, like the Actions runner's own container
#: mounts (/__w, /__e), so that it cannot collide with a directory of the image.
INJECTED_VOLUME_DIR = "/__runner"
#: The copied runner folder, inside the emptyDir: created by the copy, so owned by uid 1000. The
#: emptyDir's own root belongs to root, and `cp -a` onto it would fail to set its times and mode.
INJECTED_RUNNER_DIR = f"{INJECTED_VOLUME_DIR}/runner"
#: The job's HOME: the image's own home directories may not exist or belong to root.
INJECTED_HOME = "/__home"
#: The listener, executed without a shell. run.sh would only loop it for self-updates, which a
#: pinned, single-use runner never does.
LISTENER_COMMAND = (f"{INJECTED_RUNNER_DIR}/bin/Runner.Listener", "run")
#: Copies the whole runner folder (dot files, modes and links kept) to a new directory;
#: coreutils' cp is in the runner image, so no shell is needed there either.
COPY_COMMAND = ("cp", "-a", RUNNER_IMAGE_RUNNER_DIR, INJECTED_RUNNER_DIR)
INIT_CONTAINER = "inject-runner"
RUNNER_VOLUME = "runner"
HOME_VOLUME = "home"

NVIDIA_DRIVER_DIR = "/usr/local/nvidia"
#: Searched after the image's own directories: an image that puts a CUDA compatibility
#: library first (NGC's images do) keeps it first.
NVIDIA_BIN_DIRS = (f"{NVIDIA_DRIVER_DIR}/bin",)
NVIDIA_LIB_DIRS = (f"{NVIDIA_DRIVER_DIR}/lib64", f"{NVIDIA_DRIVER_DIR}/lib")
#: PATH of an image that does not set one (the container runtime's default).
DEFAULT_IMAGE_PATH = "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def search_path(image_value: str | None, extra: tuple[str, ...]) -> str:
    """The image's own list of directories with `extra` appended (each only once).

    A pod's `env` replaces the image's variable instead of extending it, and Kubernetes'
    `$(VAR)` expansion cannot see the image's environment: so the image's value, read from
    its config by the broker, is written out in full here.
    """
    parts = [part for part in (image_value or "").split(":") if part]
    return ":".join(parts + [part for part in extra if part not in parts])


def job_environment(image_env: Mapping[str, str], secret_name: str) -> list[V1EnvVar]:
    """The job container's environment: the JIT config, HOME, the driver on the search paths.

    Args:
        image_env: The job image's own environment (from its config); PATH and
            LD_LIBRARY_PATH are extended, not replaced.
        secret_name: The run's Secret holding the JIT config.
    """
    return [
        V1EnvVar(
            name=contract.ENV_RUNNER_JITCONFIG,
            value_from=V1EnvVarSource(
                secret_key_ref=V1SecretKeySelector(
                    name=secret_name, key=contract.JIT_SECRET_KEY, optional=False)),
        ),
        V1EnvVar(name="HOME", value=INJECTED_HOME),
        # The listener is a .NET program: without ICU in the image it aborts at start unless
        # told to run without culture data, which it does not need.
        V1EnvVar(name="DOTNET_SYSTEM_GLOBALIZATION_INVARIANT", value="1"),
        V1EnvVar(name="PATH", value=search_path(
            image_env.get("PATH") or DEFAULT_IMAGE_PATH, NVIDIA_BIN_DIRS)),
        V1EnvVar(name="LD_LIBRARY_PATH", value=search_path(
            image_env.get("LD_LIBRARY_PATH"), NVIDIA_LIB_DIRS)),
    ]


def restricted_context() -> V1SecurityContext:
    """The container security context `restricted` asks for (the pod sets uid and seccomp)."""
    return V1SecurityContext(
        allow_privilege_escalation=False,
        capabilities=V1Capabilities(drop=["ALL"]),
        run_as_non_root=True,
    )


def init_container(
    runner_image: str, *, cpu: str, memory: str, jit_volume: str
) -> V1Container:
    """The init container that copies the runner folder out of the runner image.

    Args:
        runner_image: The stack's runner image.
        cpu: The job's CPU: a pod reserves the larger of its init and its job containers, so
            the same size costs nothing and makes the copy as fast as the node allows.
        memory: The job's memory, for the same reason (and to keep the pod Guaranteed, which
            needs requests equal to limits in every container).
        jit_volume: The run's Secret volume. Mounted here only so the kubelet holds the pod
            until spawn has created the Secret; the job container takes the config from an
            env var instead, so no job step can read it from a file.
    """
    resources = {"cpu": cpu, "memory": memory}
    return V1Container(
        name=INIT_CONTAINER,
        image=runner_image,
        command=list(COPY_COMMAND),
        resources=V1ResourceRequirements(limits=dict(resources), requests=dict(resources)),
        volume_mounts=[
            V1VolumeMount(name=RUNNER_VOLUME, mount_path=INJECTED_VOLUME_DIR),
            V1VolumeMount(name=jit_volume, mount_path=contract.JIT_MOUNT_DIR, read_only=True),
        ],
        security_context=restricted_context(),
    )


def job_mounts() -> list[V1VolumeMount]:
    """The job container's mounts of the copied runner and of its HOME."""
    return [
        V1VolumeMount(name=RUNNER_VOLUME, mount_path=INJECTED_VOLUME_DIR),
        V1VolumeMount(name=HOME_VOLUME, mount_path=INJECTED_HOME),
    ]


def volumes() -> list[V1Volume]:
    """The two emptyDirs: the runner folder (with its _work directory) and HOME."""
    return [
        V1Volume(name=RUNNER_VOLUME, empty_dir=V1EmptyDirVolumeSource()),
        V1Volume(name=HOME_VOLUME, empty_dir=V1EmptyDirVolumeSource()),
    ]
