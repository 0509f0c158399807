"""The broker as a service: settings checked up front, health and readiness, metrics, the
operators' listing, the run's own runner, and the reaper loop."""

from __future__ import annotations

import re
import subprocess
import sys
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from gpu_runners import broker_api, contract
from gpu_runners.broker.settings import BrokerSettings, SettingsError
from gpu_runners.gpu_pools import GpuPool, fallback_pool
from tests.broker.broker_harness import ServedBroker, call, delete, spawn
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import wait_until


def _metric(broker: ServedBroker, name: str, **labels: str) -> float:
    """The value of one series on /metrics (0 when absent)."""
    text = call(broker.url, "GET", broker_api.METRICS_PATH).body
    assert isinstance(text, str)
    wanted = ",".join(f'{key}="{value}"' for key, value in sorted(labels.items()))
    for line in text.splitlines():
        match = re.fullmatch(r"(\w+)(?:\{(.*)\})? (\S+)", line)
        if match and match.group(1) == name and (match.group(2) or "") == wanted:
            return float(match.group(3))
    return 0.0


def test_every_settings_problem_is_reported_at_once_naming_its_variable(
    env: dict[str, str],
) -> None:
    broken = {**env, contract.ENV_MAX_RUNTIME_MINUTES: "forever",
              contract.ENV_REPOSITORY_ID: "acme", contract.ENV_ALLOWED_IMAGES: "ghcr.io/*",
              contract.ENV_ALLOWED_EVENTS: "push,pull_request_target",
              contract.ENV_GPU_POOLS: "[1]"}
    del broken[contract.ENV_IMAGE]

    with pytest.raises(SettingsError) as refused:
        BrokerSettings.from_environ(broken)

    message = str(refused.value)
    for name in (contract.ENV_MAX_RUNTIME_MINUTES, contract.ENV_REPOSITORY_ID,
                 contract.ENV_ALLOWED_IMAGES, contract.ENV_ALLOWED_EVENTS,
                 contract.ENV_GPU_POOLS, contract.ENV_IMAGE):
        assert name in message
    assert len(refused.value.problems) == 6


def test_settings_hold_the_stack_s_limits(env: dict[str, str]) -> None:
    settings = BrokerSettings.from_environ(env)

    assert settings.max_runtime_seconds == 180 * 60
    assert settings.repository_id == 74
    assert settings.allowed_events == frozenset(contract.DEFAULT_ALLOWED_EVENTS)
    assert settings.gpu_cap_per_repository == 4


def test_preemption_retries_default_to_two_and_zero_turns_recovery_off(
    env: dict[str, str],
) -> None:
    unset = {k: v for k, v in env.items() if k != contract.ENV_MAX_PREEMPTION_RETRIES}
    assert BrokerSettings.from_environ(unset).max_preemption_retries == 2
    assert BrokerSettings.from_environ(
        {**env, contract.ENV_MAX_PREEMPTION_RETRIES: "0"}).max_preemption_retries == 0
    assert BrokerSettings.from_environ(
        {**env, contract.ENV_MAX_PREEMPTION_RETRIES: "5"}).max_preemption_retries == 5


@pytest.mark.parametrize("value", ["6", "-1", "two", "1.5"])
def test_preemption_retries_outside_0_to_5_are_refused_naming_the_variable(
    env: dict[str, str], value: str,
) -> None:
    with pytest.raises(SettingsError) as refused:
        BrokerSettings.from_environ({**env, contract.ENV_MAX_PREEMPTION_RETRIES: value})

    assert refused.value.problems == [
        f"{contract.ENV_MAX_PREEMPTION_RETRIES}: {value!r} is not an integer from 0 to 5"]


def test_the_broker_reads_named_spot_pools_and_their_fallbacks(env: dict[str, str]) -> None:
    pools = ('[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1, "name": "l4-spot", '
             '"spot": true, "onDemandFallback": "l4"}, '
             '{"accelerator": "nvidia-l4", "maxGpusPerPod": 1, "name": "l4"}]')
    settings = BrokerSettings.from_environ({**env, contract.ENV_GPU_POOLS: pools})

    assert fallback_pool(settings.gpu_pools, "l4-spot") == GpuPool("nvidia-l4", 1, name="l4")
    with pytest.raises(SettingsError, match=r"entry 0 \(l4-spot\): onDemandFallback 'l4' "
                                            r"names a Spot pool"):
        BrokerSettings.from_environ(
            {**env, contract.ENV_GPU_POOLS: pools.replace('"name": "l4"}',
                                                          '"name": "l4", "spot": true}')})


def test_a_broker_process_with_bad_settings_exits_before_listening(
    env: dict[str, str], tmp_path: Path,
) -> None:
    broken = {**env, contract.ENV_GPU_CAP_PER_REPOSITORY: "0"}
    done = subprocess.run([sys.executable, "-m", "gpu_runners.broker"], env=broken,
                          capture_output=True, text=True, timeout=60, check=False)

    assert done.returncode == 2
    assert contract.ENV_GPU_CAP_PER_REPOSITORY in done.stderr


def test_healthz_and_readyz_answer_when_keys_and_the_cluster_are_there(
    broker: ServedBroker,
) -> None:
    assert call(broker.url, "GET", broker_api.HEALTH_PATH).status == 200
    ready = call(broker.url, "GET", broker_api.READY_PATH)
    assert (ready.status, ready.body) == (200, "ready")


def test_readyz_fails_while_the_kubernetes_api_is_unreachable(
    broker: ServedBroker, fake_kube: FakeKubernetes,
) -> None:
    fake_kube.inject("GET", "/api/v1/namespaces/*/pods", 503, times=20)

    ready = call(broker.url, "GET", broker_api.READY_PATH)

    assert ready.status == 503
    assert "Kubernetes API" in ready.body
    assert call(broker.url, "GET", broker_api.HEALTH_PATH).status == 200


def test_readyz_fails_while_the_issuer_s_keys_cannot_be_loaded(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
) -> None:
    fake_oidc.down = True
    broker = make_broker(env)

    ready = call(broker.url, "GET", broker_api.READY_PATH)

    assert ready.status == 503
    assert "OIDC keys" in ready.body


def test_metrics_count_spawns_stages_refusals_and_gpu_seconds(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
) -> None:
    later = datetime.now(UTC) + timedelta(hours=1)
    clock = [datetime.now(UTC)]
    broker = make_broker(env, now=lambda: clock[0])
    assert spawn(broker.url, fake_oidc.mint()).last.event == broker_api.READY
    assert spawn(broker.url, fake_oidc.mint(), {"image": "evil:1"}).status == 403
    assert spawn(broker.url, "not-a-token").status == 401
    clock[0] = later  # the runner's pod has run for about an hour when it is deleted
    assert delete(broker.url, fake_oidc.mint()).status == 200

    prefix = "gpu_runners_broker"
    assert _metric(broker, f"{prefix}_spawns_total", outcome="ready") == 1
    assert _metric(broker, f"{prefix}_stage_duration_seconds_count",
                   stage="runner online") == 1
    assert _metric(broker, f"{prefix}_requests_refused_total", reason="forbidden") == 1
    assert _metric(broker, f"{prefix}_requests_refused_total", reason="unauthorized") == 1
    gpu_seconds = _metric(broker, f"{prefix}_gpu_seconds_total", repository="acme/models")
    assert 3590 < gpu_seconds < 3610
    text = call(broker.url, "GET", broker_api.METRICS_PATH).body
    assert "run_id" not in text and "gpu-123-1" not in text


def test_get_runner_shows_the_token_s_own_runner_and_404_without_one(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer,
) -> None:
    assert spawn(broker.url, fake_oidc.mint()).last.event == broker_api.READY

    own = call(broker.url, "GET", broker_api.RUNNER_PATH, token=fake_oidc.mint())
    other = call(broker.url, "GET", broker_api.RUNNER_PATH, token=fake_oidc.mint(run_id="9"))

    view = broker_api.RunnerView.from_json(own.body)
    assert (view.name, view.run_id, view.attempt, view.gpus) == ("gpu-123-1", 123, 1, 1)
    assert view.run_url.endswith("/acme/models/actions/runs/123/attempts/1")
    assert other.status == 404
    assert other.body["error"] == broker_api.NOT_FOUND


def test_list_shows_the_repository_s_runners_without_secrets(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer,
) -> None:
    for run in ("1", "2"):
        assert spawn(broker.url, fake_oidc.mint(run_id=run)).last.event == broker_api.READY

    listed = call(broker.url, "GET", broker_api.RUNNERS_PATH, token=fake_oidc.mint())

    assert listed.status == 200
    views = [broker_api.RunnerView.from_json(item) for item in listed.body]
    assert sorted(v.name for v in views) == ["gpu-1-1", "gpu-2-1"]
    assert all(v.phase == "Running" for v in views)
    assert "jit" not in str(listed.body).lower()


def test_list_refuses_a_token_of_another_repository(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer,
) -> None:
    listed = call(broker.url, "GET", broker_api.RUNNERS_PATH,
                  token=fake_oidc.mint(repository_id="75"))
    assert listed.status == 403


def test_the_reaper_loop_removes_a_finished_runner_and_counts_its_gpu_seconds(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    env[contract.ENV_REAPER_INTERVAL_SECONDS] = "1"
    broker = make_broker(env, reconcile=True)
    assert spawn(broker.url, fake_oidc.mint()).last.event == broker_api.READY

    fake_kube.finish_pod("gpu-123-1")
    fake_github.set_runner_status("gpu-123-1", "offline")

    wait_until(lambda: fake_github.runners == {} and fake_kube.pods() == [], timeout=15,
               what="the reaper to remove the finished runner")
    assert _metric(broker, "gpu_runners_broker_reap_passes_total", outcome="ok") >= 1


def test_a_failing_reaper_pass_does_not_stop_the_loop(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    env[contract.ENV_REAPER_INTERVAL_SECONDS] = "1"
    fake_kube.inject("GET", "/api/v1/namespaces/*/pods", 403, times=8)
    broker = make_broker(env, reconcile=True)

    wait_until(lambda: _metric(broker, "gpu_runners_broker_reap_passes_total",
                               outcome="failed") >= 1, timeout=15, what="a failed pass")
    wait_until(lambda: _metric(broker, "gpu_runners_broker_reap_passes_total",
                               outcome="ok") >= 1, timeout=15, what="a later pass to succeed")


def test_an_unexpected_failure_is_answered_with_the_api_s_error_body(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
) -> None:
    # A list whose items are not objects: the Kubernetes client's models cannot take it.
    fake_kube.inject("GET", "/api/v1/namespaces/*/pods", 200,
                     body={"kind": "PodList", "apiVersion": "v1", "metadata": {},
                           "items": [{"metadata": "not an object"}]})

    listed = call(broker.url, "GET", broker_api.RUNNERS_PATH, token=fake_oidc.mint())

    assert listed.status == 500
    assert listed.body["error"] == broker_api.INTERNAL
    assert listed.body["message"].startswith("internal error (")
