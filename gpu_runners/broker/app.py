"""The broker's HTTP API (`gpu_runners.broker_api`), wired to plain functions.

`build_app` takes every dependency (settings, token verifier, the run operations with their
clients, metrics), so the process (`__main__`) and the tests build the same app, one on the
cluster and GitHub, the other on the fakes. Every `/v1` request is authenticated by the job's
OIDC token; the run it acts for is the token's, never anything in the request.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import json
import logging
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime
from typing import Any, Protocol

from kubernetes.client import V1Pod
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.routing import Route

from gpu_runners import broker_api, contract
from gpu_runners.broker.base_runners import (
    BaseRunnerConfigs,
    BaseRunnerRefusedError,
    final_sweep,
    replace_forever,
)
from gpu_runners.broker.gpu_cap import RepositoryGpuCap, pod_gpus
from gpu_runners.broker.image_registry import PullSecretRegistry
from gpu_runners.broker.metrics import BrokerMetrics
from gpu_runners.broker.oidc import RunClaims, TokenRejectedError
from gpu_runners.broker.policy import ImageResolver, decide, run_identity
from gpu_runners.broker.reconcile import reconcile_forever
from gpu_runners.broker.recovery import Recovery, RecoveryPolicy
from gpu_runners.broker.run_records import RunRecords
from gpu_runners.broker.runs import SPAWN_THREADS, RunClients, RunOperations, error_code
from gpu_runners.broker.settings import BrokerSettings
from gpu_runners.broker_api import ProtocolError, RunnerView, SpawnAsk
from gpu_runners.errors import GpuRunnersError
from gpu_runners.github_api import GitHubClient
from gpu_runners.kube import KubeClient
from gpu_runners.listing import pod_row
from gpu_runners.run_identity import run_key_from_labels

LOGGER = logging.getLogger(__name__)


class TokenVerifier(Protocol):
    """What the app needs of `gpu_runners.broker.oidc.OidcVerifier`."""

    @property
    def keys_loaded(self) -> bool: ...

    def refresh_keys(self) -> None: ...

    def verify(self, token: str) -> RunClaims: ...


class _RefusedError(Exception):
    """A request answered with an API error before any work."""

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.status = status or broker_api.ERROR_STATUS[code]


def broker_app(
    settings: BrokerSettings,
    *,
    kube: KubeClient,
    github: GitHubClient,
    verifier: TokenVerifier,
    registry: CollectorRegistry | None = None,
    now: Callable[[], datetime] = lambda: datetime.now(UTC),
    heartbeat_seconds: float = broker_api.HEARTBEAT_SECONDS,
    reconcile: bool = True,
    spawn_threads: int = SPAWN_THREADS,
    images: ImageResolver | None = None,
    actions: GitHubClient | None = None,
) -> Starlette:
    """The whole broker on the given clients: metrics, GPU cap, operations, routes, reaper.

    Args:
        settings: The stack's settings.
        kube: Client of the runner namespace (the broker's ServiceAccount in a cluster).
        github: Client of the repository's runner endpoints (the mounted credential).
        verifier: Verifies the jobs' OIDC tokens.
        registry: Where the metrics register (a fresh registry by default).
        now: Wall clock (UTC), for ages and GPU-seconds.
        heartbeat_seconds: Quiet seconds before a stream sends a heartbeat.
        reconcile: Run the reaper loop every `settings.reaper_interval_seconds`.
        spawn_threads: Most spawns running at once; more wait for a thread.
        images: Resolves asked images; by default their registries, with the credentials of
            the stack's pull Secret.
        actions: Client that re-runs and cancels workflow runs for preemption recovery (a
            token with Actions: write); `github` by default.

    Returns:
        The app; `app.state.operations` holds the run operations, `app.state.base_runners`
        the base runners' configs and passes.
    """
    metrics = BrokerMetrics(registry or CollectorRegistry())
    cap = RepositoryGpuCap(kube, settings.namespace, settings.gpu_cap_per_repository,
                           on_wait=lambda kind: metrics.waits.labels(kind=kind).inc())
    recovery = Recovery(
        records=RunRecords(kube, settings.namespace), kube=kube, github=github,
        actions=actions or github, namespace=settings.namespace,
        policy=RecoveryPolicy(max_retries=settings.max_preemption_retries,
                              pools=settings.gpu_pools),
        metrics=metrics, now=now)
    operations = RunOperations(RunClients(kube=kube, github=github, namespace=settings.namespace,
                                          gpu_cap=cap, metrics=metrics, now=now,
                                          recovery=recovery),
                               spawn_threads=spawn_threads)
    base_runners = BaseRunnerConfigs(kube=kube, github=github, namespace=settings.namespace,
                                     audience=contract.base_runner_audience(settings.audience))
    app = build_app(settings=settings, verifier=verifier, operations=operations,
                    metrics=metrics, heartbeat_seconds=heartbeat_seconds, reconcile=reconcile,
                    base_runners=base_runners,
                    images=images or PullSecretRegistry(lambda: pull_config(kube, settings)))
    app.state.operations = operations
    app.state.base_runners = base_runners
    return app


def build_app(
    *,
    settings: BrokerSettings,
    verifier: TokenVerifier,
    operations: RunOperations,
    metrics: BrokerMetrics,
    heartbeat_seconds: float = broker_api.HEARTBEAT_SECONDS,
    reconcile: bool = True,
    images: ImageResolver,
    base_runners: BaseRunnerConfigs | None = None,
) -> Starlette:
    """The broker's Starlette app: its routes, and the reaper loop while it serves.

    Args:
        settings: The stack's settings (namespace, repository, policy limits).
        verifier: Verifies the jobs' OIDC tokens.
        operations: Runs spawns and deletes, with the Kubernetes and GitHub clients.
        metrics: Where the broker counts.
        heartbeat_seconds: Quiet seconds before a stream sends a heartbeat.
        reconcile: Run the reaper loop every `settings.reaper_interval_seconds`, and the
            base runners' replacement loop (with a last sweep of their registrations when the
            broker stops).
        base_runners: Serves the base runner pods' configs and replaces used pods; None
            answers `POST /v1/base-runner/config` with 404.
        images: Resolves asked images to digests (see policy.decide).
    """
    clients = operations.clients

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        operations.loop = asyncio.get_running_loop()
        reaper = asyncio.create_task(reconcile_forever(
            operations, repository=settings.repository,
            interval_seconds=settings.reaper_interval_seconds)) if reconcile else None
        replacer = asyncio.create_task(replace_forever(
            base_runners, run_in_thread=operations.in_thread, closing=operations.closing,
            sweep_seconds=settings.reaper_interval_seconds),
        ) if reconcile and base_runners is not None else None
        try:
            yield
        finally:
            # Streams end; spawns and the cluster are left as they are (restart-safe).
            operations.close()
            if reaper is not None:
                reaper.cancel()
            if replacer is not None:
                replacer.cancel()
                assert base_runners is not None
                await final_sweep(base_runners, run_in_thread=operations.in_thread)

    def refused(refusal: _RefusedError) -> JSONResponse:
        metrics.refused.labels(reason=refusal.code).inc()
        return JSONResponse(broker_api.error_body(refusal.code, refusal.message),
                            status_code=refusal.status)

    def answered(handler: Callable[[Request], Awaitable[Response]]
                 ) -> Callable[[Request], Awaitable[Response]]:
        async def endpoint(request: Request) -> Response:
            try:
                return await handler(request)
            except _RefusedError as refusal:
                return refused(refusal)
            except GpuRunnersError as e:
                code = error_code(e)
                return JSONResponse(broker_api.error_body(code, str(e)),
                                    status_code=broker_api.ERROR_STATUS.get(code, 500))
            except Exception as e:
                # Still the API's error body, so the client reports it instead of a protocol
                # error; the traceback goes to the log only.
                LOGGER.exception("%s %s failed", request.method, request.url.path)
                return JSONResponse(
                    broker_api.error_body(broker_api.INTERNAL,
                                          f"internal error ({type(e).__name__})"),
                    status_code=broker_api.ERROR_STATUS[broker_api.INTERNAL])
        return endpoint

    async def authenticate(request: Request) -> RunClaims:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _RefusedError(broker_api.UNAUTHORIZED, "no `Authorization: Bearer <OIDC token>`")
        try:
            return await operations.in_thread(lambda: verifier.verify(token.strip()))
        except TokenRejectedError as e:
            raise _RefusedError(e.code, e.reason) from None

    async def read_ask(request: Request) -> SpawnAsk:
        declared = request.headers.get("content-length", "")
        if declared.isdigit() and int(declared) > broker_api.MAX_BODY_BYTES:
            raise _RefusedError(broker_api.USAGE, _too_large(), status=413)
        body = bytearray()
        async for chunk in request.stream():
            body += chunk
            if len(body) > broker_api.MAX_BODY_BYTES:
                raise _RefusedError(broker_api.USAGE, _too_large(), status=413)
        try:
            return SpawnAsk.from_json(json.loads(body or b"{}"))
        except ValueError as e:  # ProtocolError is one; so is malformed JSON
            where = "" if isinstance(e, ProtocolError) else "body: "
            raise _RefusedError(broker_api.USAGE, f"request {where}{e}") from None

    async def post_runner(request: Request) -> Response:
        # The size first: a large body is refused before a token is spent on it.
        ask = await read_ask(request)
        claims = await authenticate(request)
        try:
            # In a worker thread: an asked image is resolved through its registry.
            decision = await operations.in_thread(lambda: decide(ask, claims, settings, images))
        except GpuRunnersError as e:
            raise _RefusedError(error_code(e), str(e)) from None
        if operations.closing.is_set():
            raise _RefusedError(broker_api.UNAVAILABLE, "the broker is restarting; ask again")
        operation = await operations.spawn(decision)
        return StreamingResponse(operation.follow(heartbeat_seconds, operations.closing),
                                 media_type=broker_api.NDJSON)

    async def get_runner(request: Request) -> Response:
        identity = run_identity(settings, await authenticate(request))
        pod = await operations.in_thread(
            lambda: clients.kube.read_pod(clients.namespace, identity.pod_name))
        if pod is None or pod.metadata is None or not identity.owns(pod.metadata.labels):
            raise _RefusedError(broker_api.NOT_FOUND, f"run has no runner {identity.runner_name}")
        return JSONResponse(runner_view(pod, clients.now()).to_json())

    async def delete_runner(request: Request) -> Response:
        identity = run_identity(settings, await authenticate(request))
        outcome = await operations.delete(identity)
        return JSONResponse(outcome.to_json())

    async def list_runners(request: Request) -> Response:
        claims = await authenticate(request)
        selector = (f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY},"
                    f"{contract.LABEL_REPOSITORY_ID}={claims.repository_id}")
        pods = await operations.in_thread(
            lambda: list(clients.kube.list_pods(clients.namespace, selector)))
        now = clients.now()
        return JSONResponse([runner_view(pod, now).to_json() for pod in pods])

    async def post_base_runner_config(request: Request) -> Response:
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise _RefusedError(broker_api.UNAUTHORIZED,
                                "no `Authorization: Bearer <projected ServiceAccount token>`")
        if base_runners is None:
            raise _RefusedError(broker_api.NOT_FOUND, "this broker serves no base runners")
        if operations.closing.is_set():
            raise _RefusedError(broker_api.UNAVAILABLE, "the broker is restarting; ask again")
        try:
            config = await operations.in_thread(lambda: base_runners.issue(token.strip()))
        except BaseRunnerRefusedError as e:
            raise _RefusedError(e.code, e.message) from None
        # The config is a credential: it goes to the pod and nowhere else (no log line).
        return JSONResponse(config.to_json())

    async def healthz(request: Request) -> Response:
        return PlainTextResponse("ok")

    async def readyz(request: Request) -> Response:
        problems = await operations.in_thread(
            lambda: readiness_problems(verifier, operations))
        if problems:
            return PlainTextResponse("; ".join(problems), status_code=503)
        return PlainTextResponse("ready")

    async def metrics_page(request: Request) -> Response:
        return Response(generate_latest(metrics.registry), media_type=CONTENT_TYPE_LATEST)

    return Starlette(lifespan=lifespan, routes=[
        Route(broker_api.RUNNER_PATH, answered(post_runner), methods=["POST"]),
        Route(broker_api.RUNNER_PATH, answered(get_runner), methods=["GET"]),
        Route(broker_api.RUNNER_PATH, answered(delete_runner), methods=["DELETE"]),
        Route(broker_api.RUNNERS_PATH, answered(list_runners), methods=["GET"]),
        Route(broker_api.BASE_RUNNER_CONFIG_PATH, answered(post_base_runner_config),
              methods=["POST"]),
        Route(broker_api.HEALTH_PATH, healthz, methods=["GET"]),
        Route(broker_api.READY_PATH, readyz, methods=["GET"]),
        Route(broker_api.METRICS_PATH, metrics_page, methods=["GET"]),
    ])


def _too_large() -> str:
    return f"request body is larger than {broker_api.MAX_BODY_BYTES} bytes"


def pull_config(kube: KubeClient, settings: BrokerSettings) -> str | None:
    """The `.dockerconfigjson` of the stack's image pull Secret, or None without one."""
    if settings.image_pull_secret is None:
        return None
    secret = kube.read_secret(settings.namespace, settings.image_pull_secret)
    encoded = (secret.data or {}).get(".dockerconfigjson") if secret is not None else None
    return base64.b64decode(encoded).decode() if encoded else None


def readiness_problems(verifier: TokenVerifier, operations: RunOperations) -> list[str]:
    """Why the broker cannot serve now: the issuer's keys, or the Kubernetes API (blocking)."""
    problems: list[str] = []
    if operations.closing.is_set():
        problems.append("shutting down")
    if not verifier.keys_loaded:
        try:
            verifier.refresh_keys()
        except TokenRejectedError as e:
            problems.append(f"OIDC keys: {e.reason}")
    clients = operations.clients
    try:
        next(iter(clients.kube.list_pods(clients.namespace, f"{contract.LABEL_MANAGED_BY}="
                                         f"{contract.MANAGED_BY}", page_size=1)), None)
    except GpuRunnersError as e:
        problems.append(f"Kubernetes API: {e}")
    return problems


def runner_view(pod: V1Pod, now: datetime) -> RunnerView:
    """What `GET /v1/runner(s)` shows of a runner pod; nothing secret."""
    row = pod_row(pod, now)
    metadata = pod.metadata
    key = run_key_from_labels(metadata.labels if metadata else None)
    created = metadata.creation_timestamp if metadata else None
    annotations: dict[str, Any] = (metadata.annotations if metadata else None) or {}
    return RunnerView(
        name=row.name,
        run_id=key.run_id if key else 0,
        attempt=key.attempt if key else 0,
        phase=row.phase,
        node=row.node,
        gpu_type=row.gpu_type,
        gpus=pod_gpus(pod),
        age_seconds=max(0.0, (now - created).total_seconds()) if created else 0.0,
        run_url=str(annotations.get(contract.ANNOTATION_RUN_URL, "")),
    )
