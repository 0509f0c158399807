"""Spot preemption at each stage of a run: the right recovery, or none.

Over real HTTP against the broker on the fakes. The fake cluster has a Spot L4 pool whose
on-demand fallback is a second L4 pool; the fake GitHub dispatches queued jobs to runners whose
labels fit, fails the job of a lost runner when told, and makes re-runs as GitHub does (a
re-run job keeps its original labels). Preemption is the fake kubelet's graceful node
shutdown (`preempt_pod`) or the node's removal with PodGC (`lose_pod_with_node`). Recovery
passes are run by the test, one at a time, as the broker's loop runs them.
"""

from __future__ import annotations

import asyncio
import json
import math
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from gpu_runners import broker_api, contract
from gpu_runners.broker import reconcile
from gpu_runners.broker.reconcile import reap_once, recover_once
from tests.broker.broker_harness import (
    BrokerProcess,
    ServedBroker,
    broker_environ,
    delete,
    spawn,
)
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, FakeNodePool, Outcome, PodScript
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import bring_runners_online, wait_until

RUN = "gpu-123-1"
RECORD = f"{RUN}-run"
SPOT, ON_DEMAND = "spot-l4", "ondemand-l4"
POOLS = json.dumps([
    {"accelerator": "nvidia-l4", "maxGpusPerPod": 1, "name": SPOT, "spot": True,
     "onDemandFallback": ON_DEMAND},
    {"accelerator": "nvidia-l4", "maxGpusPerPod": 1, "name": ON_DEMAND, "spot": False},
])
RERUNS = r"/rerun-failed-jobs$"
CANCELS = r"/actions/runs/\d+/cancel$"
JIT_MINTS = r"/generate-jitconfig$"


class Scripts:
    """The fake cluster's scheduler: scripted lives for the next pods, then the defaults."""

    def __init__(self) -> None:
        self.queue: list[PodScript] = []
        self.fake: FakeKubernetes | None = None

    def __call__(self, pod: dict[str, Any]) -> PodScript:
        assert self.fake is not None
        return self.queue.pop(0) if self.queue else self.fake.default_script(pod)


@pytest.fixture
def scripts() -> Scripts:
    return Scripts()


@pytest.fixture
def fake_kube(make_fake_kube: Callable[..., FakeKubernetes], scripts: Scripts) -> FakeKubernetes:
    """A cluster with a Spot L4 pool and its on-demand L4 fallback, both from zero."""
    gpu = {contract.NODE_GPU_LABEL: "true", contract.GKE_ACCELERATOR_LABEL: "nvidia-l4"}
    fake = make_fake_kube(scheduler=scripts, node_pools=[
        FakeNodePool(SPOT, {**gpu, contract.GKE_SPOT_LABEL: "true"}),
        FakeNodePool(ON_DEMAND, gpu),
    ])
    scripts.fake = fake
    return fake


@pytest.fixture
def env(fake_kube: FakeKubernetes, fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
        tmp_path: Path) -> dict[str, str]:
    bring_runners_online(fake_kube, fake_github)
    return broker_environ(fake_kube, fake_github, fake_oidc, tmp_path, **{
        contract.ENV_GPU_POOLS: POOLS, contract.ENV_MAX_PREEMPTION_RETRIES: "2"})


def recovery_pass(broker: ServedBroker) -> None:
    """One recovery pass in the broker's loop; returns once the replacements it started have
    their runner online (or failed)."""
    operations = broker.operations
    recovery = operations.clients.recovery
    assert recovery is not None and operations.loop is not None
    asyncio.run_coroutine_threadsafe(recover_once(operations, recovery),
                                     operations.loop).result(30)
    wait_until(lambda: not operations.runs_in_flight(), timeout=30,
               what="the replacement spawns to end")


def record(fake_kube: FakeKubernetes) -> dict[str, Any] | None:
    """The run's record, as the broker stored it, or None."""
    for config_map in fake_kube.configmaps():
        if config_map["metadata"]["name"] == RECORD:
            data: dict[str, Any] = json.loads(config_map["data"]["record.json"])
            return data
    return None


def pool_of(fake_kube: FakeKubernetes, pod: dict[str, Any]) -> str:
    """The node pool a pod asked for (its nodeSelector), or "" when it asked for none."""
    selector: dict[str, str] = pod["spec"].get("nodeSelector", {})
    return selector.get(contract.GKE_NODEPOOL_LABEL, "")


def preemptions(broker: ServedBroker, stage: str, pool: str, action: str) -> float:
    value = broker.operations.clients.metrics.registry.get_sample_value(
        "gpu_runners_broker_preemptions_total", {"stage": stage, "pool": pool, "action": action})
    return value or 0.0


def reclaim(fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> None:
    """GKE reclaims the Spot VM under the run's runner: its pod fails, its runner is lost."""
    fake_kube.preempt_pod(RUN)
    fake_github.lose_runner(RUN)


def spawn_ready(broker: ServedBroker, fake_oidc: FakeOidcIssuer) -> broker_api.SpawnResult:
    answer = spawn(broker.url, fake_oidc.mint())
    assert answer.last.event == broker_api.READY, answer.last
    assert answer.last.result is not None
    return answer.last.result


def _on_a_node(fake_kube: FakeKubernetes) -> bool:
    return bool((fake_kube.pod(RUN) or {}).get("spec", {}).get("nodeName"))


def _pulling(fake_kube: FakeKubernetes) -> bool:
    return any(e.get("reason") == "Pulling" and e["involvedObject"]["name"] == RUN
               for e in fake_kube.events())


def _running(fake_kube: FakeKubernetes) -> bool:
    phase: object = (fake_kube.pod(RUN) or {}).get("status", {}).get("phase")
    return phase == "Running"


STARTING_STAGES = {
    # stage: (the first pod's script, when its Spot VM is reclaimed)
    "scheduled": (PodScript(Outcome.SCALE_UP, step_delay=0.5), _on_a_node),
    "image pulling": (PodScript(Outcome.SCALE_UP, step_delay=0.5), _pulling),
    "container running": (PodScript(Outcome.SCALE_UP, connect_delay=math.inf), _running),
}


@pytest.mark.parametrize("stage", sorted(STARTING_STAGES))
def test_a_pod_lost_while_starting_is_replaced_on_the_fallback_pool_within_the_spawn(
    stage: str, broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub, scripts: Scripts,
) -> None:
    # The first pod lands on a Spot node, whose VM is reclaimed before its runner connects.
    script, reached = STARTING_STAGES[stage]
    scripts.queue.append(script)
    lost: list[str] = []

    def reclaim() -> None:
        wait_until(lambda: reached(fake_kube), timeout=20, what=f"the first pod {stage}")
        first = fake_kube.pod(RUN)
        assert first is not None
        lost.append(first["metadata"]["uid"])
        fake_kube.preempt_pod(RUN)

    thread = threading.Thread(target=reclaim, daemon=True)
    thread.start()
    answer = spawn(broker.url, fake_oidc.mint())
    thread.join(5)

    assert answer.last.event == broker_api.READY, answer.last
    result = answer.last.result
    assert result is not None and result.label == RUN
    [line] = result.preemptions
    assert f"preempted on attempt 1 (while starting: {stage})" in line
    assert f"on pool {SPOT}" in line and f"retried on pool {ON_DEMAND}" in line
    assert any("starting a replacement, retry 1 of 2" in p for p in answer.progress)
    pod = fake_kube.pod(RUN)
    assert pod is not None and pod["metadata"]["uid"] != lost[0]
    assert pool_of(fake_kube, pod) == ON_DEMAND
    # One registration at the end, from the second of two JIT configs.
    assert len(fake_github.requests_to(JIT_MINTS, "POST")) == 2
    assert [r["name"] for r in fake_github.runners.values()] == [RUN]
    stored = record(fake_kube)
    assert stored is not None and stored["online"] is True
    assert [p["stage"] for p in stored["preemptions"]] == [stage]
    assert preemptions(broker, stage, SPOT, "replaced") == 1


def test_an_idle_runner_lost_before_its_job_is_replaced_and_the_queued_job_runs_on_it(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    spawn_ready(broker, fake_oidc)
    fake_github.add_job(123, "setup", ["base-runner"])  # the run goes on; train not queued yet
    first = fake_kube.pod(RUN)
    assert first is not None
    # The first attempt stays off the fallback pool: it takes Spot capacity.
    assert SPOT in first["spec"]["nodeName"]
    assert first["spec"]["affinity"]["nodeAffinity"][
        "requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"] == [
        {"matchExpressions": [{"key": contract.GKE_NODEPOOL_LABEL, "operator": "NotIn",
                               "values": [ON_DEMAND]}]}]
    reclaim(fake_kube, fake_github)

    recovery_pass(broker)

    pod = fake_kube.pod(RUN)
    assert pod is not None and pod["metadata"]["uid"] != first["metadata"]["uid"]
    assert pool_of(fake_kube, pod) == ON_DEMAND and ON_DEMAND in pod["spec"]["nodeName"]
    runner = fake_github.runner_named(RUN)
    assert runner is not None and runner["status"] == "online"
    assert len(fake_github.runners) == 1
    train = fake_github.add_job(123, "train", [RUN])
    [job] = [j for j in fake_github.jobs(123) if j["id"] == train["id"]]
    assert job["status"] == "in_progress" and job["runner_name"] == RUN
    stored = record(fake_kube)
    assert stored is not None
    assert [(p["stage"], p["pool"], p["retry_pool"]) for p in stored["preemptions"]] == [
        ("idle", SPOT, ON_DEMAND)]
    assert preemptions(broker, "idle", SPOT, "replaced") == 1
    assert fake_github.requests_to(RERUNS, "POST") == []


def test_a_runner_lost_during_the_job_gets_the_run_re_run_onto_a_fresh_pod_under_its_label(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    fake_github.add_job(123, "train", [RUN])
    fake_github.add_job(123, "cleanup", ["base-runner"], needs=("train",))
    spawn_ready(broker, fake_oidc)
    wait_until(lambda: fake_github.jobs(123)[0]["status"] == "in_progress", what="train to start")
    reclaim(fake_kube, fake_github)

    recovery_pass(broker)  # the loss is seen; GitHub has not failed the job yet
    stored = record(fake_kube)
    assert stored is not None and stored["state"] == "awaiting-run-end"
    assert fake_kube.pod(RUN) is None
    assert fake_github.requests_to(RERUNS, "POST") == []

    fake_github.fail_lost_job(RUN)
    # The first attempt's cleanup: it must not take the recovery's record with it.
    cleanup = delete(broker.url, fake_oidc.mint())
    assert cleanup.status == 200
    assert any("re-run once the run completes" in line for line in cleanup.body["recoveries"])
    assert record(fake_kube) is not None
    wait_until(lambda: fake_github.workflow_runs[123]["status"] == "completed",
               what="the first attempt to end")

    recovery_pass(broker)  # re-runs the failed jobs and puts a runner under the old label
    assert len(fake_github.requests_to(RERUNS, "POST")) == 1
    assert fake_github.workflow_runs[123]["run_attempt"] == 2
    pod = fake_kube.pod(RUN)
    assert pod is not None and pool_of(fake_kube, pod) == ON_DEMAND
    wait_until(lambda: any(j["name"] == "train" and j["status"] == "in_progress"
                           for j in fake_github.jobs(123, 2)), what="the re-run train to start")
    [train] = [j for j in fake_github.jobs(123, 2) if j["name"] == "train"]
    assert train["runner_name"] == RUN and train["labels"] == [RUN]
    recovery_pass(broker)  # nothing more to do: no second re-run
    assert len(fake_github.requests_to(RERUNS, "POST")) == 1
    assert preemptions(broker, "job", SPOT, "rerun") == 1

    # The re-run's cleanup (attempt 2) removes the runner serving it, and says what happened.
    fake_github.complete_job(RUN)
    done = delete(broker.url, fake_oidc.mint(run_attempt="2"))
    assert done.status == 200
    assert done.body["pods"] == [RUN]
    [line] = done.body["recoveries"]
    assert line.startswith("preempted on attempt 1 (during the job) on pool spot-l4")
    assert line.endswith(f"retried on pool {ON_DEMAND}")
    assert record(fake_kube) is None
    wait_until(lambda: fake_kube.pod(RUN) is None, what="the runner pod to go")


def _fail_by_step(fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> None:
    fake_github.complete_job(RUN, "failure")
    fake_kube.finish_pod(RUN, exit_code=0)  # the runner exits 0 after any job


def _oom_kill(fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> None:
    fake_kube.finish_pod(RUN, exit_code=137, reason="OOMKilled")
    fake_github.lose_runner(RUN)
    fake_github.fail_lost_job(RUN)


def _deadline(fake_kube: FakeKubernetes, fake_github: FakeGitHub) -> None:
    fake_kube.exceed_deadline(RUN)
    fake_github.lose_runner(RUN)
    fake_github.fail_lost_job(RUN)


@pytest.mark.parametrize("failure", [_fail_by_step, _oom_kill, _deadline],
                         ids=["failing step", "OOM kill", "deadline"])
def test_a_genuine_failure_is_never_retried(
    failure: Callable[[FakeKubernetes, FakeGitHub], None], broker: ServedBroker,
    fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    fake_github.add_job(123, "train", [RUN])
    spawn_ready(broker, fake_oidc)
    wait_until(lambda: fake_github.jobs(123)[0]["status"] == "in_progress", what="train to start")

    failure(fake_kube, fake_github)
    wait_until(lambda: fake_github.workflow_runs[123]["status"] == "completed",
               what="the run to end")
    recovery_pass(broker)
    recovery_pass(broker)

    assert fake_github.requests_to(RERUNS, "POST") == []
    assert fake_github.workflow_runs[123]["run_attempt"] == 1
    assert len(fake_github.requests_to(JIT_MINTS, "POST")) == 1  # no replacement
    assert record(fake_kube) is None
    assert broker.operations.clients.metrics.registry.get_sample_value(
        "gpu_runners_broker_preemptions_total",
        {"stage": "job", "pool": SPOT, "action": "rerun"}) is None


def test_a_runner_lost_after_its_job_finished_is_not_recovered(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    fake_github.add_job(123, "train", [RUN])
    fake_github.add_job(123, "cleanup", ["base-runner"], needs=("train",))
    spawn_ready(broker, fake_oidc)
    wait_until(lambda: fake_github.jobs(123)[0]["status"] == "in_progress", what="train to start")
    fake_github.complete_job(RUN)  # train passed; the cleanup job is queued
    fake_kube.lose_pod_with_node(RUN)  # the node goes before the runner process exited

    recovery_pass(broker)

    assert fake_kube.pod(RUN) is None
    assert len(fake_github.requests_to(JIT_MINTS, "POST")) == 1
    assert fake_github.requests_to(RERUNS, "POST") == []
    assert record(fake_kube) is None


def test_the_retry_cap_is_honoured_and_a_job_left_waiting_is_cancelled(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    broker = make_broker({**env, contract.ENV_MAX_PREEMPTION_RETRIES: "1"})
    spawn_ready(broker, fake_oidc)
    fake_github.add_job(123, "setup", ["base-runner"])
    for _ in range(2):
        reclaim(fake_kube, fake_github)
        recovery_pass(broker)

    # One replacement; the second loss gives up, and the run stops waiting on the label.
    assert len(fake_github.requests_to(JIT_MINTS, "POST")) == 2
    assert fake_kube.pod(RUN) is None
    assert fake_github.runners == {}
    assert len(fake_github.requests_to(CANCELS, "POST")) == 1
    assert fake_github.workflow_runs[123]["conclusion"] == "cancelled"
    stored = record(fake_kube)
    assert stored is not None and stored["state"] == "gave-up"
    assert [p["retried"] for p in stored["preemptions"]] == [True, False]
    assert preemptions(broker, "idle", ON_DEMAND, "gave_up") == 1
    # The cleanup says so, and takes the record.
    cleanup = delete(broker.url, fake_oidc.mint())
    assert cleanup.body["recoveries"][-1] == (
        "maxPreemptionRetries (1) spent: not retried again")
    assert record(fake_kube) is None


def test_recovery_off_leaves_a_lost_runner_to_the_reaper(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub,
) -> None:
    broker = make_broker({**env, contract.ENV_MAX_PREEMPTION_RETRIES: "0"})
    spawn_ready(broker, fake_oidc)
    fake_github.add_job(123, "setup", ["base-runner"])
    reclaim(fake_kube, fake_github)

    recovery_pass(broker)

    assert len(fake_github.requests_to(JIT_MINTS, "POST")) == 1
    stored = record(fake_kube)
    assert stored is not None and stored["state"] == "gave-up"


def test_a_broker_killed_during_a_recovery_finishes_it_after_restart(
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, fake_oidc: FakeOidcIssuer,
    env: dict[str, str], tmp_path: Path,
) -> None:
    fast = {**env, contract.ENV_REAPER_INTERVAL_SECONDS: "1"}
    broker = BrokerProcess(fast, tmp_path / "broker.log").start()
    try:
        fake_github.add_job(123, "train", [RUN])
        answer = spawn(broker_url(fast), fake_oidc.mint())
        assert answer.last.event == broker_api.READY
        wait_until(lambda: fake_github.jobs(123)[0]["status"] == "in_progress",
                   what="train to start")
        killed: list[str] = []

        def kill_on_rerun(request: Any) -> None:
            if request.method == "POST" and request.path.endswith("/rerun-failed-jobs"):
                killed.append(request.path)
                broker.kill()  # the re-run is made; the broker dies before it hears so

        fake_github.on_request(kill_on_rerun)
        reclaim(fake_kube, fake_github)
        fake_github.fail_lost_job(RUN)
        wait_until(lambda: bool(killed), timeout=20, what="the re-run request")
        broker.wait_killed()
        assert fake_github.workflow_runs[123]["run_attempt"] == 2

        broker = BrokerProcess(fast, tmp_path / "broker-2.log").start()
        wait_until(lambda: any(j["name"] == "train" and j["status"] == "in_progress"
                               for j in fake_github.jobs(123, 2)), timeout=30,
                   what="the re-run train on a replacement runner")
    finally:
        broker.stop()
    assert len(fake_github.requests_to(RERUNS, "POST")) == 1
    assert [p["metadata"]["name"] for p in fake_kube.pods()] == [RUN]
    assert [r["name"] for r in fake_github.runners.values()] == [RUN]


def broker_url(environ: dict[str, str]) -> str:
    return f"http://127.0.0.1:{environ[contract.ENV_BROKER_PORT]}"


def test_the_reaper_leaves_a_lost_pod_to_recovery_and_drops_the_record_of_a_pod_it_reaps(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    spawn_ready(broker, fake_oidc)
    fake_github.add_job(123, "setup", ["base-runner"])
    fake_kube.preempt_pod(RUN, keep_node=True)
    fake_github.lose_runner(RUN)

    reaped = reap_once(broker.operations, "acme/models")
    # A failed pod is the reaper's, but this one was lost to its node: recovery reads it.
    assert ("pod", RUN) not in {(a.kind, a.name) for a in reaped.removed}
    recovery_pass(broker)
    assert record(fake_kube) is not None and fake_kube.pod(RUN) is not None

    # A pod its job ended is the reaper's, and its record goes first: a vanished pod with a
    # record left behind would read as one lost to its node.
    fake_kube.finish_pod(RUN, exit_code=0)
    reaped = reap_once(broker.operations, "acme/models")
    assert ("pod", RUN) in {(a.kind, a.name) for a in reaped.removed}
    assert record(fake_kube) is None
    recovery_pass(broker)
    assert len(fake_github.requests_to(JIT_MINTS, "POST")) == 2  # the one replacement only


def test_an_unreadable_record_is_left_alone_and_the_pass_goes_on(
    broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_kube: FakeKubernetes,
    fake_github: FakeGitHub,
) -> None:
    spawn_ready(broker, fake_oidc)
    fake_github.add_job(123, "setup", ["base-runner"])
    fake_kube.seed({"apiVersion": "v1", "kind": "ConfigMap", "metadata": {
        "name": "gpu-999-1-run", "namespace": fake_kube.namespace,
        "labels": {contract.LABEL_MANAGED_BY: contract.MANAGED_BY,
                   contract.LABEL_COMPONENT: contract.RUN_RECORD_COMPONENT}},
        "data": {"record.json": '{"version": 99}'}})
    reclaim(fake_kube, fake_github)

    recovery_pass(broker)

    assert {c["metadata"]["name"] for c in fake_kube.configmaps()} >= {"gpu-999-1-run", RECORD}
    assert len(fake_github.requests_to(JIT_MINTS, "POST")) == 2  # gpu-123-1 was replaced


def test_the_loop_recovers_within_seconds_not_at_its_next_interval(
    make_broker: Callable[..., ServedBroker], env: dict[str, str], fake_oidc: FakeOidcIssuer,
    fake_kube: FakeKubernetes, fake_github: FakeGitHub, monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The reaper interval is an hour: only the loss watch, and the poll of GitHub while a
    # recovery waits on it, can make these recoveries happen within the test. The second loss
    # often comes while the replacement's spawn has not yet seen its runner online, though
    # GitHub gave it the job: a loss during the job all the same, not one while starting.
    monkeypatch.setattr(reconcile, "GITHUB_POLL_SECONDS", 0.5)
    broker = make_broker(env, reconcile=True)
    fake_github.add_job(123, "setup", ["base-runner"])
    spawn_ready(broker, fake_oidc)
    first = fake_kube.pod(RUN)
    assert first is not None
    reclaim(fake_kube, fake_github)  # idle: replaced at once
    wait_until(lambda: (fake_github.runner_named(RUN) or {}).get("status") == "online"
               and (fake_kube.pod(RUN) or first)["metadata"]["uid"] != first["metadata"]["uid"],
               timeout=15, what="the replacement runner online")

    fake_github.add_job(123, "train", [RUN])  # taken by the replacement
    wait_until(lambda: any(j["name"] == "train" and j["status"] == "in_progress"
                           for j in fake_github.jobs(123)), what="train to start")
    reclaim(fake_kube, fake_github)  # during the job: re-run once the run ends
    wait_until(lambda: (record(fake_kube) or {}).get("state") == "awaiting-run-end",
               timeout=15, what="the loss to be recorded")
    fake_github.fail_lost_job(RUN)
    # The queued setup job kept the run going; GitHub now ends it failed.
    fake_github.set_run_status(123, "completed", "failure")
    wait_until(lambda: fake_github.workflow_runs[123]["run_attempt"] == 2, timeout=15,
               what="the re-run")
    wait_until(lambda: any(j["name"] == "train" and j["status"] == "in_progress"
                           for j in fake_github.jobs(123, 2)), timeout=15,
               what="the re-run train on a replacement runner")
    assert len(fake_github.requests_to(RERUNS, "POST")) == 1
