"""The injected runner's two commands run for real: the init container's copy, then the job
container's start of the listener, in a stand-in runner folder.

Paths are the pod's own, moved under a temporary directory: the runner image's /home/runner
becomes <tmp>/runner-image/home/runner, the emptyDir /__runner <tmp>/empty-dir, HOME's emptyDir
<tmp>/home-empty-dir. Each command is the exact argv of the pod spec with those prefixes
replaced, started without a shell, with exactly the pod's environment (the Secret reference
resolved as the kubelet does).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path
from typing import Any

from kubernetes.client import ApiClient

from gpu_runners import contract, runner_injection
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.pod_spec import build_gpu_pod
from gpu_runners.run_identity import RunIdentity
from tests.docker.runner_folder import RunnerFolder, wait_until

JIT_CONFIG = "eyJydW5uZXIiOiJncHUtNDItMSJ9"
RUNNER_IMAGE = "ghcr.io/acme/models/github-runner@sha256:" + "a" * 64
JOB_IMAGE = "docker.io/library/python@sha256:" + "c" * 64


def injected_pod(image_env: dict[str, str]) -> dict[str, Any]:
    options = RunnerPodOptions(namespace="github-runners", image=JOB_IMAGE,
                               runner_image=RUNNER_IMAGE, image_env=image_env)
    pod: dict[str, Any] = ApiClient().sanitize_for_serialization(
        build_gpu_pod(RunIdentity("acme/models", 42, 1), options, None))
    return pod


class PodPaths:
    """The pod's paths under a temporary root."""

    def __init__(self, tmp_path: Path) -> None:
        self.runner_image_dir = tmp_path / "runner-image" / "home" / "runner"
        self.empty_dir = tmp_path / "empty-dir"
        self.home = tmp_path / "home-empty-dir"
        self.empty_dir.mkdir()
        self.home.mkdir()

    def local(self, text: str) -> str:
        """A path (or argv item) of the pod, as it is under the temporary root."""
        for pod_path, here in (
            (runner_injection.RUNNER_IMAGE_RUNNER_DIR, self.runner_image_dir),
            (runner_injection.INJECTED_VOLUME_DIR, self.empty_dir),
            (runner_injection.INJECTED_HOME, self.home),
        ):
            if text.startswith(pod_path):
                return str(here) + text[len(pod_path):]
        return text


def container_env(container: dict[str, Any], paths: PodPaths) -> dict[str, str]:
    """The container's environment as the kubelet gives it (the Secret key resolved)."""
    env: dict[str, str] = {}
    for item in container.get("env") or []:
        if "valueFrom" in item:
            assert item["valueFrom"]["secretKeyRef"]["key"] == contract.JIT_SECRET_KEY
            env[item["name"]] = JIT_CONFIG
        else:
            env[item["name"]] = paths.local(item["value"])
    return env


def run_init_copy(pod: dict[str, Any], paths: PodPaths) -> None:
    (init,) = pod["spec"]["initContainers"]
    argv = [paths.local(part) for part in init["command"]]
    subprocess.run(argv, check=True, env={"PATH": os.environ["PATH"]}, timeout=30)


def start_job(pod: dict[str, Any], paths: PodPaths) -> subprocess.CompletedProcess[str]:
    (job,) = pod["spec"]["containers"]
    argv = [paths.local(part) for part in job["command"] + job["args"]]
    return subprocess.run(argv, env=container_env(job, paths), cwd=paths.local(job["workingDir"]),
                          capture_output=True, text=True, timeout=30, check=False)


def test_the_init_containers_copy_brings_the_whole_runner_folder_with_its_modes(
    tmp_path: Path,
) -> None:
    paths = PodPaths(tmp_path)
    source = RunnerFolder(paths.runner_image_dir)
    (source.path / "externals" / "node20" / "bin").mkdir(parents=True)
    (source.path / "externals" / "node20" / "bin" / "node").write_bytes(b"\x7fELF stand-in")
    (source.path / ".credentials").write_text("{}")  # dot files too: `cp -a dir/.`

    run_init_copy(injected_pod({}), paths)

    # The copy makes its own directory in the emptyDir: the emptyDir's root is not the pod
    # user's, so its times and mode could not be set.
    assert [p.name for p in paths.empty_dir.iterdir()] == ["runner"]
    copied = paths.empty_dir / "runner"
    assert os.access(copied / "bin" / "Runner.Listener", os.X_OK)
    assert (copied / "externals" / "node20" / "bin" / "node").read_bytes() == b"\x7fELF stand-in"
    assert (copied / ".credentials").exists()
    assert (copied / "run.sh").stat().st_mode == (source.path / "run.sh").stat().st_mode


def test_the_listener_starts_in_an_image_with_no_shell_at_all(tmp_path: Path) -> None:
    paths = PodPaths(tmp_path)
    RunnerFolder(paths.runner_image_dir).run_exits_with(0)
    # The job image's own PATH holds no shell: an empty bin directory.
    image_bin = tmp_path / "job-image" / "usr" / "bin"
    image_bin.mkdir(parents=True)
    pod = injected_pod({"PATH": str(image_bin)})

    run_init_copy(pod, paths)
    result = start_job(pod, paths)

    assert result.returncode == 0, result.stderr
    copied = RunnerFolder(paths.empty_dir / "runner", create=False)
    (start,) = copied.starts("Runner.Listener")
    assert start["argv"] == ["run"]
    env = start["env"]
    assert env[contract.ENV_RUNNER_JITCONFIG] == JIT_CONFIG
    assert env["HOME"] == str(paths.home)
    assert env["PATH"] == f"{image_bin}:/usr/local/nvidia/bin"
    assert env["LD_LIBRARY_PATH"] == "/usr/local/nvidia/lib64:/usr/local/nvidia/lib"
    assert env["DOTNET_SYSTEM_GLOBALIZATION_INVARIANT"] == "1"
    # Neither run.sh (bash) nor anything else was started on the way.
    assert copied.starts("run.sh") == []


def test_the_listener_is_the_containers_own_process_and_its_argv_holds_no_config(
    tmp_path: Path,
) -> None:
    paths = PodPaths(tmp_path)
    RunnerFolder(paths.runner_image_dir)  # the listener keeps listening
    image_bin = tmp_path / "job-image" / "bin"
    image_bin.mkdir(parents=True)
    # An image with only a POSIX sh (dash, as Debian's /bin/sh), no bash.
    (image_bin / "sh").symlink_to(Path("/bin/sh").resolve())
    pod = injected_pod({"PATH": str(image_bin)})
    run_init_copy(pod, paths)
    (job,) = pod["spec"]["containers"]
    argv = [paths.local(part) for part in job["command"] + job["args"]]

    process = subprocess.Popen(argv, env=container_env(job, paths),
                               cwd=paths.local(job["workingDir"]), start_new_session=True)
    try:
        copied = RunnerFolder(paths.empty_dir / "runner", create=False)
        wait_until(lambda: bool(copied.calls("Runner.Listener", "listening")), "listener up")
        (start,) = copied.starts("Runner.Listener")
        cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    finally:
        process.terminate()
        process.wait(timeout=10)

    # Executed directly: the process the container runtime starts is the listener (it gets
    # the pod's SIGTERM itself), not a shell wrapping it.
    assert start["pid"] == process.pid
    assert JIT_CONFIG.encode() not in cmdline
