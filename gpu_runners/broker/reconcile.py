"""The broker's reconcile loop: every interval, a preemption recovery pass, then a reaper pass.

Each pass runs in a worker thread and leaves alone every run with an operation in flight (a
live view, consulted again just before the removals). Recovery comes first, so the reaper
never removes a pod lost to its node before recovery has read it; the reaper also keeps such
pods of recorded runs, and drops a run's record before removing its pod (recovery would take a
vanished pod for a lost one). The recovery pass hands back the runs due a replacement pod,
which start as spawns of their own. A failing pass is logged and counted; the loop goes on.
The pods a reaper pass removes are listed first, so their GPU-seconds are counted.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.broker.recovery import Recovery
from gpu_runners.broker.runs import RunOperations
from gpu_runners.errors import GpuRunnersError
from gpu_runners.pod_disruption import disruption
from gpu_runners.progress import ProgressLog
from gpu_runners.reap import DEFAULT_SECRET_GRACE, ReapReport, reap

LOGGER = logging.getLogger(__name__)


def reap_once(operations: RunOperations, repository: str,
              secret_grace: timedelta = DEFAULT_SECRET_GRACE) -> ReapReport:
    """One reaper pass (blocking); counts the GPU-seconds of the pods it removed."""
    clients = operations.clients
    selector = f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"
    before = {pod.metadata.name: pod for pod in clients.kube.list_pods(clients.namespace, selector)
              if pod.metadata is not None}
    log = ProgressLog(None, sink=lambda line: LOGGER.info("reap: %s", line))
    records = clients.recovery.records if clients.recovery is not None else None

    def left_to_recovery(pod: V1Pod) -> bool:
        return (records is not None and disruption(pod) is not None
                and records.read_for_pod(pod) is not None)

    def before_removal(pod: V1Pod) -> None:
        if records is not None:
            records.delete_for_pod(pod)

    report = reap(namespace=clients.namespace, kube=clients.kube, github=clients.github,
                  log=log, now=clients.now, busy_runs=operations.busy_runs(),
                  secret_grace=secret_grace, left_to_recovery=left_to_recovery,
                  before_removal=before_removal)
    removed = [before[action.name] for action in report.removed
               if action.kind == "pod" and action.name in before]
    clients.metrics.runners_removed(repository, removed, clients.now())
    return report


async def recover_once(operations: RunOperations, recovery: Recovery) -> None:
    """One recovery pass; the replacements it finds due start as spawns of their own."""
    try:
        due = await operations.in_thread(lambda: recovery.pass_once(operations.busy_runs()))
    except (GpuRunnersError, OSError) as e:
        operations.clients.metrics.recovery_passes.labels(outcome="failed").inc()
        LOGGER.warning("recovery pass failed: %s", e)
        return
    except Exception:
        operations.clients.metrics.recovery_passes.labels(outcome="failed").inc()
        LOGGER.exception("recovery pass failed unexpectedly")
        return
    for record in due:
        await operations.replace(record)


async def reconcile_forever(operations: RunOperations, *, repository: str,
                            interval_seconds: float,
                            secret_grace: timedelta = DEFAULT_SECRET_GRACE) -> None:
    """Runs a reaper pass every `interval_seconds` until cancelled; a failed pass is logged."""
    metrics = operations.clients.metrics
    recovery = operations.clients.recovery
    while not operations.closing.is_set():
        if recovery is not None:
            await recover_once(operations, recovery)
        try:
            await operations.in_thread(lambda: reap_once(operations, repository, secret_grace))
            metrics.reap_passes.labels(outcome="ok").inc()
        except (GpuRunnersError, OSError) as e:
            metrics.reap_passes.labels(outcome="failed").inc()
            LOGGER.warning("reaper pass failed: %s", e)
        except Exception:
            metrics.reap_passes.labels(outcome="failed").inc()
            LOGGER.exception("reaper pass failed unexpectedly")
        try:
            await asyncio.wait_for(operations.closing.wait(), timeout=interval_seconds)
        except TimeoutError:
            continue
