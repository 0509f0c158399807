"""Fixtures that run docker/entrypoint.sh in a stand-in runner folder against FakeGitHub."""

from __future__ import annotations

import os
import signal
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path

import pytest

from gpu_runners import contract
from tests.docker.runner_folder import EntrypointProcess, RunnerFolder
from tests.fakes.github_api import FakeGitHub

#: The hostname of a base runner pod, which the runner is named after.
POD_NAME = "base-runner-6f9c8d7b5-x2k9q"

StartEntrypoint = Callable[[Mapping[str, str]], EntrypointProcess]


@pytest.fixture(autouse=True, scope="session")
def default_sigint_for_children() -> Iterator[None]:
    """Lets the entrypoint start with SIGINT enabled, as a container's first process does.

    A pytest started as a background job of a script inherits an ignored SIGINT, and so would
    the entrypoint: bash can neither trap nor reset a signal ignored when it started.
    """
    ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
    if ignored:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    yield
    if ignored:
        signal.signal(signal.SIGINT, signal.SIG_IGN)


@pytest.fixture
def runner_folder(tmp_path: Path) -> RunnerFolder:
    """An empty runner folder with recording config.sh and run.sh stand-ins."""
    return RunnerFolder(tmp_path / "runner")


@pytest.fixture
def pat_file(tmp_path: Path, fake_github: FakeGitHub) -> Path:
    """The fake's PAT in a file, as the base runner's Secret mount holds it (with a newline)."""
    path = tmp_path / "secrets" / contract.PAT_SECRET_KEY
    path.parent.mkdir()
    path.write_text(fake_github.token + "\n")
    path.chmod(0o400)
    return path


@pytest.fixture
def registration_env(tmp_path: Path, fake_github: FakeGitHub, pat_file: Path) -> dict[str, str]:
    """The base runner's environment, pointed at the fake, with millisecond backoffs.

    Nothing is inherited from the test process but PATH (bash, curl, jq): a CI runner's own
    GITHUB_* variables must not leak into the entrypoint under test.
    """
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "HOSTNAME": POD_NAME,
        contract.ENV_RUNNER_MODE: "registration",
        contract.ENV_REPOSITORY: f"{fake_github.owner}/{fake_github.repo}",
        contract.ENV_API_URL: fake_github.url,
        contract.ENV_SERVER_URL: "https://github.com",
        contract.ENV_PAT_FILE: str(pat_file),
        contract.ENV_RUNNER_LABELS: contract.BASE_RUNNER_LABEL,
        contract.ENV_API_RETRY_BASE_SECONDS: "0.01",
        contract.ENV_API_MAX_WAIT_SECONDS: "10",
    }


@pytest.fixture
def start_entrypoint(runner_folder: RunnerFolder) -> Iterator[StartEntrypoint]:
    """Starts the entrypoint in `runner_folder` with a given environment; cleans up after."""
    started: list[EntrypointProcess] = []

    def start(env: Mapping[str, str]) -> EntrypointProcess:
        process = EntrypointProcess(runner_folder, env)
        started.append(process)
        return process

    yield start
    for process in started:
        process.kill_leftovers()
