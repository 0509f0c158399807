"""docker/entrypoint.sh in broker mode (the single-use base runner), run for real.

The entrypoint runs with bash, curl and jq in a stand-in runner folder against the real broker,
served over HTTP on the fake cluster and the fake GitHub. The pod's projected token is one the
fake cluster issued for a base runner pod of the stack's Deployment template, written where
the pod's volume puts it.
"""

from __future__ import annotations

import os
import socket
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import yaml

from components.broker import BROKER_CLUSTER_RULES, BROKER_RULES
from gpu_runners import contract
from tests.broker.broker_harness import ServedBroker, broker_environ, serve_broker
from tests.docker.conftest import StartEntrypoint
from tests.docker.runner_folder import RunnerFolder
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.harness.mock_stack import REPO_ROOT

GOLDEN_DEPLOYMENT = REPO_ROOT / "tests/golden/dev/deployment-github-runners-base-runner.yaml"


@pytest.fixture
def cluster(make_fake_kube: Callable[..., FakeKubernetes]) -> FakeKubernetes:
    """The cluster with the broker's rights enforced, running one base runner pod."""
    kube = make_fake_kube(rbac_rules=BROKER_RULES, cluster_rules=BROKER_CLUSTER_RULES)
    template = yaml.safe_load(GOLDEN_DEPLOYMENT.read_text())["spec"]["template"]
    kube.replicate("base-runner-7c9d5b8f6", template)
    return kube


@pytest.fixture
def pod_name(cluster: FakeKubernetes) -> str:
    (pod,) = cluster.pods()
    name: str = pod["metadata"]["name"]
    return name


@pytest.fixture
def broker(cluster: FakeKubernetes, fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
           tmp_path: Path) -> Iterator[ServedBroker]:
    served = serve_broker(broker_environ(cluster, fake_github, fake_oidc, tmp_path), cluster,
                          fake_github, reconcile=False)
    yield served
    served.stop()
    assert cluster.forbidden == []


def write_token(path: Path, token: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(token)
    return path


@pytest.fixture
def token_file(cluster: FakeKubernetes, fake_oidc: FakeOidcIssuer, pod_name: str,
               tmp_path: Path) -> Path:
    """The pod's projected token, as the kubelet writes it into the volume."""
    token = cluster.projected_token(
        pod_name, audience=contract.base_runner_audience(fake_oidc.audience),
        expiration_seconds=contract.BASE_RUNNER_TOKEN_SECONDS)
    return write_token(tmp_path / "projected" / contract.BASE_RUNNER_TOKEN_FILE, token)


def broker_mode_env(tmp_path: Path, pod_name: str, broker_url: str,
                    token_file: Path) -> dict[str, str]:
    """The base runner's environment as the stack sets it (nothing inherited but PATH)."""
    return {
        "PATH": os.environ["PATH"],
        "HOME": str(tmp_path),
        "HOSTNAME": pod_name,
        contract.ENV_RUNNER_MODE: "broker",
        contract.ENV_BROKER_URL: broker_url,
        contract.ENV_BROKER_TOKEN_FILE: str(token_file),
        contract.ENV_API_RETRY_BASE_SECONDS: "0.01",
        contract.ENV_API_MAX_WAIT_SECONDS: "2",
    }


def test_broker_mode_runs_the_pods_one_config_without_any_credential(
    broker: ServedBroker, fake_github: FakeGitHub, runner_folder: RunnerFolder,
    start_entrypoint: StartEntrypoint, tmp_path: Path, pod_name: str, token_file: Path,
) -> None:
    runner_folder.run_exits_with(0)
    process = start_entrypoint(broker_mode_env(tmp_path, pod_name, broker.url, token_file))

    result = process.finish()

    assert result.returncode == 0, result.stderr
    (run,) = runner_folder.starts("run.sh")
    registration = fake_github.runner_named(pod_name)
    assert registration is not None
    config = run["env"][contract.ENV_RUNNER_JITCONFIG]
    assert fake_github.decode_jit_config(config)
    assert run["argv"] == [] and run["pid"] == process.pid
    # GitHub saw the broker's calls only (is the name free? register it); the entrypoint has
    # no GitHub credential to call with, and hands the job none.
    scope = f"/repos/{fake_github.owner}/{fake_github.repo}/actions/runners"
    assert [(r.method, r.path) for r in fake_github.requests] == [
        ("GET", scope), ("POST", f"{scope}/generate-jitconfig")]
    assert not any(name.endswith("_PAT") or name in ("GITHUB_TOKEN", "GH_TOKEN")
                   for name in run["env"])
    assert config not in result.output and token_file.read_text() not in result.output
    assert runner_folder.starts("config.sh") == []


def test_a_restarted_container_is_refused_and_exits_with_a_clear_error(
    broker: ServedBroker, runner_folder: RunnerFolder, start_entrypoint: StartEntrypoint,
    tmp_path: Path, pod_name: str, token_file: Path,
) -> None:
    runner_folder.run_exits_with(0)
    env = broker_mode_env(tmp_path, pod_name, broker.url, token_file)
    assert start_entrypoint(env).finish().returncode == 0

    again = start_entrypoint(env).finish()

    assert again.returncode == 3
    (error,) = again.error_lines()
    assert "had its one runner config already (409" in error
    assert "the broker replaces the pod" in error
    assert len(runner_folder.starts("run.sh")) == 1


@pytest.mark.parametrize(("audience", "expected"), [
    ("the API server", "did not accept the token"),
    ("the jobs' OIDC tokens", "did not accept the token"),
])
def test_a_token_for_another_audience_is_refused_with_a_clear_error(
    broker: ServedBroker, cluster: FakeKubernetes, fake_oidc: FakeOidcIssuer,
    runner_folder: RunnerFolder, start_entrypoint: StartEntrypoint, tmp_path: Path,
    pod_name: str, audience: str, expected: str,
) -> None:
    token = cluster.projected_token(
        pod_name, audience=None if audience == "the API server" else fake_oidc.audience)
    token_file = write_token(tmp_path / "wrong" / "token", token)

    result = start_entrypoint(broker_mode_env(tmp_path, pod_name, broker.url,
                                              token_file)).finish()

    assert result.returncode == 3
    (error,) = result.error_lines()
    assert expected in error and "(401" in error
    assert runner_folder.starts("run.sh") == []


def test_the_broker_is_asked_again_while_it_fails_and_then_answers(
    broker: ServedBroker, cluster: FakeKubernetes, fake_github: FakeGitHub,
    runner_folder: RunnerFolder, start_entrypoint: StartEntrypoint, tmp_path: Path,
    pod_name: str, token_file: Path,
) -> None:
    # The API server fails every try of the broker's first TokenReview: the broker answers
    # 502, and the entrypoint asks again.
    cluster.inject("POST", "/apis/authentication.k8s.io/v1/tokenreviews", 503, times=4)
    runner_folder.run_exits_with(0)

    result = start_entrypoint(broker_mode_env(tmp_path, pod_name, broker.url,
                                              token_file)).finish(timeout=40)

    assert result.returncode == 0, result.stderr
    assert "the broker answered 502" in result.stderr and "trying again" in result.stderr
    assert fake_github.runner_named(pod_name) is not None
    assert len(runner_folder.starts("run.sh")) == 1


def test_an_unreachable_broker_is_asked_again_within_the_budget_then_given_up(
    runner_folder: RunnerFolder, start_entrypoint: StartEntrypoint, tmp_path: Path,
    token_file: Path, pod_name: str,
) -> None:
    with socket.socket() as probe:  # a port nothing listens on
        probe.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{probe.getsockname()[1]}"

    result = start_entrypoint(broker_mode_env(tmp_path, pod_name, url, token_file)).finish()

    assert result.returncode == 4
    assert "no answer from the broker" in result.stderr and "trying again" in result.stderr
    (error,) = result.error_lines()
    assert "gave up on POST" in error
    assert runner_folder.starts("run.sh") == []


def test_broker_mode_names_a_missing_token_file_and_a_missing_url(
    runner_folder: RunnerFolder, start_entrypoint: StartEntrypoint, tmp_path: Path,
) -> None:
    env = broker_mode_env(tmp_path, "base-runner-x", "http://127.0.0.1:9",
                          tmp_path / "absent" / "token")
    missing_file = start_entrypoint(env).finish()
    assert missing_file.returncode == 2
    assert "GPU_RUNNERS_BROKER_TOKEN_FILE names" in missing_file.error_lines()[0]

    no_url = start_entrypoint({k: v for k, v in env.items()
                               if k != contract.ENV_BROKER_URL}).finish()
    assert no_url.returncode == 2
    assert "GPU_RUNNERS_BROKER_URL is ''" in no_url.error_lines()[0]
