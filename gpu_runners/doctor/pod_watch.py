"""Waiting for the doctor's pods to finish, and timing each step of their way there.

One loop in the caller's thread (so SIGINT/SIGTERM reach it) follows every pod of a batch:
pod snapshots and Events through one WatchFeed, GPU nodes by polling. The stage rules are
`pod_progress.PodProgress`'s, the ones `spawn` reports; this module adds the node stages a
cold start goes through (scale-up decision, node ready, driver ready) and the end of a pod
that is meant to finish.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

from kubernetes.client import CoreV1Event, V1Pod

from gpu_runners.doctor.clients import ClusterClient
from gpu_runners.doctor.cluster_facts import NodeFact
from gpu_runners.doctor.pods import CONTAINER
from gpu_runners.errors import (
    ImagePullError,
    KubernetesError,
    NoCapacityError,
    PodFailedError,
)
from gpu_runners.kube import WatchFeed
from gpu_runners.pod_progress import PodProgress, Stage
from gpu_runners.progress import ProgressLog

CREATED = "created"
SCALE_UP_DECISION = "scale-up decision"
NODE_READY = "node ready"
DRIVER_READY = "driver ready"
SCHEDULED = "scheduled"
IMAGE_PULLED = "image pulled"
RUNNING = "running"
FINISHED = "finished"
#: Event reason of GKE's autoscaler when a scale-up it triggered for a pod failed.
FAILED_SCALE_UP = "FailedScaleUp"
_FROM_PROGRESS = {Stage.SCHEDULED: SCHEDULED, Stage.IMAGE_PULLED: IMAGE_PULLED,
                  Stage.RUNNING: RUNNING}


class FailureKind:
    """Why a pod did not finish well (the values of `PodRun.failure_kind`)."""

    CAPACITY = "capacity"  # no node and no scale-up coming
    IMAGE = "image"  # the image cannot be pulled
    FAILED = "failed"  # the container exited non-zero, or the pod was deleted or evicted
    TIMEOUT = "timeout"
    API = "api"  # the watch was refused


@dataclass(frozen=True)
class WatchTarget:
    """A created pod to follow, and the GPU pool it asks for (None for a CPU pod)."""

    pod: str
    accelerator: str | None


@dataclass
class PodRun:
    """How one pod's run went.

    Attributes:
        pod: Pod name.
        stages: {stage: seconds since the watch started}, stages as named in this module.
        succeeded: The container exited 0.
        failure: Why it did not, one line ("" when it did).
        failure_kind: A FailureKind value, "" when it succeeded.
        node: The node it was scheduled on, if it was.
        log: The container's log lines, read once it ended.
    """

    pod: str
    stages: dict[str, float] = field(default_factory=dict)
    succeeded: bool = False
    failure: str = ""
    failure_kind: str = ""
    node: str | None = None
    log: list[str] = field(default_factory=list)

    @property
    def done(self) -> bool:
        """Whether the run has an outcome."""
        return self.succeeded or bool(self.failure_kind)

    def ordered_stages(self) -> tuple[tuple[str, float], ...]:
        """The stages reached, in time order."""
        return tuple(sorted(self.stages.items(), key=lambda item: item[1]))


class _Tracker:
    """One pod's progress: PodProgress for the pod, node stages on top."""

    def __init__(self, target: WatchTarget, start: float, scale_up_grace: float,
                 nodes_before: frozenset[str]) -> None:
        self.target = target
        self.start = start
        self.progress = PodProgress(target.pod, gpu_type=target.accelerator,
                                    scale_up_grace=scale_up_grace, now=start)
        self.run = PodRun(target.pod)
        self.nodes_before = nodes_before
        self.reach(CREATED, start)

    def reach(self, stage: str, now: float) -> None:
        self.run.stages.setdefault(stage, round(now - self.start, 3))

    def fail(self, kind: str, why: str) -> None:
        if not self.run.done:
            self.run.failure_kind, self.run.failure = kind, why

    def sync_progress(self, now: float) -> None:
        if self.progress.node_name and self.run.node is None:
            self.run.node = self.progress.node_name
            # The scheduler binds a GPU pod only to a Ready node offering the GPU: whatever
            # the polls have not seen yet had happened by the binding (recorded first, so
            # that equal times keep the order of events). A node that was up before the pod
            # has no cold-start stages of its own.
            if self.target.accelerator is not None and self.run.node not in self.nodes_before:
                bound = self.progress.reached.get(Stage.SCHEDULED, now)
                self.reach(NODE_READY, bound)
                self.reach(DRIVER_READY, bound)
        for stage, name in _FROM_PROGRESS.items():
            if stage in self.progress.reached:
                self.reach(name, self.progress.reached[stage])

    def observe_nodes(self, nodes: Sequence[NodeFact], now: float) -> None:
        if self.target.accelerator is None or self.run.node is not None:
            return
        new = [node for node in nodes if node.accelerator == self.target.accelerator
               and node.name not in self.nodes_before and node.ready]
        if new:
            self.reach(NODE_READY, now)
        if any(node.allocatable_gpus > 0 for node in new):
            self.reach(DRIVER_READY, now)

    def observe_pod(self, pod: V1Pod, now: float) -> None:
        try:
            self.progress.observe_pod(pod, now)
        except ImagePullError as e:
            self.fail(FailureKind.IMAGE, str(e))
        except PodFailedError:
            # PodProgress waits for a runner, so any end is a failure to it; these pods are
            # meant to end, and only how they ended counts.
            phase = pod.status.phase if pod.status is not None else None
            self.sync_progress(now)
            if phase in ("Succeeded", "Failed"):
                self.reach(FINISHED, now)
            if phase == "Succeeded":
                self.run.succeeded = True
            else:
                self.fail(FailureKind.FAILED, ended_reason(pod))
        self.sync_progress(now)

    def observe_event(self, event: CoreV1Event, now: float) -> None:
        if event.involved_object.name != self.target.pod:
            return
        if event.reason == "TriggeredScaleUp":
            self.reach(SCALE_UP_DECISION, now)
        if event.reason == FAILED_SCALE_UP and not self.run.node:
            # GKE's autoscaler tells the pod when the node it asked for could not be created
            # ("GCE quota exceeded", "GCE out of resources"); no node is coming for it.
            self.fail(FailureKind.CAPACITY, f"the scale-up for {self.target.pod} failed: "
                                            f"{event.message or 'no reason given'}")
            return
        try:
            self.progress.observe_event(event, now)
        except NoCapacityError as e:
            self.fail(FailureKind.CAPACITY, str(e))
        except ImagePullError as e:
            self.fail(FailureKind.IMAGE, str(e))
        self.sync_progress(now)

    def check_timers(self, now: float) -> None:
        try:
            self.progress.check_timers(now)
        except NoCapacityError as e:
            self.fail(FailureKind.CAPACITY, str(e))


def follow_pods(
    cluster: ClusterClient,
    namespace: str,
    targets: Sequence[WatchTarget],
    *,
    timeout: float,
    node_poll_seconds: float,
    scale_up_grace: float,
    log: ProgressLog,
    clock: Callable[[], float] = time.monotonic,
) -> dict[str, PodRun]:
    """Follows created pods until each has succeeded or failed, or `timeout` has passed.

    Args:
        cluster: The client the pods were created with.
        namespace: Their namespace.
        targets: The pods, each with the GPU pool it asks for.
        timeout: Seconds to wait for all of them.
        node_poll_seconds: Seconds between node listings (node ready, driver ready).
        scale_up_grace: See PodProgress: unschedulable this long with no scale-up is a failure.
        log: Where progress lines go.
        clock: Monotonic clock.

    Returns:
        Each pod's run, by pod name; logs read for the pods that ended.

    Raises:
        KubernetesError: Listing nodes failed after its retries.
    """
    start = clock()
    gpu_pools = {target.accelerator for target in targets if target.accelerator}
    nodes_before = frozenset(node.name for node in cluster.list_nodes()) if gpu_pools else (
        frozenset())
    trackers = {target.pod: _Tracker(target, start, scale_up_grace, nodes_before)
                for target in targets}
    deadline = start + timeout
    next_poll = start + node_poll_seconds
    told: dict[str, set[str]] = {name: set() for name in trackers}
    with WatchFeed(cluster, namespace) as feed:
        for name in trackers:
            feed.watch_pods(f"pod:{name}", field_selector=f"metadata.name={name}")
        feed.watch_events("events", field_selector="involvedObject.kind=Pod")
        while not all(tracker.run.done for tracker in trackers.values()):
            now = clock()
            if now >= deadline:
                for tracker in trackers.values():
                    stage = tracker.progress.last_stage.value
                    tracker.fail(FailureKind.TIMEOUT,
                                 f"not finished within {timeout:.0f}s (last stage: {stage})")
                break
            if gpu_pools and now >= next_poll:
                nodes = cluster.list_nodes()
                for tracker in trackers.values():
                    tracker.observe_nodes(nodes, now)
                next_poll = now + node_poll_seconds
            timers = [t.progress.next_deadline() for t in trackers.values() if not t.run.done]
            wake = min([deadline, next_poll if gpu_pools else math.inf,
                        *(timer for timer in timers if timer is not None)])
            item = feed.get(timeout=wake - now)
            now = clock()
            if item is None:
                for tracker in trackers.values():
                    tracker.check_timers(now)
            elif item.error is not None:
                for tracker in trackers.values():
                    tracker.fail(FailureKind.API, str(item.error))
            elif item.event is not None and item.source == "events":
                for tracker in trackers.values():
                    if not tracker.run.done:
                        tracker.observe_event(item.event.object, now)
            elif item.event is not None:
                tracker = trackers[item.source.removeprefix("pod:")]
                if tracker.run.done:
                    pass
                elif item.event.type == "DELETED":
                    tracker.fail(FailureKind.FAILED, f"pod {tracker.target.pod} was deleted "
                                                     "by someone else")
                else:
                    tracker.observe_pod(item.event.object, now)
            for name, tracker in trackers.items():
                for stage, seconds in tracker.run.ordered_stages():
                    if stage not in told[name]:
                        told[name].add(stage)
                        log.line(f"{name}: {stage} after {seconds:.1f}s")
    for tracker in trackers.values():
        if FINISHED in tracker.run.stages:
            try:
                tracker.run.log = cluster.read_log(namespace, tracker.target.pod, CONTAINER)
            except KubernetesError as e:
                tracker.fail(FailureKind.API, f"cannot read the log of {tracker.target.pod}: {e}")
    return {name: tracker.run for name, tracker in trackers.items()}


def ended_reason(pod: V1Pod) -> str:
    """Why a pod that ran ended badly: its status reason, else its container's exit."""
    name = pod.metadata.name if pod.metadata is not None else "?"
    status = pod.status
    phase = status.phase if status is not None else None
    if status is not None and status.reason:  # DeadlineExceeded, Evicted, ...
        return f"pod {name} ended ({phase}): {status.reason}: {status.message or ''}".strip()
    for container in (status.container_statuses if status is not None else None) or ():
        terminated = container.state.terminated if container.state is not None else None
        if container.name == CONTAINER and terminated is not None:
            return (f"pod {name} ended ({phase}): its container exited with code "
                    f"{terminated.exit_code} ({terminated.reason or 'no reason given'})")
    return f"pod {name} ended ({phase}) without a reason"
