"""Running `python -m gpu_runners` as a subprocess, the way a workflow step runs it."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


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
