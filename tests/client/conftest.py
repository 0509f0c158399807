"""Fixtures of the client tests: the broker stub on the fake OIDC issuer, a job's environment."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_runners import contract
from tests.client.cli_process import job_step_environ
from tests.fakes.broker_stub import BrokerStub
from tests.fakes.oidc_issuer import FakeOidcIssuer


@pytest.fixture
def broker(fake_oidc: FakeOidcIssuer) -> Iterator[BrokerStub]:
    """A started BrokerStub accepting the fake issuer's tokens for the default audience."""
    with BrokerStub(fake_oidc) as stub:
        yield stub


@pytest.fixture
def job_env(broker: BrokerStub, fake_oidc: FakeOidcIssuer, tmp_path: Path) -> dict[str, str]:
    """The environment of a job step on the base runner with `id-token: write`, with the GPU
    pools the base runner's environment may name."""
    return job_step_environ(
        broker.url, fake_oidc, tmp_path,
        **{contract.ENV_GPU_POOLS: '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}, '
                                   '{"accelerator": "nvidia-tesla-t4", "maxGpusPerPod": 4}]'})
