"""`delete`: remove this run attempt's GPU pod, its Secret and its runner registration.

It selects by the managed-by label plus the run id and attempt labels, and checks those
labels again on every object listed before deleting it, so it can never remove another run's
pod (even from a server that ignored the selector). Anything already gone counts as done:
the `cleanup` job runs `if: always()`, often after spawn's own cleanup or the runner's
self-removal.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field

from gpu_runners.errors import RunnerBusyError
from gpu_runners.github_api import GitHubClient
from gpu_runners.kube import KubeClient
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import RunIdentity

DEFAULT_DELETE_TIMEOUT_SECONDS = 60.0
_BUSY_CHECK_MAX_INTERVAL = 5.0


@dataclass
class DeleteReport:
    """What `delete` removed (names), per kind."""

    pods: list[str] = field(default_factory=list)
    secrets: list[str] = field(default_factory=list)
    registrations: list[str] = field(default_factory=list)

    @property
    def nothing_found(self) -> bool:
        """Whether everything was already gone."""
        return not (self.pods or self.secrets or self.registrations)


def delete_run(
    identity: RunIdentity,
    *,
    namespace: str,
    kube: KubeClient,
    github: GitHubClient,
    log: ProgressLog,
    timeout_seconds: float = DEFAULT_DELETE_TIMEOUT_SECONDS,
    clock: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> DeleteReport:
    """Deletes the run attempt's pods, Secrets and runner registration.

    Args:
        identity: The run attempt.
        namespace: Namespace of its pod.
        kube: Kubernetes client.
        github: GitHub client for the runner scope.
        log: Where one line per action goes.
        timeout_seconds: How long to wait for a busy runner to stop before giving up on its
            registration (deleting the pod stops it).
        clock: Monotonic clock.
        sleep: Waits between checks of a busy runner.

    Returns:
        What was removed; empty lists when everything was already gone.

    Raises:
        RunnerBusyError: The runner was still running a job when the timeout passed.
        GitHubError, KubernetesError: An API call failed after retries.
    """
    report = DeleteReport()
    selector = identity.label_selector
    for pod in list(kube.list_pods(namespace, selector)):
        metadata = pod.metadata
        if metadata is None or not metadata.name or not identity.owns(metadata.labels):
            continue  # the server ignored the selector: not ours, not touched
        if metadata.deletion_timestamp:
            continue  # already on its way out (an earlier delete): nothing more to do
        if kube.delete_pod(namespace, metadata.name):
            report.pods.append(metadata.name)
            log.line(f"deleted pod {metadata.name}")
    # The Secret goes with its pod (it is owned by it); one left behind by a spawn cut short
    # before the owner reference was set is found by its name, and checked by its labels.
    secret = kube.read_secret(namespace, identity.secret_name)
    if secret is not None and secret.metadata is not None and identity.owns(
            secret.metadata.labels) and kube.delete_secret(namespace, identity.secret_name):
        report.secrets.append(identity.secret_name)
        log.line(f"deleted secret {identity.secret_name}")
    if _delete_registration(identity, github, log, timeout_seconds, clock, sleep):
        report.registrations.append(identity.runner_name)
    if report.nothing_found:
        log.line(f"nothing left of {identity.runner_name}: pod, secret and registration are gone")
    return report


def _delete_registration(
    identity: RunIdentity,
    github: GitHubClient,
    log: ProgressLog,
    timeout_seconds: float,
    clock: Callable[[], float],
    sleep: Callable[[float], None],
) -> bool:
    """Deletes the registration, waiting for a busy runner to stop; False if none was left."""
    deadline = clock() + timeout_seconds
    interval = 0.5
    told = False
    runner = github.find_runner(identity.runner_name)
    while runner is not None:
        try:
            github.delete_runner(runner.id)
        except RunnerBusyError as e:
            # The pod is going, and the runner with it; GitHub clears "busy" when it notices.
            if clock() + interval > deadline:
                raise RunnerBusyError(
                    f"runner {runner.name} still running a job after {timeout_seconds:.0f}s; "
                    "run `delete` again or let `reap` remove it",
                    status=e.status,
                ) from e
            if not told:
                log.line(f"runner {runner.name} is finishing a job; waiting to deregister it")
                told = True
            sleep(interval)
            interval = min(interval * 2, _BUSY_CHECK_MAX_INTERVAL)
            runner = github.get_runner(runner.id)
            continue
        log.line(f"deleted runner registration {runner.name} (id {runner.id})")
        return True
    return False
