"""One doctor run: read the installation, check it, run the probe and smoke pods, clean up.

`examine` decides the order and turns every failure on the way into a result, so that one
broken part does not hide the state of the others. Every pod it creates is deleted before it
returns or raises (Interrupted included), by name and by the run's session label.
"""

from __future__ import annotations

import secrets
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime

from kubernetes.client import V1Pod

from gpu_runners import contract
from gpu_runners.doctor import cluster_checks, github_checks, pods, probe, smoke
from gpu_runners.doctor.clients import ClusterClient, DoctorGitHub
from gpu_runners.doctor.cluster_facts import DeploymentFact, QuotaFact
from gpu_runners.doctor.pod_watch import FailureKind, PodRun, WatchTarget, follow_pods
from gpu_runners.doctor.report import CheckResult, ColdStart, Examination, Status
from gpu_runners.doctor.runner_version import check_runner_version, parse_releases
from gpu_runners.errors import GitHubError, KubernetesError, UsageError
from gpu_runners.github_api import RunnerScope, Token
from gpu_runners.gpu_pools import GpuPool, parse_gpu_pools
from gpu_runners.kube import CLEANUP_TIMEOUTS
from gpu_runners.progress import ProgressLog

RUNNER_REPOSITORY = "actions/runner"
#: Seconds a doctor pod outlives the doctor's own timeout before the kubelet kills it.
DEADLINE_MARGIN = 60
#: Seconds to wait for each deleted pod to be gone.
DELETE_WAIT = 30.0


@dataclass(frozen=True)
class DoctorSettings:
    """What to examine and how long to wait.

    Attributes:
        namespace: The runner namespace.
        broker_namespace: The broker's namespace.
        repository: owner/name; None to take the broker's GITHUB_REPOSITORY.
        api_url: GitHub's API URL.
        skip_smoke: Run no GPU smoke pod.
        timeout: Seconds to wait for the probe pod, and for each batch of smoke pods.
        node_poll_seconds: Seconds between node listings while smoke pods wait.
        scale_up_grace: Seconds a smoke pod may stay unschedulable with no autoscaler word.
    """

    namespace: str
    broker_namespace: str
    repository: str | None
    api_url: str
    skip_smoke: bool
    timeout: float
    node_poll_seconds: float = 5.0
    scale_up_grace: float = 300.0


class PodJanitor:
    """Remembers the doctor's pods and deletes them, whatever happened before."""

    def __init__(self, cluster: ClusterClient, namespace: str, session: str) -> None:
        self._cluster = cluster
        self._namespace = namespace
        self._session = session
        self._names: list[str] = []

    def claim(self, name: str) -> None:
        """Records a pod about to be created (before the request, which may land anyway)."""
        self._names.append(name)

    def delete_all(self, log: ProgressLog) -> list[str]:
        """Deletes every claimed pod and any other of this session; returns what is left."""
        cleanup = self._cluster.with_timeouts(CLEANUP_TIMEOUTS)
        names = list(dict.fromkeys(self._names))
        try:
            selector = pods.session_selector(self._session)
            for pod in cleanup.list_pods(self._namespace, selector):
                if pod.metadata is not None and pod.metadata.name not in names:
                    names.append(str(pod.metadata.name))
        except KubernetesError as e:
            log.line(f"cannot list this run's pods to delete them: {e}")
        left = []
        for name in names:
            try:
                if cleanup.delete_pod(self._namespace, name, grace_seconds=5):
                    log.line(f"deleted pod {name}")
                if not cleanup.wait_pod_gone(self._namespace, name, None, DELETE_WAIT):
                    left.append(name)
            except KubernetesError as e:
                log.line(f"cannot delete pod {name}: {e}")
                left.append(name)
        return left


def new_session() -> str:
    """A short random id naming one doctor run's pods."""
    return secrets.token_hex(3)


def examine(settings: DoctorSettings, cluster: ClusterClient, token: Token, *,
            log: ProgressLog, session: str | None = None,
            now: datetime | None = None) -> Examination:
    """Runs every check against the live installation.

    Args:
        settings: What to examine.
        cluster: The Kubernetes client (the operator's kubeconfig).
        token: The GitHub token to check.
        log: Progress lines (stderr in the CLI).
        session: Id of this run's pods; random by default.
        now: The current time for the runner version's age; the clock by default.

    Returns:
        Every result, and each smoke pod's cold start.

    Raises:
        Interrupted: A signal arrived; the pods were deleted first.
    """
    session = session or new_session()
    janitor = PodJanitor(cluster, settings.namespace, session)
    examination = _Examination(settings, cluster, token, log, session, janitor,
                               now or datetime.now(UTC))
    try:
        examination.run()
    finally:
        left = janitor.delete_all(log)
        if left:
            examination.results.append(CheckResult(
                "cleanup", Status.FAIL, f"pods still present: {', '.join(left)}",
                fix=f"kubectl -n {settings.namespace} delete pod {' '.join(left)}"))
    return Examination(tuple(examination.results), tuple(examination.cold_starts))


class _Examination:
    """The state of one run while it goes; `run` is the order of the checks."""

    def __init__(self, settings: DoctorSettings, cluster: ClusterClient, token: Token,
                 log: ProgressLog, session: str, janitor: PodJanitor, now: datetime) -> None:
        self.settings = settings
        self.cluster = cluster
        self.token = token
        self.log = log
        self.session = session
        self.janitor = janitor
        self.now = now
        self.results: list[CheckResult] = []
        self.cold_starts: list[ColdStart] = []

    def run(self) -> None:
        settings = self.settings
        try:
            nodes = self.cluster.list_nodes()
        except KubernetesError as e:
            self.results.append(CheckResult(
                "cluster: reachable", Status.FAIL, str(e),
                fix="check --kubeconfig/--context (gke-gcloud-auth-plugin needs `gcloud auth "
                    "login`) and that your account may read nodes"))
            return
        self.results.append(cluster_checks.check_cpu_nodes(nodes))
        broker = self._deployment(settings.broker_namespace, contract.BROKER_NAME, "broker")
        base = self._deployment(settings.namespace, contract.BASE_RUNNER_APP, "base runner")
        env = dict(broker.env) if broker is not None else {}
        pools = self._pools(env)
        retries = self._max_preemption_retries(env)
        quotas = self._quotas()
        if quotas is not None:
            self.results.append(cluster_checks.check_quota(quotas, pools))
        repository = settings.repository or env.get(contract.ENV_REPOSITORY)
        if repository:
            self._github(repository, env, retries)
        else:
            self.results.append(CheckResult(
                "repository ids", Status.FAIL,
                f"no --repository given and the broker sets no {contract.ENV_REPOSITORY}",
                fix="pass --repository owner/name"))
        image = env.get(contract.ENV_IMAGE) or (base.image if base is not None else "")
        pull_secret = env.get(contract.ENV_IMAGE_PULL_SECRET) or None
        runner_version: str | None = None
        if image:
            runner_version = self._probe(image, pull_secret)
        else:
            self.results.append(CheckResult(
                "image: pullable", Status.FAIL,
                "neither the broker nor the base runner names the runner image",
                fix="run pulumi up for this stack"))
        self._runner_version(runner_version)
        # One smoke pod per accelerator: a Spot pool and its on-demand fallback share one, and
        # the smoke pod asks for the accelerator, not for a pool.
        accelerators = _one_pool_per_accelerator(pools)
        smoke_ran = bool(image) and not settings.skip_smoke and bool(pools)
        if smoke_ran:
            self._smoke(image, pull_secret, accelerators, quotas or [])
        elif settings.skip_smoke:
            self.results.append(CheckResult("GPU smoke", Status.SKIP, "--skip-smoke"))
        elif not pools:
            self.results.append(CheckResult(
                "GPU smoke", Status.FAIL,
                f"the broker names no GPU pool ({contract.ENV_GPU_POOLS})",
                fix="declare gpuPools in the stack config and run pulumi up"))
        # After the smoke pods: the nodes they brought up are the pools' real nodes.
        try:
            nodes = self.cluster.list_nodes()
        except KubernetesError as e:
            self.log.line(f"cannot list nodes again: {e}")
        self.results.append(cluster_checks.check_gpu_node_labels(nodes))
        for pool in accelerators:
            self.results.append(cluster_checks.check_gpu_driver(pool, nodes, smoke_ran=smoke_ran))
        for pool in pools:
            self.results.append(cluster_checks.check_spot_pool(pool, pools, nodes, retries))

    # --- cluster -------------------------------------------------------------------------------

    def _deployment(self, namespace: str, name: str, what: str) -> DeploymentFact | None:
        try:
            fact = self.cluster.read_deployment(namespace, name)
        except KubernetesError as e:
            self.results.append(CheckResult(
                f"{what}: available", Status.FAIL, str(e),
                fix=f"your account needs get on deployments in {namespace}"))
            return None
        self.results.append(cluster_checks.check_deployment(fact, what=what, namespace=namespace,
                                                            name=name))
        return fact

    def _pools(self, env: dict[str, str]) -> tuple[GpuPool, ...]:
        try:
            return parse_gpu_pools(env.get(contract.ENV_GPU_POOLS))
        except UsageError as e:
            self.results.append(CheckResult("broker: settings", Status.FAIL, str(e),
                                            fix="run pulumi up for this stack"))
            return ()

    def _max_preemption_retries(self, env: dict[str, str]) -> int:
        """The broker's maxPreemptionRetries; its default when the broker sets none."""
        text = env.get(contract.ENV_MAX_PREEMPTION_RETRIES, "").strip()
        if not text:
            return contract.DEFAULT_MAX_PREEMPTION_RETRIES
        if text.isascii() and text.isdigit() and int(text) <= contract.MAX_PREEMPTION_RETRIES_LIMIT:
            return int(text)
        self.results.append(CheckResult(
            "broker: settings", Status.FAIL,
            f"{contract.ENV_MAX_PREEMPTION_RETRIES}: {text!r} is not an integer from 0 to "
            f"{contract.MAX_PREEMPTION_RETRIES_LIMIT}",
            fix="run pulumi up for this stack"))
        return contract.DEFAULT_MAX_PREEMPTION_RETRIES

    def _quotas(self) -> list[QuotaFact] | None:
        try:
            return self.cluster.list_quotas(self.settings.namespace)
        except KubernetesError as e:
            self.results.append(CheckResult(
                "quota: runner namespace", Status.FAIL, str(e),
                fix=f"your account needs list on resourcequotas in {self.settings.namespace}"))
            return None

    # --- GitHub --------------------------------------------------------------------------------

    def _github(self, repository: str, env: dict[str, str], retries: int) -> None:
        github = DoctorGitHub(self.token, RunnerScope(repository=repository),
                              api_url=self.settings.api_url)
        try:
            answer = github.repository(repository)
        except GitHubError as e:
            self.results.append(CheckResult(
                "repository ids", Status.FAIL, str(e),
                fix="check --repository and that the token can see the repository"))
        else:
            self.results.append(github_checks.check_repository_ids(repository, answer.body, env))
            self.results.append(github_checks.check_token_scopes(answer.oauth_scopes,
                                                                 self.token.source))
            self.results.append(github_checks.check_actions_write(
                answer.oauth_scopes, self.token.source, env, retries))
        try:
            runners = list(github.list_runners())
        except GitHubError as e:
            self.results.append(github_checks.check_runner_access(str(e), 0))
            self.results.append(CheckResult("base runner: online on GitHub", Status.SKIP,
                                            "the token cannot list runners"))
        else:
            self.results.append(github_checks.check_runner_access(None, len(runners)))
            self.results.append(github_checks.check_base_runner_online(runners,
                                                                       self.settings.namespace))

    def _runner_version(self, image_version: str | None) -> None:
        github = DoctorGitHub(self.token, RunnerScope(repository=RUNNER_REPOSITORY),
                              api_url=self.settings.api_url)
        try:
            items = github.releases(RUNNER_REPOSITORY)
        except GitHubError as e:
            self.results.append(CheckResult("runner version", Status.SKIP,
                                            f"cannot list {RUNNER_REPOSITORY} releases: {e}"))
            return
        self.results.append(check_runner_version(image_version, parse_releases(items), self.now))

    # --- pods ----------------------------------------------------------------------------------

    def _create(self, pod_name: str, pod: V1Pod) -> str | None:
        """Creates a built pod; returns why it could not be, or None."""
        self.janitor.claim(pod_name)
        try:
            self.cluster.create_pod(self.settings.namespace, pod)
        except KubernetesError as e:
            return str(e)
        return None

    def _deadline(self) -> int:
        return int(self.settings.timeout) + DEADLINE_MARGIN

    def _probe(self, image: str, pull_secret: str | None) -> str | None:
        settings = self.settings
        targets = probe.probe_targets(settings.api_url, image)
        name = f"{pods.DOCTOR_APP}-probe-{self.session}"
        pod = pods.build_probe_pod(name=name, namespace=settings.namespace, session=self.session,
                                   image=image, pull_secret=pull_secret, targets=targets,
                                   deadline_seconds=self._deadline())
        self.log.line(f"probing the network of {settings.namespace} from pod {name}")
        refused = self._create(name, pod)
        if refused is not None:
            run = PodRun(name, failure=refused, failure_kind=FailureKind.API)
        else:
            run = self._follow([WatchTarget(name, None)])[name]
        verdict = probe.judge_probe(run, targets, image, settings.namespace)
        self.results.extend(verdict.results)
        return verdict.runner_version

    def _follow(self, targets: Sequence[WatchTarget]) -> dict[str, PodRun]:
        """Follows created pods; a refused node listing fails them instead of the run."""
        settings = self.settings
        try:
            return follow_pods(self.cluster, settings.namespace, targets,
                               timeout=settings.timeout,
                               node_poll_seconds=settings.node_poll_seconds,
                               scale_up_grace=settings.scale_up_grace, log=self.log)
        except KubernetesError as e:
            return {target.pod: PodRun(target.pod, failure=str(e), failure_kind=FailureKind.API)
                    for target in targets}

    def _smoke(self, image: str, pull_secret: str | None, pools: Sequence[GpuPool],
               quotas: Sequence[QuotaFact]) -> None:
        for batch in _batches(pools, quotas):
            self._smoke_batch(image, pull_secret, batch)

    def _smoke_batch(self, image: str, pull_secret: str | None,
                     batch: Sequence[GpuPool]) -> None:
        settings = self.settings
        targets: list[WatchTarget] = []
        runs: dict[str, PodRun] = {}
        for pool in batch:
            name = f"{pods.DOCTOR_APP}-smoke-{pool.accelerator}-{self.session}"
            pod = pods.build_smoke_pod(name=name, namespace=settings.namespace,
                                       session=self.session, image=image,
                                       pull_secret=pull_secret, accelerator=pool.accelerator,
                                       deadline_seconds=self._deadline())
            self.log.line(f"smoke pod {name} asks for one {pool.accelerator} GPU")
            refused = self._create(name, pod)
            if refused is None:
                targets.append(WatchTarget(name, pool.accelerator))
            else:
                runs[name] = PodRun(name, failure=refused, failure_kind=FailureKind.API)
        if targets:
            runs.update(self._follow(targets))
        for pool in batch:
            name = f"{pods.DOCTOR_APP}-smoke-{pool.accelerator}-{self.session}"
            results, cold = smoke.judge_smoke(pool.accelerator, runs[name])
            self.results.extend(results)
            self.cold_starts.append(cold)


def _one_pool_per_accelerator(pools: Sequence[GpuPool]) -> tuple[GpuPool, ...]:
    """The first pool of each accelerator, in order."""
    seen: dict[str, GpuPool] = {}
    for pool in pools:
        seen.setdefault(pool.accelerator, pool)
    return tuple(seen.values())


def _batches(pools: Sequence[GpuPool],
             quotas: Sequence[QuotaFact]) -> list[Sequence[GpuPool]]:
    """Pools in groups the namespace's quota admits at once (one GPU and one pod each)."""
    room = len(pools)
    for quota in quotas:
        for key in (cluster_checks.GPU_QUOTA_KEY, "pods"):
            if key in quota.hard:
                room = min(room, quota.hard[key] - quota.used.get(key, 0))
    size = max(1, room)
    return [pools[index:index + size] for index in range(0, len(pools), size)]
