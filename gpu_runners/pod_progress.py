"""Reading a GPU pod's way to "running" from its watch snapshots and Kubernetes events.

`PodProgress` is pure: it is fed pod objects and events (from a watch, a test, anything) and
returns the progress lines to print, or raises the failure that ends the wait. Deciding is
kept apart from waiting so that every rule below can be tested without a server.

The signals it reads are the ones a real cluster emits:
- the scheduler's `FailedScheduling` Warning ("0/3 nodes are available: 3 Insufficient
  nvidia.com/gpu") and the pod's `PodScheduled=False/Unschedulable` condition;
- the cluster autoscaler's `TriggeredScaleUp` ("pod triggered scale-up: [{pool 0->1 (max:
  2)}]") and `NotTriggerScaleUp` ("pod didn't trigger scale-up: 1 max node group size
  reached", "... in backoff after failed scale-up");
- the kubelet's `Pulled` / `Failed` / `BackOff` events and the container's waiting reason
  (`ErrImagePull`, `ImagePullBackOff`, `InvalidImageName`);
- the pod phase, status reason (`DeadlineExceeded`, `Evicted`) and container termination.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass
from datetime import datetime

from kubernetes.client import CoreV1Event, V1ContainerStateTerminated, V1ContainerStatus, V1Pod

from gpu_runners import contract
from gpu_runners.errors import ImagePullError, NoCapacityError, PodFailedError, PodPreemptedError
from gpu_runners.pod_disruption import disruption
from gpu_runners.runner_injection import INIT_CONTAINER as INJECTION_INIT_CONTAINER

#: Container waiting reasons that mean the image will not be pulled without a change.
#: ErrImagePull alone is not final: the kubelet retries, and a registry hiccup recovers; the
#: BackOff that follows a failed retry is.
IMAGE_PULL_FAILURES = frozenset({"ImagePullBackOff", "InvalidImageName", "ErrImageNeverPull"})
#: How the job's image reached the node (SpawnResult.image_pull).
PULL_CACHED = "cached"  # the kubelet's "already present on machine"
PULL_STREAMED = "streamed"  # GKE image streaming's ImageStreaming event
PULL_FULL = "pulled"  # downloaded in full before the container started


class Stage(enum.Enum):
    """The stages `spawn` reports, in the order a pod goes through them."""

    CREATED = "created"
    SCALE_UP = "scale-up triggered"
    #: The node added for the pod turned Ready, and its GPUs became schedulable: placed by
    #: spawn from the Node's Ready time (gpu_runners/node_timing.py), not observed here.
    NODE_READY = "node ready"
    DRIVER_READY = "driver ready"
    SCHEDULED = "scheduled"
    PULLING = "image pulling"
    IMAGE_PULLED = "image pulled"
    RUNNING = "container running"
    ONLINE = "runner online"


@dataclass(frozen=True)
class Notice:
    """A progress line: a stage reached (stage set) or something worth telling (stage None)."""

    text: str
    stage: Stage | None = None


def _clip(text: str | None, limit: int = 300) -> str:
    """One line, bounded: event messages can hold newlines and whole node lists."""
    flat = " ".join((text or "").split())
    return flat if len(flat) <= limit else flat[: limit - 3] + "..."


class PodProgress:
    """Follows one GPU pod from creation to a running runner container.

    Args:
        pod_name: Name of the pod; events about other objects are ignored.
        gpu_type: The accelerator asked for (None for any), named in capacity failures.
        scale_up_grace: Seconds a pod may stay unschedulable without the autoscaler starting
            a scale-up before that counts as "no scale-up coming". It covers clusters with no
            autoscaler, which emit neither TriggeredScaleUp nor NotTriggerScaleUp.
        now: The time (any monotonic clock) at which the pod was created.
    """

    def __init__(
        self, pod_name: str, *, gpu_type: str | None, scale_up_grace: float, now: float
    ) -> None:
        self.pod_name = pod_name
        self.gpu_type = gpu_type
        self.scale_up_grace = scale_up_grace
        self.pod_uid: str | None = None
        self.node_name: str | None = None
        self.node_added = False
        self.reached: dict[Stage, float] = {Stage.CREATED: now}
        self._unschedulable_since: float | None = None
        self._unschedulable_reason = ""
        self._scale_up_triggered = False
        self._told: set[str] = set()
        self._last_pull_error = ""
        self.image = "the runner image"
        #: Whether the job runs in a team's image with the runner injected (an init container
        #: copies it in); such a pod ending early is usually the image's doing.
        self.injected_runner = False
        #: How the runner container's image came: PULL_CACHED, PULL_STREAMED, PULL_FULL, or ""
        #: while unknown.
        self.image_pull = ""
        #: The API server's times (wall clock, whole seconds) of the pod's creation and of
        #: its binding (PodScheduled=True), from the snapshots; None until seen.
        self.created_time: datetime | None = None
        self.scheduled_time: datetime | None = None

    @property
    def container_running(self) -> bool:
        """Whether the runner container has started (GitHub is worth asking from then on)."""
        return Stage.RUNNING in self.reached

    @property
    def last_stage(self) -> Stage:
        """The furthest stage reached, for timeout messages."""
        return max(self.reached, key=lambda stage: list(Stage).index(stage))

    # --- inputs ----------------------------------------------------------------------------------

    def observe_pod(self, pod: V1Pod, now: float) -> list[Notice]:
        """Reads a pod snapshot (a watch ADDED/MODIFIED event).

        Returns:
            The progress lines this snapshot adds.

        Raises:
            ImagePullError: The runner image cannot be pulled.
            PodFailedError: The pod failed or ended before its runner was seen online.
        """
        notices: list[Notice] = []
        if pod.metadata is not None and pod.metadata.uid:
            self.pod_uid = pod.metadata.uid
        for container in (pod.spec.containers if pod.spec else None) or ():
            if container.name == contract.GPU_RUNNER_CONTAINER and container.image:
                self.image = container.image
        for init in (pod.spec.init_containers if pod.spec else None) or ():
            if init.name == INJECTION_INIT_CONTAINER:
                self.injected_runner = True
        status = pod.status
        if pod.metadata is not None and pod.metadata.creation_timestamp is not None:
            self.created_time = pod.metadata.creation_timestamp
        for condition in (status.conditions if status is not None else None) or ():
            if (condition.type == "PodScheduled" and condition.status == "True"
                    and condition.last_transition_time is not None):
                self.scheduled_time = condition.last_transition_time
        spec_node = pod.spec.node_name if pod.spec is not None else None
        if spec_node:
            notices += self._scheduled(spec_node, now)
        elif status is not None:
            for condition in status.conditions or ():
                if (condition.type == "PodScheduled" and condition.status == "False"
                        and condition.reason == "Unschedulable"):
                    notices += self._unschedulable(condition.message, now)
        if status is None:
            return notices
        lost = disruption(pod)
        if lost is not None:
            # Ending or ended with its node: a replacement may succeed where it could not.
            # Read before the container states, which a shutdown sets to terminated.
            raise PodPreemptedError(
                f"pod {self.pod_name} was lost while {self.last_stage.value}: {lost.cause}",
                stage=self.last_stage.value, cause=lost.cause, node=self.node_name or "")
        runner = self._runner_status(status.container_statuses)
        if runner is not None and runner.state is not None:
            waiting = runner.state.waiting
            if waiting is not None and waiting.reason in IMAGE_PULL_FAILURES:
                # The back-off message only says "Back-off pulling image"; the pull error
                # before it says why (not found, unauthorized, ...).
                raise self._pull_failure(waiting.reason, self._last_pull_error or waiting.message)
            if waiting is not None and waiting.reason == "ErrImagePull":
                self._last_pull_error = waiting.message or self._last_pull_error
            if runner.state.running is not None or runner.state.terminated is not None:
                notices += self._reach(Stage.IMAGE_PULLED, "image pulled", now)
                notices += self._reach(Stage.RUNNING, "container running", now)
        if status.phase in ("Failed", "Succeeded"):
            raise PodFailedError(self._ended_reason(pod))
        return notices

    def observe_deleted(self) -> None:
        """Reads a DELETED watch event: someone else removed the pod.

        Raises:
            PodFailedError: Always; a deleted pod will not run the runner.
        """
        raise PodFailedError(f"pod {self.pod_name} was deleted before its runner came online")

    def observe_event(self, event: CoreV1Event, now: float) -> list[Notice]:
        """Reads a Kubernetes Event about the pod.

        Returns:
            The progress lines this event adds.

        Raises:
            NoCapacityError: The autoscaler says no scale-up will make room for the pod.
            ImagePullError: The kubelet backs off pulling the image.
        """
        involved = event.involved_object
        if involved.name != self.pod_name or (
            self.pod_uid and involved.uid and involved.uid != self.pod_uid
        ):
            return []  # an earlier pod of the same name, or another object
        reason, raw = event.reason or "", event.message or ""
        message = _clip(raw)
        field_path = involved.field_path or ""
        if field_path and field_path != f"spec.containers{{{contract.GPU_RUNNER_CONTAINER}}}":
            return []  # the init container's pull of the runner image is not the job's
        if reason == "FailedScheduling" and not self.node_name:
            return self._unschedulable(message, now)
        if reason == "TriggeredScaleUp":
            self._scale_up_triggered = True
            self.node_added = True
            self.reached.setdefault(Stage.SCALE_UP, now)
            if self.node_name:
                return []  # pod and event streams raced: the binding was read first
            return self._tell(f"autoscaler is adding a GPU node: {message}")
        if reason == "NotTriggerScaleUp" and not self.node_name:
            raise NoCapacityError(
                f"no {self._gpu_words()} capacity and no scale-up coming: {message}"
            )
        if reason == "Scheduled":
            node = message.rsplit(" to ", 1)[-1] if " to " in message else ""
            return self._scheduled(node, now) if node else []
        if reason == "Pulling":
            self.reached.setdefault(Stage.PULLING, now)
            return []
        if reason == "ImageStreaming":
            self.image_pull = PULL_STREAMED
            return []
        if reason == "Pulled":
            if not self.image_pull:
                self.image_pull = PULL_CACHED if "already present" in raw else PULL_FULL
            return self._reach(Stage.IMAGE_PULLED, f"image pulled ({message})", now)
        if reason == "Failed" and raw.startswith("Failed to pull image"):
            # 'Failed to pull image "<ref>": <why>' (not the "Error: ErrImagePull" after it);
            # keep <why>, as the container status reports it.
            self._last_pull_error = raw.split('": ', 1)[-1]
            return []
        if reason == "BackOff" and "pulling image" in raw.lower():
            raise self._pull_failure("ImagePullBackOff", self._last_pull_error or raw)
        if reason == "Started":
            notices = self._reach(Stage.IMAGE_PULLED, "image pulled", now)
            return notices + self._reach(Stage.RUNNING, "container running", now)
        return []

    def check_timers(self, now: float) -> None:
        """Applies the scale-up grace period.

        Raises:
            NoCapacityError: Unschedulable for longer than the grace period and no scale-up
                was triggered.
        """
        deadline = self.next_deadline()
        if deadline is not None and now >= deadline:
            raise NoCapacityError(
                f"no {self._gpu_words()} capacity: unschedulable for {self.scale_up_grace:.0f}s "
                f"and no autoscaler scale-up started: {self._unschedulable_reason}"
            )

    def next_deadline(self) -> float | None:
        """When `check_timers` will fail unless something changes; None if no timer runs."""
        if self._unschedulable_since is None or self._scale_up_triggered or self.node_name:
            return None
        return self._unschedulable_since + self.scale_up_grace

    def mark_online(self, now: float) -> list[Notice]:
        """Records that GitHub reports the runner online."""
        return self._reach(Stage.ONLINE, "runner online", now)

    # --- helpers ---------------------------------------------------------------------------------

    def _gpu_words(self) -> str:
        return f"{self.gpu_type} GPU" if self.gpu_type else "GPU"

    def _pull_failure(self, reason: str, detail: str | None) -> ImagePullError:
        # Registry errors repeat the (often 100-character, digest-pinned) reference three
        # times; naming it once keeps the one-line reason readable.
        short = (detail or "").replace(self.image, "<image>")
        return ImagePullError(f"cannot pull image {self.image}: {reason}: {_clip(short)}")

    def _runner_status(
        self, statuses: list[V1ContainerStatus] | None
    ) -> V1ContainerStatus | None:
        for status in statuses or ():
            if status.name == contract.GPU_RUNNER_CONTAINER:
                return status
        return None

    def _scheduled(self, node: str, now: float) -> list[Notice]:
        if self.node_name:
            return []
        self.node_name = node
        if self.node_added:
            how = "a node the autoscaler added"
        elif self._unschedulable_since is not None:
            # Unschedulable first, so capacity had to come from somewhere: a new node whose
            # TriggeredScaleUp event is still on its way, or a GPU another pod released.
            how = f"after waiting {now - self._unschedulable_since:.0f}s for capacity"
        else:
            how = "an existing node"
        return self._reach(Stage.SCHEDULED, f"scheduled on node {node} ({how})", now)

    def _unschedulable(self, message: str | None, now: float) -> list[Notice]:
        if self._unschedulable_since is None:
            self._unschedulable_since = now
        self._unschedulable_reason = _clip(message) or self._unschedulable_reason
        return self._tell(f"waiting for {self._gpu_words()} capacity: {self._unschedulable_reason}")

    def _reach(self, stage: Stage, text: str, now: float) -> list[Notice]:
        if stage in self.reached:
            return []
        self.reached[stage] = now
        return [Notice(text, stage)]

    def _tell(self, text: str) -> list[Notice]:
        # The autoscaler repeats its events every scan; say each distinct thing once.
        if text in self._told:
            return []
        self._told.add(text)
        return [Notice(text)]

    def _image_requirements(self) -> str:
        return (
            f"the job image {self.image} could not run the injected runner: the image must "
            f"run as uid {contract.RUNNER_UID} (the pod never runs as root, whatever the "
            "image's USER) and provide glibc 2.28 or newer at /lib64/ld-linux-x86-64.so.2, "
            "libstdc++ and libssl (no musl/Alpine); see the README's job image requirements"
        )

    @staticmethod
    def _failed_copy(pod: V1Pod) -> V1ContainerStateTerminated | None:
        for status in (pod.status.init_container_statuses if pod.status else None) or ():
            state = status.state.terminated if status.state is not None else None
            if status.name == INJECTION_INIT_CONTAINER and state is not None and state.exit_code:
                return state
        return None

    def _ended_reason(self, pod: V1Pod) -> str:
        status = pod.status
        assert status is not None  # only called for a pod with a phase
        runner = self._runner_status(status.container_statuses)
        terminated = runner.state.terminated if runner is not None and runner.state else None
        copy = self._failed_copy(pod)
        if status.reason:  # DeadlineExceeded, Evicted, UnexpectedAdmissionError, ...
            detail = f"{status.reason}: {_clip(status.message)}"
        elif copy is not None:
            detail = (
                f"the init container that copies the runner out of the runner image exited "
                f"with code {copy.exit_code} ({copy.reason or 'no reason given'}: "
                f"{_clip(copy.message)})"
            )
        elif terminated is not None:
            detail = (
                f"runner container exited with code {terminated.exit_code}"
                f" ({terminated.reason or 'no reason given'})"
            )
            if self.injected_runner:
                detail += f"; {self._image_requirements()}"
        else:
            detail = "no reason given"
        return (
            f"pod {self.pod_name} ended ({status.phase}) before its runner came online: {detail}"
        )
