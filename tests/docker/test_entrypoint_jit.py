"""docker/entrypoint.sh in JIT mode (the per-run GPU pods) and its mode switch, run for real."""

from __future__ import annotations

import base64
import json
import os
from pathlib import Path

import pytest

from gpu_runners import contract
from tests.docker.conftest import StartEntrypoint
from tests.docker.runner_folder import RunnerFolder
from tests.fakes.github_api import FakeGitHub

#: The shape of GitHub's encoded_jit_config: base64 of JSON holding the runner's config files.
JIT_CONFIG = base64.b64encode(
    json.dumps({".runner": "eyJhZ2VudE5hbWUiOiJncHUtNDItMSJ9", ".credentials": "e30="}).encode()
).decode()


@pytest.fixture
def jit_config_file(tmp_path: Path) -> Path:
    """The JIT config as the GPU pod's Secret volume holds it."""
    path = tmp_path / "jit" / contract.JIT_SECRET_KEY
    path.parent.mkdir()
    path.write_text(JIT_CONFIG + "\n")
    return path


@pytest.fixture
def jit_env(tmp_path: Path, fake_github: FakeGitHub, jit_config_file: Path) -> dict[str, str]:
    """A GPU pod's environment, with the API pointed at the fake to catch any call."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "HOSTNAME": "gpu-4242-1",
        contract.ENV_RUNNER_MODE: "jit",
        contract.ENV_JIT_CONFIG_FILE: str(jit_config_file),
        contract.ENV_REPOSITORY: f"{fake_github.owner}/{fake_github.repo}",
        contract.ENV_API_URL: fake_github.url,
    }


def test_jit_mode_replaces_itself_with_run_sh_given_the_config_in_its_environment(
    fake_github: FakeGitHub, jit_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)

    process = start_entrypoint(jit_env)
    result = process.finish()

    assert result.returncode == 0, result.stderr
    (run,) = runner_folder.starts("run.sh")
    # The runner reads ACTIONS_RUNNER_INPUT_JITCONFIG and drops it from its listener's
    # environment; on the command line it would be in /proc/<pid>/cmdline for any job to read.
    assert run["argv"] == []
    assert run["env"][contract.ENV_RUNNER_JITCONFIG] == JIT_CONFIG
    # exec: run.sh is the process the pod started, so it gets the pod's signals itself.
    assert run["pid"] == process.pid
    assert fake_github.requests == []
    assert runner_folder.starts("config.sh") == []


def test_jit_mode_puts_the_config_in_no_process_arguments(
    jit_env: dict[str, str], start_entrypoint: StartEntrypoint,
) -> None:
    # run.sh keeps listening, so the live process's command line can be read as `ps` would.
    process = start_entrypoint(jit_env)
    process.wait_until_runner_listens()

    cmdline = Path(f"/proc/{process.pid}/cmdline").read_bytes()
    environ = Path(f"/proc/{process.pid}/environ").read_bytes().split(b"\0")

    assert JIT_CONFIG.encode() not in cmdline
    assert f"{contract.ENV_RUNNER_JITCONFIG}={JIT_CONFIG}".encode() in environ


def test_jit_mode_leaves_no_credential_in_the_runners_environment(
    fake_github: FakeGitHub, jit_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    runner_folder.run_exits_with(0)
    credentials = {
        contract.ENV_PAT_SEED: fake_github.token,
        contract.ENV_PAT_FILE: f"{contract.PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}",
        "GITHUB_TOKEN": "ghs_workflowtoken",
        "GH_TOKEN": "gho_cli_token",
        "DEPLOY_PAT": "not-even-token-shaped",
        "TRAINING_NOTES": "github_pat_11AAAAAA_pasted_by_mistake",
    }
    ordinary = {"WANDB_MODE": "offline", "HF_HUB_OFFLINE": "1"}

    result = start_entrypoint({**jit_env, **credentials, **ordinary}).finish()

    assert result.returncode == 0, result.stderr
    (run,) = runner_folder.starts("run.sh")
    assert set(credentials).isdisjoint(run["env"])
    assert {name: run["env"].get(name) for name in ordinary} == ordinary
    assert run["env"][contract.ENV_JIT_CONFIG_FILE] == jit_env[contract.ENV_JIT_CONFIG_FILE]
    token_prefixes = ("ghp_", "github_pat_", "gho_", "ghu_", "ghs_", "ghr_")
    assert not [v for v in run["env"].values() if v.startswith(token_prefixes)]
    assert fake_github.requests == []


@pytest.mark.parametrize(
    ("setting", "message"),
    [
        (None, "RUNNER_JITCONFIG_FILE is not set; in jit mode it names the file holding the "
               "JIT config"),
        ("missing", "RUNNER_JITCONFIG_FILE names {path}, which cannot be read"),
        ("empty", "RUNNER_JITCONFIG_FILE names {path}, which is empty"),
    ],
    ids=["unset", "missing", "empty"],
)
def test_jit_mode_without_a_config_fails_clearly_and_starts_nothing(
    setting: str | None, message: str, tmp_path: Path, fake_github: FakeGitHub,
    jit_env: dict[str, str], runner_folder: RunnerFolder, start_entrypoint: StartEntrypoint,
) -> None:
    path = tmp_path / "jit-other" / contract.JIT_SECRET_KEY
    if setting is None:
        del jit_env[contract.ENV_JIT_CONFIG_FILE]
    else:
        jit_env[contract.ENV_JIT_CONFIG_FILE] = str(path)
    if setting == "empty":
        path.parent.mkdir()
        path.write_text("\n")

    result = start_entrypoint(jit_env).finish()

    assert result.returncode == 2
    assert result.error_lines() == ["entrypoint: error: " + message.format(path=path)]
    assert runner_folder.starts("run.sh") == []
    assert fake_github.requests == []


def test_an_unknown_mode_is_refused_listing_the_modes(
    fake_github: FakeGitHub, jit_env: dict[str, str], runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint,
) -> None:
    jit_env[contract.ENV_RUNNER_MODE] = "JIT-config"

    result = start_entrypoint(jit_env).finish()

    assert result.returncode == 2
    assert result.error_lines() == [
        "entrypoint: error: RUNNER_MODE is 'JIT-config'; allowed: registration, broker, jit"
    ]
    assert runner_folder.calls() == []
    assert fake_github.requests == []
