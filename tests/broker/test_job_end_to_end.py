"""A workflow run end to end: the client a job runs, the broker, the fake cluster and GitHub.

`python3 -m gpu_runners` runs as its own process with a job step's environment (the token
request variables of the fake issuer's Actions endpoint, the broker's URL, the output files);
the broker is the real one, served over HTTP on the fakes and enforcing the broker's Role. These
tests prove what the unit-level suites prove separately, joined up: the run the broker acts
for is the one in the job's token, whatever the job's own environment says.
"""

from __future__ import annotations

import signal
from pathlib import Path
from typing import Any

import pytest

from gpu_runners import broker_api, contract
from tests.broker.broker_harness import MAX_RUNTIME_MINUTES, ServedBroker
from tests.client.cli_process import job_step_environ, run_cli, start_cli
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import wait_until

RUN_ID = "123"
LABEL = f"gpu-{RUN_ID}-1"


def job_environ(broker: ServedBroker, issuer: FakeOidcIssuer, out_dir: Path) -> dict[str, str]:
    """A job step on the base runner with `permissions: id-token: write`, for run 123."""
    return job_step_environ(broker.url, issuer, out_dir,
                            **{contract.ENV_BROKER_AUDIENCE: issuer.audience})


def outputs(env: dict[str, str]) -> dict[str, str]:
    text = Path(env[contract.ENV_GITHUB_OUTPUT]).read_text()
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


def run_pods(kube: FakeKubernetes) -> list[dict[str, Any]]:
    return [pod for pod in kube.pods()
            if pod["metadata"].get("labels", {}).get(contract.LABEL_MANAGED_BY)
            == contract.MANAGED_BY]


def test_setup_and_cleanup_jobs_start_and_remove_their_runs_runner(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, tmp_path: Path,
) -> None:
    env = job_environ(broker, fake_oidc, tmp_path)

    setup = run_cli(env, "spawn", "--gpus", "1", "--gpu-type", "nvidia-l4")

    assert setup.returncode == 0, setup.stderr
    assert f"ready: runs-on: {LABEL}" in setup.stdout
    assert outputs(env)["label"] == LABEL
    [pod] = run_pods(fake_kube)
    labels = pod["metadata"]["labels"]
    assert (labels[contract.LABEL_RUN_ID], labels[contract.LABEL_RUN_ATTEMPT],
            labels[contract.LABEL_REPOSITORY_ID]) == (RUN_ID, "1", "74")
    registration = fake_github.runner_named(LABEL)
    assert registration is not None
    # Only its own label: `runs-on: self-hosted` elsewhere cannot take this run's runner.
    assert [label["name"] for label in registration["labels"]] == [LABEL]
    # Each request carried a token minted for the broker's audience alone.
    assert set(fake_oidc.token_audiences) == {fake_oidc.audience}

    cleanup = run_cli(env, "delete")

    assert cleanup.returncode == 0, cleanup.stderr
    wait_until(lambda: not run_pods(fake_kube), what="the run's pod to go")
    wait_until(lambda: f"{LABEL}{contract.JIT_SECRET_SUFFIX}" not in
               {secret["metadata"]["name"] for secret in fake_kube.secrets()},
               what="the run's JIT Secret to go")
    assert fake_github.runner_named(LABEL) is None


def test_the_run_comes_from_the_token_not_from_the_jobs_environment(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, tmp_path: Path,
) -> None:
    victim = job_environ(broker, fake_oidc, tmp_path / "victim")
    assert run_cli(victim, "spawn", "--gpus", "1").returncode == 0
    [victim_pod] = run_pods(fake_kube)
    # Another run of the repository lies about its run id in every variable it controls; its
    # token still says run 999.
    fake_oidc.job_claims["run_id"] = "999"
    attacker = job_environ(broker, fake_oidc, tmp_path / "attacker")

    removed = run_cli(attacker, "delete")

    assert removed.returncode == 0, removed.stderr
    [still_there] = run_pods(fake_kube)
    assert still_there["metadata"]["uid"] == victim_pod["metadata"]["uid"]
    assert still_there["metadata"].get("deletionTimestamp") is None
    assert fake_github.runner_named(LABEL) is not None


def test_a_longer_runtime_than_the_stack_allows_is_clamped(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    tmp_path: Path,
) -> None:
    env = job_environ(broker, fake_oidc, tmp_path)

    setup = run_cli(env, "spawn", "--gpus", "1", "--max-runtime", "1000h")

    assert setup.returncode == 0, setup.stderr
    [pod] = run_pods(fake_kube)
    assert pod["spec"]["activeDeadlineSeconds"] == MAX_RUNTIME_MINUTES * 60


def test_an_image_the_stack_does_not_allow_is_refused_before_anything_exists(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, tmp_path: Path,
) -> None:
    env = job_environ(broker, fake_oidc, tmp_path)

    setup = run_cli(env, "spawn", "--gpus", "1", "--image", "ghcr.io/evil/miner@sha256:" + "b" * 64)

    assert setup.returncode == broker_api.EXIT_CODES[broker_api.FORBIDDEN]
    assert run_pods(fake_kube) == []
    assert fake_github.runners == {}


def test_a_job_without_an_oidc_token_is_told_to_ask_for_one_and_sends_nothing(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    tmp_path: Path,
) -> None:
    env = job_environ(broker, fake_oidc, tmp_path)
    del env[contract.ENV_ID_TOKEN_REQUEST_URL], env[contract.ENV_ID_TOKEN_REQUEST_TOKEN]

    setup = run_cli(env, "spawn", "--gpus", "1")

    assert setup.returncode == 2
    assert "id-token: write" in setup.stderr
    assert run_pods(fake_kube) == []


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_cancelled_setup_leaves_nothing_behind(
    signum: signal.Signals, broker: ServedBroker, fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, tmp_path: Path,
) -> None:
    # The runner never connects, so the spawn is still waiting when the job is cancelled.
    fake_kube.runner_connect_delay = float("inf")
    env = job_environ(broker, fake_oidc, tmp_path)
    process = start_cli(env, "spawn", "--gpus", "1")
    try:
        wait_until(lambda: fake_github.runner_named(LABEL) is not None and bool(
            run_pods(fake_kube)), timeout=30, what="the run's pod and registration")

        process.send_signal(signum)
        code = process.wait(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
        process.communicate()

    assert code == 128 + signum
    wait_until(lambda: not run_pods(fake_kube) and fake_github.runner_named(LABEL) is None,
               timeout=15, what="the cancelled run's pod and registration to go")


def test_operators_list_shows_the_runs_runner(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, tmp_path: Path,
) -> None:
    env = job_environ(broker, fake_oidc, tmp_path)
    assert run_cli(env, "spawn", "--gpus", "1").returncode == 0

    listing = run_cli(env, "list")

    assert listing.returncode == 0, listing.stderr
    assert LABEL in listing.stdout
