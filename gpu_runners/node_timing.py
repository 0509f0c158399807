"""When the node the autoscaler added for a pod became Ready, on spawn's monotonic timeline.

`spawn` times every stage on one monotonic clock, by when it *observed* it (watch events).
Between the autoscaler's TriggeredScaleUp and the pod's binding, nothing about the pod changes,
yet two different things happen on the new node: the VM boots and its kubelet registers and
reports Ready ("node ready"), then GKE's driver installer puts the NVIDIA driver in and the
device plugin advertises `nvidia.com/gpu`, which is the moment the scheduler can bind the pod
("driver ready": the pod's PodScheduled). Only the Node says when the first ended: its `Ready`
condition's lastTransitionTime, a wall-clock time. This module places that time on the
monotonic timeline. Pure: Kubernetes objects in, a number out.

The clocks, and why the result can be trusted to about a second:

- The broker's own wall clock is never used. It may be a laptop's (direct `spawn`) and off by
  seconds or minutes, and a monotonic clock has no relation to any wall clock anyway. Instead
  the node's Ready time is measured *back from the binding*, in the cluster's own clocks: the
  pod's PodScheduled=True lastTransitionTime is stamped by the API server when it binds the
  pod, and spawn saw that binding at `scheduled_at` on its monotonic clock (a watch delivers
  it within milliseconds). So node ready = scheduled_at - (PodScheduled time - Ready time).
- PodScheduled is stamped by the API server, Ready by the node's kubelet. On GKE both sync to
  the same NTP source (the metadata server); their skew is milliseconds. A kubelet clock
  behind the API server's is caught by the node's creationTimestamp (API server clock): the
  node cannot have been Ready before it was registered, so the Ready time is raised to it.
- Both timestamps have one-second resolution (metav1.Time), so their difference is off by
  less than a second either way. A Ready time up to `RESOLUTION_SLACK` after the binding is
  that rounding (or skew) and counts as "ready at the binding"; later than that, the condition
  changed after the binding (the node flapped NotReady and back) and no longer says when the
  node first became Ready: unknown.
- Whatever comes out is clamped between the neighbouring stages spawn observed itself: not
  before the scale-up was triggered (the node was added for this pod), not after the binding.

A node created before the pod (both creationTimestamps are the API server's) was not added
for it, whatever events were seen: unknown too, so the caller shows what it knows instead.
"""

from __future__ import annotations

from datetime import datetime

from kubernetes.client import V1Node

#: Seconds a Ready time may lie after the binding and still be read as "at the binding": the
#: one-second resolution of both timestamps, plus skew between the kubelet's and the API
#: server's NTP-synced clocks.
RESOLUTION_SLACK = 1.0


def ready_since(node: V1Node) -> datetime | None:
    """When the node's Ready condition last turned True; None if it is not Ready now."""
    for condition in (node.status.conditions if node.status else None) or ():
        if condition.type == "Ready":
            if condition.status != "True":
                return None
            time: datetime | None = condition.last_transition_time
            return time
    return None


def node_ready_at(
    node: V1Node,
    *,
    pod_created: datetime | None,
    pod_scheduled: datetime,
    scheduled_at: float,
    earliest: float,
) -> float | None:
    """When `node` became Ready, on the monotonic clock spawn timed its stages with.

    Args:
        node: The node the pod was bound to, read after the binding.
        pod_created: The pod's creationTimestamp (API server clock), if known.
        pod_scheduled: The pod's PodScheduled=True lastTransitionTime (API server clock).
        scheduled_at: When spawn saw the binding (monotonic).
        earliest: The earliest the node can have been Ready for this pod (monotonic): when
            spawn saw the scale-up triggered.

    Returns:
        A time in [earliest, scheduled_at], or None when the node does not say: not Ready
        now, no Ready time, Ready again only after the binding, or older than the pod.
    """
    ready = ready_since(node)
    if ready is None:
        return None
    created = node.metadata.creation_timestamp if node.metadata else None
    if created is not None and pod_created is not None and created < pod_created:
        return None  # up before the pod: not a node added for it
    if created is not None:
        ready = max(ready, created)  # a kubelet clock behind the API server's
    before_binding = (pod_scheduled - ready).total_seconds()
    if before_binding < -RESOLUTION_SLACK:
        return None  # Ready turned True again after the binding: the first time is lost
    at = scheduled_at - max(0.0, before_binding)
    return min(scheduled_at, max(earliest, at))
