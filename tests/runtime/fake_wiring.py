"""Wiring gpu_runners' real clients to the fake Kubernetes and GitHub servers.

The clients are the ones the CLI builds (the official Kubernetes client from a kubeconfig,
the urllib GitHub client), with retry waits shortened so that fault tests stay fast.
`bring_runners_online` plays the runner process: when a GPU pod's runner connects (the fake
writes its "Listening for Jobs" line, `connect_delay` seconds after its container starts),
the registration named in the pod's annotation turns online on the fake GitHub.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from gpu_runners import contract
from gpu_runners.github_api import GitHubClient, RetryPolicy, RunnerScope, Token
from gpu_runners.kube import KubeClient, KubeTimeouts, load_api_client
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.run_identity import RunIdentity
from gpu_runners.spawn import LOG_SILENCE_GRACE_SECONDS, ONLINE_FALLBACK_INTERVAL, SpawnRequest
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, RecordedRequest

REPOSITORY = "acme/models"
IMAGE = "ghcr.io/acme/models/github-runner@sha256:" + "a" * 64
#: Retries as the product does them, with waits cut to milliseconds.
FAST_GITHUB_POLICY = RetryPolicy(attempts=4, backoff_base=0.01, backoff_max=0.05, max_wait=5.0,
                                 timeout=2.0)
FAST_KUBE_TIMEOUTS = KubeTimeouts(connect=2.0, read=5.0, attempts=4, backoff_base=0.01)


def kube_client_for(fake: FakeKubernetes) -> KubeClient:
    """A KubeClient on `fake`, configured from its kubeconfig as the CLI would be."""
    assert fake.kubeconfig_path is not None
    api = load_api_client(kubeconfig=str(fake.kubeconfig_path), environ={})
    return KubeClient(api, timeouts=FAST_KUBE_TIMEOUTS)


def github_client_for(fake: FakeGitHub, *, organization: str | None = None,
                      sleep: Callable[[float], None] = time.sleep) -> GitHubClient:
    """A GitHubClient on `fake` for its repository (or an organisation)."""
    scope = (RunnerScope(organization=organization) if organization
             else RunnerScope(repository=f"{fake.owner}/{fake.repo}"))
    return GitHubClient(Token(fake.token, "the test token"), scope, api_url=fake.url,
                        policy=FAST_GITHUB_POLICY, sleep=sleep)


def bring_runners_online(fake_kube: FakeKubernetes, fake_github: FakeGitHub, *,
                         connect_delay: float | None = None) -> dict[str, float]:
    """When a GPU pod's runner connects, its registration goes online, as for real: GitHub
    lists it online as the runner prints "Listening for Jobs" (one event of the fake).

    Args:
        fake_kube: The cluster whose pods run the runners.
        fake_github: Where their registrations are.
        connect_delay: Seconds from a container starting to its runner connecting, for pods
            whose script does not say; None keeps the fake's `runner_connect_delay` (0).

    Returns:
        When (time.monotonic()) each runner went online, by runner name; filled as they do.
    """
    online_at: dict[str, float] = {}
    if connect_delay is not None:
        fake_kube.runner_connect_delay = connect_delay

    def online(pod: dict[str, Any]) -> None:
        name = pod["metadata"].get("annotations", {}).get(contract.ANNOTATION_RUNNER_NAME)
        if name is not None and fake_github.runner_named(name) is not None:
            fake_github.set_runner_status(name, "online")
            online_at[name] = time.monotonic()

    fake_kube.on_runner_listening(online)
    return online_at


def spawn_request(run_id: int = 123, attempt: int = 1, *, gpu_types: tuple[str, ...] = (),
                  timeout: float = 10.0, online_poll_seconds: float = ONLINE_FALLBACK_INTERVAL,
                  log_silence_seconds: float = LOG_SILENCE_GRACE_SECONDS,
                  **pod: Any) -> SpawnRequest:
    """A SpawnRequest for acme/models with the test image, overridable per test."""
    options = {"namespace": contract.DEFAULT_NAMESPACE, "image": IMAGE, **pod}
    return SpawnRequest(
        identity=RunIdentity(REPOSITORY, run_id, attempt),
        pod=RunnerPodOptions(**options),
        gpu_types=gpu_types,
        wait_timeout_seconds=timeout,
        online_poll_seconds=online_poll_seconds,
        log_silence_seconds=log_silence_seconds,
    )


def wait_until(condition: Callable[[], bool], *, timeout: float = 5.0, what: str) -> None:
    """Polls `condition` until it holds; fails the test after `timeout` seconds.

    For tests that act on a spawn running in another thread or process; the poll interval is
    short and the deadline bounds the wait.
    """
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(0.01)


def is_stream(request: RecordedRequest) -> bool:
    """Whether a request to the fake cluster opened a stream: a watch, or a log follow."""
    return request.query.get("watch") == "true" or request.query.get("follow") == "true"


def api_requests(fake: FakeKubernetes) -> list[tuple[str, str]]:
    """(method, path) of every request but streams (watches, log follows), in order."""
    return [(r.method, r.path) for r in fake.requests if not is_stream(r)]
