"""The operations in flight per run key (repository id, run id, attempt), and running them.

Spawn and delete are idempotent per run: a POST while the run's spawn is in flight attaches to
it (it replays the progress lines so far, then follows, and gets the same outcome); a POST
after it ended runs spawn again, which adopts the pod and registration that exist; so
concurrent or replayed POSTs never make a second pod or registration. A DELETE first stops the
run's spawn in flight (its own cleanup runs, its stream ends `failed`/`cancelled`), then
removes whatever is left; a DELETE while another runs gets that one's outcome.

Nothing here is state that matters after a crash: the pods, Secrets and registrations are in
the cluster and on GitHub, labelled by run, and spawn adopts them. A client that disconnects
does not cancel its spawn (the job may reconnect; a cancelled job sends DELETE), and a broker
that stops does not clean up.

The blocking work runs in worker threads: the spawns in threads of their own (each holds one
for its whole wait), the short calls (token checks, deletes, lists) in others, so that waiting
spawns can never hold up a DELETE. The event loop only moves events.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import threading
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import TypeVar

import anyio
from anyio import to_thread

from gpu_runners import broker_api
from gpu_runners.broker.gpu_cap import RepositoryGpuCap
from gpu_runners.broker.metrics import BrokerMetrics
from gpu_runners.broker.policy import PolicyDecision, PolicyRefusedError
from gpu_runners.broker.recovery import Recovery, spawn_preemption
from gpu_runners.broker.run_records import RecoveryState, RunRecord
from gpu_runners.broker_api import DeleteOutcome, SpawnResult, StreamEvent
from gpu_runners.delete import DeleteReport, delete_run
from gpu_runners.errors import (
    GitHubError,
    GpuRunnersError,
    ImagePullError,
    KubernetesError,
    NoCapacityError,
    PodFailedError,
    PodPreemptedError,
    SpawnCancelledError,
    UsageError,
    WaitTimeoutError,
)
from gpu_runners.github_api import GitHubClient
from gpu_runners.kube import KubeClient
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import RunIdentity, RunKey
from gpu_runners.spawn import SpawnRequest, spawn

T = TypeVar("T")
LOGGER = logging.getLogger(__name__)

#: Worker threads for spawns: each holds one for its whole wait, so this bounds the spawns
#: in flight; more wait their turn (their streams send heartbeats meanwhile).
SPAWN_THREADS = 256
#: Worker threads for the short blocking calls (token checks, deletes, lists, reaper passes),
#: apart from the spawns' so that a full house of waiting spawns never holds up a DELETE.
CALL_THREADS = 32
#: Every worker thread the broker may run: what its connection pools are sized for.
WORKER_THREADS = SPAWN_THREADS + CALL_THREADS
#: Longest a DELETE waits for the run's spawn to stop and clean up before deleting anyway.
SPAWN_STOP_SECONDS = 30.0

#: API error code of each domain error, most specific first.
_ERROR_CODES: tuple[tuple[type[GpuRunnersError], str], ...] = (
    (SpawnCancelledError, broker_api.CANCELLED),
    (NoCapacityError, broker_api.NO_CAPACITY),
    (ImagePullError, broker_api.IMAGE_PULL),
    (WaitTimeoutError, broker_api.TIMEOUT),
    (PodFailedError, broker_api.POD_FAILED),
    (PolicyRefusedError, broker_api.FORBIDDEN),
    (UsageError, broker_api.USAGE),
    (GitHubError, broker_api.GITHUB),
    (KubernetesError, broker_api.KUBERNETES),
)


class _SpawnOutcomeError(Exception):
    """A spawn failed: the domain error, and the run's record as it stood then."""

    def __init__(self, error: GpuRunnersError, record: RunRecord | None, *,
                 job_taken: bool = False) -> None:
        super().__init__(str(error))
        self.error = error
        self.record = record
        #: The runner had taken its job when its pod was lost: the record stays, for the
        #: recovery pass.
        self.job_taken = job_taken


def error_code(error: GpuRunnersError) -> str:
    """The API error code of a domain error (`internal` for one without its own)."""
    for kind, code in _ERROR_CODES:
        if isinstance(error, kind):
            return code
    return broker_api.INTERNAL


class SpawnOperation:
    """One run's spawn in flight: its stream so far, its followers, its cancel event.

    Events are published from the spawn's worker thread and read by any number of followers
    on the event loop.
    """

    def __init__(self, key: RunKey, loop: asyncio.AbstractEventLoop) -> None:
        self.key = key
        self.cancel = threading.Event()
        self.finished = asyncio.Event()
        self._loop = loop
        self._lines: list[bytes] = []
        self._ended = False
        self._wakeups: set[asyncio.Event] = set()
        self._lock = threading.Lock()

    def publish(self, event: StreamEvent) -> None:
        """Adds an event (from any thread); `ready` or `failed` ends the stream."""
        with self._lock:
            if self._ended:
                return
            self._lines.append(event.encode())
            self._ended = event.event in (broker_api.READY, broker_api.FAILED)
            wakeups = list(self._wakeups)
        for wakeup in wakeups:
            self._loop.call_soon_threadsafe(wakeup.set)
        if self._ended:
            self._loop.call_soon_threadsafe(self.finished.set)

    def progress(self, line: str) -> None:
        """A ProgressLog sink: one progress event per line."""
        self.publish(StreamEvent(broker_api.PROGRESS, line=line))

    async def follow(self, heartbeat_seconds: float,
                     closing: asyncio.Event) -> AsyncIterator[bytes]:
        """The stream from its first line: replays what came, then follows until the end.

        A heartbeat goes out after `heartbeat_seconds` without news. When `closing` is set
        (the broker is stopping) the stream ends with `failed`/`unavailable`; the spawn is
        left as it is, for the client's next POST to adopt.
        """
        index = 0
        wakeup = asyncio.Event()
        with self._lock:
            self._wakeups.add(wakeup)
        try:
            while True:
                with self._lock:
                    fresh = self._lines[index:]
                    ended = self._ended
                    wakeup.clear()
                for line in fresh:
                    yield line
                index += len(fresh)
                if ended and not fresh:
                    return
                if fresh:
                    continue
                if closing.is_set():
                    yield StreamEvent(broker_api.FAILED, error=broker_api.UNAVAILABLE,
                                      message="the broker is restarting; ask again").encode()
                    return
                waits = [asyncio.ensure_future(wakeup.wait()),
                         asyncio.ensure_future(closing.wait())]
                done, pending = await asyncio.wait(waits, timeout=heartbeat_seconds,
                                                   return_when=asyncio.FIRST_COMPLETED)
                for task in pending:
                    task.cancel()
                if not done:
                    yield StreamEvent(broker_api.HEARTBEAT).encode()
        finally:
            with self._lock:
                self._wakeups.discard(wakeup)


@dataclass(frozen=True)
class RunClients:
    """What the operations need besides the registry: clients, limits, metrics.

    `recovery` keeps a record per run and recovers runs from Spot preemption; None (tests of
    the bare operations) keeps no records.
    """

    kube: KubeClient
    github: GitHubClient
    namespace: str
    gpu_cap: RepositoryGpuCap
    metrics: BrokerMetrics
    now: Callable[[], datetime] = lambda: datetime.now(UTC)
    recovery: Recovery | None = None


class RunOperations:
    """Starts, joins and stops each run's operations; one per broker."""

    def __init__(self, clients: RunClients, *, spawn_threads: int = SPAWN_THREADS,
                 call_threads: int = CALL_THREADS,
                 spawn_stop_seconds: float = SPAWN_STOP_SECONDS) -> None:
        self.clients = clients
        self._spawn_limiter = anyio.CapacityLimiter(spawn_threads)
        self._call_limiter = anyio.CapacityLimiter(call_threads)
        self.closing = asyncio.Event()
        #: The event loop serving the app, once it has started (for signal handlers).
        self.loop: asyncio.AbstractEventLoop | None = None
        self._spawn_stop_seconds = spawn_stop_seconds
        self._spawns: dict[RunKey, SpawnOperation] = {}
        self._deletes: dict[RunKey, asyncio.Future[DeleteOutcome]] = {}
        self._tasks: set[asyncio.Task[None]] = set()
        # Read by the reaper's thread while the loop changes the dicts.
        self._lock = threading.Lock()

    async def in_thread(self, work: Callable[[], T]) -> T:
        """Runs a short blocking call in a worker thread (not one of the spawns')."""
        return await to_thread.run_sync(work, limiter=self._call_limiter)

    # --- spawn -----------------------------------------------------------------------------

    async def spawn(self, decision: PolicyDecision) -> SpawnOperation:
        """The run's spawn in flight, started now unless one is running already."""
        key = decision.request.identity.run_key
        pending_delete = self._deletes.get(key)
        if pending_delete is not None:
            # Start after the run's DELETE, not beside it; its outcome is its caller's.
            await asyncio.wait([pending_delete])
        existing = self._spawns.get(key)
        if existing is not None:
            return existing
        operation = SpawnOperation(key, asyncio.get_running_loop())
        with self._lock:
            self._spawns[key] = operation
        task = asyncio.create_task(self._run_spawn(operation, decision))
        # The task outlives the request that started it (a client may disconnect).
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return operation

    async def replace(self, record: RunRecord) -> SpawnOperation | None:
        """Starts the replacement spawn of a recovered run, unless its run is busy."""
        key = record.identity.run_key
        if key in self._spawns or key in self._deletes:
            return None
        operation = SpawnOperation(key, asyncio.get_running_loop())
        with self._lock:
            self._spawns[key] = operation
        task = asyncio.create_task(
            self._run_spawn(operation, PolicyDecision(request=record.request), record))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return operation

    async def _run_spawn(self, operation: SpawnOperation, decision: PolicyDecision,
                         replacement: RunRecord | None = None) -> None:
        try:
            await to_thread.run_sync(
                lambda: self._spawn_blocking(operation, decision, replacement),
                limiter=self._spawn_limiter)
        finally:
            operation.publish(StreamEvent(broker_api.FAILED, error=broker_api.INTERNAL,
                                          message="the spawn ended without an outcome"))
            with self._lock:
                if self._spawns.get(operation.key) is operation:
                    del self._spawns[operation.key]

    def _spawn_blocking(self, operation: SpawnOperation, decision: PolicyDecision,
                        replacement: RunRecord | None = None) -> None:
        clients = self.clients
        request = decision.request
        sink = operation.progress
        if replacement is not None:
            # No client follows a replacement: its progress goes to the broker's log.
            def sink(line: str) -> None:
                operation.progress(line)
                LOGGER.info("replacement %s: %s", request.identity.runner_name, line)
        log = ProgressLog(None, sink=sink)
        for note in decision.notes:
            log.line(note)
        record = replacement if replacement is not None else self._open_record(request)
        if record is not None:
            request = record.request  # a retry pinned to a fallback pool stays pinned
        try:
            result = self._spawn_surviving_preemption(operation, request, record, log)
        except _SpawnOutcomeError as outcome:
            e, record = outcome.error, outcome.record
            code = error_code(e)
            clients.metrics.spawn_ended(code)
            if not outcome.job_taken:
                self._spawn_failed(record, replacement is not None, e)
            operation.publish(StreamEvent(broker_api.FAILED, error=code, message=str(e)))
        except Exception as e:
            LOGGER.exception("spawn of %s failed unexpectedly", request.identity.runner_name)
            clients.metrics.spawn_ended(broker_api.INTERNAL)
            operation.publish(StreamEvent(broker_api.FAILED, error=broker_api.INTERNAL,
                                          message=f"internal error ({type(e).__name__})"))
        else:
            clients.metrics.spawn_ended(broker_api.READY, dict(result.stage_seconds))
            operation.publish(StreamEvent(broker_api.READY, result=result))

    def _spawn_surviving_preemption(self, operation: SpawnOperation, request: SpawnRequest,
                                    record: RunRecord | None, log: ProgressLog) -> SpawnResult:
        """Spawns, and spawns again while the pod is lost to its node and retries are left.

        Raises:
            _SpawnOutcomeError: The spawn failed (with the record as it stands then).
        """
        clients = self.clients
        recovery = clients.recovery
        while True:
            try:
                result = spawn(
                    request, kube=clients.kube, github=clients.github, log=log,
                    cancel=operation.cancel,
                    admission=clients.gpu_cap.admission(request.identity,
                                                        request.pod.gpu_count),
                )
            except PodPreemptedError as e:
                if record is not None and recovery is not None and recovery.took_a_job(record):
                    # Online and given a job just before its node went, before this spawn saw
                    # it online: a loss during the job, the recovery pass's to handle.
                    try:
                        record = recovery.records.save(record.with_changes(
                            state=RecoveryState.ACTIVE, online=True))
                    except GpuRunnersError as save_error:
                        raise _SpawnOutcomeError(save_error, record) from e
                    raise _SpawnOutcomeError(e, record, job_taken=True) from e
                # spawn removed the pod and the registration: a replacement starts clean.
                step = None if record is None or recovery is None else spawn_preemption(
                    record, recovery.policy, stage=e.stage, cause=e.cause, node=e.node,
                    now=clients.now())
                if step is None or recovery is None:
                    limit = recovery.policy.max_retries if recovery is not None else 0
                    raise _SpawnOutcomeError(PodPreemptedError(
                        f"{e}; not retried: maxPreemptionRetries ({limit}) spent",
                        stage=e.stage, cause=e.cause, node=e.node), record) from e
                record, preemption = step
                try:
                    record = recovery.records.save(record)
                except GpuRunnersError as save_error:
                    raise _SpawnOutcomeError(save_error, record) from e
                clients.metrics.preemptions.labels(
                    stage=e.stage, pool=preemption.pool, action="replaced").inc()
                log.line(f"{e}; starting a replacement, retry {record.retries} of "
                         f"{recovery.policy.max_retries} ({preemption.describe()})")
                request = record.request
                continue
            except GpuRunnersError as e:
                raise _SpawnOutcomeError(e, record) from e
            break
        if record is not None and recovery is not None:
            try:
                record = recovery.records.save(record.with_changes(
                    state=RecoveryState.ACTIVE, online=True))
            except GpuRunnersError as e:
                # The runner serves its job; only a later loss would go unrecovered.
                LOGGER.warning("run record of %s not updated: %s", request.identity.runner_name,
                               e)
            if record.preemptions:
                result = dataclasses.replace(
                    result, preemptions=record.preemption_lines())
        return result

    def _open_record(self, request: SpawnRequest) -> RunRecord | None:
        """The run's record, created now unless it exists (a replayed POST, a restart)."""
        recovery = self.clients.recovery
        if recovery is None:
            return None
        try:
            return recovery.records.create(
                RunRecord(request=request, serving_attempt=request.identity.attempt))
        except GpuRunnersError as e:
            # The runner is worth more than its recovery: spawn without a record.
            LOGGER.warning("no run record for %s, so no preemption recovery: %s",
                           request.identity.runner_name, e)
            return None

    def _spawn_failed(self, record: RunRecord | None, replacement: bool,
                      error: GpuRunnersError) -> None:
        """A failed spawn's record: a client's goes (its `setup` fails; nothing waits on the
        label), a replacement's gives up and cancels the run (its job would wait 24 h)."""
        recovery = self.clients.recovery
        if record is None or recovery is None or isinstance(error, SpawnCancelledError):
            return  # a cancel is a DELETE's, which settles the record itself
        identity = record.identity
        try:
            if not replacement:
                recovery.records.delete(identity)
                return
            recovery.records.save(record.with_changes(state=RecoveryState.GAVE_UP,
                                                      online=False))
            recovery.actions.cancel_run(identity.repository, identity.run_id)
            LOGGER.warning("replacement runner %s could not start (%s); run %d cancelled",
                           identity.runner_name, error, identity.run_id)
        except GpuRunnersError as e:
            LOGGER.warning("run record of %s not settled after a failed spawn: %s",
                           identity.runner_name, e)

    # --- delete ----------------------------------------------------------------------------

    async def delete(self, identity: RunIdentity) -> DeleteOutcome:
        """Stops the run's spawn in flight, then removes its pod, Secret and registration.

        Raises:
            GpuRunnersError: Removing failed (the caller answers with its code).
        """
        key = identity.run_key
        running = self._deletes.get(key)
        if running is not None:
            return await asyncio.shield(running)
        outcome: asyncio.Future[DeleteOutcome] = asyncio.get_running_loop().create_future()
        with self._lock:
            self._deletes[key] = outcome
        try:
            result = await self._delete(identity)
        except BaseException as e:
            outcome.set_exception(e)
            outcome.exception()  # retrieved: callers that joined get it; none is fine too
            raise
        finally:
            with self._lock:
                del self._deletes[key]
        outcome.set_result(result)
        return result

    async def _delete(self, identity: RunIdentity) -> DeleteOutcome:
        clients = self.clients
        recovery = clients.recovery
        records = ([] if recovery is None
                   else await self.in_thread(lambda: recovery.records_for_delete(identity)))
        # This attempt's spawn, and a replacement serving this attempt after a re-run.
        for key in {identity.run_key} | {record.identity.run_key for record in records}:
            operation = self._spawns.get(key)
            if operation is not None:
                operation.cancel.set()
                with anyio.move_on_after(self._spawn_stop_seconds):
                    await operation.finished.wait()

        def remove() -> DeleteOutcome:
            lines: list[str] = []
            identities = [identity]
            if recovery is not None:
                for record in recovery.records_for_delete(identity):
                    keep, said = recovery.settle_for_delete(record, identity.attempt)
                    lines += said
                    if not keep:
                        recovery.records.delete(record.identity)
                    if record.identity != identity:
                        identities.append(record.identity)
            report = DeleteReport()
            for target in identities:
                pods = [pod for pod in clients.kube.list_pods(clients.namespace,
                                                              target.label_selector)
                        if pod.metadata is not None and target.owns(pod.metadata.labels)]
                done = delete_run(target, namespace=clients.namespace, kube=clients.kube,
                                  github=clients.github, log=ProgressLog(None))
                removed = [pod for pod in pods if pod.metadata and pod.metadata.name in done.pods]
                clients.metrics.runners_removed(target.repository, removed, clients.now())
                report.pods += done.pods
                report.secrets += done.secrets
                report.registrations += done.registrations
            return DeleteOutcome(pods=report.pods, secrets=report.secrets,
                                 registrations=report.registrations, recoveries=lines)

        return await self.in_thread(remove)

    # --- what is in flight -----------------------------------------------------------------

    def busy_runs(self) -> BusyRuns:
        """A live view of (run id, attempt) of the runs with an operation in flight."""
        return BusyRuns(self)

    def runs_in_flight(self) -> set[tuple[int, int]]:
        """(run id, attempt) of the runs with a spawn or a delete in flight now."""
        with self._lock:
            keys = set(self._spawns) | set(self._deletes)
        return {(key.run_id, key.attempt) for key in keys}

    def close(self) -> None:
        """The broker is stopping: streams end (`unavailable`); spawns are left as they are."""
        self.closing.set()


class BusyRuns:
    """(run id, attempt) of the runs with an operation in flight, read afresh on each use."""

    def __init__(self, operations: RunOperations) -> None:
        self._operations = operations

    def __contains__(self, item: object) -> bool:
        return item in self._operations.runs_in_flight()

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return iter(self._operations.runs_in_flight())

    def __len__(self) -> int:
        return len(self._operations.runs_in_flight())
