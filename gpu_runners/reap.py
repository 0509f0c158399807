"""`reap`: remove what cancelled or crashed runs left behind (the reaper CronJob runs it).

A pod created by gpu_runners is removed when it has finished (Succeeded/Failed), when it is
past its deadline (start plus activeDeadlineSeconds: a pod that never started has no kubelet
to enforce it), or when GitHub reports its workflow run completed. A live pod whose run is
still in progress, or whose run GitHub cannot tell about, is kept. Its Secret goes with it
(the pod owns it).

A `gpu-<run_id>-<attempt>` registration is removed when its pod is reaped now, or when it is
offline with no pod at all and (for repository runners) its run is not in progress. The
registrations are listed *before* the pods: spawn creates a run's pod before registering its
runner, so a registration seen first whose pod is missing afterwards can only be a leftover.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.errors import GitHubError, GpuRunnersError, RunnerBusyError
from gpu_runners.github_api import GitHubClient, Runner, RunStatus
from gpu_runners.kube import DEFAULT_PAGE_SIZE, KubeClient
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import parse_runner_name

#: A pod is past its deadline this long after start + activeDeadlineSeconds: the kubelet's
#: own enforcement gets the first chance, so reap only takes pods the kubelet cannot end.
DEADLINE_GRACE = timedelta(minutes=5)
#: Parallel API calls for run lookups and deletions: enough to reap thousands of pods in
#: seconds, few enough to stay far from API server and GitHub abuse limits.
DEFAULT_WORKERS = 8


@dataclass(frozen=True)
class ReapAction:
    """One removal: what ("pod" or "registration"), its name, and why."""

    kind: str
    name: str
    reason: str


@dataclass
class ReapReport:
    """What a reap pass removed (or, with dry_run, would remove), kept, and failed at."""

    removed: list[ReapAction] = field(default_factory=list)
    kept: list[ReapAction] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pods_seen: int = 0
    registrations_seen: int = 0

    def count(self, kind: str) -> int:
        """How many objects of a kind were removed."""
        return sum(1 for action in self.removed if action.kind == kind)


@dataclass(frozen=True)
class _RunKey:
    repository: str
    run_id: int


def _pod_run(pod: V1Pod) -> _RunKey | None:
    """The run a pod serves, from its run-id label and repository annotation."""
    metadata = pod.metadata
    labels = (metadata.labels if metadata else None) or {}
    annotations = (metadata.annotations if metadata else None) or {}
    run_id = labels.get(contract.LABEL_RUN_ID, "")
    repository = annotations.get(contract.ANNOTATION_REPOSITORY)
    if not run_id.isdigit() or not repository:
        return None
    return _RunKey(repository, int(run_id))


def _runner_name(pod: V1Pod) -> str:
    metadata = pod.metadata
    annotations = (metadata.annotations if metadata else None) or {}
    return annotations.get(contract.ANNOTATION_RUNNER_NAME) or (
        metadata.name if metadata and metadata.name else ""
    )


FINISHED_PHASES = ("Succeeded", "Failed")


def _finished_phase(pod: V1Pod) -> str | None:
    phase = pod.status.phase if pod.status else None
    return phase if phase in FINISHED_PHASES else None


def _finished_or_expired(pod: V1Pod, now: datetime) -> str | None:
    """Why a pod can go whatever its run does, or None."""
    status, spec, metadata = pod.status, pod.spec, pod.metadata
    phase = _finished_phase(pod)
    if phase is not None:
        reason = f": {status.reason}" if status and status.reason else ""
        return f"finished ({phase}{reason})"
    deadline = spec.active_deadline_seconds if spec else None
    started = (status.start_time if status else None) or (
        metadata.creation_timestamp if metadata else None
    )
    if deadline is not None and started is not None:
        age = now - started
        if age > timedelta(seconds=deadline) + DEADLINE_GRACE:
            return (
                f"past its deadline (started {_duration(age)} ago, max runtime "
                f"{_duration(timedelta(seconds=deadline))})"
            )
    return None


def _duration(delta: timedelta) -> str:
    seconds = int(delta.total_seconds())
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    return f"{seconds // 60}m{seconds % 60:02d}s"


def reap(
    *,
    namespace: str,
    kube: KubeClient,
    github: GitHubClient,
    log: ProgressLog,
    dry_run: bool = False,
    page_size: int = DEFAULT_PAGE_SIZE,
    workers: int = DEFAULT_WORKERS,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
) -> ReapReport:
    """Removes leftover GPU pods and runner registrations; prints each action and a count.

    Args:
        namespace: Namespace of the GPU pods.
        kube: Kubernetes client.
        github: GitHub client for the runner scope.
        log: Where one line per action, and the final count, go.
        dry_run: Only say what would be removed.
        page_size: Pods per list request.
        workers: Parallel GitHub lookups and deletions.
        now: Current time (UTC), replaceable in tests.

    Returns:
        What was removed, kept, and what failed (failures do not stop the pass).

    Raises:
        GitHubError, KubernetesError: Listing the registrations or the pods failed.
    """
    report = ReapReport()
    registrations = [r for r in github.list_runners() if parse_runner_name(r.name) is not None]
    report.registrations_seen = len(registrations)
    selector = f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"
    pods = list(kube.list_pods(namespace, selector, page_size=page_size))
    report.pods_seen = len(pods)
    moment = now()

    doomed: dict[str, tuple[V1Pod, str]] = {}
    undecided: list[V1Pod] = []
    for pod in pods:
        name = pod.metadata.name if pod.metadata and pod.metadata.name else ""
        if pod.metadata is not None and pod.metadata.deletion_timestamp:
            continue  # already on its way out
        reason = _finished_or_expired(pod, moment)
        if reason is not None:
            doomed[name] = (pod, reason)
        else:
            undecided.append(pod)

    runs = {run for run in map(_pod_run, undecided) if run is not None}
    with ThreadPoolExecutor(max_workers=workers) as pool:
        statuses = dict(zip(runs, pool.map(lambda run: _run_status(github, run, report), runs),
                            strict=True))
        for pod in undecided:
            name = pod.metadata.name if pod.metadata and pod.metadata.name else ""
            run = _pod_run(pod)
            lookup = statuses.get(run) if run is not None else None
            status = lookup.status if lookup is not None else None
            if run is not None and status is not None and status.completed:
                doomed[name] = (pod, f"workflow run {run.run_id} completed ({status.conclusion})")
            elif status is None:
                # Unknown to GitHub, or unreadable: the deadline will take it if nothing else.
                report.kept.append(ReapAction("pod", name, "run status unknown"))
            else:
                report.kept.append(ReapAction("pod", name, f"run {status.status}"))

        pod_runners = {_runner_name(pod) for pod in pods}
        reaped_runners = {_runner_name(pod) for pod, _ in doomed.values()}
        for name, (_pod, reason) in sorted(doomed.items()):
            _act(report, log, dry_run, ReapAction("pod", name, reason))
        if not dry_run:
            _delete_pods(kube, namespace, doomed, pool, report)

        orphans = _orphan_registrations(
            registrations, pod_runners, reaped_runners, github, report, pool
        )
        for runner, reason in orphans:
            _act(report, log, dry_run, ReapAction("registration", runner.name, reason))
        if not dry_run:
            failures = pool.map(
                lambda item: _try(lambda: github.delete_runner(item[0].id),
                                  f"registration {item[0].name}"),
                orphans,
            )
            report.failures += [failure for failure in failures if failure]

    for failure in report.failures:
        log.line(f"could not remove {failure}")
    verb = "would remove" if dry_run else "removed"
    log.line(
        f"{verb} {report.count('pod')} of {report.pods_seen} pods and "
        f"{report.count('registration')} of {report.registrations_seen} runner registrations; "
        f"kept {len(report.kept)} pods of runs in progress or unknown"
    )
    return report


@dataclass(frozen=True)
class _Lookup:
    """A run's status: known, unknown to GitHub (404: status None), or not obtained."""

    status: RunStatus | None
    failed: bool = False


def _run_status(github: GitHubClient, run: _RunKey, report: ReapReport) -> _Lookup:
    try:
        return _Lookup(github.get_run_status(run.repository, run.run_id))
    except GitHubError as e:
        report.failures.append(f"the status of run {run.run_id} ({e}); its objects are kept")
        return _Lookup(None, failed=True)


def _orphan_registrations(
    registrations: Iterable[Runner],
    pod_runners: set[str],
    reaped_runners: set[str],
    github: GitHubClient,
    report: ReapReport,
    pool: ThreadPoolExecutor,
) -> list[tuple[Runner, str]]:
    """The registrations to remove, with why."""
    chosen: list[tuple[Runner, str]] = []
    candidates: list[Runner] = []
    for runner in registrations:
        if runner.busy:
            continue  # running a job: never interrupt it
        if runner.name in reaped_runners:
            chosen.append((runner, "its pod is reaped"))
        elif runner.name not in pod_runners and not runner.online:
            candidates.append(runner)
    repository = github.scope.repository
    if repository is None:
        # Organisation runners do not say which repository's run they serve; offline with no
        # pod (after the list order above) is the evidence.
        return chosen + [(runner, "offline, no pod") for runner in candidates]

    def may_go(runner: Runner) -> bool:
        parsed = parse_runner_name(runner.name)
        assert parsed is not None  # only gpu-<run>-<attempt> names were kept
        lookup = _run_status(github, _RunKey(repository, parsed[0]), report)
        # A run GitHub does not know (404) needs no runner; a failed lookup keeps it.
        return not lookup.failed and (lookup.status is None or lookup.status.completed)

    for runner, removable in zip(candidates, pool.map(may_go, candidates), strict=True):
        if removable:
            chosen.append((runner, "offline, no pod"))
    return chosen


def _delete_pods(
    kube: KubeClient,
    namespace: str,
    doomed: dict[str, tuple[V1Pod, str]],
    pool: ThreadPoolExecutor,
    report: ReapReport,
) -> None:
    """Deletes the doomed pods one by one, several at a time.

    One request per pod keeps the reaper within the spawner Role (delete, not deletecollection)
    and selects nothing but the pods it examined.
    """
    failures = pool.map(
        lambda name: _try(lambda: kube.delete_pod(namespace, name), f"pod {name}"), sorted(doomed)
    )
    report.failures += [failure for failure in failures if failure]


def _act(report: ReapReport, log: ProgressLog, dry_run: bool, action: ReapAction) -> None:
    report.removed.append(action)
    verb = "would remove" if dry_run else "removing"
    log.line(f"{verb} {action.kind} {action.name}: {action.reason}")


def _try(step: Callable[[], object], what: str) -> str | None:
    try:
        step()
    except RunnerBusyError:
        return f"{what}: it started a job meanwhile"
    except GpuRunnersError as e:
        return f"{what}: {e}"
    return None
