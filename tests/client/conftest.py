"""Fixtures of the client tests: the broker stub on the fake OIDC issuer, a job's environment."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_runners import contract
from tests.client.cli_process import REPO_ROOT
from tests.fakes.broker_stub import BrokerStub
from tests.fakes.oidc_issuer import FakeOidcIssuer


@pytest.fixture
def broker(fake_oidc: FakeOidcIssuer) -> Iterator[BrokerStub]:
    """A started BrokerStub accepting the fake issuer's tokens for the default audience."""
    with BrokerStub(fake_oidc) as stub:
        yield stub


@pytest.fixture
def job_env(broker: BrokerStub, fake_oidc: FakeOidcIssuer, tmp_path: Path) -> dict[str, str]:
    """The environment of a job step on the base runner with `id-token: write`: run 123
    attempt 1 of acme/models, the broker's URL, the token request variables, output files."""
    output = tmp_path / "github_output"
    summary = tmp_path / "step_summary"
    output.touch()
    summary.touch()
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GITHUB_", "GPU_RUNNERS_", "ACTIONS_", "KUBERNETES_"))}
    env.update({
        contract.ENV_BROKER_URL: broker.url,
        contract.ENV_ID_TOKEN_REQUEST_URL: fake_oidc.request_url,
        contract.ENV_ID_TOKEN_REQUEST_TOKEN: fake_oidc.request_token,
        contract.ENV_REPOSITORY: "acme/models",
        contract.ENV_RUN_ID: "123",
        contract.ENV_RUN_ATTEMPT: "1",
        contract.ENV_GPU_POOLS: '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}, '
                                '{"accelerator": "nvidia-tesla-t4", "maxGpusPerPod": 4}]',
        contract.ENV_GITHUB_OUTPUT: str(output),
        contract.ENV_STEP_SUMMARY: str(summary),
        "PYTHONPATH": str(REPO_ROOT),
    })
    return env
