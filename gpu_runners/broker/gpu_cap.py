"""The per-repository GPU cap: a repository's live runner pods hold at most N GPUs at once.

Checked at each pod create of a spawn (spawn's `admission` hook): under the repository's lock,
the GPUs requested by its live (not finished) runner pods are counted from the cluster, and
the create goes ahead only if they plus this pod's stay within the cap. The lock is held until
the create has been answered, so two spawns of one repository cannot both see room for one.
A refusal is a `GpuCapReachedError`, which spawn waits out like a ResourceQuota refusal.

The count comes from the cluster, not from memory, so a restarted broker counts the same.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Callable, Iterator

from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.errors import GpuCapReachedError, QuotaExceededError
from gpu_runners.kube import KubeClient
from gpu_runners.run_identity import RunIdentity
from gpu_runners.spawn import PodAdmission

#: What an admission reports when a create has to wait: "cap" or "quota".
WaitListener = Callable[[str], None]


def pod_gpus(pod: V1Pod) -> int:
    """GPUs a pod's containers are limited to (what the scheduler reserves)."""
    total = 0
    for container in (pod.spec.containers if pod.spec else None) or ():
        limits = (container.resources.limits if container.resources else None) or {}
        value = str(limits.get(contract.GPU_RESOURCE, "0"))
        total += int(value) if value.isdigit() else 0
    return total


def _live(pod: V1Pod) -> bool:
    phase = pod.status.phase if pod.status else None
    return phase not in ("Succeeded", "Failed")


class RepositoryGpuCap:
    """Admits pod creates while a repository's runners stay within the GPU cap.

    Args:
        kube: Client of the runner namespace.
        namespace: The runner namespace.
        cap: Most GPUs one repository's live runner pods may hold.
        on_wait: Told "cap" when the cap refuses a create, "quota" when a ResourceQuota does.
    """

    def __init__(self, kube: KubeClient, namespace: str, cap: int, *,
                 on_wait: WaitListener | None = None) -> None:
        self._kube = kube
        self._namespace = namespace
        self.cap = cap
        self._on_wait = on_wait
        self._locks: dict[int | None, threading.Lock] = {}
        self._locks_guard = threading.Lock()

    def admission(self, identity: RunIdentity, gpus: int) -> PodAdmission:
        """The hook for one spawn of `identity`'s run, whose pod asks for `gpus`."""
        return lambda: self._admit(identity, gpus)

    def held_gpus(self, identity: RunIdentity) -> int:
        """GPUs of the repository's live runner pods, this run's own pod excepted."""
        selector = (f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY},"
                    f"{contract.LABEL_REPOSITORY_ID}={identity.repository_id}")
        return sum(
            pod_gpus(pod) for pod in self._kube.list_pods(self._namespace, selector)
            # This run's own pod is the one about to be created or adopted: not another's.
            if _live(pod) and pod.metadata is not None
            and pod.metadata.name != identity.pod_name
        )

    def _lock(self, repository_id: int | None) -> threading.Lock:
        with self._locks_guard:
            return self._locks.setdefault(repository_id, threading.Lock())

    @contextlib.contextmanager
    def _admit(self, identity: RunIdentity, asked: int) -> Iterator[None]:
        with self._lock(identity.repository_id):
            held = self.held_gpus(identity)
            if held + asked > self.cap:
                self._tell("cap")
                raise GpuCapReachedError(
                    f"repository {identity.repository} holds {held} GPU(s) of its cap of "
                    f"{self.cap}; {identity.runner_name} needs {asked} more"
                )
            try:
                yield
            except QuotaExceededError:
                self._tell("quota")
                raise

    def _tell(self, kind: str) -> None:
        if self._on_wait is not None:
            self._on_wait(kind)

