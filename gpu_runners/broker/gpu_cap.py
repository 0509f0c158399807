"""The per-repository GPU cap: a repository's live runner pods hold at most N GPUs at once.

Checked at each pod create of a spawn (spawn's `admission` hook), per repository, under its
lock: the GPUs of its live (not finished) runner pods, as last listed from the cluster, plus
the creates admitted since, plus this pod's, must stay within the cap. An admitted create is
counted (reserved) before it is sent, so the lock need not be held while it is in flight and
two spawns can never both take the last GPU; a create that fails gives its reservation back.

The listing is the truth and is taken again whenever it is older than LISTING_MAX_AGE_SECONDS
and after every refusal, so a pod that has ended since frees its GPUs at the next retry; in
between, an ended pod is still counted, which can only make a spawn wait, never exceed the
cap. Nothing is trusted from memory across a restart: a new broker starts with a listing.
A refusal is a `GpuCapReachedError`, which spawn waits out like a ResourceQuota refusal.
"""

from __future__ import annotations

import contextlib
import math
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.errors import AlreadyExistsError, GpuCapReachedError, QuotaExceededError
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


#: Longest a listing of a repository's pods is reused for admitting creates.
LISTING_MAX_AGE_SECONDS = 2.0


@dataclass
class _Ledger:
    """One repository's GPUs as the cap counts them: pod name -> GPUs.

    Attributes:
        counted: Live pods at the last listing, and every create admitted since.
        in_flight: Pods whose create has been admitted and not answered yet.
        listed_at: When the listing was taken (monotonic); -inf to list again.
    """

    counted: dict[str, int] = field(default_factory=dict)
    in_flight: dict[str, int] = field(default_factory=dict)
    listed_at: float = -math.inf


class RepositoryGpuCap:
    """Admits pod creates while a repository's runners stay within the GPU cap.

    Args:
        kube: Client of the runner namespace.
        namespace: The runner namespace.
        cap: Most GPUs one repository's live runner pods may hold.
        on_wait: Told "cap" when the cap refuses a create, "quota" when a ResourceQuota does.
        clock: Monotonic clock (the listing's age).
    """

    def __init__(self, kube: KubeClient, namespace: str, cap: int, *,
                 on_wait: WaitListener | None = None,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self._kube = kube
        self._namespace = namespace
        self.cap = cap
        self._on_wait = on_wait
        self._clock = clock
        self._ledgers: dict[int | None, tuple[threading.Lock, _Ledger]] = {}
        self._ledgers_guard = threading.Lock()

    def admission(self, identity: RunIdentity, gpus: int) -> PodAdmission:
        """The hook for one spawn of `identity`'s run, whose pod asks for `gpus`."""
        return lambda: self._admit(identity, gpus)

    def live_pod_gpus(self, repository_id: int | None) -> dict[str, int]:
        """GPUs of each live runner pod of the repository, listed from the cluster."""
        selector = (f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY},"
                    f"{contract.LABEL_REPOSITORY_ID}={repository_id}")
        return {
            pod.metadata.name: pod_gpus(pod)
            for pod in self._kube.list_pods(self._namespace, selector)
            if _live(pod) and pod.metadata is not None and pod.metadata.name
        }

    def _ledger(self, repository_id: int | None) -> tuple[threading.Lock, _Ledger]:
        with self._ledgers_guard:
            return self._ledgers.setdefault(repository_id, (threading.Lock(), _Ledger()))

    @contextlib.contextmanager
    def _admit(self, identity: RunIdentity, asked: int) -> Iterator[None]:
        name = identity.pod_name
        lock, ledger = self._ledger(identity.repository_id)
        with lock:
            if self._clock() - ledger.listed_at > LISTING_MAX_AGE_SECONDS:
                ledger.counted = {**self.live_pod_gpus(identity.repository_id),
                                  **ledger.in_flight}
                ledger.listed_at = self._clock()
            # This run's own pod is the one about to be created or adopted: not another's.
            held = sum(gpus for pod, gpus in ledger.counted.items() if pod != name)
            if held + asked > self.cap:
                ledger.listed_at = -math.inf  # the retry looks at the cluster afresh
                self._tell("cap")
                raise GpuCapReachedError(
                    f"repository {identity.repository} holds {held} GPU(s) of its cap of "
                    f"{self.cap}; {identity.runner_name} needs {asked} more"
                )
            ledger.counted[name] = ledger.in_flight[name] = asked
        exists = False
        try:
            yield
            exists = True
        except AlreadyExistsError:
            exists = True  # this run's earlier pod: spawn adopts or replaces it
            raise
        except QuotaExceededError:
            self._tell("quota")
            raise
        finally:
            with lock:
                ledger.in_flight.pop(name, None)
                if not exists:
                    ledger.counted.pop(name, None)

    def _tell(self, kind: str) -> None:
        if self._on_wait is not None:
            self._on_wait(kind)
