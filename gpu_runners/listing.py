"""`list`: the rows of the GPU runner pods in the namespace (printed by `runner_table`)."""

from __future__ import annotations

from datetime import datetime

from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.kube import KubeClient
from gpu_runners.runner_table import RunnerPodRow, format_age


def _phase(pod: V1Pod) -> str:
    """The phase, refined as kubectl's STATUS: Terminating, or a container's waiting reason."""
    if pod.metadata is not None and pod.metadata.deletion_timestamp:
        return "Terminating"
    status = pod.status
    phase = (status.phase if status else None) or "Unknown"
    for container in (status.container_statuses if status else None) or ():
        waiting = container.state.waiting if container.state else None
        if waiting is not None and waiting.reason and waiting.reason != "ContainerCreating":
            return f"{phase} ({waiting.reason})"
    if status is not None and status.reason:
        return f"{phase} ({status.reason})"
    return phase


def pod_row(pod: V1Pod, now: datetime) -> RunnerPodRow:
    """The table row of one pod."""
    metadata = pod.metadata
    labels = (metadata.labels if metadata else None) or {}
    created = metadata.creation_timestamp if metadata else None
    return RunnerPodRow(
        name=(metadata.name if metadata else None) or "?",
        run_id=labels.get(contract.LABEL_RUN_ID, "?"),
        attempt=labels.get(contract.LABEL_RUN_ATTEMPT, "?"),
        phase=_phase(pod),
        node=(pod.spec.node_name if pod.spec else None) or "<none>",
        gpu_type=labels.get(contract.LABEL_GPU_TYPE, "?"),
        age=format_age((now - created).total_seconds()) if created else "?",
    )


def list_runner_pods(kube: KubeClient, namespace: str, now: datetime) -> list[RunnerPodRow]:
    """The rows of every pod gpu_runners manages in the namespace, oldest first."""
    selector = f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"
    pods = sorted(
        kube.list_pods(namespace, selector),
        key=lambda pod: (pod.metadata.creation_timestamp.timestamp()
                         if pod.metadata and pod.metadata.creation_timestamp else 0.0),
    )
    return [pod_row(pod, now) for pod in pods]
