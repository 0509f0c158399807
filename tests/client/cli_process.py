"""Running `python -m gpu_runners` as a subprocess, the way a workflow step runs it."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from gpu_runners import contract
from tests.fakes.oidc_issuer import FakeOidcIssuer

REPO_ROOT = Path(__file__).resolve().parents[2]


def job_step_environ(broker_url: str, issuer: FakeOidcIssuer, out_dir: Path,
                     **extra: str) -> dict[str, str]:
    """The environment of a job step on the base runner with `permissions: id-token: write`:
    run 123 attempt 1 of acme/models, the broker's URL, the fake issuer's token request
    variables, and step output files in `out_dir`; `extra` adds or replaces variables."""
    out_dir.mkdir(parents=True, exist_ok=True)
    output = out_dir / "github_output"
    summary = out_dir / "step_summary"
    output.touch()
    summary.touch()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GITHUB_", "GPU_RUNNERS_", "ACTIONS_", "KUBERNETES_"))}
    env.update({
        contract.ENV_BROKER_URL: broker_url,
        contract.ENV_ID_TOKEN_REQUEST_URL: issuer.request_url,
        contract.ENV_ID_TOKEN_REQUEST_TOKEN: issuer.request_token,
        contract.ENV_REPOSITORY: "acme/models",
        contract.ENV_RUN_ID: "123",
        contract.ENV_RUN_ATTEMPT: "1",
        contract.ENV_GITHUB_OUTPUT: str(output),
        contract.ENV_STEP_SUMMARY: str(summary),
        "PYTHONPATH": str(REPO_ROOT),
        **extra,
    })
    return env


def cli_command(*args: str) -> list[str]:
    """`python -m gpu_runners <args>` with the interpreter running the tests."""
    return [sys.executable, "-m", "gpu_runners", *args]


def run_cli(env: dict[str, str], *args: str,
            timeout: float = 60.0) -> subprocess.CompletedProcess[str]:
    """Runs the command to its end; returns its exit code and output."""
    return subprocess.run(cli_command(*args), env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def start_cli(env: dict[str, str], *args: str) -> subprocess.Popen[str]:
    """Starts the command with its stdout and stderr piped, line-buffered text."""
    return subprocess.Popen(cli_command(*args), env=env, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, bufsize=1)
