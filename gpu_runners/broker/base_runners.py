"""Single-use base runners: one JIT runner config per base runner pod, and replacing used pods.

A base runner pod holds no GitHub credential. Its entrypoint shows the broker the pod's
projected ServiceAccount token (audience `contract.base_runner_audience(<broker audience>)`,
600 s) and gets one JIT config, registered under the pod's name with the labels
`self-hosted` and `base-runner` (a JIT registration has no label it is not given, and
workflows target `[self-hosted, base-runner]`; `self-hosted` says nothing about a run, so it
is harmless here). The runner takes one job and exits.

Who may ask (`BaseRunnerConfigs.issue`), checked through the TokenReview API:
1. the token authenticates for the broker's base-runner audience, and the review says so in
   `status.audiences` (a review without audiences would check the API server's);
2. it belongs to the `base-runner` ServiceAccount of the runner namespace, and is bound to a
   pod (`extra` names it and its uid);
3. that pod exists with that uid, is Pending or Running and not being deleted, carries the
   base runner Deployment's labels and is owned by one of its ReplicaSets.

At most one config per pod, judged three ways, each kept where it survives what it must:
- the broker's own set of pod uids served (this process; fast, and closes the window between
  two concurrent asks, which run one at a time under a lock);
- the pod's runner container has never restarted (`restartCount` 0: the kubelet keeps it, a
  restarted broker sees it; a restarted container is one whose runner already ran or gave up);
- no registration under the pod's name exists on GitHub (a restarted broker sees it too: from
  the moment the first config is minted until its job ends, the registration is there).
Together they survive a broker restart: the only state lost is the in-process set, and while
the first container lives its registration stands in for it; once that container exits, the
restart count does.

Replacement (`BaseRunnerConfigs.replace_used`): a runner container that has exited (or been
restarted) is never run again; the pod is deleted and its ReplicaSet creates a fresh one at
once, with new empty volumes, instead of the kubelet restarting the container after a growing
back-off with a consumed config. The registration of a pod that is gone is removed (after a
scale-down, a rollout, a destroy): a JIT runner cannot deregister itself without a credential.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import threading
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field

from kubernetes.client import V1Pod

from gpu_runners import broker_api, contract
from gpu_runners.broker_api import BaseRunnerConfig
from gpu_runners.errors import GitHubConflictError, GpuRunnersError, RunnerBusyError
from gpu_runners.github_api import GitHubClient, Runner
from gpu_runners.kube import KubeClient

LOGGER = logging.getLogger(__name__)

#: Keys of `status.user.extra` of a review of a pod-bound ServiceAccount token.
POD_NAME_EXTRA = "authentication.kubernetes.io/pod-name"
POD_UID_EXTRA = "authentication.kubernetes.io/pod-uid"
#: Labels every base runner pod carries (the Deployment's template); selector of the passes.
BASE_RUNNER_POD_LABELS: Mapping[str, str] = {
    contract.LABEL_NAME: contract.BASE_RUNNER_APP,
    contract.LABEL_COMPONENT: contract.BASE_RUNNER_COMPONENT,
}
BASE_RUNNER_SELECTOR = ",".join(f"{key}={value}" for key, value in BASE_RUNNER_POD_LABELS.items())
#: Names of the base runner Deployment's pods: <Deployment>-<ReplicaSet hash>-<suffix>.
BASE_RUNNER_NAME_PREFIX = f"{contract.BASE_RUNNER_APP}-"
_LIVE_PHASES = frozenset({"Pending", "Running"})
#: Runs a blocking call in a worker thread (`RunOperations.in_thread`).
RunInThread = Callable[[Callable[[], object]], Awaitable[object]]


class BaseRunnerRefusedError(Exception):
    """A base runner pod's ask is refused; `code` is the API's error code."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


@dataclass
class BaseRunnerReport:
    """What one pass over the base runners removed."""

    pods: list[str] = field(default_factory=list)
    registrations: list[str] = field(default_factory=list)


def runner_used(pod: V1Pod) -> bool:
    """Whether the pod's runner container has run its course: exited, or restarted since."""
    status = pod.status
    if status is None:
        return False
    if status.phase in ("Succeeded", "Failed"):
        return True
    for container in status.container_statuses or ():
        if container.name != contract.BASE_RUNNER_CONTAINER:
            continue
        state = container.state
        if (container.restart_count or 0) > 0 or (state is not None and state.terminated):
            return True
    return False


def is_base_runner_registration(runner: Runner) -> bool:
    """Whether a registration is a base runner's (named like its pods, labelled base-runner)."""
    return (runner.name.startswith(BASE_RUNNER_NAME_PREFIX)
            and contract.BASE_RUNNER_LABEL in runner.labels)


class BaseRunnerConfigs:
    """Hands out the base runners' JIT configs and replaces used base runner pods.

    Args:
        kube: Client of the runner namespace (the broker's account: pods, and TokenReview).
        github: Client of the runner scope.
        namespace: The runner namespace.
        audience: The base runners' token audience (`contract.base_runner_audience`).
    """

    def __init__(self, *, kube: KubeClient, github: GitHubClient, namespace: str,
                 audience: str) -> None:
        self.kube = kube
        self.github = github
        self.namespace = namespace
        self.audience = audience
        self.account = (f"system:serviceaccount:{namespace}:"
                        f"{contract.BASE_RUNNER_SERVICE_ACCOUNT}")
        self._served: set[str] = set()
        self._lock = threading.Lock()
        #: Base runner pod names the last pass saw: one missing now is gone.
        self._seen: set[str] = set()

    # --- configs ---------------------------------------------------------------------------

    def issue(self, token: str) -> BaseRunnerConfig:
        """The calling pod's one JIT config (blocking).

        Raises:
            BaseRunnerRefusedError: `unauthorized` (the token proves no base runner pod for
                this audience), `forbidden` (a genuine token of another account or pod),
                `already_served` (this pod had its config).
            GpuRunnersError: The Kubernetes or GitHub API failed.
        """
        pod = self.authenticate(token)
        assert pod.metadata is not None
        name, uid = str(pod.metadata.name), str(pod.metadata.uid)
        with self._lock:
            if uid in self._served or runner_used(pod):
                raise BaseRunnerRefusedError(
                    broker_api.ALREADY_SERVED,
                    f"pod {name} had its one runner config; the broker replaces the pod")
            if self.github.find_runner(name) is not None:
                raise BaseRunnerRefusedError(
                    broker_api.ALREADY_SERVED,
                    f"a runner named {name} is registered already: pod {name} had its one "
                    "runner config; the broker replaces the pod")
            try:
                jit = self.github.generate_jit_config(name, contract.BASE_RUNNER_RUNNER_LABELS)
            except GitHubConflictError:
                raise BaseRunnerRefusedError(
                    broker_api.ALREADY_SERVED,
                    f"a runner named {name} is registered already") from None
            self._served.add(uid)
        LOGGER.info("base runner %s: registered as runner %d", name, jit.runner.id)
        return BaseRunnerConfig(runner_name=name, runner_id=jit.runner.id,
                                labels=contract.BASE_RUNNER_RUNNER_LABELS,
                                encoded_jit_config=jit.encoded_jit_config)

    def authenticate(self, token: str) -> V1Pod:
        """The live base runner pod the token is bound to (blocking; see the module doc).

        Raises:
            BaseRunnerRefusedError: `unauthorized` or `forbidden`, with the reason.
        """
        review = self.kube.review_token(token, [self.audience])
        if not review.authenticated:
            raise BaseRunnerRefusedError(
                broker_api.UNAUTHORIZED,
                f"the token is not a valid ServiceAccount token for audience {self.audience}")
        if self.audience not in (review.audiences or ()):
            raise BaseRunnerRefusedError(
                broker_api.UNAUTHORIZED, f"the token is not for audience {self.audience}")
        user = review.user
        username = user.username if user is not None else None
        if username != self.account:
            raise BaseRunnerRefusedError(
                broker_api.FORBIDDEN,
                f"only {self.account} may ask for a base runner config, not {username}")
        extra: Mapping[str, list[str]] = (user.extra if user is not None else None) or {}
        names, uids = extra.get(POD_NAME_EXTRA) or [], extra.get(POD_UID_EXTRA) or []
        if len(names) != 1 or len(uids) != 1:
            raise BaseRunnerRefusedError(broker_api.UNAUTHORIZED,
                                         "the token is not bound to a pod")
        pod = self.kube.read_pod(self.namespace, names[0])
        problem = self._pod_problem(pod, uids[0])
        if problem is not None:
            raise BaseRunnerRefusedError(broker_api.FORBIDDEN, f"pod {names[0]}: {problem}")
        assert pod is not None
        return pod

    @staticmethod
    def _pod_problem(pod: V1Pod | None, uid: str) -> str | None:
        if pod is None or pod.metadata is None:
            return "no such pod"
        metadata = pod.metadata
        if metadata.uid != uid:
            return "the pod of that name is another one (its uid differs from the token's)"
        if metadata.deletion_timestamp is not None:
            return "the pod is being deleted"
        phase = pod.status.phase if pod.status is not None else None
        if phase not in _LIVE_PHASES:
            return f"the pod is {phase}, not Pending or Running"
        labels = metadata.labels or {}
        if any(labels.get(key) != value for key, value in BASE_RUNNER_POD_LABELS.items()):
            return "not a pod of the base runner Deployment (its labels differ)"
        owners = [ref for ref in metadata.owner_references or () if ref.controller]
        if not (len(owners) == 1 and owners[0].kind == "ReplicaSet"
                and owners[0].name.startswith(BASE_RUNNER_NAME_PREFIX)):
            return "not a pod of the base runner Deployment (no base runner ReplicaSet owns it)"
        if pod.spec is None or pod.spec.service_account_name != \
                contract.BASE_RUNNER_SERVICE_ACCOUNT:
            return f"it does not run as {contract.BASE_RUNNER_SERVICE_ACCOUNT}"
        return None

    # --- replacement -----------------------------------------------------------------------

    def replace_used(self, *, sweep: bool = False) -> BaseRunnerReport:
        """One pass (blocking): deletes used base runner pods and registrations of gone ones.

        A used pod (its runner container exited or restarted) loses its registration (unless
        GitHub still shows it busy: then the next pass) and is deleted; its ReplicaSet makes a
        fresh one. A registration whose pod was seen by the last pass and is gone now is
        removed. With `sweep`, every base runner registration without a pod is (it lists the
        scope's runners: the reaper's interval, and once when the broker stops, so that a
        destroy, which removes the base runners before the broker, leaves none behind).

        Raises:
            GpuRunnersError: Listing pods or runners failed (removals that fail are logged and
                retried by the next pass).
        """
        report = BaseRunnerReport()
        # Runners first, then pods: a registration listed is of a pod that existed before
        # the pod list, so a pod created in between cannot lose its fresh registration.
        registrations = ({runner.name: runner for runner in self.github.list_runners(
            on_malformed=lambda line: LOGGER.warning("GitHub runner list: %s", line))
            if is_base_runner_registration(runner)} if sweep else None)
        pods = {str(pod.metadata.name): pod for pod in self.kube.list_pods(
            self.namespace, BASE_RUNNER_SELECTOR) if pod.metadata is not None}
        names = set(pods)
        for name, pod in pods.items():
            metadata = pod.metadata
            if metadata is None or metadata.deletion_timestamp is not None or \
                    not runner_used(pod):
                continue
            runner = (registrations.get(name) if registrations is not None
                      else self.github.find_runner(name))
            if runner is not None and not self._remove_registration(runner, report):
                continue
            if self.kube.delete_pod(self.namespace, name):
                LOGGER.info("base runner %s: its runner has run; pod deleted for a fresh one",
                            name)
                report.pods.append(name)
        if registrations is not None:
            orphans: Iterable[Runner] = [runner for name, runner in registrations.items()
                                         if name not in names]
        else:
            orphans = [runner for name in sorted(self._seen - names)
                       if (runner := self.github.find_runner(name)) is not None]
        for runner in orphans:
            self._remove_registration(runner, report)
        with self._lock:
            self._served &= {str(pod.metadata.uid) for pod in pods.values() if pod.metadata}
        self._seen = names
        return report

    def _remove_registration(self, runner: Runner, report: BaseRunnerReport) -> bool:
        """Removes a registration unless GitHub says it runs a job; whether it is gone."""
        if runner.busy:
            return False
        try:
            self.github.delete_runner(runner.id)
        except RunnerBusyError:
            return False
        LOGGER.info("base runner %s: registration %d removed", runner.name, runner.id)
        report.registrations.append(runner.name)
        return True


#: Seconds between two passes over the base runner pods: how long a used pod waits to be
#: replaced (a pod list per pass; GitHub is asked only about used or vanished pods).
REPLACE_INTERVAL_SECONDS = 5.0
#: Longest the final sweep may take when the broker stops (inside its termination grace).
FINAL_SWEEP_SECONDS = 15.0


async def replace_forever(configs: BaseRunnerConfigs, *, run_in_thread: RunInThread,
                          closing: asyncio.Event, sweep_seconds: float,
                          interval_seconds: float = REPLACE_INTERVAL_SECONDS) -> None:
    """Runs `replace_used` every `interval_seconds` until `closing`; a full sweep of the
    registrations first and then every `sweep_seconds`. A failed pass is logged; the loop
    goes on."""
    loop = asyncio.get_running_loop()
    next_sweep = loop.time()
    while not closing.is_set():
        sweep = loop.time() >= next_sweep
        try:
            await run_in_thread(functools.partial(configs.replace_used, sweep=sweep))
            if sweep:
                next_sweep = loop.time() + sweep_seconds
        except (GpuRunnersError, OSError) as e:
            LOGGER.warning("base runner pass failed: %s", e)
        except Exception:
            LOGGER.exception("base runner pass failed unexpectedly")
        try:
            await asyncio.wait_for(closing.wait(), timeout=interval_seconds)
        except TimeoutError:
            continue


async def final_sweep(configs: BaseRunnerConfigs, *, run_in_thread: RunInThread,
                      timeout_seconds: float = FINAL_SWEEP_SECONDS) -> None:
    """One sweep as the broker stops: on a destroy the base runner pods are gone by now (the
    stack removes them before the broker), and nothing else could remove their registrations."""
    try:
        await asyncio.wait_for(run_in_thread(lambda: configs.replace_used(sweep=True)),
                               timeout=timeout_seconds)
    except (GpuRunnersError, OSError, TimeoutError) as e:
        LOGGER.warning("final base runner sweep failed: %s", e)
