"""A pod lost to its node is told apart from a pod its job ended.

The statuses are those Kubernetes writes (kubelet node shutdown manager, PodGC, taint manager,
scheduler preemption, Eviction API, node-pressure eviction, OOM kill, deadline).
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from kubernetes.client import (
    V1Container,
    V1ContainerState,
    V1ContainerStateTerminated,
    V1ContainerStatus,
    V1ObjectMeta,
    V1Pod,
    V1PodCondition,
    V1PodSpec,
    V1PodStatus,
)

from gpu_runners.pod_disruption import disruption

SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
SINCE = datetime(2026, 12, 3, 10, 0, tzinfo=UTC)


def pod(phase: str = "Failed", *, reason: str | None = None,
        target: str | None = None, container: dict[str, Any] | None = None) -> V1Pod:
    """A pod status as the API server writes it, in the official client's models."""
    status = V1PodStatus(phase=phase)
    if reason is not None:
        status.reason, status.message = reason, SHUTDOWN_MESSAGE
    if target is not None:
        status.conditions = [V1PodCondition(type="DisruptionTarget", status="True",
                                            reason=target, last_transition_time=SINCE)]
    if container is not None:
        status.container_statuses = [V1ContainerStatus(
            name="runner", image="i", image_id="", ready=False, restart_count=0,
            state=V1ContainerState(terminated=V1ContainerStateTerminated(
                exit_code=container["exitCode"], reason=container["reason"])))]
    return V1Pod(metadata=V1ObjectMeta(name="gpu-1-1"),
                 spec=V1PodSpec(containers=[V1Container(name="runner", image="i")]),
                 status=status)


@pytest.mark.parametrize(("target", "reason", "words"), [
    ("TerminationByKubelet", "Terminated", "Spot VM reclaimed"),
    ("DeletionByPodGC", None, "node was removed"),
    ("DeletionByTaintManager", None, "unreachable"),
    ("EvictionByEvictionAPI", None, "evicted"),
    ("PreemptionByScheduler", None, "higher-priority"),
])
def test_node_side_causes_are_disruptions(target: str, reason: str | None, words: str) -> None:
    lost = disruption(pod(target=target, reason=reason))
    assert lost is not None
    assert lost.reason == target
    assert words in lost.cause
    assert lost.since == SINCE


def test_a_node_shutdown_without_the_condition_still_counts() -> None:
    # Kubelets before DisruptionTarget (and pods refused admission during a shutdown).
    for reason in ("Terminated", "NodeShutdown"):
        lost = disruption(pod(reason=reason))
        assert lost is not None and "Spot VM" in lost.cause


@pytest.mark.parametrize("failed", [
    pytest.param(pod(target="TerminationByKubelet", reason="Evicted"), id="node-pressure"),
    pytest.param(pod(container={"exitCode": 137, "reason": "OOMKilled"}), id="oom-kill"),
    pytest.param(pod(reason="DeadlineExceeded"), id="deadline"),
    pytest.param(pod(container={"exitCode": 1, "reason": "Error"}), id="runner-error"),
    pytest.param(pod("Succeeded", container={"exitCode": 0, "reason": "Completed"}),
                 id="job-done"),
    pytest.param(pod("Running"), id="running"),
])
def test_what_the_job_caused_is_not_a_disruption(failed: V1Pod) -> None:
    assert disruption(failed) is None


def test_a_condition_that_is_not_true_is_ignored() -> None:
    lost = pod(target="DeletionByPodGC")
    assert lost.status is not None and lost.status.conditions is not None
    lost.status.conditions[0].status = "False"
    assert disruption(lost) is None
