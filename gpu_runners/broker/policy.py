"""The stack's policy over what a job asks: a `SpawnAsk` plus verified claims -> `SpawnRequest`.

Whatever the request says, the run is the token's (repository from the stack, repository id,
run id and attempt from the claims), the runtime is at most the stack's maxRuntimeMinutes (a
bigger ask is clamped and told, not refused), the GPUs fit the cluster's pools and the
repository's cap, and the image is the stack's unless the stack allows others: then it is
matched against `allowedImages` in its full form, and pinned to the digest its registry
serves (or refused if the stack requires digests and a tag was asked) before any pod exists.
"""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from typing import Protocol

from gpu_runners import pod_options
from gpu_runners.broker.image_registry import ImageResolutionError, ResolvedImage
from gpu_runners.broker.oidc import RunClaims
from gpu_runners.broker.settings import BrokerSettings
from gpu_runners.broker_api import SpawnAsk
from gpu_runners.errors import GpuRunnersError, UsageError
from gpu_runners.github_api import DEFAULT_RUNNER_GROUP_ID
from gpu_runners.gpu_pools import check_gpu_request, fallback_pools, parse_gpu_types
from gpu_runners.image_refs import (
    ImageReference,
    mirrored_reference,
    normalize_pattern,
    parse_image_reference,
)
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.run_identity import RunIdentity
from gpu_runners.spawn import (
    DEFAULT_SCALE_UP_GRACE_SECONDS,
    DEFAULT_WAIT_TIMEOUT_SECONDS,
    SpawnRequest,
)

#: Longest a spawn may wait for its runner (scale-up, pull, quota and cap waits included).
MAX_WAIT_TIMEOUT_SECONDS = 3600.0
#: Names of the repository's only runner group (repository runners have no other).
_DEFAULT_GROUP_NAMES = frozenset({"default", str(DEFAULT_RUNNER_GROUP_ID)})


class PolicyRefusedError(GpuRunnersError):
    """A valid token's ask that the stack's policy refuses (API code `forbidden`)."""

    exit_code = 9


class ImageResolver(Protocol):
    """What the policy needs of `image_registry.RegistryClient`."""

    def resolve(self, image: ImageReference) -> ResolvedImage: ...


@dataclass(frozen=True)
class PolicyDecision:
    """What the broker will do for an ask, and what it changed on the way.

    Attributes:
        request: The spawn to run.
        notes: One line per value the policy changed (e.g. a clamped runtime), for the stream.
    """

    request: SpawnRequest
    notes: tuple[str, ...] = ()


def run_identity(settings: BrokerSettings, claims: RunClaims) -> RunIdentity:
    """The run a verified token proves: built from the claims and the stack alone."""
    return RunIdentity(
        repository=settings.repository,
        run_id=claims.run_id,
        attempt=claims.run_attempt,
        server_url=settings.server_url,
        repository_id=claims.repository_id,
    )


def decide(ask: SpawnAsk, claims: RunClaims, settings: BrokerSettings,
           images: ImageResolver) -> PolicyDecision:
    """Applies the stack's policy to an ask.

    Blocking (an asked image is resolved through its registry): run it in a worker thread.

    Args:
        ask: What the job asked for (already parsed strictly).
        claims: The verified token's claims.
        settings: The stack's limits.
        images: Resolves an asked image to its digest and config.

    Returns:
        The spawn request and the notes on what was changed.

    Raises:
        UsageError: A malformed or out-of-range value (GPU type, size, label, timeout).
        PolicyRefusedError: An image the stack does not allow (outside allowedImages, a tag
            where digests are required, one its registry does not resolve or serves under
            another digest), or more GPUs than the repository's cap.
    """
    notes: list[str] = []
    gpu_types = parse_gpu_types(ask.gpu_types)
    check_gpu_request(ask.gpus, gpu_types, settings.gpu_pools)
    if ask.gpus > settings.gpu_cap_per_repository:
        raise PolicyRefusedError(
            f"gpus: {ask.gpus} is more than this repository may hold at once "
            f"({settings.gpu_cap_per_repository}, the stack's GPU cap per repository)")
    runtime = settings.max_runtime_seconds
    if ask.max_runtime_seconds is not None:
        if ask.max_runtime_seconds < 1:
            raise UsageError(
                f"maxRuntimeSeconds: {ask.max_runtime_seconds} is not a positive number of "
                "seconds")
        if ask.max_runtime_seconds > runtime:
            notes.append(
                f"maxRuntimeSeconds {ask.max_runtime_seconds} is above the stack's maximum; "
                f"the pod gets {runtime}s (maxRuntimeMinutes {runtime // 60})")
        else:
            runtime = ask.max_runtime_seconds
    timeout = _seconds("timeoutSeconds", ask.timeout_seconds, DEFAULT_WAIT_TIMEOUT_SECONDS,
                       MAX_WAIT_TIMEOUT_SECONDS)
    grace = _seconds("scaleUpGraceSeconds", ask.scale_up_grace_seconds,
                     min(DEFAULT_SCALE_UP_GRACE_SECONDS, timeout), timeout)
    if ask.runner_group is not None and ask.runner_group.strip().lower() not in (
            _DEFAULT_GROUP_NAMES):
        raise UsageError(
            f"runnerGroup: {ask.runner_group!r} is not allowed; this stack's runners register "
            "in the repository's Default group")
    identity = run_identity(settings, claims)
    image, image_env = settings.image, {}
    if ask.image is not None and ask.image != settings.image:
        resolved = _job_image(ask.image, settings, images)
        # Resolved upstream; pulled (and streamed) through the stack's mirror of its registry.
        image = mirrored_reference(resolved.reference, settings.registry_mirrors)
        image_env = dict(resolved.env)
        notes.append(f"image {ask.image} runs as {image}, the runner injected")
        if resolved.runs_as_root:
            notes.append(
                f"image {ask.image} declares USER {resolved.user or 'root (none set)'}; the job "
                "runs as uid 1000 instead (restricted pods never run as root): steps that need "
                "root, such as apt-get install, will fail")
    pod = RunnerPodOptions(
        namespace=settings.namespace,
        image=image,
        image_env=image_env,
        runner_image=settings.image,
        gpu_count=ask.gpus,
        cpu=ask.cpu or pod_options.DEFAULT_CPU,
        memory=ask.memory or pod_options.DEFAULT_MEMORY,
        shm_size=ask.shm_size or pod_options.DEFAULT_SHM_SIZE,
        max_runtime_seconds=runtime,
        image_pull_secret=settings.image_pull_secret,
        extra_labels=dict(ask.labels),
        avoid_node_pools=fallback_pools(settings.gpu_pools),
    )
    request = SpawnRequest(
        identity=identity,
        pod=pod,
        gpu_types=gpu_types,
        wait_timeout_seconds=timeout,
        scale_up_grace_seconds=grace,
        runner_group_id=DEFAULT_RUNNER_GROUP_ID,
    )
    return PolicyDecision(request, tuple(notes))


def _seconds(name: str, value: float | None, default: float, highest: float) -> float:
    if value is None:
        return default
    if not 0 < value <= highest:
        raise UsageError(f"{name}: {value:g} is outside (0, {highest:g}] seconds")
    return value


def _job_image(asked: str, settings: BrokerSettings, images: ImageResolver) -> ResolvedImage:
    """An asked image the stack allows, pinned to the digest its registry serves."""
    reference = parse_image_reference(asked, "image")
    full = str(reference)
    if not any(fnmatch.fnmatchcase(full, normalize_pattern(pattern))
               for pattern in settings.allowed_images):
        allowed = ", ".join(settings.allowed_images) or "none besides the stack's runner image"
        raise PolicyRefusedError(f"image: {asked!r} ({full}) is not allowed by the stack "
                                 f"(allowedImages: {allowed})")
    if settings.require_image_digests and reference.digest is None:
        raise PolicyRefusedError(
            f"image: {asked!r} names a tag; this stack requires a digest "
            f"(requireImageDigests): ask for {reference.name}@sha256:<digest>")
    try:
        return images.resolve(reference)
    except ImageResolutionError as e:
        raise PolicyRefusedError(f"image: {e}") from None
