"""Spot preemption: tell a pod lost to its node from a job that failed, and bring the run back.

A GPU runner pod can be lost at any stage. What the broker does, by stage:

- **Starting** (scheduled, image pulling, container running) while `setup` waits: the spawn
  itself starts a replacement pod under the same label at once (runs.py).
- **Online, before it took the job** (`train` still queued on its label): a replacement pod
  under the same label at once; the queued job runs on it.
- **During the job**: once GitHub reports the run completed with the job failed, the run's
  failed jobs are re-run, and a runner is put under the label the re-run `train` targets: the
  first attempt's, since re-run jobs reuse the outputs of the `setup` job that is not re-run.
- **After the job** (`cleanup` running): nothing; the job's outcome stands.

A job that failed on its own (a failing step, an OOM kill, the pod's deadline, node pressure)
is never retried: only pod_disruption's node-side causes count, and a job GitHub reports
completed before the node went keeps its result. Every retry counts against
`maxPreemptionRetries` per run; with a pool's `onDemandFallback` the retry is pinned to that
pool. When the retries are spent with a job still queued on the label, the run is cancelled,
so it does not wait a day for a runner that will not come.

The state lives in the run's record (run_records), written before each step it guards, so a
broker restarted in the middle of a recovery finishes it: it re-reads the record, checks
GitHub (was the re-run made?) and goes on.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Collection
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

from kubernetes.client import V1Pod

from gpu_runners.broker.metrics import BrokerMetrics
from gpu_runners.broker.run_records import Preemption, RecoveryState, RunRecord, RunRecords
from gpu_runners.delete import delete_run
from gpu_runners.errors import GitHubError, GpuRunnersError
from gpu_runners.github_api import GitHubClient, WorkflowJob
from gpu_runners.gpu_pools import GpuPool
from gpu_runners.kube import KubeClient
from gpu_runners.pod_disruption import Disruption, disruption
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import RunIdentity
from gpu_runners.spawn import SpawnRequest

LOGGER = logging.getLogger(__name__)

DEFAULT_MAX_RETRIES = 2
#: A pod that vanished (its node deleted and the pod garbage-collected before a pass saw it).
VANISHED = Disruption("its pod disappeared with its node", "Vanished")
#: A job GitHub reports completed this long before its node went is taken as finished by
#: itself: clocks of GitHub and the cluster differ by seconds, not minutes.
CLOCK_SKEW = timedelta(seconds=30)
#: Job conclusions that stand whatever happened to the runner afterwards.
_FINAL_CONCLUSIONS = frozenset({"success", "skipped", "neutral", "cancelled"})
_FINISHED_PHASES = ("Succeeded", "Failed")


@dataclass(frozen=True)
class RecoveryPolicy:
    """The stack's limits on recovery.

    Attributes:
        max_retries: Replacements per run (`maxPreemptionRetries`); 0 turns recovery off.
        pools: The GPU pools, with their Spot setting and on-demand fallback.
    """

    max_retries: int = DEFAULT_MAX_RETRIES
    pools: tuple[GpuPool, ...] = ()

    def lost_pool(self, request: SpawnRequest, node: str) -> GpuPool | None:
        """The pool a lost pod ran on: the pool it was pinned to, the pool its node's name
        carries (GKE names nodes `gke-<cluster>-<pool>-<hash>-<id>`), or the only Spot pool
        of its GPU type."""
        named = {pool.name: pool for pool in self.pools if pool.name}
        if request.pod.node_pool:
            return named.get(request.pod.node_pool)
        for name in sorted(named, key=len, reverse=True):
            if node and f"-{name}-" in node:
                return named[name]
        types = set(request.gpu_types)
        spot = [pool for pool in self.pools if pool.spot
                and (not types or pool.accelerator in types)]
        return spot[0] if len(spot) == 1 else None

    def retry_request(self, request: SpawnRequest, lost: GpuPool | None) -> tuple[SpawnRequest,
                                                                                   str]:
        """The request for a replacement, pinned to the lost pool's on-demand fallback if it
        has one, and the name of the pool it is pinned to ("" when not pinned)."""
        fallback = None
        if lost is not None and lost.on_demand_fallback:
            fallback = next((pool for pool in self.pools
                             if pool.name == lost.on_demand_fallback), None)
        if fallback is None:
            return request, request.pod.node_pool or ""
        pod = dataclasses.replace(request.pod, node_pool=fallback.name, avoid_node_pools=())
        return dataclasses.replace(request, pod=pod, gpu_types=(fallback.accelerator,)), \
            fallback.name


@dataclass(frozen=True)
class Loss:
    """A record's pod lost to its node, and how far its job had got.

    Attributes:
        disruption: What happened to the node.
        stage: "idle" (no job had taken the runner) or "job".
        pool: The pool it was lost on.
        node: The node it ran on ("" if unknown).
    """

    disruption: Disruption
    stage: str
    pool: GpuPool | None
    node: str


class Recovery:
    """The broker's preemption recovery: one pass over the run records, and DELETE's share.

    Blocking throughout: run it in a worker thread.
    """

    def __init__(self, *, records: RunRecords, kube: KubeClient, github: GitHubClient,
                 actions: GitHubClient, namespace: str, policy: RecoveryPolicy,
                 metrics: BrokerMetrics,
                 now: Callable[[], datetime] = lambda: datetime.now(UTC)) -> None:
        self.records = records
        self.kube = kube
        self.github = github
        self.actions = actions
        self.namespace = namespace
        self.policy = policy
        self.metrics = metrics
        self.now = now
        #: Runs whose recovery waited on GitHub (or failed) at the end of the last pass.
        self.waiting = 0

    # --- the pass --------------------------------------------------------------------------------

    def pass_once(self, busy: Collection[tuple[int, int]]) -> list[RunRecord]:
        """Looks at every run record whose run has no operation in flight.

        Returns:
            The records due a replacement pod (REPLACING; their old pod and registration
            removed), for the caller to spawn.
        """
        due: list[RunRecord] = []
        failed = False
        waiting = 0
        for listed in self.records.list():
            identity = listed.identity
            if (identity.run_id, identity.attempt) in busy:
                continue
            try:
                # Read again now that the run is not busy: an operation that ended since the
                # list saved the record last (its spawns and deletes are busy until then).
                record = self.records.read(identity)
                replacement = None if record is None else self._step(record)
            except GpuRunnersError as e:
                failed = True
                waiting += 1
                LOGGER.warning("recovery of %s: %s (tried again next pass)",
                               identity.runner_name, e)
                continue
            if replacement is not None:
                due.append(replacement)
            elif self._waits_on_github(identity):
                waiting += 1
        self.metrics.recovery_passes.labels(outcome="failed" if failed else "ok").inc()
        self.waiting = waiting
        return due

    def _waits_on_github(self, identity: RunIdentity) -> bool:
        """Whether the run's recovery waits for GitHub (the run to end, a re-run to show),
        which no pod event announces: the loop then looks again soon."""
        record = self.records.read(identity)
        return record is not None and record.state in (RecoveryState.AWAITING_RUN_END,
                                                       RecoveryState.RERUN_REQUESTED)

    def _step(self, record: RunRecord) -> RunRecord | None:
        state = record.state
        if state is RecoveryState.REPLACING:
            return self._clear_for_replacement(record)
        if state is RecoveryState.AWAITING_RUN_END:
            return self._after_run_end(record)
        if state is RecoveryState.RERUN_REQUESTED:
            return self._rerun(record)
        pod = self._pod(record.identity)
        if state is RecoveryState.GAVE_UP or not record.online:
            # Given up: kept for the cleanup's summary. Not online: a spawn's to handle (in
            # flight, or cut short by a restart: the job's next POST adopts it). Either goes
            # once its run has ended and its pod is gone.
            if pod is None and self._run_ended(record):
                self.records.delete(record.identity)
            return None
        loss = self.assess(record, pod)
        if loss is None:
            if pod is None or disruption(pod) is not None or (
                    pod.status is not None and pod.status.phase in _FINISHED_PHASES):
                # Ended by its job, or lost after its job had finished: nothing to recover;
                # what is left is the reaper's.
                self.records.delete(record.identity)
            return None
        return self._recover(record, loss, pod)

    # --- judging a loss --------------------------------------------------------------------------

    def assess(self, record: RunRecord, pod: V1Pod | None) -> Loss | None:
        """Whether the record's online runner was lost to its node in a way worth recovering.

        None when the pod lives, ended by its own doing, or its job had finished before the
        node went (its outcome stands).
        """
        if pod is not None:
            lost = disruption(pod)
            if lost is None:
                return None
        else:
            lost = VANISHED
        node = (pod.spec.node_name or "") if pod is not None and pod.spec is not None else ""
        pool = self.policy.lost_pool(record.request, node)
        job = self._job_of(record)
        if job is None:
            return Loss(lost, "idle", pool, node)
        if job.completed and (job.conclusion in _FINAL_CONCLUSIONS or (
                lost.since is not None and job.completed_at is not None
                and job.completed_at < lost.since - CLOCK_SKEW)):
            return None
        return Loss(lost, "job", pool, node)

    def took_a_job(self, record: RunRecord) -> bool:
        """Whether GitHub gave the record's runner a job of the attempt it serves."""
        try:
            return self._job_of(record) is not None
        except GpuRunnersError:
            return False  # not known: a spawn retries, as for a loss before any job

    def _job_of(self, record: RunRecord) -> WorkflowJob | None:
        """The job of the serving attempt that GitHub gave this record's runner, if any."""
        identity = record.identity
        jobs = self.github.list_run_jobs(identity.repository, identity.run_id,
                                         record.serving_attempt)
        return next((job for job in jobs if job.runner_name == identity.runner_name), None)

    # --- recovering ------------------------------------------------------------------------------

    def _recover(self, record: RunRecord, loss: Loss, pod: V1Pod | None) -> RunRecord | None:
        identity = record.identity
        if loss.stage == "idle" and self._run_ended(record):
            # Nothing waits on the label any more: nothing to replace.
            self._forget(record, loss, "none")
            return None
        if record.retries >= self.policy.max_retries:
            self._give_up(record, loss)
            return None
        retry, retry_pool = self.policy.retry_request(record.request, loss.pool)
        preemption = self._preemption(record, loss, retry_pool, retried=True)
        if loss.stage == "idle":
            saved = self.records.save(record.with_changes(
                state=RecoveryState.REPLACING, online=False, request=retry,
                preemptions=(*record.preemptions, preemption)))
            self._count(loss, "replaced")
            LOGGER.info("%s: %s", identity.runner_name, preemption.describe())
            return self._clear_for_replacement(saved)
        saved = self.records.save(record.with_changes(
            state=RecoveryState.AWAITING_RUN_END, online=False, request=retry,
            preemptions=(*record.preemptions, preemption)))
        self._count(loss, "rerun")
        LOGGER.info("%s: %s; the failed jobs are re-run when the run completes",
                    identity.runner_name, preemption.describe())
        if pod is not None:
            self.kube.delete_pod(self.namespace, identity.pod_name)  # dead; its record stays
        return None  # the job is still failing on GitHub's side; a later pass re-runs it

    def _give_up(self, record: RunRecord, loss: Loss) -> None:
        identity = record.identity
        preemption = self._preemption(record, loss, "", retried=False)
        self.records.save(record.with_changes(
            state=RecoveryState.GAVE_UP, preemptions=(*record.preemptions, preemption)))
        self._count(loss, "gave_up")
        LOGGER.warning("%s: %s: maxPreemptionRetries (%d) spent", identity.runner_name,
                       preemption.describe(), self.policy.max_retries)
        if loss.stage == "idle":
            # Its job waits on a label no runner will carry again: end the run now rather
            # than after GitHub's 24 hours; the cleanup job still runs.
            self.actions.cancel_run(identity.repository, identity.run_id)
        delete_run(identity, namespace=self.namespace, kube=self.kube, github=self.github,
                   log=ProgressLog(None))

    def _after_run_end(self, record: RunRecord) -> RunRecord | None:
        """AWAITING_RUN_END: once the run completed with the lost job failed, re-run it."""
        identity = record.identity
        run = self.github.get_run_status(identity.repository, identity.run_id)
        if run is None:
            self.records.delete(identity)
            return None
        if run.attempt > record.serving_attempt:
            # Someone re-ran it already: its jobs still target this label; serve them.
            saved = self.records.save(record.with_changes(
                state=RecoveryState.REPLACING, serving_attempt=run.attempt))
            return self._clear_for_replacement(saved)
        if not run.completed:
            return None
        job = self._job_of(record)
        if job is None or job.conclusion != "failure":
            # Cancelled by a person, or it passed after all: nothing to re-run.
            self.records.delete(identity)
            return None
        saved = self.records.save(record.with_changes(
            state=RecoveryState.RERUN_REQUESTED, rerun_attempt=record.serving_attempt + 1))
        return self._rerun(saved)

    def _rerun(self, record: RunRecord) -> RunRecord | None:
        """RERUN_REQUESTED: ask GitHub for the re-run unless it was made, then replace."""
        identity = record.identity
        target = record.rerun_attempt or record.serving_attempt + 1
        run = self.github.get_run_status(identity.repository, identity.run_id)
        if run is None:
            self.records.delete(identity)
            return None
        if run.attempt < target:
            if not run.completed:
                return None  # not yet re-runnable; GitHub says so next pass
            self.actions.rerun_failed_jobs(identity.repository, identity.run_id)
            LOGGER.info("%s: re-ran the failed jobs of run %d as attempt %d",
                        identity.runner_name, identity.run_id, target)
        saved = self.records.save(record.with_changes(
            state=RecoveryState.REPLACING, serving_attempt=max(target, run.attempt),
            rerun_attempt=None))
        return self._clear_for_replacement(saved)

    def _clear_for_replacement(self, record: RunRecord) -> RunRecord:
        """Removes the lost pod, its Secret and its registration (the name is reused)."""
        delete_run(record.identity, namespace=self.namespace, kube=self.kube,
                   github=self.github, log=ProgressLog(None))
        return record

    def _forget(self, record: RunRecord, loss: Loss, action: str) -> None:
        self._count(loss, action)
        self.records.delete(record.identity)

    # --- DELETE's share --------------------------------------------------------------------------

    def records_for_delete(self, identity: RunIdentity) -> list[RunRecord]:
        """The records a run attempt's DELETE concerns: its own, and a record of the same run
        whose runner now serves this attempt (after a re-run)."""
        return [record for record in self.records.list(run_id=identity.run_id)
                if record.identity.repository_id == identity.repository_id
                and (record.identity.attempt == identity.attempt
                     or record.serving_attempt == identity.attempt)]

    def settle_for_delete(self, record: RunRecord, attempt: int) -> tuple[bool, list[str]]:
        """What a DELETE from attempt `attempt` does with a record.

        Returns:
            (keep, lines): keep the record when a recovery of its run is still to come (a job
            lost mid-run, re-run once the run completes); the lines say what happened.
        """
        lines = list(record.preemption_lines())
        pending = record.state in (RecoveryState.AWAITING_RUN_END,
                                   RecoveryState.RERUN_REQUESTED)
        if not pending and record.state is RecoveryState.ACTIVE and record.online and (
                record.serving_attempt == attempt):
            pod = self._pod(record.identity)
            loss = self.assess(record, pod)
            if loss is not None and loss.stage == "job":
                # The cleanup came before the pass that would have seen it: record it now,
                # or this DELETE would take the recovery's record with it.
                self._recover(record, loss, pod)
                record = self.records.read(record.identity) or record
                lines = list(record.preemption_lines())
                pending = record.state is RecoveryState.AWAITING_RUN_END
        if pending and record.serving_attempt == attempt:
            retry = f"retry {record.retries} of {self.policy.max_retries}"
            return True, [*lines, f"the run's failed jobs are re-run once the run completes "
                                  f"({retry})"]
        if record.state is RecoveryState.GAVE_UP:
            lines.append(f"maxPreemptionRetries ({self.policy.max_retries}) spent: not retried "
                         "again")
        return False, lines

    # --- small helpers ---------------------------------------------------------------------------

    def _pod(self, identity: RunIdentity) -> V1Pod | None:
        for pod in self.kube.list_pods(self.namespace, identity.label_selector):
            if pod.metadata is not None and identity.owns(pod.metadata.labels):
                return pod
        return None

    def _run_ended(self, record: RunRecord) -> bool:
        identity = record.identity
        try:
            run = self.github.get_run_status(identity.repository, identity.run_id)
        except GitHubError:
            return False
        return run is None or (run.completed and run.attempt <= record.serving_attempt)

    def _preemption(self, record: RunRecord, loss: Loss, retry_pool: str, *,
                    retried: bool) -> Preemption:
        return Preemption(attempt=record.serving_attempt, stage=loss.stage,
                          cause=loss.disruption.cause,
                          pool=loss.pool.name if loss.pool is not None else "",
                          retry_pool=retry_pool, at=self.now(), retried=retried)

    def _count(self, loss: Loss, action: str) -> None:
        pool = loss.pool.name if loss.pool is not None else ""
        self.metrics.preemptions.labels(stage=loss.stage, pool=pool, action=action).inc()


def spawn_preemption(record: RunRecord, policy: RecoveryPolicy, *, stage: str, cause: str,
                     node: str, now: datetime) -> tuple[RunRecord, Preemption] | None:
    """A spawn's pod was lost while starting: the record with the retry added, and the
    preemption, or None when the retries are spent."""
    lost = policy.lost_pool(record.request, node)
    if record.retries >= policy.max_retries:
        return None
    retry, retry_pool = policy.retry_request(record.request, lost)
    preemption = Preemption(attempt=record.serving_attempt, stage=stage, cause=cause,
                            pool=lost.name if lost is not None else "", retry_pool=retry_pool,
                            at=now)
    return record.with_changes(request=retry,
                               preemptions=(*record.preemptions, preemption)), preemption
