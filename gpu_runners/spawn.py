"""`spawn`: start this run's GPU runner pod and wait until its runner is online on GitHub.

The order of the steps is deliberate:

1. **Pod first.** The Pod must exist before its Secret can name it as owner, and creating it
   first means a ResourceQuota refusal is waited out before any runner is registered, and
   that the reaper can never see a registration whose pod is still to come. The kubelet
   holds the container until the Secret it mounts exists.
2. **Then the JIT runner config** (`gpu-<run_id>-<attempt>`, single use, one job), and the
   Secret holding it, owned by the Pod so that deleting the Pod removes it.
3. **Then watch** the pod and its events (no polling of Kubernetes) and, once the container
   runs, follow its log: the runner prints "Listening for Jobs" once it has connected, and
   only then is GitHub asked, once, whether it is online (GitHub cannot push it, and polling
   spends the token's rate limit). GitHub is polled slowly only as a fallback: while the
   log cannot be read, or when the line has not come after a grace period. Log lines are
   the job's output too: they are matched, never printed or kept. A pod bound to a node the
   autoscaler added for it costs one more request: a GET of that node, whose Ready time
   splits the cold start's "node ready" from "driver ready" (gpu_runners/node_timing.py).

Any failure, SIGINT/SIGTERM (raised as `Interrupted` by the CLI), and a set `cancel` event
(the broker's DELETE for the run) remove what this spawn created or adopted: the pod (and
with it the Secret), the Secret, the registration. A second spawn for the same run and
attempt adopts the first one's pod and registration when they are still usable, instead of
failing on the name clash.
"""

from __future__ import annotations

import contextlib
import re
import threading
import time
from collections.abc import Callable, Iterable
from contextlib import AbstractContextManager
from dataclasses import dataclass

import urllib3
from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.broker_api import SpawnResult
from gpu_runners.errors import (
    AlreadyExistsError,
    GitHubConflictError,
    GpuRunnersError,
    KubernetesError,
    NoCapacityError,
    PodFailedError,
    QuotaExceededError,
    SpawnCancelledError,
    WaitTimeoutError,
)
from gpu_runners.github_api import (
    DEFAULT_RUNNER_GROUP_ID,
    GitHubClient,
    JitRunner,
    RetryPolicy,
    Runner,
)
from gpu_runners.kube import (
    CLEANUP_TIMEOUTS,
    KubeClient,
    KubeTimeouts,
    LogSignal,
    WatchFeed,
    stream_watch,
)
from gpu_runners.node_timing import node_ready_at
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.pod_progress import Notice, PodProgress, Stage
from gpu_runners.pod_spec import ANY_GPU_TYPE, build_gpu_pod, build_jit_secret
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import RunIdentity

DEFAULT_WAIT_TIMEOUT_SECONDS = 20 * 60
DEFAULT_SCALE_UP_GRACE_SECONDS = 120.0
#: The line the Actions runner prints once its session with GitHub exists, i.e. once GitHub
#: lists it online: `{DateTime.UtcNow:u}: Listening for Jobs` (actions/runner,
#: src/Runner.Listener/Runner.cs, RunAsync, which a JIT runner reaches too). Matched
#: loosely at the end of the line: a miss costs LOG_SILENCE_GRACE_SECONDS, a false match one
#: GitHub request.
RUNNER_LISTENING_LINE = re.compile(r"Listening for Jobs\s*$")
#: GitHub poll interval when the log cannot tell: it cannot be read (RBAC, a broken stream)
#: or stayed silent past the grace period. Slow, because the rate limit (5,000 requests an
#: hour per token) is shared by every concurrent run.
ONLINE_FALLBACK_INTERVAL = 5.0
#: Seconds after the container starts that spawn waits for the line before polling GitHub:
#: a runner connects within seconds, so a longer silence suggests an image that logs
#: elsewhere.
LOG_SILENCE_GRACE_SECONDS = 30.0
#: After the line, GitHub is asked at once; should it not list the runner online yet (its
#: view lags), again every LINE_CONFIRM_INTERVAL for LINE_CONFIRM_SECONDS.
LINE_CONFIRM_INTERVAL = 0.5
LINE_CONFIRM_SECONDS = 5.0
#: Longest wait for a quota-blocked create before trying again even without a pod going away
#: (the quota itself may be raised).
QUOTA_RETRY_MAX_INTERVAL = 30.0
#: Longest stretch the wait loop sleeps without looking at its `cancel` event.
CANCEL_CHECK_SECONDS = 0.25
#: Retries of GitHub calls made while cleaning up: GitHub Actions kills a cancelled step
#: 7.5 s after SIGINT, so cleanup must not wait long on any one call.
CLEANUP_GITHUB_POLICY = RetryPolicy(attempts=2, backoff_base=0.1, backoff_max=0.5, max_wait=1.0,
                                    timeout=3.0)
#: The one read of a new node, for the cold start's split only: short, never worth a delay.
NODE_READ_TIMEOUTS = KubeTimeouts(connect=2.0, read=5.0, attempts=2, backoff_base=0.1)


@dataclass(frozen=True)
class SpawnRequest:
    """Everything `spawn` needs to know, validated before any API call.

    Attributes:
        identity: The run attempt the runner serves.
        pod: Image, GPU count, sizes, deadline and labels of the pod.
        gpu_types: Accelerators to try in order when one has no capacity; empty for any pool.
        wait_timeout_seconds: Longest wait, from start to runner online, quota waits included.
        scale_up_grace_seconds: How long an unschedulable pod may wait for the autoscaler to
            start a scale-up before the GPU type counts as unavailable.
        runner_group_id: Runner group of the registration (1, Default, for repositories).
        online_poll_seconds: Interval of the fallback GitHub poll (see ONLINE_FALLBACK_INTERVAL).
        log_silence_seconds: How long the log may stay without the runner's "Listening for
            Jobs" line before the fallback poll starts (see LOG_SILENCE_GRACE_SECONDS).
    """

    identity: RunIdentity
    pod: RunnerPodOptions
    gpu_types: tuple[str, ...] = ()
    wait_timeout_seconds: float = DEFAULT_WAIT_TIMEOUT_SECONDS
    scale_up_grace_seconds: float = DEFAULT_SCALE_UP_GRACE_SECONDS
    runner_group_id: int = DEFAULT_RUNNER_GROUP_ID
    online_poll_seconds: float = ONLINE_FALLBACK_INTERVAL
    log_silence_seconds: float = LOG_SILENCE_GRACE_SECONDS

    def __post_init__(self) -> None:
        for name in ("online_poll_seconds", "log_silence_seconds"):
            value = getattr(self, name)
            if not value > 0:
                raise ValueError(f"SpawnRequest.{name} must be a number of seconds > 0, got "
                                 f"{value!r}")

    @property
    def runner_labels(self) -> list[str]:
        """The labels the runner registers with: only the one unique to this run attempt.

        With a shared label such as `self-hosted`, a job asking only for that label could take
        another run's idle runner, and that run would hang. A JIT registration carries exactly
        the labels it is given: the runner's default labels come from config.sh, which a JIT
        runner never runs.
        """
        return [self.identity.runner_name]


@dataclass
class _Owned:
    """What this spawn created or adopted, i.e. what a failure must remove.

    Each flag is set *before* the create request is sent: a signal that arrives while the
    request is in flight must still remove what the server may have created. The names are
    this run attempt's own, so removing by name cannot hit another run's objects.
    """

    pod: bool = False
    pod_uid: str | None = None
    secret: bool = False
    registration: bool = False
    runner_id: int | None = None


@dataclass
class _OnlineChecks:
    """When to ask GitHub whether the runner is online (see the module docstring, step 3).

    Attributes:
        poll_interval: Interval of the fallback poll.
        silence_grace: Seconds of running without the line before the fallback poll starts.
        running_at: When the container was seen running; None before.
        log_readable: False from a failed log read until a follow is open again.
        line_seen_at: When the "Listening for Jobs" line was read.
        next_at: When to ask next; None while there is nothing to ask yet.
    """

    poll_interval: float
    silence_grace: float
    running_at: float | None = None
    log_readable: bool = True
    line_seen_at: float | None = None
    next_at: float | None = None

    def container_running(self, now: float, *, adopted_running: bool) -> None:
        """The container runs: wait for the line, or ask at once for a pod adopted running
        (its runner may have connected long ago, its line beyond the log's re-read tail)."""
        self.running_at = now
        self.next_at = now if adopted_running else now + self.silence_grace

    def line_seen(self, now: float) -> None:
        """The runner says it is connected: ask now."""
        self.line_seen_at = now
        self.next_at = now

    def log_failed(self, now: float) -> bool:
        """The log cannot be read: ask now (the line may have come meanwhile), then poll.

        Returns:
            True if the log was readable until now (worth telling once).
        """
        was_readable, self.log_readable = self.log_readable, False
        if was_readable and self.next_at is not None:
            self.next_at = min(self.next_at, now)
        return was_readable

    def asked(self, now: float) -> None:
        """GitHub did not list the runner online: decide when to ask again."""
        assert self.running_at is not None  # only asked once the container runs
        if self.line_seen_at is not None and now - self.line_seen_at < LINE_CONFIRM_SECONDS:
            self.next_at = now + LINE_CONFIRM_INTERVAL
        elif not self.log_readable or now >= self.running_at + self.silence_grace:
            self.next_at = now + self.poll_interval
        else:
            self.next_at = self.running_at + self.silence_grace


@dataclass(frozen=True)
class _Adopted:
    """An earlier spawn's pod for this run, and what of its registration is usable."""

    pod: V1Pod
    runner: Runner | None
    secret_exists: bool


def spawn(
    request: SpawnRequest,
    *,
    kube: KubeClient,
    github: GitHubClient,
    log: ProgressLog,
    clock: Callable[[], float] = time.monotonic,
    cancel: threading.Event | None = None,
    admission: PodAdmission | None = None,
) -> SpawnResult:
    """Starts the run's GPU runner and returns once GitHub reports it online.

    Args:
        request: What to start.
        kube: Kubernetes client (namespace taken from the request).
        github: GitHub client for the runner scope.
        log: Where progress lines go.
        clock: Monotonic clock (the same one `log` uses).
        cancel: When set, the spawn stops between steps (within CANCEL_CHECK_SECONDS while
            it waits), removes what it owns and raises SpawnCancelledError.
        admission: Entered around each pod create (see PodAdmission), e.g. the broker's
            per-repository GPU cap.

    Returns:
        Where the runner runs and how long each stage took.

    Raises:
        NoCapacityError: No GPU type of the list can be scheduled and no scale-up is coming.
        ImagePullError: The runner image cannot be pulled.
        PodFailedError: The pod failed or was deleted before the runner came online.
        WaitTimeoutError: The runner was not online within the wait timeout.
        GitHubError, KubernetesError: An API call failed after retries.
        SpawnCancelledError: `cancel` was set; what was created is removed first.
        Interrupted: SIGINT/SIGTERM arrived (from the CLI); what was created is removed first.
    """
    return _Spawn(request, kube=kube, github=github, log=log, clock=clock, cancel=cancel,
                  admission=admission).run()


#: Entered just before each pod create is sent and left once it is answered (an exception of
#: the create passes through it). It may raise QuotaExceededError (or a subclass) to refuse
#: the create for now, which spawn waits out like a ResourceQuota refusal; so it can check a
#: limit and reserve room for the pod atomically, and give the room back if the create fails.
PodAdmission = Callable[[], AbstractContextManager[object]]


class _Spawn:
    """One spawn: its state (what it owns so far) and its steps."""

    def __init__(
        self,
        request: SpawnRequest,
        *,
        kube: KubeClient,
        github: GitHubClient,
        log: ProgressLog,
        clock: Callable[[], float],
        cancel: threading.Event | None = None,
        admission: PodAdmission | None = None,
    ) -> None:
        self.request = request
        self.cancel = cancel
        self.admission: PodAdmission = admission or contextlib.nullcontext
        self.identity = request.identity
        self.namespace = request.pod.namespace
        self.kube = kube
        self.github = github
        self.log = log
        self.clock = clock
        self.start = clock()
        self.deadline = self.start + request.wait_timeout_seconds
        self.owned = _Owned()
        self.reused = False
        self.pod_created_at = self.start
        #: The PodProgress whose new node was read (one GET per pod, see _time_new_node).
        self._node_timed: PodProgress | None = None

    # --- the whole flow ------------------------------------------------------------------------

    def run(self) -> SpawnResult:
        name = self.identity.runner_name
        self.log.line(f"spawning GPU runner {name} for {self.identity.run_url}")
        try:
            return self._try_gpu_types()
        except BaseException as failure:  # Interrupted included: cleanup must run for signals
            self._clean_up(failure)
            raise

    def _try_gpu_types(self) -> SpawnResult:
        candidates: tuple[str | None, ...] = self.request.gpu_types or (None,)
        refusals: list[str] = []
        jit: JitRunner | None = None
        for index, gpu_type in enumerate(candidates):
            self._check_cancel()
            pod, adopted = self._create_or_adopt_pod(gpu_type)
            self._check_cancel()
            jit = self._register(pod, adopted, jit)
            self._check_cancel()
            try:
                return self._wait_online(pod)
            except NoCapacityError as e:
                refusals.append(str(e))
                if index + 1 == len(candidates):
                    break
                self.log.line(f"{e}; trying {candidates[index + 1]} next")
                # The runner never started, so its single-use config is still unused: keep
                # the registration and hand the same config to the next pod.
                self._remove_pod(pod)
        raise NoCapacityError("; ".join(refusals))

    # --- step 1: the pod -----------------------------------------------------------------------

    def _create_or_adopt_pod(self, gpu_type: str | None) -> tuple[V1Pod, _Adopted | None]:
        body = build_gpu_pod(self.identity, self.request.pod, gpu_type)
        quota_wait = 1.0
        told_quota = ""
        while True:
            self._check_cancel()
            try:
                with self.admission():
                    self.owned.pod = True
                    pod = self.kube.create_pod(self.namespace, body)
            except AlreadyExistsError:
                self.owned.pod = False  # that pod is not (yet) ours
                adopted = self._adoptable_pod()
                if adopted is not None:
                    return adopted.pod, adopted
                continue  # the earlier pod is gone now: create ours
            except QuotaExceededError as e:
                self.owned.pod = False  # refused: nothing was created
                if str(e) != told_quota:
                    self.log.line(f"waiting for GPU quota: {e}")
                    told_quota = str(e)
                self._wait_for_released_pod(quota_wait, e)
                quota_wait = min(quota_wait * 2, QUOTA_RETRY_MAX_INTERVAL)
                continue
            self.owned.pod_uid = _uid(pod)
            self.pod_created_at = self.clock()
            gpus = f"{self.request.pod.gpu_count} x {gpu_type or 'any GPU'}"
            self.log.line(f"created pod {_name(pod)} in namespace {self.namespace} ({gpus})")
            return pod, None

    def _adoptable_pod(self) -> _Adopted | None:
        """Looks at the pod that blocks ours; returns it if it can be reused, else removes it."""
        name = self.identity.pod_name
        existing = self.kube.read_pod(self.namespace, name)
        if existing is None:
            return None
        labels = existing.metadata.labels if existing.metadata else None
        if not self.identity.owns(labels):
            raise KubernetesError(
                f"pod {name} exists in namespace {self.namespace} but does not carry this "
                f"run's labels ({self.identity.label_selector}); refusing to touch it"
            )
        phase = existing.status.phase if existing.status else None
        deleting = existing.metadata is not None and existing.metadata.deletion_timestamp
        if phase not in ("Failed", "Succeeded") and not deleting:
            runner = self.github.find_runner(self.identity.runner_name)
            secret = self.kube.read_secret(self.namespace, self.identity.secret_name)
            started = _container_started(existing)
            # A started container has consumed its JIT config: without the registration it
            # belongs to, that pod can never take the job.
            if (runner is not None and secret is not None) or not started:
                self.reused = True
                self.owned.pod, self.owned.pod_uid = True, _uid(existing)
                self.pod_created_at = self.clock()
                self.log.line(f"reusing pod {name} of an earlier spawn for this run")
                return _Adopted(existing, runner, secret is not None)
        self.log.line(f"removing pod {name} of an earlier spawn for this run: it cannot be reused")
        self._remove_pod(existing)
        return None

    def _remove_pod(self, pod: V1Pod) -> None:
        name, uid = _name(pod), _uid(pod)
        self.kube.delete_pod(self.namespace, name, grace_seconds=0)
        # The Secret is owned by the pod, but garbage collection is asynchronous: delete it now
        # so the next Secret of this name can be created at once.
        self.kube.delete_secret(self.namespace, self.identity.secret_name)
        self.owned.secret = False
        if not self.kube.wait_pod_gone(self.namespace, name, uid, self._remaining()):
            raise WaitTimeoutError(f"pod {name} was still terminating when the wait timed out")
        if self.owned.pod_uid == uid:
            self.owned.pod, self.owned.pod_uid = False, None

    def _wait_for_released_pod(self, seconds: float, cause: QuotaExceededError) -> None:
        """Waits until a gpu_runners pod ends or goes (freeing quota), or `seconds` pass.

        With a `cancel` event the wait is cut into one-second watches resumed from the last
        resource version, so a cancel is noticed within about a second and no event is missed.
        """
        remaining = self._remaining()
        if remaining <= 0:
            raise WaitTimeoutError(
                f"GPU quota still exhausted after {self.request.wait_timeout_seconds:.0f}s: "
                f"{cause}"
            ) from cause
        until = self.clock() + min(seconds, remaining)
        window = max(1, round(min(seconds, remaining)))
        if self.cancel is not None:
            window = 1  # the shortest watch the API takes
        version: str | None = None
        timeouts = self.kube.timeouts
        while True:
            try:
                for event in stream_watch(
                    self.kube.core.list_namespaced_pod,
                    self.namespace,
                    label_selector=f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY}",
                    resource_version=version,
                    timeout_seconds=window,
                    request_timeout=(timeouts.connect, window + timeouts.connect),
                ):
                    version = event.resource_version or version
                    phase = getattr(getattr(event.object, "status", None), "phase", None)
                    if event.type == "DELETED" or (
                        event.type == "MODIFIED" and phase in ("Succeeded", "Failed")
                    ):
                        return
            except urllib3.exceptions.HTTPError:
                return  # the window's read timeout, or a dropped watch: try the create again
            except KubernetesError as e:
                if e.status != 410:
                    raise
                return  # the resumed version is too old to watch from: try the create again
            self._check_cancel()
            if self.cancel is None or self.clock() >= until:
                return

    # --- step 2: the registration and its Secret -----------------------------------------------

    def _register(
        self, pod: V1Pod, adopted: _Adopted | None, jit: JitRunner | None
    ) -> JitRunner | None:
        """Makes sure the run has a registration and the pod its Secret; returns the config."""
        if adopted is not None and adopted.runner is not None and adopted.secret_exists:
            self.owned.registration, self.owned.runner_id = True, adopted.runner.id
            self.owned.secret = True
            self.log.line(f"reusing runner registration {adopted.runner.name}")
            return None
        if adopted is not None and adopted.runner is not None:
            # Registered, but its config was lost with the earlier spawn: start over.
            self.github.delete_runner(adopted.runner.id)
            jit = None
        if adopted is not None and adopted.secret_exists:
            self.kube.delete_secret(self.namespace, self.identity.secret_name)
        if jit is None:
            jit = self._mint()
        self._create_secret(pod, jit)
        return jit

    def _mint(self) -> JitRunner:
        name = self.identity.runner_name
        labels = self.request.runner_labels
        group = self.request.runner_group_id
        self.owned.registration = True
        try:
            jit = self.github.generate_jit_config(name, labels, runner_group_id=group)
        except GitHubConflictError:
            stale = self.github.find_runner(name)
            if stale is not None:
                if stale.busy:
                    raise PodFailedError(
                        f"runner {name} is registered and running a job, but not in pod "
                        f"{self.identity.pod_name}; run `delete` for this run first"
                    ) from None
                self.log.line(f"removing stale runner registration {name} (id {stale.id})")
                self.github.delete_runner(stale.id)
            jit = self.github.generate_jit_config(name, labels, runner_group_id=group)
        self.owned.runner_id = jit.runner.id
        self.log.line(
            f"registered JIT runner {name} (id {jit.runner.id}, labels {', '.join(labels)})"
        )
        return jit

    def _create_secret(self, pod: V1Pod, jit: JitRunner) -> None:
        secret = build_jit_secret(
            self.identity, namespace=self.namespace, owner=pod, jit_config=jit.encoded_jit_config
        )
        self.owned.secret = True
        try:
            self.kube.create_secret(self.namespace, secret)
        except AlreadyExistsError:
            # Left by an earlier pod of this run (its garbage collection is pending), or made
            # by our own create whose answer was lost: replace it with this config.
            self.kube.delete_secret(self.namespace, self.identity.secret_name)
            self.kube.create_secret(self.namespace, secret)

    # --- step 3: wait ----------------------------------------------------------------------------

    def _wait_online(self, pod: V1Pod) -> SpawnResult:
        name, uid = _name(pod), _uid(pod)
        labels = (pod.metadata.labels if pod.metadata else None) or {}
        gpu_type = labels.get(contract.LABEL_GPU_TYPE)
        progress = PodProgress(
            name,
            gpu_type=None if gpu_type in (None, ANY_GPU_TYPE) else gpu_type,
            scale_up_grace=self.request.scale_up_grace_seconds,
            now=self.pod_created_at,
        )
        checks = _OnlineChecks(self.request.online_poll_seconds, self.request.log_silence_seconds)
        runner_id = self.owned.runner_id
        assert runner_id is not None  # _register always leaves one
        with WatchFeed(self.kube, self.namespace) as feed:
            feed.watch_pods("pod", field_selector=f"metadata.name={name}")
            feed.watch_events("event", field_selector=f"involvedObject.name={name}")
            self._say(progress.observe_pod(pod, self.clock()))
            self._time_new_node(progress)
            if progress.container_running:
                self._follow_runner_log(feed, name, checks, adopted_running=True)
            while True:
                self._check_cancel()
                now = self.clock()
                progress.check_timers(now)
                if checks.next_at is not None and now >= checks.next_at:
                    runner = self.github.get_runner(runner_id)
                    if runner is None:
                        raise PodFailedError(
                            f"runner registration {self.identity.runner_name} disappeared "
                            "before the runner was seen online"
                        )
                    if runner.online:
                        self._say(progress.mark_online(self.clock()))
                        self._time_new_node(progress)
                        return self._result(progress, gpu_type or ANY_GPU_TYPE)
                    checks.asked(self.clock())
                if now >= self.deadline:
                    raise WaitTimeoutError(
                        f"runner {self.identity.runner_name} not online after "
                        f"{self.request.wait_timeout_seconds:.0f}s (last stage: "
                        f"{progress.last_stage.value})"
                    )
                wake = min(t for t in (self.deadline, progress.next_deadline(), checks.next_at)
                           if t is not None)
                if self.cancel is not None:
                    wake = min(wake, self.clock() + CANCEL_CHECK_SECONDS)
                item = feed.get(wake - self.clock())
                if item is None:
                    continue
                if item.log is not None:
                    self._read_log_signal(item.log, item.detail, checks)
                    continue
                if item.error is not None:
                    raise item.error
                assert item.event is not None
                event = item.event
                was_running = progress.container_running
                if item.source == "event":
                    self._say(progress.observe_event(event.object, self.clock()))
                elif _uid(event.object) == uid:  # not an earlier pod of the same name
                    if event.type == "DELETED":
                        progress.observe_deleted()
                    self._say(progress.observe_pod(event.object, self.clock()))
                self._time_new_node(progress)
                if progress.container_running and not was_running:
                    self._follow_runner_log(feed, name, checks, adopted_running=False)

    def _follow_runner_log(self, feed: WatchFeed, pod: str, checks: _OnlineChecks, *,
                           adopted_running: bool) -> None:
        checks.container_running(self.clock(), adopted_running=adopted_running)
        feed.follow_log("log", pod, container=contract.GPU_RUNNER_CONTAINER,
                        matches=lambda line: RUNNER_LISTENING_LINE.search(line) is not None)

    def _read_log_signal(self, signal: LogSignal, detail: str, checks: _OnlineChecks) -> None:
        if signal is LogSignal.MATCHED:
            checks.line_seen(self.clock())
        elif signal is LogSignal.FOLLOWING:
            checks.log_readable = True
        elif checks.log_failed(self.clock()):
            self.log.line(
                f"cannot read the runner's log ({detail}); asking GitHub every "
                f"{self.request.online_poll_seconds:g}s whether it is online"
            )

    def _time_new_node(self, progress: PodProgress) -> None:
        """Splits "node ready" from "driver ready" once the pod is bound to a node the
        autoscaler added for it: one GET of that node, once per pod, placing its Ready time
        on the timeline (gpu_runners/node_timing.py); "driver ready" is the binding, as the
        device plugin advertises the GPU only once the driver is installed.

        Decoration, never a failure: a node that cannot be read (403 without the `get nodes`
        right, 404 once gone, any other error) or does not say leaves the two stages out, and
        the summary shows them as one.
        """
        scheduled_at = progress.reached.get(Stage.SCHEDULED)
        if (progress is self._node_timed or not progress.node_added or not progress.node_name
                or scheduled_at is None or progress.scheduled_time is None):
            return
        self._node_timed = progress
        name = progress.node_name
        try:
            node = self.kube.with_timeouts(NODE_READ_TIMEOUTS).read_node(name)
        except KubernetesError as e:
            why = f"HTTP {e.status}" if e.status else str(e)
            self.log.line(f"cannot read node {name} ({why}): the step summary shows its "
                          "node and driver ready as one")
            return
        if node is None:
            return
        # The autoscaler's event may be read after the binding (separate streams): then only
        # the pod's creation bounds the node's Ready time from below.
        scale_up = progress.reached.get(Stage.SCALE_UP, scheduled_at)
        earliest = scale_up if scale_up <= scheduled_at else progress.reached[Stage.CREATED]
        ready_at = node_ready_at(node, pod_created=progress.created_time,
                                 pod_scheduled=progress.scheduled_time,
                                 scheduled_at=scheduled_at, earliest=earliest)
        if ready_at is not None:
            progress.reached[Stage.NODE_READY] = ready_at
            progress.reached[Stage.DRIVER_READY] = scheduled_at

    def _result(self, progress: PodProgress, gpu_type: str) -> SpawnResult:
        return SpawnResult(
            label=self.identity.runner_name,
            namespace=self.namespace,
            pod_name=self.identity.pod_name,
            node=progress.node_name,
            gpu_type=gpu_type,
            gpu_count=self.request.pod.gpu_count,
            node_added=progress.node_added,
            reused=self.reused,
            seconds=self.clock() - self.start,
            stage_seconds={
                stage.value: round(at - self.start, 3) for stage, at in progress.reached.items()
            },
            run_url=self.identity.run_url,
            image_pull=progress.image_pull,
        )

    # --- cleanup ---------------------------------------------------------------------------------

    def _clean_up(self, failure: BaseException) -> None:
        """Removes what this spawn owns; reports, never raises (the failure is what matters)."""
        kube = self.kube.with_timeouts(CLEANUP_TIMEOUTS)
        github = self.github.with_policy(CLEANUP_GITHUB_POLICY)
        owned = self.owned
        steps: list[tuple[str, Callable[[], bool]]] = []
        if owned.pod:
            steps.append((f"pod {self.identity.pod_name}", lambda: self._delete_pod(kube)))
        if owned.secret or owned.pod:
            steps.append((f"secret {self.identity.secret_name}",
                          lambda: kube.delete_secret(self.namespace, self.identity.secret_name)))
        if owned.registration:
            steps.append((f"runner registration {self.identity.runner_name}",
                          lambda: self._delete_registration(github)))
        removed: list[str] = []  # gone now: deleted here, or already (a Secret goes with its pod)
        for what, step in steps:
            try:
                step()
                removed.append(what)
            except GpuRunnersError as e:
                self.log.line(f"cleanup: could not remove {what} ({e}); `reap` will")
        if removed:
            self.log.line(f"removed {', '.join(removed)} after: {_describe(failure)}")

    def _delete_pod(self, kube: KubeClient) -> bool:
        name = self.identity.pod_name
        if self.owned.pod_uid is None:
            # The create was in flight when it failed: make sure a pod of that name is this
            # run's before deleting it.
            pod = kube.read_pod(self.namespace, name)
            if pod is None or not self.identity.owns(pod.metadata.labels if pod.metadata else None):
                return False
        return kube.delete_pod(self.namespace, name, grace_seconds=0)

    def _delete_registration(self, github: GitHubClient) -> bool:
        runner_id = self.owned.runner_id
        if runner_id is None:  # the mint was in flight: its answer, and the id, never came
            runner = github.find_runner(self.identity.runner_name)
            runner_id = runner.id if runner is not None else None
        return runner_id is not None and github.delete_runner(runner_id)

    # --- small helpers ---------------------------------------------------------------------------

    def _remaining(self) -> float:
        return self.deadline - self.clock()

    def _check_cancel(self) -> None:
        if self.cancel is not None and self.cancel.is_set():
            raise SpawnCancelledError(
                f"spawn of {self.identity.runner_name} cancelled: its run's runner is being "
                "deleted"
            )

    def _say(self, notices: Iterable[Notice]) -> None:
        for notice in notices:
            self.log.line(notice.text)


def _name(pod: V1Pod) -> str:
    return pod.metadata.name if pod.metadata and pod.metadata.name else ""


def _uid(obj: object) -> str | None:
    metadata = getattr(obj, "metadata", None)
    return getattr(metadata, "uid", None)


def _container_started(pod: V1Pod) -> bool:
    for status in (pod.status.container_statuses if pod.status else None) or ():
        if status.name == contract.GPU_RUNNER_CONTAINER and status.state is not None and (
            status.state.running is not None or status.state.terminated is not None
        ):
            return True
    return False


def _describe(failure: BaseException) -> str:
    signum = getattr(failure, "signum", None)
    if signum is not None:
        return f"signal {signum}"
    return str(failure) or type(failure).__name__
