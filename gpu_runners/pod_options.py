"""The choices a user makes about a GPU runner pod, validated before anything is sent.

Kept apart from `pod_spec` (which builds the Kubernetes objects) so that the CLI can reject a
bad size or label without importing the Kubernetes client: a typo fails in milliseconds.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

from gpu_runners import contract
from gpu_runners.errors import UsageError
from gpu_runners.label_syntax import label_key_problem, label_value_problem
from gpu_runners.quantities import parse_quantity

# Defaults that fit the smallest GPU machines (n1-standard-4 with a T4, g2-standard-4 with an
# L4: 4 vCPUs, about 13 GiB allocatable), so a pod asking for nothing else schedules on any pool.
DEFAULT_CPU = "2"
DEFAULT_MEMORY = "8Gi"
DEFAULT_SHM_SIZE = "2Gi"
DEFAULT_MAX_RUNTIME_SECONDS = 6 * 3600
MAX_DEADLINE_SECONDS = 2**31 - 1  # the API server's bound on activeDeadlineSeconds

# Labels whose values gpu_runners owns: an extra label may not override them, or `delete` and
# `reap` could lose track of the pod (or select another run's).
RESERVED_LABELS = frozenset({
    contract.LABEL_NAME,
    contract.LABEL_COMPONENT,
    contract.LABEL_MANAGED_BY,
    contract.LABEL_PART_OF,
    contract.LABEL_RUN_ID,
    contract.LABEL_RUN_ATTEMPT,
    contract.LABEL_GPU_TYPE,
    contract.LABEL_REPOSITORY_ID,
})


def _check_label(key: str, value: str) -> None:
    problem = label_key_problem(key) or label_value_problem(value)
    if problem is not None:
        raise UsageError(f"--label: {problem} (Kubernetes' label syntax)")
    if key in RESERVED_LABELS:
        raise UsageError(f"--label: {key!r} is set by gpu_runners and cannot be overridden")


@dataclass(frozen=True)
class RunnerPodOptions:
    """What the user chooses about a GPU runner pod; validated on construction.

    Attributes:
        namespace: Namespace of the pod and its Secret.
        image: Runner image reference (the base runner's own image by default).
        gpu_count: `nvidia.com/gpu` requested (and limited) for the runner container.
        cpu: CPU request and limit, a Kubernetes quantity.
        memory: Memory request and limit, a Kubernetes quantity.
        shm_size: Size limit of the memory-backed `/dev/shm`; it counts against `memory`.
        max_runtime_seconds: activeDeadlineSeconds: the kubelet kills the pod after this.
        image_pull_secret: Name of a dockerconfigjson Secret for a private image, or None.
        extra_labels: Further pod labels (e.g. a team, for cost reports).
        runner_image: The stack's runner image. When `image` is another one (a team's CUDA
            image), the runner is injected into it from this image (see runner_injection).
        image_env: The environment `image` declares in its config (read by the broker when it
            resolves the image); an injected runner's PATH and LD_LIBRARY_PATH extend it.
        node_pool: GKE node pool to pin the pod to (its nodes' `cloud.google.com/gke-nodepool`
            label), or None for any pool of the GPU type. Set by the broker on a retry after a
            Spot preemption, to the pool's on-demand fallback.
        avoid_node_pools: GKE node pools the pod must not land on (unless pinned to one by
            `node_pool`): the on-demand fallbacks, kept for retries after a Spot preemption,
            so a first attempt takes Spot capacity.
    """

    namespace: str
    image: str
    gpu_count: int = 1
    cpu: str = DEFAULT_CPU
    memory: str = DEFAULT_MEMORY
    shm_size: str = DEFAULT_SHM_SIZE
    max_runtime_seconds: int = DEFAULT_MAX_RUNTIME_SECONDS
    image_pull_secret: str | None = None
    extra_labels: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    runner_image: str | None = None
    image_env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    node_pool: str | None = None
    avoid_node_pools: tuple[str, ...] = ()

    @property
    def injects_runner(self) -> bool:
        """Whether the job runs in an image other than the runner image."""
        return self.runner_image is not None and self.runner_image != self.image

    def __post_init__(self) -> None:
        if not self.image.strip():
            raise UsageError(f"--image is empty (and {contract.ENV_IMAGE} is not set)")
        if self.gpu_count < 1:
            raise UsageError(f"--gpus: {self.gpu_count} is not allowed; ask for at least 1 GPU")
        parse_quantity(self.cpu, "--cpu")
        memory = parse_quantity(self.memory, "--memory")
        shm = parse_quantity(self.shm_size, "--shm-size")
        # /dev/shm pages are charged to the container's memory limit: a larger shm could never
        # be filled, and a training job that tries would be OOM-killed, not told why.
        if shm >= memory:
            raise UsageError(
                f"--shm-size: {self.shm_size} must be smaller than --memory ({self.memory}), "
                "because /dev/shm is memory charged to the container"
            )
        if not 1 <= self.max_runtime_seconds <= MAX_DEADLINE_SECONDS:
            raise UsageError(
                f"--max-runtime: {self.max_runtime_seconds}s is outside 1s to "
                f"{MAX_DEADLINE_SECONDS}s (what activeDeadlineSeconds accepts)"
            )
        for key, value in self.extra_labels.items():
            _check_label(key, value)
        if self.node_pool is not None:
            problem = label_value_problem(self.node_pool) if self.node_pool else "it is empty"
            if problem is not None:
                raise UsageError(f"node_pool: {self.node_pool!r} is not a node pool name: "
                                 f"{problem}")
        for pool in self.avoid_node_pools:
            problem = label_value_problem(pool) if pool else "it is empty"
            if problem is not None:
                raise UsageError(f"avoid_node_pools: {pool!r} is not a node pool name: "
                                 f"{problem}")
        object.__setattr__(self, "avoid_node_pools", tuple(self.avoid_node_pools))
        # A copy, read-only: a caller changing its dict later must not change the pod.
        object.__setattr__(self, "extra_labels", MappingProxyType(dict(self.extra_labels)))
        object.__setattr__(self, "image_env", MappingProxyType(dict(self.image_env)))
