"""The reaper as a loop in the broker: every interval, one `reap` pass under its identity.

Each pass runs in a worker thread and leaves alone every run with an operation in flight (a
live view, consulted again just before the removals). A failing pass is logged and counted;
the loop goes on. The pods a pass removes are listed first, so their GPU-seconds are counted.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import timedelta

from gpu_runners import contract
from gpu_runners.broker.runs import RunOperations
from gpu_runners.errors import GpuRunnersError
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
    report = reap(namespace=clients.namespace, kube=clients.kube, github=clients.github,
                  log=log, now=clients.now, busy_runs=operations.busy_runs(),
                  secret_grace=secret_grace)
    removed = [before[action.name] for action in report.removed
               if action.kind == "pod" and action.name in before]
    clients.metrics.runners_removed(repository, removed, clients.now())
    return report


async def reconcile_forever(operations: RunOperations, *, repository: str,
                            interval_seconds: float,
                            secret_grace: timedelta = DEFAULT_SECRET_GRACE) -> None:
    """Runs a reaper pass every `interval_seconds` until cancelled; a failed pass is logged."""
    metrics = operations.clients.metrics
    while not operations.closing.is_set():
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
