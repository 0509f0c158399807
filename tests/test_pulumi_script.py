"""scripts/pulumi.sh, the README's main command, run for real against a stand-in `pulumi` CLI.

The stand-in records how it was called and with which backend; the project's virtualenv is a
stand-in too, so nothing is installed. What matters is what the operator is told: a stack on
the local file backend is invisible to preview.yaml and to every other machine.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from tests.harness.mock_stack import REPO_ROOT

FAKE_PULUMI = """#!/usr/bin/env bash
# Not logged in anywhere, like a fresh machine; every other command is recorded.
if [ "$1" = whoami ]; then echo "error: not logged in" >&2; exit 255; fi
echo "pulumi $* backend=${PULUMI_BACKEND_URL:-}" >> "$CALLS"
"""
FAKE_PYTHON = """#!/usr/bin/env bash
echo "python $*" >> "$CALLS"
"""


@pytest.fixture
def checkout(tmp_path: Path) -> Path:
    """A copy of the script and one stack file, with a stand-in CLI and virtualenv."""
    root = tmp_path / "repo"
    (root / "scripts").mkdir(parents=True)
    shutil.copy(REPO_ROOT / "scripts" / "pulumi.sh", root / "scripts" / "pulumi.sh")
    shutil.copy(REPO_ROOT / "Pulumi.dev.yaml", root / "Pulumi.dev.yaml")
    for path, text in ((root / ".venv" / "bin" / "python", FAKE_PYTHON),
                       (tmp_path / "bin" / "pulumi", FAKE_PULUMI)):
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
        path.chmod(0o755)
    return root


def run_script(checkout: Path, *args: str, backend: str | None) -> tuple[str, list[str]]:
    calls = checkout.parent / "calls.log"
    env = {key: value for key, value in os.environ.items() if key != "PULUMI_BACKEND_URL"}
    env.update(PATH=f"{checkout.parent / 'bin'}:{env['PATH']}", CALLS=str(calls))
    if backend is not None:
        env["PULUMI_BACKEND_URL"] = backend
    result = subprocess.run(["bash", str(checkout / "scripts" / "pulumi.sh"), *args],
                            env=env, capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    return result.stderr, calls.read_text().splitlines()


def test_the_local_fallback_warns_that_ci_and_other_machines_cannot_see_the_state(
        checkout: Path) -> None:
    stderr, calls = run_script(checkout, "preview", "dev", backend=None)
    assert "WARNING: no Pulumi backend is configured" in stderr
    assert "preview.yaml in CI cannot see it" in stderr
    assert "export PULUMI_BACKEND_URL=gs://<bucket>" in stderr
    assert "commit Pulumi.dev.yaml" in stderr
    local = f"file://{checkout}/.pulumi-state"
    assert calls[-1] == f"pulumi preview --stack dev backend={local}"
    # The program's virtualenv gets the hashed lock, nothing else.
    (install,) = [call for call in calls if call.startswith("python -m pip install")]
    assert install.endswith("--require-hashes -r requirements.txt")


def test_a_configured_backend_is_used_without_a_warning(checkout: Path) -> None:
    stderr, calls = run_script(checkout, "up", "dev", "--yes", backend="gs://acme-pulumi-state")
    assert "WARNING" not in stderr
    assert calls[-1] == "pulumi up --stack dev --yes backend=gs://acme-pulumi-state"
    assert not (checkout / ".pulumi-state").exists()
