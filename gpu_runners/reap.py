"""`reap`: remove what cancelled or crashed runs left behind (the broker's reconcile loop runs it).

A GPU pod created by gpu_runners is removed when one of these holds, tried in this order:

1. it has finished (Succeeded/Failed);
2. it is past its deadline (start plus activeDeadlineSeconds: a pod that never started has no
   kubelet to enforce it);
3. it has waited longer than a grace period for a JIT config Secret that does not exist:
   whoever created the pod died before creating its Secret, and the kubelet would hold the
   container, and its GPU node, until the deadline. The Secret is read with one GET per such
   pod (the spawner Role may get Secrets but not list them), and only for pods past the grace;
4. GitHub reports its workflow run completed.

Rules 1-3 need only Kubernetes and apply whatever GitHub does. A live pod whose run is still in
progress, or whose run GitHub cannot tell about, is kept. Its Secret goes with it (the pod owns
it, and the garbage collector removes a Secret whose owner is gone).

A `gpu-<run_id>-<attempt>` registration is removed when its pod is reaped now, or when it is
offline with no pod at all and (for repository runners) its run is not in progress. The
registrations are listed *before* the pods: spawn creates a run's pod before registering its
runner, so a registration seen first whose pod is missing afterwards can only be a leftover.

Nothing of a run in `busy_runs` (an operation in flight in the broker) is touched: not its pod,
not its Secret, not its registration.

When GitHub cannot be asked (it is down, or its runner list is unusable), rule 4 and the
registration rules are skipped for the pass, with the reason logged and counted among the
failures; one malformed entry in the runner list is skipped alone.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.errors import GitHubError, GpuRunnersError, KubernetesError, RunnerBusyError
from gpu_runners.github_api import GitHubClient, Runner, RunStatus
from gpu_runners.kube import DEFAULT_PAGE_SIZE, KubeClient
from gpu_runners.pod_spec import JIT_VOLUME
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import parse_runner_name, run_key_from_labels

#: A pod is past its deadline this long after start + activeDeadlineSeconds: the kubelet's
#: own enforcement gets the first chance, so reap only takes pods the kubelet cannot end.
DEADLINE_GRACE = timedelta(minutes=5)
#: How long a pod may wait for its JIT config Secret before reap takes it. Spawn creates the
#: Secret a GitHub request after the pod, so a live spawn never comes near it.
DEFAULT_SECRET_GRACE = timedelta(minutes=10)
#: Parallel API calls for run lookups and deletions: enough to reap thousands of pods in
#: seconds, few enough to stay far from API server and GitHub abuse limits.
DEFAULT_WORKERS = 8
FINISHED_PHASES = ("Succeeded", "Failed")

#: (run id, attempt) of a run.
RunAttempt = tuple[int, int]


@dataclass(frozen=True)
class ReapAction:
    """One removal: what ("pod" or "registration"), its name, and why."""

    kind: str
    name: str
    reason: str


@dataclass
class ReapReport:
    """What a reap pass removed (or, with dry_run, would remove), kept, and failed at.

    Attributes:
        removed: Each removal, with its reason.
        kept: Each live pod kept, with why.
        failures: One line per thing that could not be done or checked (a deletion, a run
            lookup, the runner list); the pass went on without it.
        pods_seen: GPU pods listed.
        registrations_seen: `gpu-` registrations listed; None when they could not be listed.
    """

    removed: list[ReapAction] = field(default_factory=list)
    kept: list[ReapAction] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)
    pods_seen: int = 0
    registrations_seen: int | None = 0

    def count(self, kind: str) -> int:
        """How many objects of a kind were removed."""
        return sum(1 for action in self.removed if action.kind == kind)


@dataclass(frozen=True)
class _RunRef:
    """A workflow run as GitHub's API addresses it."""

    repository: str
    run_id: int


def _pod_run(pod: V1Pod) -> _RunRef | None:
    """The run a pod serves, from its run-id label and repository annotation."""
    metadata = pod.metadata
    labels = (metadata.labels if metadata else None) or {}
    annotations = (metadata.annotations if metadata else None) or {}
    run_id = labels.get(contract.LABEL_RUN_ID, "")
    repository = annotations.get(contract.ANNOTATION_REPOSITORY)
    if not run_id.isdigit() or not repository:
        return None
    return _RunRef(repository, int(run_id))


def _pod_name(pod: V1Pod) -> str:
    return pod.metadata.name if pod.metadata and pod.metadata.name else ""


def _runner_name(pod: V1Pod) -> str:
    metadata = pod.metadata
    annotations = (metadata.annotations if metadata else None) or {}
    return annotations.get(contract.ANNOTATION_RUNNER_NAME) or _pod_name(pod)


def _pod_attempt(pod: V1Pod) -> RunAttempt | None:
    """(run id, attempt) of a pod, from its labels or else its runner name."""
    key = run_key_from_labels(pod.metadata.labels if pod.metadata else None)
    if key is not None:
        return key.run_id, key.attempt
    return parse_runner_name(_runner_name(pod))


def _finished_or_expired(pod: V1Pod, now: datetime) -> str | None:
    """Why a pod can go whatever its run does (rules 1 and 2), or None."""
    status, spec, metadata = pod.status, pod.spec, pod.metadata
    phase = status.phase if status else None
    if phase in FINISHED_PHASES:
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


def _awaited_secret(pod: V1Pod, now: datetime, grace: timedelta) -> tuple[str, timedelta] | None:
    """The JIT Secret a pod has waited for longer than `grace` (rule 3), and for how long.

    Only a pod whose runner container never started can be waiting: a started one has read
    its config already.
    """
    status, spec, metadata = pod.status, pod.spec, pod.metadata
    if (status.phase if status else None) not in (None, "Pending"):
        return None
    for container in (status.container_statuses if status else None) or ():
        state = container.state
        if state is not None and (state.running is not None or state.terminated is not None):
            return None
    created = metadata.creation_timestamp if metadata else None
    if created is None or now - created <= grace:
        return None
    for volume in (spec.volumes if spec else None) or ():
        if volume.name == JIT_VOLUME and volume.secret is not None and volume.secret.secret_name:
            return volume.secret.secret_name, now - created
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
    busy_runs: Collection[RunAttempt] = (),
    secret_grace: timedelta = DEFAULT_SECRET_GRACE,
    left_to_recovery: Callable[[V1Pod], bool] = lambda pod: False,
    before_removal: Callable[[V1Pod], None] = lambda pod: None,
) -> ReapReport:
    """Removes leftover GPU pods and runner registrations; prints each action and a count.

    Args:
        namespace: Namespace of the GPU pods.
        kube: Kubernetes client.
        github: GitHub client for the runner scope.
        log: Where one line per action, per failure, and the final count go.
        dry_run: Only say what would be removed.
        page_size: Pods per list request.
        workers: Parallel Secret reads, GitHub lookups and deletions.
        now: Current time (UTC), replaceable in tests.
        busy_runs: (run id, attempt) of the runs with an operation in flight; nothing of
            theirs is touched. Consulted when each pod is judged and again just before the
            removals, so a live view (the broker's set of runs in flight) narrows the window.
        secret_grace: How long a pod may wait for its JIT config Secret (rule 3).
        left_to_recovery: Whether a pod is the broker's preemption recovery's to handle (lost
            to its node, with a run record): such a pod is kept.
        before_removal: Called with each pod just before it is deleted (the broker drops the
            run's record first, so a reaped pod is never mistaken for one lost to its node).

    Returns:
        What was removed, kept, and what failed (failures do not stop the pass).

    Raises:
        KubernetesError: Listing the pods failed: without them there is nothing to judge.
    """
    report = ReapReport()
    registrations = _list_registrations(github, report)
    report.registrations_seen = None if registrations is None else len(registrations)
    selector = f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}"
    pods = list(kube.list_pods(namespace, selector, page_size=page_size))
    report.pods_seen = len(pods)
    moment = now()

    def busy(attempt: RunAttempt | None) -> bool:
        return attempt is not None and attempt in busy_runs

    doomed: dict[str, tuple[V1Pod, str]] = {}
    awaiting: list[tuple[V1Pod, str, timedelta]] = []
    undecided: list[V1Pod] = []
    for pod in pods:
        name = _pod_name(pod)
        if pod.metadata is not None and pod.metadata.deletion_timestamp:
            continue  # already on its way out
        if busy(_pod_attempt(pod)):
            report.kept.append(ReapAction("pod", name, "an operation on its run is in flight"))
            continue
        if left_to_recovery(pod):
            report.kept.append(ReapAction("pod", name, "lost to its node: recovery's to handle"))
            continue
        reason = _finished_or_expired(pod, moment)
        awaited = _awaited_secret(pod, moment, secret_grace) if reason is None else None
        if reason is not None:
            doomed[name] = (pod, reason)
        elif awaited is not None:
            awaiting.append((pod, *awaited))
        else:
            undecided.append(pod)

    with ThreadPoolExecutor(max_workers=workers) as pool:
        secrets_found = pool.map(
            lambda item: _secret_exists(kube, namespace, item[1], report), awaiting
        )
        for (pod, secret, waited), found in zip(awaiting, secrets_found, strict=True):
            if found is False:
                doomed[_pod_name(pod)] = (
                    pod, f"waited {_duration(waited)} for its JIT config Secret {secret}, "
                    "which does not exist",
                )
            else:
                undecided.append(pod)

        if registrations is None:
            for pod in undecided:
                report.kept.append(ReapAction("pod", _pod_name(pod), "GitHub not asked"))
        else:
            _judge_by_run_status(github, undecided, doomed, report, pool)

        # The GitHub lookups took a while: a run may have become busy meanwhile.
        for name, (pod, _reason) in list(doomed.items()):
            if busy(_pod_attempt(pod)):
                del doomed[name]
                report.kept.append(ReapAction("pod", name, "an operation on its run began"))
        for name, (_pod, reason) in sorted(doomed.items()):
            _act(report, log, dry_run, ReapAction("pod", name, reason))
        if not dry_run:
            _delete_pods(kube, namespace, doomed, pool, report, before_removal)

        if registrations is not None:
            pod_runners = {_runner_name(pod) for pod in pods}
            reaped_runners = {_runner_name(pod) for pod, _ in doomed.values()}
            orphans = [
                (runner, reason)
                for runner, reason in _orphan_registrations(
                    registrations, pod_runners, reaped_runners, github, report, pool
                )
                if not busy(parse_runner_name(runner.name))
            ]
            for runner, reason in orphans:
                _act(report, log, dry_run, ReapAction("registration", runner.name, reason))
            if not dry_run:
                failures = pool.map(
                    lambda item: _try(lambda: github.delete_runner(item[0].id),
                                      f"registration {item[0].name}"),
                    orphans,
                )
                report.failures += [f"could not remove {f}" for f in failures if f]

    for failure in report.failures:
        log.line(failure)
    log.line(_summary(report, dry_run))
    return report


def _summary(report: ReapReport, dry_run: bool) -> str:
    verb = "would remove" if dry_run else "removed"
    parts = [f"{verb} {report.count('pod')} of {report.pods_seen} pods"]
    if report.registrations_seen is None:
        parts.append("runner registrations not listed")
    else:
        parts[0] += (
            f" and {report.count('registration')} of {report.registrations_seen} runner "
            "registrations"
        )
    parts.append(f"kept {len(report.kept)} pods")
    if report.failures:
        parts.append(f"{len(report.failures)} failures")
    return "; ".join(parts)


def _list_registrations(github: GitHubClient, report: ReapReport) -> list[Runner] | None:
    """The `gpu-` registrations, or None when GitHub cannot list them (rules skipped)."""
    try:
        runners = list(github.list_runners(on_malformed=lambda problem: report.failures.append(
            f"skipped one runner registration: {problem}"
        )))
    except GitHubError as e:
        report.failures.append(
            f"could not list the runner registrations ({e}); skipped the rules that need GitHub"
        )
        return None
    return [runner for runner in runners if parse_runner_name(runner.name) is not None]


def _secret_exists(kube: KubeClient, namespace: str, name: str, report: ReapReport) -> bool | None:
    """Whether a Secret exists; None when it could not be read (the pod is then kept)."""
    try:
        return kube.read_secret(namespace, name) is not None
    except KubernetesError as e:
        report.failures.append(f"could not read Secret {name} ({e}); its pod is kept")
        return None


@dataclass(frozen=True)
class _Lookup:
    """A run's status: known, unknown to GitHub (404: status None), or not obtained."""

    status: RunStatus | None
    failed: bool = False


def _run_status(github: GitHubClient, run: _RunRef, report: ReapReport) -> _Lookup:
    try:
        return _Lookup(github.get_run_status(run.repository, run.run_id))
    except GitHubError as e:
        report.failures.append(
            f"could not read the status of run {run.run_id} ({e}); its objects are kept"
        )
        return _Lookup(None, failed=True)


def _judge_by_run_status(
    github: GitHubClient,
    undecided: list[V1Pod],
    doomed: dict[str, tuple[V1Pod, str]],
    report: ReapReport,
    pool: ThreadPoolExecutor,
) -> None:
    """Rule 4: dooms the pods whose run GitHub reports completed; keeps the others."""
    runs = {run for run in map(_pod_run, undecided) if run is not None}
    statuses = dict(
        zip(runs, pool.map(lambda run: _run_status(github, run, report), runs), strict=True)
    )
    for pod in undecided:
        name = _pod_name(pod)
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
        lookup = _run_status(github, _RunRef(repository, parsed[0]), report)
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
    before_removal: Callable[[V1Pod], None],
) -> None:
    """Deletes the doomed pods one by one, several at a time.

    One request per pod keeps the reaper within the spawner Role (delete, not deletecollection)
    and selects nothing but the pods it examined.
    """
    def remove(name: str) -> bool:
        before_removal(doomed[name][0])
        return kube.delete_pod(namespace, name)

    failures = pool.map(lambda name: _try(lambda: remove(name), f"pod {name}"), sorted(doomed))
    report.failures += [f"could not remove {failure}" for failure in failures if failure]


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
