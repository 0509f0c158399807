"""How spawn reads a pod's progress from pod snapshots and events (pure, no server).

The event reasons, sources and messages are the ones the scheduler, the cluster autoscaler
and the kubelet write (see the fake cluster, which emits the same).
"""

from __future__ import annotations

import pytest
from kubernetes.client import (
    CoreV1Event,
    V1Container,
    V1ContainerState,
    V1ContainerStateRunning,
    V1ContainerStateTerminated,
    V1ContainerStateWaiting,
    V1ContainerStatus,
    V1ObjectMeta,
    V1ObjectReference,
    V1Pod,
    V1PodCondition,
    V1PodSpec,
    V1PodStatus,
)

from gpu_runners.errors import ImagePullError, NoCapacityError, PodFailedError
from gpu_runners.pod_progress import PodProgress, Stage

NAME = "gpu-7-1"
UID = "7f0f9a52-8f41-4a43-9c57-111111111111"
IMAGE = "ghcr.io/acme/runner:1"


def progress(grace: float = 120.0) -> PodProgress:
    tracker = PodProgress(NAME, gpu_type="nvidia-l4", scale_up_grace=grace, now=0.0)
    tracker.observe_pod(pod(), 0.0)
    return tracker


def pod(
    *,
    node: str | None = None,
    phase: str = "Pending",
    state: V1ContainerState | None = None,
    reason: str | None = None,
    message: str | None = None,
    conditions: list[V1PodCondition] | None = None,
) -> V1Pod:
    statuses = None
    if state is not None:
        statuses = [V1ContainerStatus(name="runner", image=IMAGE, image_id="", ready=False,
                                      restart_count=0, state=state)]
    return V1Pod(
        metadata=V1ObjectMeta(name=NAME, uid=UID),
        spec=V1PodSpec(containers=[V1Container(name="runner", image=IMAGE)], node_name=node),
        status=V1PodStatus(phase=phase, container_statuses=statuses, reason=reason,
                           message=message, conditions=conditions),
    )


def event(reason: str, message: str, *, uid: str = UID, name: str = NAME) -> CoreV1Event:
    return CoreV1Event(
        metadata=V1ObjectMeta(name=f"{name}.1"),
        involved_object=V1ObjectReference(kind="Pod", name=name, uid=uid),
        reason=reason,
        message=message,
    )


UNSCHEDULABLE = "0/3 nodes are available: 3 node(s) didn't match Pod's node affinity/selector."
SCALE_UP = "pod triggered scale-up: [{https://.../gke-gpu-pool-grp 0->1 (max: 3)}]"


def test_scale_up_then_binding_reports_a_node_added_by_the_autoscaler() -> None:
    tracker = progress()

    notices = tracker.observe_event(event("FailedScheduling", UNSCHEDULABLE), 1.0)
    notices += tracker.observe_event(event("TriggeredScaleUp", SCALE_UP), 2.0)
    notices += tracker.observe_pod(pod(node="gke-gpu-pool-abc"), 50.0)

    assert [notice.text for notice in notices] == [
        f"waiting for nvidia-l4 GPU capacity: {UNSCHEDULABLE}",
        f"autoscaler is adding a GPU node: {SCALE_UP}",
        "scheduled on node gke-gpu-pool-abc (a node the autoscaler added)",
    ]
    assert tracker.node_added
    assert tracker.reached[Stage.SCHEDULED] == 50.0


def test_autoscaler_refusing_a_scale_up_means_no_capacity() -> None:
    tracker = progress()
    tracker.observe_event(event("FailedScheduling", UNSCHEDULABLE), 1.0)

    with pytest.raises(NoCapacityError) as error:
        refusal = "pod didn't trigger scale-up: 1 max node group size reached"
        tracker.observe_event(event("NotTriggerScaleUp", refusal), 2.0)

    assert str(error.value) == (
        "no nvidia-l4 GPU capacity and no scale-up coming: "
        "pod didn't trigger scale-up: 1 max node group size reached"
    )


def test_unschedulable_without_any_autoscaler_answer_fails_after_the_grace_period() -> None:
    tracker = progress(grace=30.0)
    unschedulable = V1PodCondition(type="PodScheduled", status="False", reason="Unschedulable",
                                   message=UNSCHEDULABLE)
    tracker.observe_pod(pod(conditions=[unschedulable]), 10.0)

    assert tracker.next_deadline() == 40.0
    tracker.check_timers(39.9)
    with pytest.raises(NoCapacityError, match="unschedulable for 30s and no autoscaler scale-up"):
        tracker.check_timers(40.0)


def test_a_triggered_scale_up_stops_the_grace_timer() -> None:
    tracker = progress(grace=30.0)
    tracker.observe_event(event("FailedScheduling", UNSCHEDULABLE), 1.0)
    tracker.observe_event(event("TriggeredScaleUp", SCALE_UP), 2.0)

    assert tracker.next_deadline() is None
    tracker.check_timers(10_000.0)


def test_image_pull_back_off_fails_with_the_registry_error() -> None:
    tracker = progress()
    pull_error = f'failed to pull and unpack image "{IMAGE}": not found'
    tracker.observe_pod(pod(node="n1", state=V1ContainerState(
        waiting=V1ContainerStateWaiting(reason="ErrImagePull", message=pull_error))), 1.0)

    with pytest.raises(ImagePullError) as error:
        tracker.observe_pod(pod(node="n1", state=V1ContainerState(waiting=V1ContainerStateWaiting(
            reason="ImagePullBackOff", message=f'Back-off pulling image "{IMAGE}"'))), 2.0)

    assert str(error.value) == (
        f'cannot pull image {IMAGE}: ImagePullBackOff: failed to pull and unpack image "<image>": '
        "not found"
    )


def test_kubelet_back_off_event_fails_with_the_earlier_pull_error() -> None:
    tracker = progress()
    failure = f'Failed to pull image "{IMAGE}": rpc error: code = NotFound'
    tracker.observe_event(event("Failed", failure), 1.0)
    tracker.observe_event(event("Failed", "Error: ErrImagePull"), 1.0)

    with pytest.raises(ImagePullError, match="code = NotFound"):
        tracker.observe_event(event("BackOff", f'Back-off pulling image "{IMAGE}"'), 2.0)


def test_a_single_err_image_pull_is_not_yet_a_failure() -> None:
    tracker = progress()

    tracker.observe_pod(pod(node="n1", state=V1ContainerState(
        waiting=V1ContainerStateWaiting(reason="ErrImagePull", message="i/o timeout"))), 1.0)

    assert not tracker.container_running


def test_running_container_reaches_image_pulled_and_running_in_order() -> None:
    tracker = progress()
    running = V1ContainerState(running=V1ContainerStateRunning())

    notices = tracker.observe_pod(pod(node="n1", phase="Running", state=running), 3.0)

    assert [notice.stage for notice in notices] == [
        Stage.SCHEDULED, Stage.IMAGE_PULLED, Stage.RUNNING,
    ]
    assert tracker.container_running
    assert notices[0].text == "scheduled on node n1 (an existing node)"


def test_a_failed_pod_reports_its_status_reason() -> None:
    tracker = progress()

    with pytest.raises(PodFailedError) as error:
        tracker.observe_pod(pod(node="n1", phase="Failed", reason="DeadlineExceeded",
                                message="Pod was active on the node longer than the "
                                "specified deadline"), 5.0)

    assert str(error.value) == (
        "pod gpu-7-1 ended (Failed) before its runner came online: DeadlineExceeded: Pod was "
        "active on the node longer than the specified deadline"
    )


def test_a_crashed_runner_reports_its_exit_code() -> None:
    tracker = progress()
    crashed = V1ContainerState(terminated=V1ContainerStateTerminated(exit_code=3, reason="Error"))

    with pytest.raises(PodFailedError, match=r"runner container exited with code 3 \(Error\)"):
        tracker.observe_pod(pod(node="n1", phase="Failed", state=crashed), 5.0)


def test_a_deleted_pod_ends_the_wait() -> None:
    with pytest.raises(PodFailedError, match="gpu-7-1 was deleted"):
        progress().observe_deleted()


def test_events_of_an_earlier_pod_with_the_same_name_are_ignored() -> None:
    tracker = progress()

    notices = tracker.observe_event(
        event("NotTriggerScaleUp", "pod didn't trigger scale-up", uid="earlier-pod-uid"), 1.0
    )

    assert notices == []


def test_repeated_autoscaler_events_are_reported_once() -> None:
    tracker = progress()

    first = tracker.observe_event(event("TriggeredScaleUp", SCALE_UP), 1.0)
    again = tracker.observe_event(event("TriggeredScaleUp", SCALE_UP), 11.0)

    assert len(first) == 1
    assert again == []


def container_event(reason: str, message: str, container: str) -> CoreV1Event:
    kind = "initContainers" if container == "inject-runner" else "containers"
    return CoreV1Event(
        metadata=V1ObjectMeta(name=f"{NAME}.2"),
        involved_object=V1ObjectReference(kind="Pod", name=NAME, uid=UID,
                                          field_path=f"spec.{kind}{{{container}}}"),
        reason=reason, message=message)


def test_the_init_containers_pull_of_the_runner_image_is_not_the_jobs_image_pull() -> None:
    tracker = progress()

    notices = tracker.observe_event(container_event(
        "Pulled", f'Successfully pulled image "{IMAGE}" in 2s', "inject-runner"), 5.0)

    assert notices == []
    assert Stage.IMAGE_PULLED not in tracker.reached


def test_the_job_images_pull_is_timed_from_pulling_to_pulled_and_its_kind_kept() -> None:
    tracker = progress()

    tracker.observe_event(container_event("Pulling", f'Pulling image "{IMAGE}"', "runner"), 3.0)
    tracker.observe_event(container_event(
        "ImageStreaming", f"Image {IMAGE} is backed by image streaming.", "runner"), 3.1)
    tracker.observe_event(container_event("Pulled", "Successfully pulled image", "runner"), 4.5)

    assert (tracker.reached[Stage.PULLING], tracker.reached[Stage.IMAGE_PULLED]) == (3.0, 4.5)
    assert tracker.image_pull == "streamed"


def test_an_image_already_on_the_node_is_reported_cached() -> None:
    tracker = progress()

    tracker.observe_event(container_event(
        "Pulled", f'Container image "{IMAGE}" already present on machine', "runner"), 1.0)

    assert tracker.image_pull == "cached"


def test_the_autoscalers_decision_is_timed() -> None:
    tracker = progress()

    tracker.observe_event(event("TriggeredScaleUp", "pod triggered scale-up: [{pool 0->1}]"), 8.0)

    assert tracker.reached[Stage.SCALE_UP] == 8.0
    assert tracker.node_added
