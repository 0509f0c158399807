"""The broker's reconcile loop: preemption recovery passes, and a reaper pass every interval.

A recovery pass runs every `reaperIntervalSeconds`, at once when a watch on the runner pods sees
one lost to its node, and every GITHUB_POLL_SECONDS while a recovery waits on GitHub (a lost
job's run to complete). Each pass runs in a worker thread and leaves alone every run with an
operation in flight (a live view, consulted again just before the removals). Recovery comes
first, so the reaper never removes a pod lost to its node before recovery has read it; the
reaper also keeps such pods of recorded runs, and drops a run's record before removing its pod
(recovery would take a vanished pod for a lost one). The recovery pass hands back the runs due
a replacement pod, which start as spawns of their own. A failing pass is logged and counted;
the loop goes on. The pods a reaper pass removes are listed first, so their GPU-seconds are
counted.
"""

from __future__ import annotations

import asyncio
import logging
import threading
from collections.abc import Callable
from datetime import timedelta

import urllib3
from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.broker.recovery import Recovery
from gpu_runners.broker.runs import RunOperations
from gpu_runners.errors import GpuRunnersError, KubernetesError
from gpu_runners.kube import stream_watch
from gpu_runners.pod_disruption import disruption
from gpu_runners.progress import ProgressLog
from gpu_runners.reap import DEFAULT_SECRET_GRACE, ReapReport, reap
from gpu_runners.run_identity import run_key_from_labels

LOGGER = logging.getLogger(__name__)
#: Length of one watch request of the loss watch: how late it may notice it should stop.
WATCH_WINDOW_SECONDS = 30
#: How often a recovery that waits on GitHub (a lost job's run to end) looks again: no pod
#: event announces it, and a re-run should not wait a whole reaper interval.
GITHUB_POLL_SECONDS = 20.0
#: How soon a run whose pod was lost while an operation of its run was in flight is looked at
#: again.
BUSY_RETRY_SECONDS = 1.0
#: Wait before watching again after a failed watch request.
WATCH_RETRY_SECONDS = 2.0


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
    """Runs a recovery and a reaper pass every `interval_seconds` until cancelled, and a
    recovery pass as soon as a watch sees a runner pod lost to its node; a failed pass is
    logged."""
    recovery = operations.clients.recovery
    loop = asyncio.get_running_loop()
    lost = asyncio.Event()
    # (run id, attempt) of runs whose pod the watch saw lost: one that was busy when the pass
    # came (its spawn was just ending) is looked at again shortly, not at the next interval.
    suspects: set[tuple[int, int]] = set()
    stop = threading.Event()

    def on_loss(run: tuple[int, int]) -> None:
        suspects.add(run)
        lost.set()

    if recovery is not None:
        threading.Thread(
            target=watch_losses, name="loss-watch", daemon=True,
            args=(operations, lambda run: loop.call_soon_threadsafe(on_loss, run), stop)
        ).start()
    try:
        next_reap = 0.0
        while not operations.closing.is_set():
            if recovery is not None:
                await recover_once(operations, recovery)
            if loop.time() >= next_reap:
                await _reap_pass(operations, repository, secret_grace)
                next_reap = loop.time() + interval_seconds
            lost.clear()
            suspects.intersection_update(operations.runs_in_flight())
            wake = next_reap
            if recovery is not None and recovery.waiting:
                wake = min(wake, loop.time() + GITHUB_POLL_SECONDS)
            if suspects:
                wake = min(wake, loop.time() + BUSY_RETRY_SECONDS)
            waits = [asyncio.ensure_future(operations.closing.wait()),
                     asyncio.ensure_future(lost.wait())]
            _, pending = await asyncio.wait(waits, timeout=max(0.0, wake - loop.time()),
                                            return_when=asyncio.FIRST_COMPLETED)
            for task in pending:
                task.cancel()
    finally:
        stop.set()


async def _reap_pass(operations: RunOperations, repository: str,
                     secret_grace: timedelta) -> None:
    metrics = operations.clients.metrics
    try:
        await operations.in_thread(lambda: reap_once(operations, repository, secret_grace))
        metrics.reap_passes.labels(outcome="ok").inc()
    except (GpuRunnersError, OSError) as e:
        metrics.reap_passes.labels(outcome="failed").inc()
        LOGGER.warning("reaper pass failed: %s", e)
    except Exception:
        metrics.reap_passes.labels(outcome="failed").inc()
        LOGGER.exception("reaper pass failed unexpectedly")


def watch_losses(operations: RunOperations, on_loss: Callable[[tuple[int, int]], None],
                 stop: threading.Event) -> None:
    """Watches the runner pods and calls `on_loss` with (run id, attempt) when one is lost to
    its node, so that a run is recovered within seconds rather than at the next periodic
    pass. Resumes after a dropped watch; ends when `stop` is set (checked at least every
    WATCH_WINDOW_SECONDS)."""
    clients = operations.clients
    kube = clients.kube
    selector = f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"
    version: str | None = None
    while not stop.is_set():
        try:
            for event in stream_watch(
                    kube.core.list_namespaced_pod, clients.namespace, label_selector=selector,
                    resource_version=version, timeout_seconds=WATCH_WINDOW_SECONDS,
                    request_timeout=(kube.timeouts.connect,
                                     WATCH_WINDOW_SECONDS + kube.timeouts.connect)):
                version = event.resource_version or version
                pod = event.object
                if (event.type in ("MODIFIED", "DELETED") and pod is not None
                        and disruption(pod) is not None):
                    key = run_key_from_labels(pod.metadata.labels if pod.metadata else None)
                    if key is not None:
                        on_loss((key.run_id, key.attempt))
                if stop.is_set():
                    return
        except KubernetesError as e:
            if e.status == 410:
                version = None  # too old to resume from: start afresh
                continue
            LOGGER.warning("loss watch: %s; watching again", e)
            stop.wait(WATCH_RETRY_SECONDS)
        except urllib3.exceptions.HTTPError as e:
            LOGGER.warning("loss watch dropped (%s); watching again", e)
            stop.wait(WATCH_RETRY_SECONDS)
        except Exception:
            # The periodic passes still recover what it misses; it must not die silently.
            LOGGER.exception("loss watch failed; watching again")
            stop.wait(WATCH_RETRY_SECONDS)
