"""What the doctor reads from the cluster, reduced to plain values the checks can judge.

Built from the official client's models by the `from_*` functions; the checks never see a
model, so tests of the rules need no server.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

from kubernetes.client import V1Deployment, V1Node, V1ResourceQuota

from gpu_runners import contract
from gpu_runners.quantities import parse_quantity


@dataclass(frozen=True)
class NodeFact:
    """A node: its labels, readiness, allocatable GPUs and taints (key, effect)."""

    name: str
    labels: Mapping[str, str]
    ready: bool
    allocatable_gpus: int
    taints: tuple[tuple[str, str], ...]

    @property
    def accelerator(self) -> str | None:
        """The GKE accelerator label, None on a node without one."""
        return self.labels.get(contract.GKE_ACCELERATOR_LABEL)


@dataclass(frozen=True)
class DeploymentFact:
    """A Deployment: whether it is available, and its first container's image and env."""

    namespace: str
    name: str
    available: bool
    available_replicas: int
    replicas: int
    reason: str
    image: str
    env: Mapping[str, str]


@dataclass(frozen=True)
class QuotaFact:
    """A ResourceQuota's hard limits and current use, as integers (GPUs, pods)."""

    name: str
    hard: Mapping[str, int]
    used: Mapping[str, int]


def node_fact(node: V1Node) -> NodeFact:
    """Reduces a Node to what the checks read."""
    metadata, status, spec = node.metadata, node.status, node.spec
    ready = any(
        condition.type == "Ready" and condition.status == "True"
        for condition in (status.conditions if status is not None else None) or ()
    )
    allocatable = (status.allocatable if status is not None else None) or {}
    taints = tuple(
        (taint.key, taint.effect) for taint in (spec.taints if spec is not None else None) or ()
    )
    return NodeFact(
        name=str(metadata.name if metadata is not None else ""),
        labels=dict((metadata.labels if metadata is not None else None) or {}),
        ready=ready,
        allocatable_gpus=_count(allocatable.get(contract.GPU_RESOURCE, "0")),
        taints=taints,
    )


def deployment_fact(deployment: V1Deployment) -> DeploymentFact:
    """Reduces a Deployment to its availability and its first container's image and env."""
    metadata, status, spec = deployment.metadata, deployment.status, deployment.spec
    conditions = (status.conditions if status is not None else None) or ()
    available = next((c for c in conditions if c.type == "Available"), None)
    containers = spec.template.spec.containers if spec and spec.template.spec else []
    first = containers[0] if containers else None
    env = {item.name: item.value or "" for item in (first.env if first else None) or ()}
    return DeploymentFact(
        namespace=str(metadata.namespace if metadata is not None else ""),
        name=str(metadata.name if metadata is not None else ""),
        available=available is not None and available.status == "True",
        available_replicas=int((status.available_replicas if status else None) or 0),
        replicas=int((spec.replicas if spec else None) or 0),
        reason=(f"{available.reason}: {available.message}" if available is not None
                and available.reason else "no Available condition reported"),
        image=str(first.image or "") if first is not None else "",
        env=env,
    )


def quota_fact(quota: V1ResourceQuota) -> QuotaFact:
    """Reduces a ResourceQuota to integer hard limits and use."""
    status = quota.status
    hard = (status.hard if status is not None else None) or (quota.spec.hard if quota.spec
                                                              else None) or {}
    used = (status.used if status is not None else None) or {}
    return QuotaFact(
        name=str(quota.metadata.name if quota.metadata is not None else ""),
        hard={key: _count(value) for key, value in hard.items()},
        used={key: _count(value) for key, value in used.items()},
    )


def _count(quantity: str) -> int:
    """A countable quantity ("0", "2", "1k") as an integer; GPUs and pods are whole numbers."""
    text = str(quantity).strip()
    if text.isdigit():
        return int(text)  # zero included, which parse_quantity refuses as an option value
    return int(parse_quantity(text, "a quantity the API server reported"))
