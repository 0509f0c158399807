"""Fixtures of the doctor's tests: a healthy installation on the fakes, and a doctor run."""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import pytest

from gpu_runners.doctor.cli import main
from tests.doctor.installation import Installation, install
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes


@dataclass(frozen=True)
class DoctorRun:
    """A doctor run's exit code, its JSON report and its stderr."""

    exit_code: int
    report: dict[str, Any]
    stderr: str

    def check(self, name: str) -> dict[str, Any]:
        """The named check of the report."""
        found = [item for item in self.report["checks"] if item["check"] == name]
        assert len(found) == 1, f"{name!r} in {[c['check'] for c in self.report['checks']]}"
        check: dict[str, Any] = found[0]
        return check

    def failed(self) -> list[str]:
        """Names of the failed checks."""
        return [item["check"] for item in self.report["checks"] if item["status"] == "fail"]


RunDoctor = Callable[..., DoctorRun]


@pytest.fixture
def installation(make_fake_kube: Callable[..., FakeKubernetes],
                 fake_github: FakeGitHub) -> Installation:
    """A healthy installation: every check passes against it."""
    return install(make_fake_kube, fake_github)


def doctor_environ(installation: Installation) -> dict[str, str]:
    """What an operator's shell holds: the token, GitHub's URL, the kubeconfig."""
    return {
        "GITHUB_TOKEN": installation.github.token,
        "GITHUB_API_URL": installation.github.url,
        "KUBECONFIG": str(installation.kube.kubeconfig_path),
    }


@pytest.fixture
def run_doctor(capsys: pytest.CaptureFixture[str]) -> RunDoctor:
    """Runs `python -m gpu_runners.doctor --json` in-process against an installation."""

    def run(installation: Installation, *options: str) -> DoctorRun:
        code = main(["--json", "--timeout", "30", *options], doctor_environ(installation))
        captured = capsys.readouterr()
        return DoctorRun(code, json.loads(captured.out), captured.err)

    return run
