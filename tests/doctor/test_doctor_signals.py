"""A doctor stopped by SIGINT or SIGTERM while its smoke pods wait deletes them, then exits
128+N. Run as the operator runs it: `python -m gpu_runners.doctor` in its own process."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from gpu_runners import contract
from tests.doctor.conftest import doctor_environ
from tests.doctor.installation import install
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, PodScript

REPOSITORY_ROOT = Path(__file__).resolve().parents[2]
JSON = dict[str, object]


def slow_smoke(pod: dict[str, dict[str, dict[str, str]]]) -> PodScript:
    """The probe runs at once; a smoke pod's node takes a minute to come up."""
    if pod["metadata"]["labels"].get(contract.LABEL_COMPONENT) == "smoke":
        return PodScript.scale_up(scale_up_delay=60.0)
    return PodScript.run()


def wait_until(condition: Callable[[], bool], timeout: float = 20.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


@pytest.mark.parametrize("signum", [signal.SIGINT, signal.SIGTERM])
def test_a_signal_while_smoke_pods_wait_deletes_them_and_exits_128_plus_n(
    make_fake_kube: Callable[..., FakeKubernetes], fake_github: FakeGitHub,
    signum: signal.Signals,
) -> None:
    installation = install(make_fake_kube, fake_github, scheduler=slow_smoke)
    environ = {**os.environ, **doctor_environ(installation)}
    process = subprocess.Popen(
        [sys.executable, "-m", "gpu_runners.doctor", "--json", "--timeout", "120"],
        cwd=REPOSITORY_ROOT, env=environ, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )
    try:
        def smoke_pods_wait_for_scale_up() -> bool:
            reasons = [(event["involvedObject"]["name"], event["reason"])
                       for event in installation.kube.events()]
            smoke = [name for name in installation.doctor_pods() if "-smoke-" in name]
            return len(smoke) == 2 and all((name, "TriggeredScaleUp") in reasons
                                           for name in smoke)

        wait_until(smoke_pods_wait_for_scale_up)
        process.send_signal(signum)
        _, stderr = process.communicate(timeout=60)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == 128 + signum
    assert f"interrupted by signal {int(signum)}" in stderr
    assert installation.doctor_pods() == []
