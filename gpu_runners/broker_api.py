"""The broker's versioned JSON API: paths, request and event shapes, error codes.

Shared by the thin client the base runner runs (`gpu_runners.cli`) and the broker service
(`gpu_runners.broker`), so the two cannot drift. Standard library only: the client imports it
and must start in well under a second.

Every request carries the job's GitHub Actions OIDC token (`Authorization: Bearer <jwt>`).
The run a request acts for is the token's (`run_id`, `run_attempt`, `repository_id`), never
anything in the path or the body: there is no run id to name.

- `POST /v1/runner`: start this run's GPU runner (body: `SpawnAsk`). The answer is an NDJSON
  stream of `StreamEvent`s ending with `ready` or `failed`. Idempotent: a second request for
  the same run attaches to the first one's progress, or adopts its pod and registration.
- `GET /v1/runner`: this run's runner (`RunnerView`); 404 when there is none.
- `DELETE /v1/runner`: remove this run's pod, Secret and registration (`DeleteOutcome`); it
  stops a spawn in progress first; already gone is success.
- `GET /v1/runners`: every GPU runner of the repository (`RunnerView`s), for operators.
- `GET /healthz`, `GET /readyz`, `GET /metrics`: liveness, readiness, Prometheus metrics
  (no token).

One path serves the base runner pods, not jobs, and takes no OIDC token:

- `POST /v1/base-runner/config`: the calling base runner pod's one JIT runner config
  (`BaseRunnerConfig`). The pod authenticates with its projected ServiceAccount token
  (`Authorization: Bearer <token>`, audience `contract.base_runner_audience(<broker
  audience>)`), which the broker checks through the Kubernetes TokenReview API: only the
  `base-runner` ServiceAccount of the runner namespace, only a live pod of the base runner
  Deployment, at most one config per pod (409 `already_served` after that). No body.

Errors before a stream starts are JSON `{"error": <code>, "message": <one line>}` with the
HTTP status of `ERROR_STATUS`; after, the stream's last line is a `failed` event with the same
code. The client exits with `EXIT_CODES[code]`. A body larger than `MAX_BODY_BYTES` is
answered 413 (code `usage`) before the token is read.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

API_VERSION = "v1"
RUNNER_PATH = f"/{API_VERSION}/runner"
RUNNERS_PATH = f"/{API_VERSION}/runners"
BASE_RUNNER_CONFIG_PATH = f"/{API_VERSION}/base-runner/config"
HEALTH_PATH = "/healthz"
READY_PATH = "/readyz"
METRICS_PATH = "/metrics"
#: Content type of the spawn stream: one JSON object per line.
NDJSON = "application/x-ndjson"
#: Largest request body the broker reads; anything larger is refused before parsing.
MAX_BODY_BYTES = 16 * 1024
#: Seconds between heartbeat events on a quiet stream, so that proxies and the client's read
#: timeout can tell a slow scale-up from a dead connection.
HEARTBEAT_SECONDS = 15.0

# --- Error codes: what went wrong, the HTTP status before a stream, the client's exit code -----

USAGE = "usage"  # a malformed or out-of-range ask
UNAUTHORIZED = "unauthorized"  # no token, or a token that fails verification
FORBIDDEN = "forbidden"  # a valid token whose claims or ask the stack's policy refuses
NOT_FOUND = "not_found"
GITHUB = "github"
KUBERNETES = "kubernetes"
NO_CAPACITY = "no_capacity"
IMAGE_PULL = "image_pull"
POD_FAILED = "pod_failed"
TIMEOUT = "timeout"
CANCELLED = "cancelled"  # a DELETE for the run stopped this spawn
UNAVAILABLE = "unavailable"  # the broker is shutting down or not ready
ALREADY_SERVED = "already_served"  # a base runner pod asked for a second runner config
INTERNAL = "internal"

ERROR_STATUS: Mapping[str, int] = {
    USAGE: 400,
    UNAUTHORIZED: 401,
    FORBIDDEN: 403,
    NOT_FOUND: 404,
    ALREADY_SERVED: 409,
    GITHUB: 502,
    KUBERNETES: 502,
    UNAVAILABLE: 503,
    INTERNAL: 500,
}

#: Exit codes of `python3 -m gpu_runners` per error code; 0 is success.
EXIT_CODES: Mapping[str, int] = {
    USAGE: 2,
    GITHUB: 3,
    KUBERNETES: 4,
    NO_CAPACITY: 5,
    IMAGE_PULL: 6,
    POD_FAILED: 7,
    CANCELLED: 7,
    TIMEOUT: 8,
    UNAUTHORIZED: 9,
    FORBIDDEN: 9,
    NOT_FOUND: 1,
    ALREADY_SERVED: 1,
    UNAVAILABLE: 10,
    INTERNAL: 1,
}
#: Exit code when the broker cannot be reached at all (connection refused, DNS, timeouts).
EXIT_UNREACHABLE = 10


class ProtocolError(ValueError):
    """A request or event does not have the documented shape; names the field."""

    def __init__(self, field_name: str, message: str) -> None:
        super().__init__(f"{field_name}: {message}")
        self.field_name = field_name


def _take(data: Mapping[str, Any], name: str, kind: type | tuple[type, ...],
          default: Any = None) -> Any:
    value = data.get(name, default)
    if value is None:
        return default
    # bool is an int in Python; a JSON true is not a GPU count.
    if isinstance(value, bool) and bool not in (kind if isinstance(kind, tuple) else (kind,)):
        raise ProtocolError(name, f"expected {_kind_name(kind)}, got a boolean")
    if not isinstance(value, kind):
        raise ProtocolError(name, f"expected {_kind_name(kind)}, got {type(value).__name__}")
    return value


def _kind_name(kind: type | tuple[type, ...]) -> str:
    kinds = kind if isinstance(kind, tuple) else (kind,)
    names = {int: "an integer", float: "a number", str: "a string", list: "a list",
             dict: "an object", bool: "a boolean"}
    return " or ".join(names.get(k, k.__name__) for k in kinds)


def _strings(data: Mapping[str, Any], name: str) -> tuple[str, ...]:
    values = _take(data, name, list, [])
    if not all(isinstance(v, str) for v in values):
        raise ProtocolError(name, "expected a list of strings")
    return tuple(values)


@dataclass(frozen=True)
class SpawnAsk:
    """What a job asks for in `POST /v1/runner`: the shape options `spawn` takes.

    The broker checks every value against the stack's policy (GPU pools, runtime cap, allowed
    images, per-repository GPU cap) whatever the job sends. None means "the stack's default".

    Attributes:
        gpus: GPUs for the runner.
        gpu_types: Accelerators to try in order; empty for any pool.
        cpu, memory, shm_size: Kubernetes quantities (None: the defaults of `pod_options`).
        max_runtime_seconds: The pod's lifetime; clamped to the stack's maxRuntimeMinutes.
        timeout_seconds: How long to wait for the runner to come online.
        scale_up_grace_seconds: How long an unschedulable pod may wait for a scale-up.
        image: Runner image; None for the stack's runner image.
        labels: Extra pod labels.
        runner_group: Organisation runner group name or id; None for the default group.
    """

    gpus: int = 1
    gpu_types: tuple[str, ...] = ()
    cpu: str | None = None
    memory: str | None = None
    shm_size: str | None = None
    max_runtime_seconds: int | None = None
    timeout_seconds: float | None = None
    scale_up_grace_seconds: float | None = None
    image: str | None = None
    labels: Mapping[str, str] = field(default_factory=dict)
    runner_group: str | None = None

    def to_json(self) -> dict[str, Any]:
        """The request body, without the fields left at None."""
        body = {
            "gpus": self.gpus,
            "gpuTypes": list(self.gpu_types),
            "cpu": self.cpu,
            "memory": self.memory,
            "shmSize": self.shm_size,
            "maxRuntimeSeconds": self.max_runtime_seconds,
            "timeoutSeconds": self.timeout_seconds,
            "scaleUpGraceSeconds": self.scale_up_grace_seconds,
            "image": self.image,
            "labels": dict(self.labels),
            "runnerGroup": self.runner_group,
        }
        return {key: value for key, value in body.items() if value is not None}

    @classmethod
    def from_json(cls, data: Any) -> SpawnAsk:
        """Parses a request body strictly: unknown fields and wrong types are refused.

        Unknown fields are refused rather than ignored so that a job cannot believe it chose
        something (a run id, a namespace) that the broker never takes from a request.

        Raises:
            ProtocolError: Names the offending field.
        """
        if not isinstance(data, dict):
            raise ProtocolError("body", "expected a JSON object")
        unknown = sorted(set(data) - _SPAWN_ASK_FIELDS)
        if unknown:
            raise ProtocolError(unknown[0], "unknown field (allowed: "
                                f"{', '.join(sorted(_SPAWN_ASK_FIELDS))})")
        labels = _take(data, "labels", dict, {})
        if not all(isinstance(k, str) and isinstance(v, str) for k, v in labels.items()):
            raise ProtocolError("labels", "expected an object of string values")
        max_runtime = _take(data, "maxRuntimeSeconds", int)
        timeout = _take(data, "timeoutSeconds", (int, float))
        grace = _take(data, "scaleUpGraceSeconds", (int, float))
        return cls(
            gpus=_take(data, "gpus", int, 1),
            gpu_types=_strings(data, "gpuTypes"),
            cpu=_take(data, "cpu", str),
            memory=_take(data, "memory", str),
            shm_size=_take(data, "shmSize", str),
            max_runtime_seconds=max_runtime,
            timeout_seconds=None if timeout is None else float(timeout),
            scale_up_grace_seconds=None if grace is None else float(grace),
            image=_take(data, "image", str),
            labels=dict(labels),
            runner_group=_take(data, "runnerGroup", str),
        )


_SPAWN_ASK_FIELDS = frozenset({
    "gpus", "gpuTypes", "cpu", "memory", "shmSize", "maxRuntimeSeconds", "timeoutSeconds",
    "scaleUpGraceSeconds", "image", "labels", "runnerGroup",
})


@dataclass(frozen=True)
class SpawnResult:
    """What a spawn started, for the step outputs and the summary.

    Attributes:
        label: The label to put in `runs-on` (also the runner and pod name).
        namespace: Namespace of the pod.
        pod_name: The GPU pod.
        node: Node the pod runs on.
        gpu_type: Accelerator of the pod's pool ("any" when none was asked for).
        gpu_count: GPUs reserved.
        node_added: Whether the autoscaler had to add a node for the pod.
        reused: Whether an earlier spawn's pod and registration were adopted.
        seconds: Seconds from start to runner online.
        stage_seconds: Seconds from start at which each stage was reached, by the names of
            `pod_progress.Stage` ("node ready" and "driver ready" only for a new node the
            broker could read). An open mapping: a client ignores stages it does not know,
            and an older broker sends fewer.
        run_url: The workflow run attempt the runner serves.
        image_pull: How the image reached the node: "cached", "streamed", "pulled" (in
            full), or "" when not seen.
        preemptions: One line per pod of this run lost to its node and replaced (a Spot VM
            reclaimed), oldest first; empty when none was.
    """

    label: str
    namespace: str
    pod_name: str
    node: str | None
    gpu_type: str
    gpu_count: int
    node_added: bool
    reused: bool
    seconds: float
    stage_seconds: Mapping[str, float] = field(default_factory=dict)
    run_url: str = ""
    image_pull: str = ""
    preemptions: Sequence[str] = ()

    def to_json(self) -> dict[str, Any]:
        """The `result` of a `ready` event."""
        data = asdict(self)
        data["stage_seconds"] = dict(self.stage_seconds)
        data["preemptions"] = list(self.preemptions)
        return data

    @classmethod
    def from_json(cls, data: Any) -> SpawnResult:
        """Parses the `result` of a `ready` event.

        Raises:
            ProtocolError: A field is missing or has the wrong type.
        """
        if not isinstance(data, dict):
            raise ProtocolError("result", "expected a JSON object")
        for name in ("label", "namespace", "pod_name", "gpu_type"):
            if not isinstance(data.get(name), str):
                raise ProtocolError(f"result.{name}", "expected a string")
        stages = _take(data, "stage_seconds", dict, {})
        return cls(
            label=data["label"],
            namespace=data["namespace"],
            pod_name=data["pod_name"],
            node=_take(data, "node", str),
            gpu_type=data["gpu_type"],
            gpu_count=_take(data, "gpu_count", int, 0),
            node_added=bool(_take(data, "node_added", bool, False)),
            reused=bool(_take(data, "reused", bool, False)),
            seconds=float(_take(data, "seconds", (int, float), 0.0)),
            stage_seconds={str(k): float(v) for k, v in stages.items()},
            run_url=_take(data, "run_url", str, ""),
            image_pull=_take(data, "image_pull", str, ""),
            preemptions=_strings(data, "preemptions"),
        )


# --- The spawn stream -------------------------------------------------------------------------

PROGRESS = "progress"  # {"event": "progress", "line": "<a stage line, as the CLI prints it>"}
HEARTBEAT = "heartbeat"  # {"event": "heartbeat"}: nothing new, the spawn goes on
READY = "ready"  # {"event": "ready", "result": SpawnResult}: the last line on success
FAILED = "failed"  # {"event": "failed", "error": <code>, "message": ...}: the last on failure
STREAM_EVENTS = frozenset({PROGRESS, HEARTBEAT, READY, FAILED})


@dataclass(frozen=True)
class StreamEvent:
    """One line of the spawn stream."""

    event: str
    line: str = ""
    result: SpawnResult | None = None
    error: str = ""
    message: str = ""

    def encode(self) -> bytes:
        """The event as one NDJSON line."""
        body: dict[str, Any] = {"event": self.event}
        if self.event == PROGRESS:
            body["line"] = self.line
        elif self.event == READY:
            assert self.result is not None
            body["result"] = self.result.to_json()
        elif self.event == FAILED:
            body["error"] = self.error
            body["message"] = self.message
        return json.dumps(body, separators=(",", ":")).encode() + b"\n"

    @classmethod
    def decode(cls, raw: bytes | str) -> StreamEvent:
        """Parses one NDJSON line.

        Raises:
            ProtocolError: Not JSON, or not a known event.
        """
        try:
            data = json.loads(raw)
        except ValueError as e:
            raise ProtocolError("stream", f"a line is not JSON ({e})") from e
        if not isinstance(data, dict) or data.get("event") not in STREAM_EVENTS:
            raise ProtocolError("stream", "a line is not a known event")
        kind = data["event"]
        if kind == READY:
            return cls(READY, result=SpawnResult.from_json(data.get("result")))
        if kind == FAILED:
            return cls(FAILED, error=str(data.get("error") or INTERNAL),
                       message=str(data.get("message") or ""))
        return cls(kind, line=str(data.get("line") or ""))


@dataclass(frozen=True)
class DeleteOutcome:
    """What `DELETE /v1/runner` removed (names), per kind; empty lists when all was gone.

    `recoveries` says, one line each, what the broker did for the run's runners lost to their
    nodes (Spot preemption), and whether a recovery is still to come.
    """

    pods: Sequence[str] = ()
    secrets: Sequence[str] = ()
    registrations: Sequence[str] = ()
    recoveries: Sequence[str] = ()

    def to_json(self) -> dict[str, Any]:
        return {"pods": list(self.pods), "secrets": list(self.secrets),
                "registrations": list(self.registrations), "recoveries": list(self.recoveries)}

    @classmethod
    def from_json(cls, data: Any) -> DeleteOutcome:
        if not isinstance(data, dict):
            raise ProtocolError("body", "expected a JSON object")
        return cls(pods=_strings(data, "pods"), secrets=_strings(data, "secrets"),
                   registrations=_strings(data, "registrations"),
                   recoveries=_strings(data, "recoveries"))


@dataclass(frozen=True)
class RunnerView:
    """One GPU runner as `GET /v1/runner(s)` shows it; nothing secret."""

    name: str
    run_id: int
    attempt: int
    phase: str
    node: str
    gpu_type: str
    gpus: int
    age_seconds: float
    run_url: str = ""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, data: Any) -> RunnerView:
        if not isinstance(data, dict):
            raise ProtocolError("runner", "expected a JSON object")
        return cls(
            name=_take(data, "name", str, ""),
            run_id=_take(data, "run_id", int, 0),
            attempt=_take(data, "attempt", int, 0),
            phase=_take(data, "phase", str, ""),
            node=_take(data, "node", str, ""),
            gpu_type=_take(data, "gpu_type", str, ""),
            gpus=_take(data, "gpus", int, 0),
            age_seconds=float(_take(data, "age_seconds", (int, float), 0.0)),
            run_url=_take(data, "run_url", str, ""),
        )


def error_body(code: str, message: str) -> dict[str, str]:
    """The JSON body of an error answered before any stream."""
    return {"error": code, "message": " ".join(message.split())}


@dataclass(frozen=True)
class BaseRunnerConfig:
    """The answer to `POST /v1/base-runner/config`: the pod's single-use runner.

    `repr` leaves the config out: it is a credential (the runner's registration key) and must
    not reach a log through a debug print.

    Attributes:
        runner_name: The registration's name: the pod's name.
        runner_id: GitHub's id of the registration.
        labels: The registration's labels.
        encoded_jit_config: The config `run.sh` takes (ACTIONS_RUNNER_INPUT_JITCONFIG).
    """

    runner_name: str
    runner_id: int
    labels: tuple[str, ...]
    encoded_jit_config: str = field(repr=False)

    def to_json(self) -> dict[str, Any]:
        """The answer's JSON body."""
        return {"runner_name": self.runner_name, "runner_id": self.runner_id,
                "labels": list(self.labels), "encoded_jit_config": self.encoded_jit_config}
