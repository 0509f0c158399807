"""Placing a new node's Ready time on spawn's monotonic timeline (pure: objects in, a time out).

The wall clock of the cluster is mapped through the pod's binding, never the caller's clock:
the node became Ready (PodScheduled time - Ready time) before spawn saw the binding.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from kubernetes.client import V1Node, V1NodeCondition, V1NodeStatus, V1ObjectMeta

from gpu_runners.node_timing import node_ready_at

#: The binding, as the API server stamped it, and as spawn saw it on its monotonic clock.
BOUND = datetime(2025, 5, 1, 12, 0, 0, tzinfo=UTC)
BOUND_AT = 1000.0
#: When spawn saw the scale-up triggered, 200 s before the binding; the pod's creation.
SCALE_UP_AT = 800.0
POD_CREATED = BOUND - timedelta(seconds=210)


def node(*, created: float, ready: float | None, status: str = "True") -> V1Node:
    """A node created and Ready at these seconds relative to the binding."""
    conditions = [] if ready is None else [V1NodeCondition(
        type="Ready", status=status, last_transition_time=BOUND + timedelta(seconds=ready))]
    return V1Node(metadata=V1ObjectMeta(name="gke-l4-1",
                                        creation_timestamp=BOUND + timedelta(seconds=created)),
                  status=V1NodeStatus(conditions=conditions))


def placed(subject: V1Node, *, earliest: float = SCALE_UP_AT) -> float | None:
    return node_ready_at(subject, pod_created=POD_CREATED, pod_scheduled=BOUND,
                         scheduled_at=BOUND_AT, earliest=earliest)


def test_the_ready_time_is_measured_back_from_the_binding() -> None:
    # Registered 150 s before the binding, Ready 140 s before it: the driver took 140 s.
    assert placed(node(created=-150, ready=-140)) == BOUND_AT - 140


def test_a_kubelet_clock_behind_the_api_servers_is_raised_to_the_nodes_registration() -> None:
    assert placed(node(created=-150, ready=-152)) == BOUND_AT - 150


def test_a_ready_time_within_the_timestamps_resolution_after_the_binding_is_the_binding() -> None:
    assert placed(node(created=-150, ready=1)) == BOUND_AT


def test_a_node_ready_again_only_after_the_binding_does_not_say_when_it_first_was() -> None:
    assert placed(node(created=-150, ready=30)) is None


@pytest.mark.parametrize(("ready", "status"), [(None, "True"), (-140, "False"),
                                               (-140, "Unknown")],
                         ids=["no-condition", "not-ready", "unknown"])
def test_a_node_not_ready_now_says_nothing(ready: float | None, status: str) -> None:
    assert placed(node(created=-150, ready=ready, status=status)) is None


def test_a_node_older_than_the_pod_was_not_added_for_it() -> None:
    assert placed(node(created=-3600, ready=-3500)) is None


def test_the_time_is_clamped_to_the_scale_up_spawn_saw() -> None:
    # Ready 204 s before the binding, but spawn saw the scale-up only 100 s before it: the
    # node cannot have been Ready for this pod before the autoscaler decided to add it.
    assert placed(node(created=-205, ready=-204), earliest=BOUND_AT - 100) == BOUND_AT - 100
