"""Whether a GPU runner pod ended because its node went away, not because of its job.

The broker retries a run only when the pod was lost to something the job did not cause: its
Spot VM reclaimed, its node removed, drained or shut down, or a higher-priority pod taking its
place. What Kubernetes records for each (kubelet `nodeshutdown` manager, PodGC, the taint
manager, the scheduler and the Eviction API; the `DisruptionTarget` condition since 1.26):

| Cause | `DisruptionTarget` reason | `status.reason` |
|---|---|---|
| node shutdown (GKE reclaims a Spot VM with ~30 s notice) | `TerminationByKubelet` | `Terminated` |
| node object deleted, pod garbage-collected | `DeletionByPodGC` | |
| node unreachable (NoExecute taint) | `DeletionByTaintManager` | |
| drain, upgrade, autoscaler scale-down | `EvictionByEvictionAPI` | |
| higher-priority pod | `PreemptionByScheduler` | |
| node-pressure eviction | `TerminationByKubelet` | `Evicted` |

Node-pressure eviction is the one `DisruptionTarget` that is *not* counted: a job that fills
the node's disk or memory causes it, and retrying it would repeat it. Neither is an OOM kill
(`OOMKilled` on the container), a failing step (the runner exits 0 after any job), or the
pod's deadline (`DeadlineExceeded`): those are the job's, and are never retried.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from kubernetes.client import V1Pod

DISRUPTION_CONDITION = "DisruptionTarget"
#: `status.reason` the kubelet gives pods it ends for a node shutdown, and a pod refused
#: admission on a node shutting down.
NODE_SHUTDOWN_REASONS = frozenset({"Terminated", "NodeShutdown"})
#: `status.reason` of a pod the old node lifecycle controller gave up on.
NODE_LOST_REASON = "NodeLost"
#: `status.reason` of a node-pressure eviction: the job's doing, not the node's.
NODE_PRESSURE_REASON = "Evicted"

#: What each DisruptionTarget reason means, in the words of a summary line.
_CAUSES = {
    "TerminationByKubelet": "its node shut down (a Spot VM reclaimed)",
    "DeletionByPodGC": "its node was removed",
    "DeletionByTaintManager": "its node became unreachable",
    "EvictionByEvictionAPI": "it was evicted from its node (a drain or an upgrade)",
    "PreemptionByScheduler": "a higher-priority pod took its place",
}


@dataclass(frozen=True)
class Disruption:
    """Why a pod was lost, and since when.

    Attributes:
        cause: One phrase saying what happened to the node, for summaries and logs.
        reason: The Kubernetes reason it was read from.
        since: When the condition was set (None when Kubernetes did not say).
    """

    cause: str
    reason: str
    since: datetime | None = None


def disruption(pod: V1Pod) -> Disruption | None:
    """The node-side cause that ended or is ending `pod`, or None when there is none.

    A pod still running on a healthy node, and a pod that ended by its own doing (its job, an
    OOM kill, its deadline, node pressure), both give None.
    """
    status = pod.status
    if status is None:
        return None
    reason = status.reason or ""
    for condition in status.conditions or ():
        if condition.type != DISRUPTION_CONDITION or condition.status != "True":
            continue
        kind = condition.reason or ""
        if kind == "TerminationByKubelet" and reason == NODE_PRESSURE_REASON:
            return None
        cause = _CAUSES.get(kind)
        if cause is not None:
            return Disruption(cause, kind, condition.last_transition_time)
    if reason in NODE_SHUTDOWN_REASONS:
        return Disruption(_CAUSES["TerminationByKubelet"], reason)
    if reason == NODE_LOST_REASON:
        return Disruption("its node stopped reporting", reason)
    return None
