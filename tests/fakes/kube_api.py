"""A stateful fake of the Kubernetes core/v1 API, served over HTTP on 127.0.0.1.

`gpu_runners` talks to the cluster through the official `kubernetes` client. Its tests point that
client at this server, so the real client, its serialization and its HTTP paths run end to end.
Existing fakes fall short (no watch, label selectors ignored, namespace bugs), hence this one.

What it emulates, for what `gpu_runners` uses:

- Pods, Secrets, ConfigMaps and Events in `/api/v1/namespaces/{ns}/...` (and cluster-wide
  lists in `/api/v1/{resource}`): create, get, delete, deletecollection, list with label and
  field selectors, `limit`/`continue` pagination from a consistent snapshot, and `watch=true`
  streams from a `resourceVersion`, honouring `timeoutSeconds`. ConfigMaps can also be replaced
  (PUT, 409 Conflict when `metadata.resourceVersion` is stale) and patched (JSON patch, JSON
  merge patch, strategic merge patch), and `immutable` ones refuse data changes; every
  namespace holds `kube-root-ca.crt`. Nodes, Namespaces and ResourceQuotas are readable.
  Errors are `Status` objects with the API server's reasons and message shapes.
- The API server's admission on create, in its order: object validation (names, labels,
  containers, and a strict JSON-schema check (tests/harness/kubernetes_schema.py)),
  Pod Security `restricted`, ResourceQuota on `nvidia.com/gpu` and pod count, then 409 on a name
  already taken.
- Defaulting (restartPolicy, requests from limits, the ServiceAccount token volume, ...), uid,
  a cluster-wide monotonic resourceVersion, creationTimestamp.
- A scheduler, cluster autoscaler and kubelet per `PodScript`: events with the real reasons,
  messages and sources, pod conditions and container states as they progress, node scale-up
  (the new node registered NotReady, then Ready, then its GPUs allocatable once the driver is
  in: `PodScript.node_not_ready_seconds`, `driver_delay`),
  `activeDeadlineSeconds`, graceful deletion, and the garbage collector that deletes Secrets
  whose owner Pod is gone. Tests end pods as the cluster would: `finish_pod` (an exit code and
  reason, e.g. OOMKilled), `exceed_deadline`, `preempt_pod` (a GKE Spot VM reclaimed: the
  kubelet's graceful node shutdown, then the node gone) and `lose_pod_with_node` (the node
  gone, then PodGC).
- Pod logs (`GET .../pods/{name}/log` with `container`, `follow`, `tailLines`,
  `sinceSeconds`): plain text, a chunked stream with `follow=true` that ends when the container
  terminates, and the kubelet's 400 while the container waits. A started runner container
  prints what the Actions runner prints, then "Listening for Jobs" once it has connected
  (`PodScript.connect_delay`); `on_runner_listening` and `append_log` drive it.
- Faults injected per method and path: a status, a delay, or a dropped connection; and
  callbacks on chosen requests, before or after they are applied (`on_request`), e.g. to
  kill a client between two steps.
- A ReplicaSet stand-in (`replicate`): it keeps a number of pods of a template, making a new
  one (new name, new uid, new volumes) as soon as one is deleted; and, with `volume_root`,
  each pod's emptyDir volumes as directories, created empty with the pod and removed with it
  (`empty_dir`). A container that exits under restartPolicy Always is shown restarting after a
  back-off (CrashLoopBackOff, restartCount + 1), as the kubelet does, not Succeeded.
- Projected ServiceAccount tokens bound to a pod (`projected_token`) and the TokenReview API
  (`POST /apis/authentication.k8s.io/v1/tokenreviews`) that checks them as the API server
  does: `spec.audiences` (empty means the API server's audience), `status.audiences` the
  intersection, the ServiceAccount's username and groups, and `extra` naming the pod; a token
  is refused once it has expired (`advance_token_clock`) or its pod is gone.

Deliberately stricter than a real API server: unknown fields are rejected (422) instead of
dropped with a warning, so a misspelt field fails the test; GKE's ExtendedResourceToleration
admission (which adds the GPU toleration) is not emulated, so a pod must tolerate GPU taints
itself. Not emulated: PUT/PATCH of anything but ConfigMaps (405), server-side apply
(`application/apply-patch+yaml`, 415), ServiceAccount existence, logs of a previous container
(`previous`), `timestamps`, `limitBytes`, a scheduler retry of pods left Pending (a pod that is
unschedulable stays so). RBAC is checked only when `rbac_rules` are given; a Role's rules
never grant a cluster-scoped resource (nodes, namespaces, tokenreviews): `cluster_rules` do.
"""

from __future__ import annotations

import base64
import contextlib
import copy
import enum
import fnmatch
import heapq
import http.server
import itertools
import json
import math
import random
import re
import secrets
import select
import shutil
import socket
import threading
import time
import traceback
import uuid
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal, cast
from urllib.parse import parse_qs, urlsplit

from gpu_runners.contract import (
    DEFAULT_NAMESPACE,
    GKE_ACCELERATOR_LABEL,
    GPU_RESOURCE,
    GPU_TAINT_KEY,
    GPU_TAINT_VALUE,
    JIT_MOUNT_DIR,
    JIT_SECRET_KEY,
    NODE_GPU_LABEL,
    PSA_ENFORCE_LABEL,
    PSA_LEVEL,
)
from tests.harness.kubernetes_schema import KUBERNETES_VERSION, strict_errors

JSON = dict[str, Any]

#: Name of the ResourceQuota the fake enforces when a quota is set.
DEFAULT_QUOTA_NAME = "gpu-quota"
_SCHEDULER = "default-scheduler"
_AUTOSCALER = "cluster-autoscaler"
_KUBELET = "kubelet"
_GKE_NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
_HOSTNAME_LABEL = "kubernetes.io/hostname"
_SA_TOKEN_MOUNT = "/var/run/secrets/kubernetes.io/serviceaccount"
#: The audience of tokens for the API server itself: what a TokenReview without
#: `spec.audiences` checks for, and a projected token without `audience` is issued for.
API_SERVER_AUDIENCE = "https://kubernetes.default.svc.cluster.local"
#: The API server's least `expirationSeconds` of a projected token.
MIN_TOKEN_SECONDS = 600
_AUTHENTICATION_API = "authentication.k8s.io/v1"
_DEADLINE_MESSAGE = "Pod was active on the node longer than the specified deadline"
# The characters the API server draws generateName suffixes from (no vowels: no words).
_NAME_SUFFIX_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"
_WATCH_POLL_SECONDS = 0.2
#: What the Actions runner (actions/runner, src/Runner.Listener) prints in a JIT pod: the image's
#: entrypoint first, then, once its session with GitHub exists, these lines; the last is
#: `{DateTime.UtcNow:u}: Listening for Jobs` (Runner.cs, RunAsync), the same in JIT mode.
RUNNER_START_LINES = (
    f"entrypoint: starting the single-use runner from {JIT_MOUNT_DIR}/{JIT_SECRET_KEY}",
)
RUNNER_CONNECTED_LINES = ("\u221a Connected to GitHub", "", "Current runner version: '2.328.0'")
RUNNER_LISTENING_SUFFIX = ": Listening for Jobs"


# --- What the cluster looks like and what happens to a pod ------------------------------------


@dataclass(frozen=True)
class Taint:
    """A node taint, as in `spec.taints` of a Node."""

    key: str
    value: str = ""
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] = "NoSchedule"


#: The taint GKE puts on GPU nodes; a GPU pod must tolerate it.
GPU_TAINT = Taint(GPU_TAINT_KEY, GPU_TAINT_VALUE, "NoSchedule")


@dataclass(frozen=True)
class FakeNode:
    """A node that exists from the start.

    Attributes:
        name: Node name.
        labels: Node labels (`kubernetes.io/hostname` is added).
        gpus: Allocatable `nvidia.com/gpu`.
        taints: Node taints.
    """

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    gpus: int = 0
    taints: tuple[Taint, ...] = ()


@dataclass(frozen=True)
class FakeNodePool:
    """An autoscaled node pool the cluster autoscaler can add nodes from.

    Attributes:
        name: Pool name (the node label `cloud.google.com/gke-nodepool` and node name infix).
        labels: Labels of every node of the pool.
        gpus_per_node: Allocatable `nvidia.com/gpu` of each new node.
        max_nodes: Size the autoscaler stops at ("max node group size reached").
        taints: Taints of every node of the pool.
    """

    name: str
    labels: Mapping[str, str] = field(default_factory=dict)
    gpus_per_node: int = 1
    max_nodes: int = 3
    taints: tuple[Taint, ...] = (GPU_TAINT,)


def default_nodes() -> list[FakeNode]:
    """Three CPU nodes labelled `gpu=false`, as the stack's CPU pool."""
    return [
        FakeNode(
            f"gke-fake-cpu-pool-{index}",
            {NODE_GPU_LABEL: "false", _GKE_NODEPOOL_LABEL: "cpu-pool"},
        )
        for index in range(3)
    ]


def default_node_pools() -> list[FakeNodePool]:
    """One GPU pool of NVIDIA L4 nodes (1 GPU each), at zero nodes, autoscaled to 3."""
    return [
        FakeNodePool(
            "gpu-nvidia-l4",
            {NODE_GPU_LABEL: "true", GKE_ACCELERATOR_LABEL: "nvidia-l4"},
            gpus_per_node=1,
            max_nodes=3,
        )
    ]


class Outcome(enum.Enum):
    """What the simulated control plane and kubelet do with a new pod."""

    RUN = "run"  # scheduled on an existing node; pulled, created, started; Running and Ready
    SCALE_UP = "scale_up"  # FailedScheduling, TriggeredScaleUp, a new node, then as RUN
    UNSCHEDULABLE = "unschedulable"  # FailedScheduling, NotTriggerScaleUp; stays Pending
    IMAGE_PULL_ERROR = "image_pull_error"  # ErrImagePull, then ImagePullBackOff; stays Pending
    CRASH = "crash"  # runs, then its container exits non-zero: phase Failed
    SUCCEED = "succeed"  # runs, then its container exits 0: phase Succeeded


@dataclass(frozen=True)
class PodScript:
    """The scripted life of one pod. Delays are seconds, short by default.

    Attributes:
        outcome: What happens.
        schedule_delay: Creation to binding (or to FailedScheduling).
        step_delay: Between kubelet and autoscaler steps (pull, start, scale-up event, ...).
        scale_up_delay: TriggeredScaleUp to the new node being Ready.
        node_not_ready_seconds: How long, within `scale_up_delay`, the new node is registered
            (its Node object created, so its creationTimestamp) but NotReady, as while its
            kubelet waits for the network plugin; 0: created Ready.
        driver_delay: The new node being Ready to its GPUs being allocatable (GKE's driver
            installer, then the device plugin advertising `nvidia.com/gpu`); the scheduler
            binds the pod then. 0: allocatable as it turns Ready.
        run_duration: Running to terminated, for CRASH and SUCCEED.
        exit_code: The container's exit code for CRASH.
        message: Overrides the FailedScheduling message (UNSCHEDULABLE, SCALE_UP) or the image
            pull error (IMAGE_PULL_ERROR); by default they are computed as the real components
            would write them.
        connect_delay: Seconds from the container starting to its runner being connected to
            GitHub and printing "Listening for Jobs"; None for the fake's
            `runner_connect_delay`; `math.inf` for a runner that never connects.
    """

    outcome: Outcome
    schedule_delay: float = 0.02
    step_delay: float = 0.01
    scale_up_delay: float = 0.05
    node_not_ready_seconds: float = 0.0
    driver_delay: float = 0.0
    run_duration: float = 0.05
    exit_code: int = 1
    message: str | None = None
    connect_delay: float | None = None

    def __post_init__(self) -> None:
        if not 0 <= self.node_not_ready_seconds <= self.scale_up_delay or self.driver_delay < 0:
            raise ValueError(
                "PodScript: 0 <= node_not_ready_seconds <= scale_up_delay and driver_delay >= 0"
            )
        if self.connect_delay is not None and not self.connect_delay >= 0:
            raise ValueError(
                f"PodScript.connect_delay must be >= 0 (math.inf: never) or None, "
                f"got {self.connect_delay}"
            )

    @classmethod
    def run(
        cls,
        *,
        schedule_delay: float = 0.02,
        step_delay: float = 0.01,
        connect_delay: float | None = None,
    ) -> PodScript:
        """The pod is scheduled on an existing node and runs until deleted or finished."""
        return cls(
            Outcome.RUN,
            schedule_delay=schedule_delay,
            step_delay=step_delay,
            connect_delay=connect_delay,
        )

    @classmethod
    def scale_up(
        cls,
        *,
        scale_up_delay: float = 0.05,
        node_not_ready_seconds: float = 0.0,
        driver_delay: float = 0.0,
    ) -> PodScript:
        """No node fits; the autoscaler adds one and the pod runs there."""
        return cls(
            Outcome.SCALE_UP,
            scale_up_delay=scale_up_delay,
            node_not_ready_seconds=node_not_ready_seconds,
            driver_delay=driver_delay,
        )

    @classmethod
    def unschedulable(cls, message: str | None = None) -> PodScript:
        """No node fits and no scale-up would help; the pod stays Pending."""
        return cls(Outcome.UNSCHEDULABLE, message=message)

    @classmethod
    def image_pull_error(cls, message: str | None = None) -> PodScript:
        """The image cannot be pulled: ErrImagePull, then ImagePullBackOff."""
        return cls(Outcome.IMAGE_PULL_ERROR, message=message)

    @classmethod
    def crash(cls, *, exit_code: int = 1, run_duration: float = 0.05) -> PodScript:
        """The pod runs, then its container exits with `exit_code` (phase Failed)."""
        if exit_code == 0:
            raise ValueError("PodScript.crash: exit_code must be non-zero; use succeed()")
        return cls(Outcome.CRASH, exit_code=exit_code, run_duration=run_duration)

    @classmethod
    def succeed(cls, *, run_duration: float = 0.05) -> PodScript:
        """The pod runs, then its container exits 0 (phase Succeeded)."""
        return cls(Outcome.SUCCEED, exit_code=0, run_duration=run_duration)


@dataclass(frozen=True)
class RecordedRequest:
    """One request the fake answered.

    Attributes:
        method: HTTP method.
        path: URL path, without the query.
        query: Query parameters (the last value of each).
        headers: Request headers.
        body: The parsed JSON body, or None.
        status: The HTTP status answered (0 for a dropped connection).
    """

    method: str
    path: str
    query: Mapping[str, str]
    headers: Mapping[str, str]
    body: Any
    status: int


# --- Errors as the API server reports them -----------------------------------------------------

_REASONS = {
    400: "BadRequest",
    401: "Unauthorized",
    403: "Forbidden",
    404: "NotFound",
    405: "MethodNotAllowed",
    409: "AlreadyExists",
    410: "Expired",
    422: "Invalid",
    429: "TooManyRequests",
    500: "InternalError",
    503: "ServiceUnavailable",
    504: "Timeout",
}


class ApiError(Exception):
    """An API error, answered as a `Status` object."""

    def __init__(
        self, code: int, message: str, *, reason: str | None = None, details: JSON | None = None
    ) -> None:
        super().__init__(message)
        self.code = code
        self.message = message
        self.reason = reason or _REASONS.get(code, "InternalError")
        self.details = details

    def status(self) -> JSON:
        """The `Status` object the API server sends for this error."""
        body: JSON = {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": self.message,
            "reason": self.reason,
            "code": self.code,
        }
        if self.details is not None:
            body["details"] = self.details
        return body


# --- Resources -------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Resource:
    plural: str
    kind: str
    namespaced: bool
    writable: bool
    field_labels: frozenset[str]
    #: API group: "" for core/v1 (served under /api/v1), else served under /apis/<group>/v1.
    group: str = ""

    @property
    def api_version(self) -> str:
        """The `apiVersion` of the resource's objects ("v1", "apps/v1")."""
        return f"{self.group}/v1" if self.group else "v1"


_COMMON_FIELDS = frozenset({"metadata.name", "metadata.namespace"})
_RESOURCES = {
    resource.plural: resource
    for resource in (
        _Resource(
            "pods",
            "Pod",
            True,
            True,
            _COMMON_FIELDS
            | {
                "spec.nodeName",
                "spec.restartPolicy",
                "spec.schedulerName",
                "spec.serviceAccountName",
                "spec.hostNetwork",
                "status.phase",
                "status.podIP",
                "status.nominatedNodeName",
            },
        ),
        _Resource("secrets", "Secret", True, True, _COMMON_FIELDS | {"type"}),
        _Resource("configmaps", "ConfigMap", True, True, _COMMON_FIELDS),
        _Resource(
            "events",
            "Event",
            True,
            True,
            _COMMON_FIELDS
            | {
                "involvedObject.kind",
                "involvedObject.namespace",
                "involvedObject.name",
                "involvedObject.uid",
                "involvedObject.apiVersion",
                "involvedObject.resourceVersion",
                "involvedObject.fieldPath",
                "reason",
                "reportingComponent",
                "source",
                "type",
            },
        ),
        _Resource("resourcequotas", "ResourceQuota", True, False, _COMMON_FIELDS),
        _Resource(
            "nodes", "Node", False, False, frozenset({"metadata.name", "spec.unschedulable"})
        ),
        _Resource("namespaces", "Namespace", False, False, frozenset({"metadata.name"})),
        # Read-only, seeded by tests (`seed`): what a stack's Deployments report.
        _Resource("deployments", "Deployment", True, False, _COMMON_FIELDS, group="apps"),
        # Create only, never stored: the answer is the review (see FakeKubernetes.review_token).
        _Resource("tokenreviews", "TokenReview", False, True, frozenset(),
                  group="authentication.k8s.io"),
    )
}


def _field_value(obj: JSON, label: str) -> str:
    """The string value a field selector compares for `label` (missing fields are "")."""
    if label == "source":
        return str(obj.get("source", {}).get("component", ""))
    value: Any = obj
    for part in label.split("."):
        value = value.get(part) if isinstance(value, dict) else None
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


# --- Selectors -------------------------------------------------------------------------------

_SELECTOR_OPERATORS = frozenset({"==", "!=", "=", "(", ")", "!", ">", "<"})
_SELECTOR_TOKENS = re.compile(r"\s*(?:(==|!=|=|\(|\)|,|!|>|<)|([^\s=!(),<>]+))")


@dataclass(frozen=True)
class _Requirement:
    """One term of a label selector: `key <operator> values`."""

    key: str
    operator: Literal["exists", "!", "=", "!=", "in", "notin", ">", "<"]
    values: frozenset[str] = frozenset()

    def matches(self, labels: Mapping[str, str]) -> bool:
        value = labels.get(self.key)
        if self.operator == "exists":
            return value is not None
        if self.operator == "!":
            return value is None
        if self.operator in ("=", "in"):
            return value in self.values
        if self.operator in ("!=", "notin"):
            return value not in self.values
        (bound,) = self.values
        return _compare_label(value, int(bound), self.operator == ">")


@dataclass(frozen=True)
class LabelSelector:
    """A parsed label selector; `matches(labels)` applies it."""

    requirements: tuple[_Requirement, ...]

    def matches(self, labels: Mapping[str, str]) -> bool:
        """Whether `labels` satisfy every requirement."""
        return all(requirement.matches(labels) for requirement in self.requirements)


def parse_label_selector(text: str) -> LabelSelector:
    """Parses a label selector as the API server does (`a=b,c!=d,e in (f,g),h notin (i),j,!k`).

    Args:
        text: The `labelSelector` query value.

    Returns:
        The selector.

    Raises:
        ApiError: 400 BadRequest for a malformed selector.
    """
    tokens: list[str] = []
    position = 0
    while text[position:].strip():
        match = _SELECTOR_TOKENS.match(text, position)
        if match is None:
            raise ApiError(400, f"unable to parse requirement: invalid label selector {text!r}")
        tokens.append(match.group(1) or match.group(2))
        position = match.end()
    requirements: list[_Requirement] = []
    index = 0

    def fail(detail: str) -> ApiError:
        return ApiError(400, f"unable to parse requirement: {detail} in label selector {text!r}")

    def take() -> str:
        nonlocal index
        if index >= len(tokens):
            raise fail("unexpected end")
        index += 1
        return tokens[index - 1]

    def peek() -> str | None:
        return tokens[index] if index < len(tokens) else None

    while index < len(tokens):
        key = take()
        if key == "!":
            requirements.append(_Requirement(take(), "!"))
        else:
            operator = peek()
            if operator is None or operator == ",":
                requirements.append(_Requirement(key, "exists"))
            elif operator in ("=", "==", "!="):
                take()
                value = "" if peek() in (None, ",") else take()
                if value in _SELECTOR_OPERATORS:
                    raise fail(f"invalid value {value!r} for {key!r}")
                requirements.append(
                    _Requirement(key, "!=" if operator == "!=" else "=", frozenset({value}))
                )
            elif operator in ("in", "notin"):
                take()
                if take() != "(":
                    raise fail(f"expected '(' after {operator}")
                values: set[str] = set()
                while (item := take()) != ")":
                    if item != ",":
                        values.add(item)
                requirements.append(
                    _Requirement(key, "in" if operator == "in" else "notin", frozenset(values))
                )
            elif operator in (">", "<"):
                take()
                bound = take()
                if not bound.isdigit():
                    raise fail(f"{bound!r} is not an integer")
                requirements.append(
                    _Requirement(key, ">" if operator == ">" else "<", frozenset({bound}))
                )
            else:
                raise fail(f"unexpected {operator!r} after {key!r}")
        if index < len(tokens) and take() != ",":
            raise fail("expected ','")
    return LabelSelector(tuple(requirements))


def _compare_label(value: str | None, bound: int, greater: bool) -> bool:
    if value is None or not value.lstrip("-").isdigit():
        return False
    return int(value) > bound if greater else int(value) < bound


def _parse_field_selector(text: str, resource: _Resource) -> Callable[[JSON], bool]:
    """Parses a field selector (`a=b,c!=d`) over the fields `resource` supports."""
    terms: list[tuple[str, bool, str]] = []
    for term in filter(None, (part.strip() for part in text.split(","))):
        for operator in ("!=", "==", "="):
            if operator in term:
                label, value = (side.strip() for side in term.split(operator, 1))
                break
        else:
            raise ApiError(400, f"invalid field selector: {term!r}: expected key=value")
        if label not in resource.field_labels:
            raise ApiError(400, f'field label not supported: "{label}"')
        terms.append((label, operator == "!=", value))
    return lambda obj: all(
        (_field_value(obj, label) != value) if negated else (_field_value(obj, label) == value)
        for label, negated, value in terms
    )


# --- Validation ------------------------------------------------------------------------------

_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_LABEL_NAME = re.compile(r"([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]")
_ENV_NAME = re.compile(r"[-._a-zA-Z][-._a-zA-Z0-9]*")
_SECRET_KEY = re.compile(r"[-._a-zA-Z0-9]+")
_QUANTITY = re.compile(r"[+-]?(\d+(\.\d*)?|\.\d+)([eE][+-]?\d+|[KMGTPE]i?|[munkMGTPE])?")
_SUBDOMAIN_MESSAGE = (
    "a lowercase RFC 1123 subdomain must consist of lower case alphanumeric characters, '-' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'example.com', regex used "
    "for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?(\\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*')"
)
_DNS_LABEL_MESSAGE = (
    "a lowercase RFC 1123 label must consist of lower case alphanumeric characters or '-', and "
    "must start and end with an alphanumeric character (e.g. 'my-name',  or '123-abc', regex "
    "used for validation is '[a-z0-9]([-a-z0-9]*[a-z0-9])?')"
)
_LABEL_VALUE_MESSAGE = (
    "a valid label must be an empty string or consist of alphanumeric characters, '-', '_' or "
    "'.', and must start and end with an alphanumeric character (e.g. 'MyValue',  or 'my_value',"
    "  or '12345', regex used for validation is '(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?')"
)
_RESTRICTED_VOLUME_TYPES = frozenset(
    {
        "configMap",
        "csi",
        "downwardAPI",
        "emptyDir",
        "ephemeral",
        "persistentVolumeClaim",
        "projected",
        "secret",
    }
)


def _validate_name(name: str, path: str, *, label: bool = False) -> list[str]:
    pattern, limit, message = (
        (_DNS_LABEL, 63, _DNS_LABEL_MESSAGE) if label else (_DNS_SUBDOMAIN, 253, _SUBDOMAIN_MESSAGE)
    )
    if len(name) > limit:
        return [f'{path}: Invalid value: "{name}": must be no more than {limit} characters']
    if not pattern.fullmatch(name):
        return [f'{path}: Invalid value: "{name}": {message}']
    return []


_QUALIFIED_NAME_MESSAGE = (
    "must consist of alphanumeric characters, '-', '_' or '.', and must start and end with an "
    "alphanumeric character (e.g. 'MyName',  or 'my.name',  or '123-abc', regex used for "
    "validation is '([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9]')"
)


def _qualified_name_errors(key: str) -> list[str]:
    """apimachinery's IsQualifiedName: `[prefix/]name`, as the API server checks label keys."""
    parts = key.split("/")
    if len(parts) == 1:
        name = parts[0]
        errors: list[str] = []
    elif len(parts) == 2:
        prefix, name = parts
        if not prefix:
            errors = ["prefix part must be non-empty"]
        elif len(prefix) > 253:
            errors = ["prefix part must be no more than 253 characters"]
        elif not _DNS_SUBDOMAIN.fullmatch(prefix):
            errors = [f"prefix part {_SUBDOMAIN_MESSAGE}"]
        else:
            errors = []
    else:
        return [
            f"a qualified name {_QUALIFIED_NAME_MESSAGE} with an optional DNS subdomain prefix "
            "and '/' (e.g. 'example.com/MyName')"
        ]
    if not name:
        errors.append("name part must be non-empty")
    elif len(name) > 63:
        errors.append("name part must be no more than 63 characters")
    if name and not _LABEL_NAME.fullmatch(name):
        errors.append(f"name part {_QUALIFIED_NAME_MESSAGE}")
    return errors


def _validate_labels(labels: Mapping[str, Any], path: str) -> list[str]:
    errors = [
        f'{path}: Invalid value: "{key}": {message}'
        for key in labels
        for message in _qualified_name_errors(key)
    ]
    for value in labels.values():
        if not isinstance(value, str):
            continue  # the schema check reports the type
        if len(value) > 63:
            errors.append(f'{path}: Invalid value: "{value}": must be no more than 63 characters')
        if value and not _LABEL_NAME.fullmatch(value):
            errors.append(f'{path}: Invalid value: "{value}": {_LABEL_VALUE_MESSAGE}')
    return errors


def _validate_metadata(metadata: JSON) -> list[str]:
    errors = _validate_name(str(metadata.get("name", "")), "metadata.name")
    errors += _validate_labels(metadata.get("labels") or {}, "metadata.labels")
    annotations = metadata.get("annotations") or {}
    size = sum(len(key) + len(str(value)) for key, value in annotations.items())
    if size > 256 * 1024:
        errors.append(f"metadata.annotations: Too long: must have at most 262144 bytes, not {size}")
    return errors


def _validate_pod(pod: JSON) -> list[str]:
    """The API server's pod validation beyond the schema, for what a runner pod uses."""
    spec = pod.get("spec") or {}
    errors: list[str] = []
    volumes = [volume.get("name", "") for volume in spec.get("volumes") or []]
    for index, name in enumerate(volumes):
        errors += _validate_name(name, f"spec.volumes[{index}].name", label=True)
    errors += [
        f'spec.volumes: Duplicate value: "{name}"'
        for name, count in Counter(volumes).items()
        if count > 1
    ]
    if not spec.get("containers"):
        errors.append("spec.containers: Required value")
    deadline = spec.get("activeDeadlineSeconds")
    if isinstance(deadline, int) and not 1 <= deadline <= 2**31 - 1:
        errors.append(
            f"spec.activeDeadlineSeconds: Invalid value: {deadline}: must be between 1 and "
            "2147483647, inclusive"
        )
    restart = spec.get("restartPolicy", "Always")
    if restart not in ("Always", "OnFailure", "Never"):
        errors.append(
            f'spec.restartPolicy: Unsupported value: "{restart}": supported values: "Always", '
            '"OnFailure", "Never"'
        )
    for group in ("initContainers", "containers"):
        for index, container in enumerate(spec.get(group) or []):
            errors += _validate_container(container, f"spec.{group}[{index}]", set(volumes))
    return errors


def _validate_container(container: JSON, path: str, volumes: set[str]) -> list[str]:
    errors = _validate_name(str(container.get("name", "")), f"{path}.name", label=True)
    if not container.get("image"):
        errors.append(f"{path}.image: Required value")
    for index, env in enumerate(container.get("env") or []):
        name = str(env.get("name", ""))
        if not _ENV_NAME.fullmatch(name):
            errors.append(
                f'{path}.env[{index}].name: Invalid value: "{name}": a valid environment variable '
                "name must consist of alphabetic characters, digits, '_', '-', or '.', and must "
                "not start with a digit"
            )
    for index, mount in enumerate(container.get("volumeMounts") or []):
        if mount.get("name") not in volumes:
            errors.append(f'{path}.volumeMounts[{index}].name: Not found: "{mount.get("name")}"')
    resources = container.get("resources") or {}
    for section in ("limits", "requests"):
        for resource, quantity in (resources.get(section) or {}).items():
            if not _QUANTITY.fullmatch(str(quantity)):
                errors.append(
                    f'{path}.resources.{section}[{resource}]: Invalid value: "{quantity}": must '
                    "match the regular expression "
                    "'^([+-]?[0-9.]+)([eEinumkKMGTP]*[-+]?[0-9]*)$'"
                )
    limits = resources.get("limits") or {}
    requests = resources.get("requests") or {}
    if GPU_RESOURCE in requests or GPU_RESOURCE in limits:
        request, limit = requests.get(GPU_RESOURCE), limits.get(GPU_RESOURCE)
        if limit is None:
            errors.append(
                f"{path}.resources.limits: Required value: Limit must be set for non "
                "overcommitable resources"
            )
        elif request is not None and str(request) != str(limit):
            errors.append(
                f'{path}.resources.requests[{GPU_RESOURCE}]: Invalid value: "{request}": must be '
                f"equal to {GPU_RESOURCE} limit of {limit}"
            )
        elif not str(limit).isdigit():
            errors.append(
                f'{path}.resources.limits[{GPU_RESOURCE}]: Invalid value: "{limit}": must be an '
                "integer"
            )
    return errors


def _validate_secret(secret: JSON) -> list[str]:
    errors: list[str] = []
    for section in ("data", "stringData"):
        for key, value in (secret.get(section) or {}).items():
            if not _SECRET_KEY.fullmatch(key):
                errors.append(
                    f'{section}[{key}]: Invalid value: "{key}": a valid config key must consist '
                    "of alphanumeric characters, '-', '_' or '.'"
                )
            if section == "data":
                try:
                    base64.b64decode(str(value), validate=True)
                except ValueError:
                    errors.append(f"data[{key}]: Invalid value: not valid base64")
    return errors


#: The most `data` plus `binaryData` a ConfigMap may hold (corev1.MaxSecretSize, 1 MiB).
MAX_CONFIG_MAP_BYTES = 1024 * 1024


def _validate_config_map(config_map: JSON) -> list[str]:
    """ValidateConfigMap: keys, no key in both maps, string values, 1 MiB in all."""
    errors: list[str] = []
    data = config_map.get("data") or {}
    binary = config_map.get("binaryData") or {}
    total = 0
    for section, values in (("data", data), ("binaryData", binary)):
        if not isinstance(values, dict):
            continue  # the schema check reports the type
        for key, value in values.items():
            if not _SECRET_KEY.fullmatch(key) or len(key) > 253:
                errors.append(
                    f'{section}[{key}]: Invalid value: "{key}": a valid config key must consist '
                    "of alphanumeric characters, '-', '_' or '.' (e.g. 'key.name',  or "
                    "'KEY_NAME',  or 'key-name', regex used for validation is '[-._a-zA-Z0-9]+')"
                )
            if not isinstance(value, str):
                errors.append(f"{section}[{key}]: Invalid value: must be a string")
                continue
            if section == "binaryData":
                try:
                    total += len(base64.b64decode(value, validate=True))
                except ValueError:
                    errors.append(f"binaryData[{key}]: Invalid value: not valid base64")
            else:
                total += len(value.encode())
    if isinstance(data, dict) and isinstance(binary, dict):
        errors += [
            f'data[{key}]: Invalid value: "{key}": duplicate of key present in binaryData'
            for key in sorted(set(data) & set(binary))
        ]
    if total > MAX_CONFIG_MAP_BYTES:
        errors.append(f"[]: Too long: may not be more than {MAX_CONFIG_MAP_BYTES} bytes")
    return errors


def _pod_security_violations(pod: JSON) -> list[str]:
    """Violations of the Pod Security Standard `restricted`, worded as the admission plugin."""
    spec = pod.get("spec") or {}
    pod_context = spec.get("securityContext") or {}
    containers = [*(spec.get("initContainers") or []), *(spec.get("containers") or [])]
    violations: list[str] = []

    def names(predicate: Callable[[JSON], bool]) -> list[str]:
        return [c.get("name", "") for c in containers if predicate(c.get("securityContext") or {})]

    def quoted(items: list[str]) -> str:
        return ", ".join(f'"{item}"' for item in items)

    def container_word(items: list[str]) -> str:
        return "container" if len(items) == 1 else "containers"

    host = [key for key in ("hostNetwork", "hostPID", "hostIPC") if spec.get(key)]
    if host:
        violations.append(f"host namespaces ({', '.join(f'{key}=true' for key in host)})")
    privileged = names(lambda sc: sc.get("privileged") is True)
    if privileged:
        violations.append(
            f"privileged ({container_word(privileged)} {quoted(privileged)} must not set "
            "securityContext.privileged=true)"
        )
    escalation = names(lambda sc: sc.get("allowPrivilegeEscalation") is not False)
    if escalation:
        violations.append(
            f"allowPrivilegeEscalation != false ({container_word(escalation)} {quoted(escalation)}"
            " must set securityContext.allowPrivilegeEscalation=false)"
        )
    capabilities = names(
        lambda sc: (
            "ALL" not in ((sc.get("capabilities") or {}).get("drop") or [])
            or any(
                cap != "NET_BIND_SERVICE" for cap in (sc.get("capabilities") or {}).get("add") or []
            )
        )
    )
    if capabilities:
        violations.append(
            f"unrestricted capabilities ({container_word(capabilities)} {quoted(capabilities)} "
            'must set securityContext.capabilities.drop=["ALL"])'
        )
    restricted_volumes = [
        (volume.get("name", ""), kind)
        for volume in spec.get("volumes") or []
        for kind in volume
        if kind != "name" and kind not in _RESTRICTED_VOLUME_TYPES
    ]
    if restricted_volumes:
        detail = ", ".join(
            f'volume "{name}" uses restricted volume type "{kind}"'
            for name, kind in restricted_volumes
        )
        violations.append(f"restricted volume types ({detail})")
    pod_non_root = pod_context.get("runAsNonRoot") is True
    non_root = names(
        lambda sc: (
            sc.get("runAsNonRoot") is False
            or (not pod_non_root and sc.get("runAsNonRoot") is not True)
        )
    )
    if non_root:
        where = "" if pod_non_root else "pod or "
        violations.append(
            f"runAsNonRoot != true ({where}{container_word(non_root)} {quoted(non_root)} must set "
            "securityContext.runAsNonRoot=true)"
        )
    root_user = names(lambda sc: sc.get("runAsUser") == 0)
    if pod_context.get("runAsUser") == 0:
        violations.append("runAsUser=0 (pod must not set runAsUser=0)")
    elif root_user:
        violations.append(
            f"runAsUser=0 ({container_word(root_user)} {quoted(root_user)} must not set "
            "runAsUser=0)"
        )
    allowed_seccomp = ("RuntimeDefault", "Localhost")
    pod_seccomp = (pod_context.get("seccompProfile") or {}).get("type")
    seccomp = names(
        lambda sc: (sc.get("seccompProfile") or {}).get("type", pod_seccomp) not in allowed_seccomp
    )
    if seccomp:
        where = "" if pod_seccomp in allowed_seccomp else "pod or "
        violations.append(
            f"seccompProfile ({where}{container_word(seccomp)} {quoted(seccomp)} must set "
            'securityContext.seccompProfile.type to "RuntimeDefault" or "Localhost")'
        )
    return violations


# --- Quantities and pod arithmetic -------------------------------------------------------------


def _gpu_request(pod: JSON) -> int:
    """The pod's effective `nvidia.com/gpu` request (containers summed, init containers maxed)."""

    def of(container: JSON) -> int:
        resources = container.get("resources") or {}
        value = (resources.get("requests") or {}).get(GPU_RESOURCE) or (
            resources.get("limits") or {}
        ).get(GPU_RESOURCE)
        return int(str(value)) if value is not None and str(value).isdigit() else 0

    spec = pod.get("spec") or {}
    regular = sum(of(container) for container in spec.get("containers") or [])
    init = max((of(container) for container in spec.get("initContainers") or []), default=0)
    return max(regular, init)


def _is_terminal(pod: JSON) -> bool:
    return pod.get("status", {}).get("phase") in ("Succeeded", "Failed")


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


#: The taint the node lifecycle controller keeps on a node until it is Ready.
_NOT_READY_TAINT = "node.kubernetes.io/not-ready"


def _node_ready_condition(ready: bool) -> JSON:
    """A node's Ready condition as its kubelet posts it, changed now (second resolution, as the
    API server's timestamps)."""
    reason, message = (
        ("KubeletReady", "kubelet is posting ready status")
        if ready
        else (
            "KubeletNotReady",
            "container runtime network not ready: NetworkReady=false "
            "reason:NetworkPluginNotReady message:Network plugin returns error: cni plugin "
            "not initialized",
        )
    )
    return {
        "type": "Ready",
        "status": "True" if ready else "False",
        "reason": reason,
        "message": message,
        "lastHeartbeatTime": _now(),
        "lastTransitionTime": _now(),
    }


def _tolerates(tolerations: list[JSON], taint: JSON) -> bool:
    for toleration in tolerations:
        if toleration.get("effect") and toleration["effect"] != taint.get("effect"):
            continue
        operator = toleration.get("operator", "Equal")
        key = toleration.get("key", "")
        if operator == "Exists" and (not key or key == taint.get("key")):
            return True
        if (
            operator == "Equal"
            and key == taint.get("key")
            and (toleration.get("value", "") == taint.get("value", ""))
        ):
            return True
    return False


def _node_term_matches(term: JSON, labels: Mapping[str, str]) -> bool:
    return all(_requirement_matches(expression, labels)
               for expression in term.get("matchExpressions") or [])


def _requirement_matches(expression: JSON, labels: Mapping[str, str]) -> bool:
    """One node selector requirement; each operator reads `values` its own way (Gt and Lt:
    one integer), so only the expression's own is evaluated."""
    key, operator = expression.get("key", ""), expression.get("operator", "")
    values = expression.get("values") or []
    value = labels.get(key)
    if operator == "In":
        return value in values
    if operator == "NotIn":
        return value not in values
    if operator == "Exists":
        return key in labels
    if operator == "DoesNotExist":
        return key not in labels
    if operator in ("Gt", "Lt"):
        return value is not None and bool(values) and _compare_label(
            value, int(values[0]), operator == "Gt")
    return False


def _selector_matches(pod: JSON, labels: Mapping[str, str]) -> bool:
    """Whether node `labels` satisfy the pod's nodeSelector and required node affinity."""
    spec = pod.get("spec") or {}
    if any(labels.get(key) != value for key, value in (spec.get("nodeSelector") or {}).items()):
        return False
    required = ((spec.get("affinity") or {}).get("nodeAffinity") or {}).get(
        "requiredDuringSchedulingIgnoredDuringExecution"
    ) or {}
    terms = required.get("nodeSelectorTerms") or []
    return not terms or any(_node_term_matches(term, labels) for term in terms)


def _untolerated(pod: JSON, taints: Iterable[JSON]) -> JSON | None:
    tolerations = (pod.get("spec") or {}).get("tolerations") or []
    for taint in taints:
        if taint.get("effect") in ("NoSchedule", "NoExecute") and not _tolerates(
            tolerations, taint
        ):
            return taint
    return None


def _taint_reason(taint: JSON) -> str:
    return f"node(s) had untolerated taint {{{taint.get('key')}: {taint.get('value', '')}}}"


_SELECTOR_REASON = "node(s) didn't match Pod's node affinity/selector"


def _histogram(reasons: Iterable[str]) -> str:
    return ", ".join(sorted(f"{count} {reason}" for reason, count in Counter(reasons).items()))


def _failed_scheduling_message(reasons: list[str]) -> str:
    """The default scheduler's FailedScheduling message for per-node failure reasons."""
    total = len(reasons)
    if total == 0:
        return "no nodes available to schedule pods"
    preemption = [
        "No preemption victims found for incoming pod"
        if reason.startswith("Insufficient")
        else "Preemption is not helpful for scheduling"
        for reason in reasons
    ]
    return (
        f"0/{total} nodes are available: {_histogram(reasons)}. "
        f"preemption: 0/{total} nodes are available: {_histogram(preemption)}."
    )


# --- The fake --------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Change:
    resource_version: int
    type: str  # ADDED, MODIFIED, DELETED
    plural: str
    obj: JSON
    previous: JSON | None


@dataclass(frozen=True)
class _LogLine:
    at: float  # time.time() when written, for sinceSeconds
    text: str


@dataclass
class _Fault:
    method: str
    path_pattern: str
    status: int | None
    remaining: int
    body: Any
    delay: float
    drop: bool


@dataclass
class _RequestHook:
    """A callback for the next `remaining` requests matching a method and a path."""

    method: str
    path: re.Pattern[str]
    callback: Callable[[str, str], None]
    after: bool
    remaining: int


@dataclass(frozen=True)
class _ReplicaSet:
    """A ReplicaSet the fake keeps its pods for (`FakeKubernetes.replicate`)."""

    name: str
    namespace: str
    uid: str
    template: JSON
    replicas: int


@dataclass(frozen=True)
class _BoundToken:
    """A projected ServiceAccount token the fake issued: what it is bound to, until when."""

    namespace: str
    service_account: str
    pod_name: str
    pod_uid: str
    audiences: tuple[str, ...]
    expires_at: float
    credential_id: str


class FakeKubernetes:
    """A Kubernetes API server for tests, on 127.0.0.1 (see the module docstring).

    Start it (`start()` or `with`), write a kubeconfig with `write_kubeconfig`, and point the
    official client at it. Inspect the state with `pods()`, `secrets()`, `events()`, `nodes()`
    and `requests`; drive it with `inject`, `on_request`, `on_pod_running`, `finish_pod` and
    `seed`.
    """

    def __init__(
        self,
        *,
        namespace: str = DEFAULT_NAMESPACE,
        nodes: list[FakeNode] | None = None,
        gpu_quota: int | None = None,
        pod_quota: int | None = None,
        scheduler: Callable[[JSON], PodScript] | None = None,
        validate: bool = True,
        node_pools: list[FakeNodePool] | None = None,
        quota_name: str = DEFAULT_QUOTA_NAME,
        pod_security: Literal["restricted", "privileged"] = "restricted",
        termination_delay: float = 0.02,
        deadline_scale: float = 1.0,
        token: str | None = None,
        rbac_rules: Iterable[Mapping[str, Any]] | None = None,
        runner_connect_delay: float = 0.0,
        cluster_rules: Iterable[Mapping[str, Any]] = (),
        volume_root: Path | None = None,
    ) -> None:
        """Creates the fake; nothing listens until `start()`.

        Args:
            namespace: The runner namespace, created with the Pod Security label.
            nodes: Nodes at start; default: three CPU nodes labelled `gpu=false`.
            gpu_quota: `requests.nvidia.com/gpu` hard limit of a ResourceQuota in `namespace`.
            pod_quota: `pods` hard limit of that ResourceQuota.
            scheduler: Chooses each new pod's `PodScript`; default: `default_script`.
            validate: Check Pod, Secret and ConfigMap bodies against the strict schema (422 if
                not).
            node_pools: Autoscaled pools; default: one NVIDIA L4 pool at zero nodes, max 3.
            quota_name: Name of the ResourceQuota (it appears in the 403 message).
            pod_security: The level `namespace` enforces ("restricted" as the runner plane's).
            termination_delay: Seconds a gracefully deleted running pod takes to go away.
            deadline_scale: Seconds of fake time per second of `activeDeadlineSeconds`, so a
                test can let a one-hour deadline pass in 36 ms (0.00001).
            token: Bearer token the server requires; default: a random one.
            rbac_rules: The caller's Role rules (`api_groups`/`apiGroups`, `resources`,
                `verbs`): a request no rule allows is answered 403 Forbidden, as RBAC would,
                and recorded in `forbidden`. None allows everything. A Role grants nothing
                cluster-scoped.
            runner_connect_delay: Seconds from a runner container starting to its "Listening
                for Jobs" line, for scripts that do not say (`PodScript.connect_delay`);
                `math.inf` for runners that never connect. Also settable later as an attribute.
            cluster_rules: The caller's ClusterRole rules (same shape), checked with
                `rbac_rules` when those are given; they also grant cluster-scoped resources.
            volume_root: Where pods' emptyDir volumes live as directories (`empty_dir`);
                None: volumes have no contents.
        """
        if gpu_quota is not None and gpu_quota < 0 or pod_quota is not None and pod_quota < 0:
            raise ValueError("FakeKubernetes: gpu_quota and pod_quota must be >= 0 or None")
        if termination_delay < 0 or deadline_scale <= 0:
            raise ValueError("FakeKubernetes: termination_delay >= 0 and deadline_scale > 0")
        if not runner_connect_delay >= 0:
            raise ValueError(
                f"FakeKubernetes: runner_connect_delay must be >= 0, got {runner_connect_delay}"
            )
        self.namespace = namespace
        self.runner_connect_delay = runner_connect_delay
        self.validate = validate
        self.token = token or secrets.token_urlsafe(24)
        self.validation_errors: list[str] = []
        self._rbac = None if rbac_rules is None else _parse_rules(rbac_rules)
        self._cluster_rbac = _parse_rules(cluster_rules)
        #: Projected tokens issued (`projected_token`), by token; and the tokens' clock offset.
        self._bound_tokens: dict[str, _BoundToken] = {}
        self._volume_root = volume_root
        self._replica_sets: dict[str, _ReplicaSet] = {}  # by uid
        self._token_clock_offset = 0.0
        #: Every request RBAC refused, as "<verb> <resource>"; tests assert it stays empty.
        self.forbidden: list[str] = []
        #: Exceptions raised by simulation steps, callbacks or request handling: fake bugs or
        #: failing callbacks. The `fake_kube` fixture fails a test that leaves any.
        self.errors: list[str] = []
        self.kubeconfig_path: Path | None = None
        self._quota_name = quota_name
        self._hard: dict[str, int] = {}
        if gpu_quota is not None:
            self._hard[f"requests.{GPU_RESOURCE}"] = gpu_quota
        if pod_quota is not None:
            self._hard["pods"] = pod_quota
        self._pod_security = pod_security
        self._termination_delay = termination_delay
        self._deadline_scale = deadline_scale
        self._scheduler = scheduler
        self._pools = list(default_node_pools() if node_pools is None else node_pools)
        self._pool_sizes: Counter[str] = Counter()
        self._lock = threading.RLock()
        self._changed = threading.Condition(self._lock)
        self._objects: dict[str, dict[tuple[str, str], JSON]] = {name: {} for name in _RESOURCES}
        self._history: list[_Change] = []
        self._history_start = 0  # resourceVersion below which watch history was compacted
        self._resource_version = 0
        self._snapshots: dict[str, list[JSON]] = {}
        self._requests: list[RecordedRequest] = []
        self._faults: list[_Fault] = []
        self._running_callbacks: list[Callable[[JSON], None]] = []
        self._listening_callbacks: list[Callable[[JSON], None]] = []
        self._request_hooks: list[_RequestHook] = []
        self._log_breaks = 0  # end_log_streams() calls so far: open follows end on a change
        self._open_log_follows = 0  # log follows being served now
        #: Container logs per pod: (namespace, name) -> (pod uid, container -> lines).
        self._logs: dict[tuple[str, str], tuple[str, dict[str, list[_LogLine]]]] = {}
        self._stopping = threading.Event()
        self._timeline = _Timeline(self._report_error)
        self._server: _Server | None = None
        self._serve_thread: threading.Thread | None = None
        self.url = ""
        for name in ("default", "kube-system", namespace):
            labels = {"kubernetes.io/metadata.name": name}
            if name == namespace and pod_security == "restricted":
                labels[PSA_ENFORCE_LABEL] = PSA_LEVEL
            self._store("namespaces", {"metadata": {"name": name, "labels": labels}})
            self._store("configmaps", _root_ca_config_map(name))
        for node in default_nodes() if nodes is None else nodes:
            self._add_node(node.name, dict(node.labels), node.gpus, node.taints)
        if self._hard:
            self._store(
                "resourcequotas",
                {
                    "metadata": {"name": quota_name, "namespace": namespace},
                    "spec": {"hard": {key: str(value) for key, value in self._hard.items()}},
                    "status": {
                        "hard": {key: str(value) for key, value in self._hard.items()},
                        "used": {key: "0" for key in self._hard},
                    },
                },
            )

    # --- lifecycle ------------------------------------------------------------------------

    def start(self) -> FakeKubernetes:
        """Starts serving on 127.0.0.1 (a free port) and the simulation thread."""
        if self._server is not None or self._stopping.is_set():
            raise RuntimeError("FakeKubernetes.start: a fake starts once; create a new one")
        self._server = _Server(("127.0.0.1", 0), _Handler, self)
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._serve_thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.01},
            name="fake-kube-api",
            daemon=True,
        )
        self._serve_thread.start()
        self._timeline.start()
        return self

    def stop(self) -> None:
        """Ends open watches cleanly, closes every connection and stops the threads."""
        if self._server is None:
            return
        self._stopping.set()
        with self._changed:
            self._changed.notify_all()
        self._timeline.stop()
        # Requests in flight finish first (watches end with their last chunk), so only idle
        # keep-alive connections are cut.
        self._server.join_busy_handlers(timeout=5)
        self._server.shutdown()
        self._server.close_connections()
        self._server.server_close()
        if self._serve_thread is not None:
            self._serve_thread.join(timeout=5)
        self._server.join_handlers(timeout=5)
        self._server = None

    def __enter__(self) -> FakeKubernetes:
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.stop()

    def write_kubeconfig(self, path: Path, *, namespace: str | None = None) -> Path:
        """Writes a kubeconfig for this server (static bearer token) with its context current.

        Args:
            path: File to write.
            namespace: The context's namespace; default: the fake's namespace.

        Returns:
            `path`, for `kubernetes.config.load_kube_config(config_file=...)`.
        """
        if not self.url:
            raise RuntimeError("FakeKubernetes.write_kubeconfig: start() the server first")
        kubeconfig = {
            "apiVersion": "v1",
            "kind": "Config",
            "clusters": [{"name": "fake", "cluster": {"server": self.url}}],
            "users": [{"name": "fake-user", "user": {"token": self.token}}],
            "contexts": [
                {
                    "name": "fake",
                    "context": {
                        "cluster": "fake",
                        "user": "fake-user",
                        "namespace": namespace or self.namespace,
                    },
                }
            ],
            "current-context": "fake",
        }
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(kubeconfig, indent=2))  # JSON is YAML
        self.kubeconfig_path = path
        return path

    # --- inspection -----------------------------------------------------------------------

    @property
    def requests(self) -> list[RecordedRequest]:
        """Every request answered so far, in order (a copy)."""
        with self._lock:
            return list(self._requests)

    @property
    def resource_version(self) -> int:
        """The cluster's current resourceVersion."""
        with self._lock:
            return self._resource_version

    def pods(self, namespace: str | None = None) -> list[JSON]:
        """Copies of the pods in `namespace` (default: the fake's), sorted by name."""
        return self._list_copies("pods", namespace)

    def secrets(self, namespace: str | None = None) -> list[JSON]:
        """Copies of the Secrets in `namespace` (default: the fake's), sorted by name."""
        return self._list_copies("secrets", namespace)

    def configmaps(self, namespace: str | None = None) -> list[JSON]:
        """Copies of the ConfigMaps in `namespace` (default: the fake's), sorted by name; every
        namespace holds `kube-root-ca.crt`, as the root CA publisher keeps it there."""
        return self._list_copies("configmaps", namespace)

    def events(self, namespace: str | None = None) -> list[JSON]:
        """Copies of the Events in `namespace` (default: the fake's), in creation order."""
        events = self._list_copies("events", namespace)
        return sorted(events, key=lambda event: int(event["metadata"]["resourceVersion"]))

    def nodes(self) -> list[JSON]:
        """Copies of the nodes, sorted by name."""
        return self._list_copies("nodes", "")

    def pod(self, name: str, namespace: str | None = None) -> JSON | None:
        """A copy of one pod, or None."""
        with self._lock:
            pod = self._objects["pods"].get((namespace or self.namespace, name))
            return copy.deepcopy(pod) if pod is not None else None

    def _list_copies(self, plural: str, namespace: str | None) -> list[JSON]:
        scope = "" if plural == "nodes" else (namespace or self.namespace)
        with self._lock:
            return [
                copy.deepcopy(obj)
                for (ns, _), obj in sorted(self._objects[plural].items())
                if ns == scope
            ]

    # --- driving --------------------------------------------------------------------------

    def inject(
        self,
        method: str,
        path_pattern: str,
        status: int | None,
        *,
        times: int = 1,
        body: Any = None,
        delay: float = 0.0,
        drop: bool = False,
    ) -> None:
        """Makes the next `times` matching requests fail or stall.

        Args:
            method: HTTP method, or "*" for any.
            path_pattern: fnmatch pattern over the URL path (`*` also matches `/`), e.g.
                "/api/v1/namespaces/*/pods".
            status: Answer this status (body: `body`, or a Status object with the usual
                reason); None to answer normally after `delay`.
            times: How many matching requests this fault applies to (>= 1).
            body: JSON body to answer with instead of the Status object.
            delay: Seconds to wait before answering (cut short by `stop()`).
            drop: Close the connection without answering.
        """
        if times < 1:
            raise ValueError(f"FakeKubernetes.inject: times must be >= 1, got {times}")
        if status is None and not drop and delay <= 0:
            raise ValueError("FakeKubernetes.inject: give a status, a delay or drop=True")
        with self._lock:
            self._faults.append(
                _Fault(method.upper(), path_pattern, status, times, body, delay, drop)
            )

    def on_pod_running(self, callback: Callable[[JSON], None]) -> None:
        """Calls `callback(pod)` (a copy) each time a pod becomes Running and Ready."""
        with self._lock:
            self._running_callbacks.append(callback)

    def on_request(self, method: str, path_regex: str, callback: Callable[[str, str], None],
                   *, after: bool = True, times: int = 1) -> None:
        """Calls `callback(method, path)` for the next `times` matching requests (not watches
        or log follows), e.g. to kill the client at a precise step.

        Args:
            method: HTTP method, or "*" for any.
            path_regex: Regular expression the whole URL path must match.
            callback: Called in the handler thread; what it raises is answered as a 500.
            after: True: once the request has been applied, before its answer is sent (the
                client never hears that it succeeded); False: before it is applied.
            times: How many matching requests trigger it.
        """
        with self._lock:
            self._request_hooks.append(
                _RequestHook(method.upper(), re.compile(path_regex), callback, after, times))

    def _run_request_hooks(self, method: str, path: str, *, after: bool) -> None:
        with self._lock:
            due = [hook for hook in self._request_hooks if hook.after == after
                   and hook.method in ("*", method) and hook.path.fullmatch(path)]
            for hook in due:
                hook.remaining -= 1
                if hook.remaining == 0:
                    self._request_hooks.remove(hook)
        for hook in due:
            hook.callback(method, path)

    def on_runner_listening(self, callback: Callable[[JSON], None]) -> None:
        """Calls `callback(pod)` (a copy) when a pod's runner connects, just before its
        "Listening for Jobs" line is written (a real runner is online on GitHub by then)."""
        with self._lock:
            self._listening_callbacks.append(callback)

    def append_log(
        self,
        namespace: str,
        pod: str,
        line: str,
        *,
        container: str | None = None,
        at: float | None = None,
    ) -> None:
        """Appends one line to a container's log, as the container writing it would.

        Args:
            namespace: The pod's namespace.
            pod: Pod name.
            line: The text, without its newline.
            container: Container name; default: the pod's first container.
            at: When it was written (`time.time()`), for `sinceSeconds`; default: now.

        Raises:
            LookupError: No such pod or container.
            ValueError: `line` holds a newline.
        """
        if "\n" in line:
            raise ValueError("FakeKubernetes.append_log: one line at a time, without newline")
        with self._changed:
            obj = self._objects["pods"].get((namespace, pod))
            if obj is None:
                raise LookupError(f"FakeKubernetes.append_log: no pod {namespace}/{pod}")
            names = [c["name"] for c in obj["spec"]["containers"]]
            name = container or names[0]
            if name not in names:
                raise LookupError(
                    f"FakeKubernetes.append_log: pod {namespace}/{pod} has no container "
                    f"{name!r} (it has {', '.join(names)})"
                )
            self._container_log((namespace, pod), obj["metadata"]["uid"], name).append(
                _LogLine(time.time() if at is None else at, line)
            )
            self._changed.notify_all()

    @property
    def open_log_follows(self) -> int:
        """Log follows being served now: an `end_log_streams` from then on ends them."""
        with self._changed:
            return self._open_log_follows

    def end_log_streams(self) -> None:
        """Ends every open log follow without an error, as a restarted API server or a lost
        kubelet connection does; the containers keep running."""
        with self._changed:
            self._log_breaks += 1
            self._changed.notify_all()

    def log_text(self, pod: str, *, container: str | None = None,
                 namespace: str | None = None) -> str:
        """A container's log so far, one line per line (empty if it wrote nothing)."""
        key = (namespace or self.namespace, pod)
        with self._lock:
            obj = self._objects["pods"].get(key)
            if obj is None:
                raise LookupError(f"FakeKubernetes.log_text: no pod {key[0]}/{key[1]}")
            name = container or obj["spec"]["containers"][0]["name"]
            lines = self._container_log(key, obj["metadata"]["uid"], name)
            return "".join(f"{line.text}\n" for line in lines)

    def finish_pod(
        self,
        name: str,
        *,
        exit_code: int = 0,
        namespace: str | None = None,
        reason: str | None = None,
    ) -> JSON:
        """Ends a running pod's containers as its process would (the runner's one job is done).

        Args:
            name: Pod name.
            exit_code: The containers' exit code; 0 gives phase Succeeded, else Failed.
            namespace: The pod's namespace; default: the fake's.
            reason: The terminated state's reason, e.g. "OOMKilled" (with exit code 137) for a
                container the kernel killed at its memory limit; default: "Completed" for
                exit code 0, else "Error", as the kubelet reports.

        Returns:
            The updated pod (a copy).

        Raises:
            LookupError: No such pod.
        """
        key = (namespace or self.namespace, name)
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is None:
                raise LookupError(f"FakeKubernetes.finish_pod: no pod {key[0]}/{key[1]}")
            updated = self._terminate(key, pod["metadata"]["uid"], exit_code, reason)
            return copy.deepcopy(updated if updated is not None else pod)

    def exceed_deadline(self, name: str, namespace: str | None = None) -> JSON:
        """Ends a pod on its node now as the kubelet does once `activeDeadlineSeconds` passed:
        phase Failed, reason DeadlineExceeded, containers killed, a DeadlineExceeded event.

        Raises:
            LookupError: No such pod.
            ValueError: The pod is not on a node yet, or has already finished.
        """
        key, pod = self._bound_pod("exceed_deadline", name, namespace)
        with self._lock:
            self._deadline(key, pod["metadata"]["uid"])
            return copy.deepcopy(self._objects["pods"][key])

    def preempt_pod(self, name: str, namespace: str | None = None, *,
                    keep_node: bool = False) -> JSON:
        """Reclaims the Spot VM under a pod, as GKE does, seen through the kubelet's graceful
        node shutdown: every unfinished pod on the node fails (phase Failed, reason
        Terminated, condition DisruptionTarget True with reason TerminationByKubelet), its
        running containers exit on SIGTERM (143, "Error"), those never started are reported
        as the kubelet does for them (137, "ContainerStatusUnknown"), and its log streams end.
        Then the node object goes (a DELETED watch event; its pool may scale up again), unless
        `keep_node`; its GPUs are free either way. The pods stay, bound to the gone node,
        until deleted (`lose_pod_with_node` then plays PodGC).

        Returns:
            The named pod as updated (a copy).

        Raises:
            LookupError: No such pod.
            ValueError: The pod is not on a node yet (nothing to preempt), or has finished.
        """
        key, pod = self._bound_pod("preempt_pod", name, namespace)
        node_name = pod["spec"]["nodeName"]
        with self._lock:
            for victim_key, victim in sorted(self._objects["pods"].items()):
                if victim["spec"].get("nodeName") != node_name or _is_terminal(victim):
                    continue
                running = [s["name"] for s in victim["status"].get("containerStatuses") or []
                           if "running" in (s.get("state") or {})]
                updated = self._update("pods", victim_key, victim["metadata"]["uid"],
                                       _shut_down)
                for container in running:
                    self._event(cast(JSON, updated), "Normal", "Killing",
                                f"Stopping container {container}", _KUBELET,
                                f"spec.containers{{{container}}}")
            self._update_quota_usage()
            if not keep_node:
                self._remove_node(node_name)
            return copy.deepcopy(self._objects["pods"][key])

    def lose_pod_with_node(self, name: str, namespace: str | None = None) -> JSON:
        """The pod's node disappears (if still there) and PodGC removes its pods, as the
        controller manager does for pods bound to a node that no longer exists: an
        unfinished pod first fails (phase Failed, condition DisruptionTarget True with reason
        DeletionByPodGC), then every pod of the node is deleted at once (grace period 0), and
        the garbage collector takes the Secrets it owned.

        Returns:
            The named pod as deleted (a copy).

        Raises:
            LookupError: No such pod.
            ValueError: The pod is not on a node yet.
        """
        key, pod = self._bound_pod("lose_pod_with_node", name, namespace, finished_ok=True)
        node_name = pod["spec"]["nodeName"]
        with self._lock:
            self._remove_node(node_name)
            removed: JSON = {}
            for victim_key, victim in sorted(self._objects["pods"].items()):
                if victim["spec"].get("nodeName") != node_name:
                    continue
                if not _is_terminal(victim):
                    self._update("pods", victim_key, victim["metadata"]["uid"], _collected)
                gone = self._remove("pods", victim_key)
                if victim_key == key:
                    removed = gone
            return copy.deepcopy(removed)

    def _bound_pod(self, caller: str, name: str, namespace: str | None, *,
                   finished_ok: bool = False) -> tuple[tuple[str, str], JSON]:
        """The pod `name` (a copy) for a control that needs it on a node."""
        key = (namespace or self.namespace, name)
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is None:
                raise LookupError(f"FakeKubernetes.{caller}: no pod {key[0]}/{key[1]}")
            if not pod["spec"].get("nodeName"):
                raise ValueError(
                    f"FakeKubernetes.{caller}: pod {key[0]}/{key[1]} is not scheduled on a node "
                    f"yet (phase {pod['status'].get('phase')}, no spec.nodeName): wait until it "
                    "is bound"
                )
            if _is_terminal(pod) and not finished_ok:
                raise ValueError(
                    f"FakeKubernetes.{caller}: pod {key[0]}/{key[1]} has already finished "
                    f"(phase {pod['status']['phase']})"
                )
            return key, copy.deepcopy(pod)

    def _remove_node(self, name: str) -> None:
        """The node object goes (caller holds the lock); an autoscaled pool may regrow."""
        node = self._objects["nodes"].get(("", name))
        if node is None:
            return
        self._remove("nodes", ("", name))
        pool = (node["metadata"].get("labels") or {}).get(_GKE_NODEPOOL_LABEL, "")
        if self._pool_sizes[pool] > 0:
            self._pool_sizes[pool] -= 1

    # --- ReplicaSets and volumes ---------------------------------------------------------

    def replicate(self, name: str, template: JSON, *, replicas: int = 1,
                  namespace: str | None = None) -> list[JSON]:
        """Keeps `replicas` pods of `template` as a ReplicaSet `name` would.

        Each pod is named `<name>-<5 characters>`, owned by the ReplicaSet (its controller
        ownerReference), and goes through admission like any create. As soon as one is deleted
        (gracefully or not) a new one is created: new name, new uid, new empty volumes.

        Args:
            name: The ReplicaSet's name (a Deployment's is `<deployment>-<hash>`).
            template: The pod template: `metadata` (labels) and `spec`.
            replicas: Pods to keep.
            namespace: Where; default: the fake's namespace.

        Returns:
            The pods created now (copies).
        """
        replica_set = _ReplicaSet(name, namespace or self.namespace, str(uuid.uuid4()),
                                  copy.deepcopy(template), replicas)
        with self._lock:
            self._replica_sets[replica_set.uid] = replica_set
        return [copy.deepcopy(pod) for pod in self._fill(replica_set)]

    def _fill(self, replica_set: _ReplicaSet) -> list[JSON]:
        """Creates the pods `replica_set` misses (those being deleted count as missing)."""
        with self._lock:
            live = [pod for (namespace, _), pod in self._objects["pods"].items()
                    if namespace == replica_set.namespace
                    and self._owner_set(pod) is replica_set
                    and not pod["metadata"].get("deletionTimestamp")]
            missing = replica_set.replicas - len(live)
        created: list[JSON] = []
        for _ in range(missing):
            body = copy.deepcopy(replica_set.template)
            metadata = body.setdefault("metadata", {})
            metadata["generateName"] = f"{replica_set.name}-"
            metadata["ownerReferences"] = [{
                "apiVersion": "apps/v1", "kind": "ReplicaSet", "name": replica_set.name,
                "uid": replica_set.uid, "controller": True, "blockOwnerDeletion": True}]
            created.append(self._create("pods", replica_set.namespace, body))
        return created

    def _owner_set(self, pod: JSON) -> _ReplicaSet | None:
        for reference in pod["metadata"].get("ownerReferences") or []:
            if reference.get("controller") and reference.get("uid") in self._replica_sets:
                return self._replica_sets[reference["uid"]]
        return None

    def _replace_replica(self, pod: JSON) -> None:
        """The ReplicaSet controller reacts to its pod's deletion at once (in the timeline)."""
        replica_set = self._owner_set(pod)
        if replica_set is not None:

            def fill() -> None:
                self._fill(replica_set)

            self._timeline.call_later(0, fill)

    def empty_dir(self, pod_name: str, volume: str, namespace: str | None = None) -> Path:
        """The directory holding a pod's emptyDir `volume` (needs `volume_root`).

        Raises:
            LookupError: No such pod, or it has no emptyDir of that name.
        """
        if self._volume_root is None:
            raise LookupError("FakeKubernetes.empty_dir: the fake was made without volume_root")
        pod = self.pod(pod_name, namespace)
        if pod is None or not any(v.get("name") == volume and "emptyDir" in v
                                  for v in pod["spec"].get("volumes") or []):
            raise LookupError(f"FakeKubernetes.empty_dir: pod {pod_name} has no emptyDir "
                              f"{volume!r}")
        return self._volume_root / str(pod["metadata"]["uid"]) / volume

    def _make_volumes(self, pod: JSON) -> None:
        if self._volume_root is None:
            return
        for volume in pod["spec"].get("volumes") or []:
            if "emptyDir" in volume:
                (self._volume_root / pod["metadata"]["uid"] / volume["name"]).mkdir(parents=True)

    def _remove_volumes(self, pod: JSON) -> None:
        if self._volume_root is not None:
            shutil.rmtree(self._volume_root / pod["metadata"]["uid"], ignore_errors=True)

    # --- ServiceAccount tokens and TokenReview -------------------------------------------

    def projected_token(
        self,
        pod_name: str,
        namespace: str | None = None,
        *,
        audience: str | None = None,
        expiration_seconds: int = 3607,
    ) -> str:
        """Issues the token the kubelet would write into a pod's projected token volume.

        The token is opaque (a random string the fake remembers), bound to the pod's uid and
        its ServiceAccount, for one audience, valid for `expiration_seconds` of the tokens'
        clock (see `advance_token_clock`) and only while that very pod exists.

        Args:
            pod_name: The pod the token is bound to.
            namespace: The pod's namespace; default: the fake's.
            audience: The projected source's `audience`; None for the API server's.
            expiration_seconds: The source's `expirationSeconds` (the API server's least: 600).

        Raises:
            LookupError: No such pod.
            ValueError: `expiration_seconds` is below the API server's minimum.
        """
        if expiration_seconds < MIN_TOKEN_SECONDS:
            raise ValueError(f"FakeKubernetes.projected_token: expirationSeconds must be at "
                             f"least {MIN_TOKEN_SECONDS}, got {expiration_seconds}")
        key = (namespace or self.namespace, pod_name)
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is None:
                raise LookupError(f"FakeKubernetes.projected_token: no pod {key[0]}/{key[1]}")
            token = secrets.token_urlsafe(32)
            self._bound_tokens[token] = _BoundToken(
                namespace=key[0],
                service_account=str(pod["spec"].get("serviceAccountName") or "default"),
                pod_name=pod_name,
                pod_uid=pod["metadata"]["uid"],
                audiences=(audience or API_SERVER_AUDIENCE,),
                expires_at=self._token_now() + expiration_seconds,
                credential_id=str(uuid.uuid4()),
            )
            return token

    def advance_token_clock(self, seconds: float) -> None:
        """Moves the clock that token expiry is judged by `seconds` ahead."""
        with self._lock:
            self._token_clock_offset += seconds

    def _token_now(self) -> float:
        return time.time() + self._token_clock_offset

    def review_token(self, body: Any) -> JSON:
        """The API server's answer to a TokenReview (`POST .../tokenreviews`).

        Raises:
            ApiError: 400 for a body that is not a TokenReview, 422 without `spec.token`.
        """
        if not isinstance(body, dict) or body.get("kind", "TokenReview") != "TokenReview" or \
                body.get("apiVersion", _AUTHENTICATION_API) != _AUTHENTICATION_API:
            raise ApiError(400, f"the body of a tokenreviews create must be a TokenReview "
                                f"({_AUTHENTICATION_API})")
        spec = body.get("spec")
        token = spec.get("token") if isinstance(spec, dict) else None
        if not isinstance(token, str) or not token:
            raise ApiError(422, 'TokenReview.authentication.k8s.io "" is invalid: spec.token: '
                                "Required value", details={"kind": "TokenReview"})
        assert isinstance(spec, dict)
        wanted = [str(a) for a in spec.get("audiences") or [API_SERVER_AUDIENCE]]
        with self._lock:
            bound = self._bound_tokens.get(token)
            problem = self._token_problem(bound, wanted)
        status: JSON
        if bound is None or problem is not None:
            status = {"user": {}, "error": f"[invalid bearer token, {problem or 'unknown token'}]"}
        else:
            service_account = f"system:serviceaccount:{bound.namespace}:{bound.service_account}"
            status = {
                "authenticated": True,
                "audiences": [a for a in wanted if a in bound.audiences],
                "user": {
                    "username": service_account,
                    "uid": str(uuid.uuid5(uuid.NAMESPACE_URL, service_account)),
                    "groups": ["system:serviceaccounts",
                               f"system:serviceaccounts:{bound.namespace}",
                               "system:authenticated"],
                    "extra": {
                        "authentication.kubernetes.io/credential-id": [
                            f"JTI={bound.credential_id}"],
                        "authentication.kubernetes.io/pod-name": [bound.pod_name],
                        "authentication.kubernetes.io/pod-uid": [bound.pod_uid],
                    },
                },
            }
        return {"kind": "TokenReview", "apiVersion": _AUTHENTICATION_API,
                "metadata": {"creationTimestamp": None}, "spec": copy.deepcopy(spec),
                "status": status}

    def _token_problem(self, bound: _BoundToken | None, wanted: list[str]) -> str | None:
        """Why a token does not authenticate for `wanted`, in the API server's words."""
        if bound is None:
            return None
        if self._token_now() >= bound.expires_at:
            return "service account token has expired"
        if not set(wanted) & set(bound.audiences):
            return (f"token audiences {list(bound.audiences)} is invalid for the target "
                    f"audiences {wanted}")
        pod = self._objects["pods"].get((bound.namespace, bound.pod_name))
        if pod is None:
            return f'service account token has been invalidated (pod "{bound.pod_name}" not found)'
        if pod["metadata"]["uid"] != bound.pod_uid:
            return (f"service account token has been invalidated (the UID in the bound object "
                    f"reference ({bound.pod_uid}) does not match the UID in record "
                    f"({pod['metadata']['uid']}))")
        return None

    def seed(self, *objects: JSON) -> list[JSON]:
        """Stores objects as they are (no admission, no scheduling), e.g. 5,000 finished pods.

        Each object needs `kind` (Pod, Secret, ConfigMap, Event or Deployment) and
        `metadata.name`; the
        namespace defaults to the fake's. Status is kept as given (a Pod without one is
        Pending).

        Returns:
            The stored objects (copies), with uid and resourceVersion.
        """
        stored: list[JSON] = []
        kinds = {resource.kind: plural for plural, resource in _RESOURCES.items()}
        with self._lock:
            for obj in objects:
                plural = kinds.get(str(obj.get("kind")))
                if plural not in ("pods", "secrets", "configmaps", "events", "deployments"):
                    raise ValueError(
                        f"FakeKubernetes.seed: kind must be Pod, Secret, ConfigMap, Event or "
                        f"Deployment, "
                        f"got {obj.get('kind')!r}"
                    )
                body = copy.deepcopy(obj)
                body.setdefault("metadata", {}).setdefault("namespace", self.namespace)
                if plural == "pods":
                    body.setdefault("status", {"phase": "Pending"})
                stored.append(copy.deepcopy(self._store(plural, body)))
            self._update_quota_usage()
        return stored

    def expire_watch_history(self) -> None:
        """Compacts the watch history: a watch from an older resourceVersion gets 410 Gone."""
        with self._lock:
            self._history.clear()
            self._history_start = self._resource_version
            self._snapshots.clear()

    def default_script(self, pod: JSON) -> PodScript:
        """What the default scheduler does with `pod`, given the nodes and pools now.

        A pod some node fits runs there; else, a pod some pool with room would fit scales that
        pool up; else it is unschedulable (an accelerator no node or pool offers, a missing
        toleration, more GPUs than a node has, every pool at its maximum).
        """
        with self._lock:
            if self._fitting_node(pod) is not None:
                return PodScript.run()
            if self._fitting_pool(pod) is not None:
                return PodScript.scale_up()
            return PodScript.unschedulable()

    # --- store ----------------------------------------------------------------------------

    def _next_version(self) -> int:
        self._resource_version += 1
        return self._resource_version

    def _store(self, plural: str, obj: JSON) -> JSON:
        """Adds a new object (caller holds the lock); returns the stored object."""
        resource = _RESOURCES[plural]
        metadata = obj.setdefault("metadata", {})
        if not resource.namespaced:
            metadata.pop("namespace", None)
        metadata.setdefault("uid", str(uuid.uuid4()))
        metadata.setdefault("creationTimestamp", _now())
        metadata["resourceVersion"] = str(self._next_version())
        obj["kind"], obj["apiVersion"] = resource.kind, resource.api_version
        key = (metadata.get("namespace", ""), metadata["name"])
        self._objects[plural][key] = obj
        self._record(_Change(self._resource_version, "ADDED", plural, obj, None))
        return obj

    def _replace(self, plural: str, key: tuple[str, str], obj: JSON) -> JSON:
        previous = self._objects[plural][key]
        obj["metadata"]["resourceVersion"] = str(self._next_version())
        self._objects[plural][key] = obj
        self._record(_Change(self._resource_version, "MODIFIED", plural, obj, previous))
        return obj

    def _remove(self, plural: str, key: tuple[str, str]) -> JSON:
        previous = self._objects[plural].pop(key)
        removed = copy.deepcopy(previous)
        removed["metadata"]["resourceVersion"] = str(self._next_version())
        self._record(_Change(self._resource_version, "DELETED", plural, removed, previous))
        if plural == "pods":
            self._collect_garbage(previous["metadata"]["uid"], key[0])
            self._update_quota_usage()
            self._remove_volumes(previous)
            self._replace_replica(previous)
        return removed

    def _record(self, change: _Change) -> None:
        with self._changed:
            self._history.append(change)
            self._changed.notify_all()

    def _update(
        self, plural: str, key: tuple[str, str], uid: str, mutate: Callable[[JSON], None]
    ) -> JSON | None:
        """Applies `mutate` to a copy of the object if it still exists with `uid`."""
        with self._lock:
            current = self._objects[plural].get(key)
            if current is None or current["metadata"]["uid"] != uid:
                return None
            updated = copy.deepcopy(current)
            mutate(updated)
            return self._replace(plural, key, updated)

    def _collect_garbage(self, owner_uid: str, namespace: str) -> None:
        """Deletes Secrets whose every owner is gone, as the garbage collector (background)."""
        live = {
            obj["metadata"]["uid"]
            for plural in ("pods", "secrets")
            for (ns, _), obj in self._objects[plural].items()
            if ns == namespace
        }
        for key, secret in list(self._objects["secrets"].items()):
            owners = secret["metadata"].get("ownerReferences") or []
            if key[0] != namespace or not any(ref.get("uid") == owner_uid for ref in owners):
                continue
            remaining = [ref for ref in owners if ref.get("uid") in live]
            if remaining:
                updated = copy.deepcopy(secret)
                updated["metadata"]["ownerReferences"] = remaining
                self._replace("secrets", key, updated)
            else:
                self._remove("secrets", key)

    def _dangling_owner_check(self, key: tuple[str, str], uid: str) -> None:
        """The garbage collector deletes a Secret created with owners that never existed."""
        with self._lock:
            secret = self._objects["secrets"].get(key)
            if secret is None or secret["metadata"]["uid"] != uid:
                return
            owners = secret["metadata"].get("ownerReferences") or []
            live = {obj["metadata"]["uid"] for obj in self._objects["pods"].values()}
            if owners and not any(ref.get("uid") in live for ref in owners):
                self._remove("secrets", key)

    # --- quota ----------------------------------------------------------------------------

    def _quota_used(self) -> dict[str, int]:
        pods = [
            pod
            for (ns, _), pod in self._objects["pods"].items()
            if ns == self.namespace and not _is_terminal(pod)
        ]
        return {"pods": len(pods), f"requests.{GPU_RESOURCE}": sum(map(_gpu_request, pods))}

    def _update_quota_usage(self) -> None:
        key = (self.namespace, self._quota_name)
        quota = self._objects["resourcequotas"].get(key)
        if quota is None:
            return
        used = self._quota_used()
        status_used = {name: str(used[name]) for name in self._hard}
        if quota["status"]["used"] != status_used:
            updated = copy.deepcopy(quota)
            updated["status"]["used"] = status_used
            self._replace("resourcequotas", key, updated)

    def _admit_quota(self, pod: JSON) -> None:
        if not self._hard or pod["metadata"]["namespace"] != self.namespace:
            return
        used = self._quota_used()
        requested = {"pods": 1, f"requests.{GPU_RESOURCE}": _gpu_request(pod)}
        exceeded = sorted(
            name
            for name, hard in self._hard.items()
            if requested[name] > 0 and used[name] + requested[name] > hard
        )
        if exceeded:

            def listed(values: Mapping[str, int]) -> str:
                return ",".join(f"{name}={values[name]}" for name in exceeded)

            name = pod["metadata"]["name"]
            raise ApiError(
                403,
                f'pods "{name}" is forbidden: exceeded quota: {self._quota_name}, requested: '
                f"{listed(requested)}, used: {listed(used)}, limited: {listed(self._hard)}",
                details={"name": name, "kind": "pods"},
            )

    # --- admission and defaulting ----------------------------------------------------------

    def _check_namespace(self, namespace: str) -> None:
        if ("", namespace) not in self._objects["namespaces"]:
            raise ApiError(
                404,
                f'namespaces "{namespace}" not found',
                details={"name": namespace, "kind": "namespaces"},
            )

    def _create(self, plural: str, namespace: str, body: Any) -> JSON:
        resource = _RESOURCES[plural]
        if not resource.writable:
            raise ApiError(405, f"the fake serves {plural} read-only")
        if not isinstance(body, dict):
            raise ApiError(400, f"the body of a {resource.kind} create must be a JSON object")
        obj = copy.deepcopy(body)
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", resource.kind)
        if obj["kind"] != resource.kind or obj["apiVersion"] != "v1":
            raise ApiError(
                400,
                f"the API version in the data ({obj['apiVersion']}) and kind ({obj['kind']}) do "
                f"not match the path's (v1, {resource.kind})",
            )
        metadata = obj.setdefault("metadata", {})
        if metadata.get("namespace", namespace) != namespace:
            raise ApiError(
                400,
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        metadata["namespace"] = namespace
        if not metadata.get("name") and metadata.get("generateName"):
            suffix = "".join(random.choices(_NAME_SUFFIX_ALPHABET, k=5))
            metadata["name"] = f"{metadata['generateName']}{suffix}"
        if not metadata.get("name"):
            raise ApiError(
                422,
                f'{resource.kind} "" is invalid: metadata.name: Required value: name or '
                "generateName is required",
                details={"kind": resource.kind},
            )
        with self._lock:
            self._check_namespace(namespace)
            if plural in ("pods", "secrets", "configmaps"):
                self._validate(obj)
            if plural == "pods":
                self._default_pod(obj)
                if self._pod_security == "restricted" and namespace == self.namespace:
                    violations = _pod_security_violations(obj)
                    if violations:
                        raise ApiError(
                            403,
                            f'pods "{metadata["name"]}" is forbidden: violates PodSecurity '
                            f'"restricted:latest": {", ".join(violations)}',
                            details={"name": metadata["name"], "kind": "pods"},
                        )
                self._admit_quota(obj)
            elif plural == "secrets":
                self._default_secret(obj)
            elif plural == "events":
                obj.setdefault("count", 1)
            key = (namespace, metadata["name"])
            if key in self._objects[plural]:
                raise ApiError(
                    409,
                    f'{plural} "{metadata["name"]}" already exists',
                    details={"name": metadata["name"], "kind": plural},
                )
            for server_field in (
                "uid",
                "resourceVersion",
                "creationTimestamp",
                "deletionTimestamp",
            ):
                metadata.pop(server_field, None)
            stored = self._store(plural, obj)
            if plural == "pods":
                # The volumes exist before anyone can see the pod.
                self._make_volumes(stored)
                self._update_quota_usage()
            uid = stored["metadata"]["uid"]
        if plural == "pods":
            self._plan(stored)
        elif plural == "secrets" and metadata.get("ownerReferences"):
            self._timeline.call_later(0.05, lambda: self._dangling_owner_check(key, uid))
        return stored

    def _validate(self, obj: JSON) -> None:
        kind = obj["kind"]
        errors = _validate_metadata(obj["metadata"])
        errors += {
            "Pod": _validate_pod, "Secret": _validate_secret, "ConfigMap": _validate_config_map
        }[kind](obj)
        if self.validate:
            errors += strict_errors(obj)
        if errors:
            name = obj["metadata"].get("name", "")
            self.validation_errors.extend(f"{kind} {name}: {error}" for error in errors)
            listed = errors[0] if len(errors) == 1 else f"[{', '.join(errors)}]"
            raise ApiError(
                422,
                f'{kind} "{name}" is invalid: {listed}',
                details={
                    "name": name,
                    "kind": kind,
                    "causes": [{"reason": "FieldValueInvalid", "message": e} for e in errors],
                },
            )

    def _default_pod(self, pod: JSON) -> None:
        spec = pod.setdefault("spec", {})
        for key, value in (
            ("restartPolicy", "Always"),
            ("terminationGracePeriodSeconds", 30),
            ("dnsPolicy", "ClusterFirst"),
            ("schedulerName", _SCHEDULER),
            ("serviceAccountName", "default"),
            ("securityContext", {}),
            ("enableServiceLinks", True),
            ("priority", 0),
            ("preemptionPolicy", "PreemptLowerPriority"),
        ):
            spec.setdefault(key, copy.deepcopy(value))
        spec["serviceAccount"] = spec["serviceAccountName"]
        tolerations = spec.setdefault("tolerations", [])
        for taint_key in ("node.kubernetes.io/not-ready", "node.kubernetes.io/unreachable"):
            if not any(t.get("key") == taint_key for t in tolerations):
                tolerations.append(
                    {
                        "key": taint_key,
                        "operator": "Exists",
                        "effect": "NoExecute",
                        "tolerationSeconds": 300,
                    }
                )
        mount_token = spec.get("automountServiceAccountToken") is not False
        token_volume = (
            f"kube-api-access-{''.join(random.choices('bcdfghjklmnpqrstvwxz2456789', k=5))}"
        )
        if mount_token:
            spec.setdefault("volumes", []).append(
                {
                    "name": token_volume,
                    "projected": {
                        "defaultMode": 420,
                        "sources": [
                            {"serviceAccountToken": {"expirationSeconds": 3607, "path": "token"}},
                            {
                                "configMap": {
                                    "name": "kube-root-ca.crt",
                                    "items": [{"key": "ca.crt", "path": "ca.crt"}],
                                }
                            },
                        ],
                    },
                }
            )
        for container in [*(spec.get("initContainers") or []), *spec.get("containers", [])]:
            image = str(container.get("image", ""))
            tag = image.rsplit("/", 1)[-1]
            latest = "@" not in image and (":" not in tag or tag.endswith(":latest"))
            container.setdefault("imagePullPolicy", "Always" if latest else "IfNotPresent")
            container.setdefault("terminationMessagePath", "/dev/termination-log")
            container.setdefault("terminationMessagePolicy", "File")
            resources = container.setdefault("resources", {})
            limits = resources.get("limits") or {}
            if limits:
                requests = resources.setdefault("requests", {})
                for name, quantity in limits.items():
                    requests.setdefault(name, quantity)
            if mount_token:
                container.setdefault("volumeMounts", []).append(
                    {"name": token_volume, "readOnly": True, "mountPath": _SA_TOKEN_MOUNT}
                )
        pod["status"] = {"phase": "Pending", "qosClass": _qos_class(spec)}

    def _default_secret(self, secret: JSON) -> None:
        secret.setdefault("type", "Opaque")
        string_data = secret.pop("stringData", None) or {}
        data = secret.setdefault("data", {}) if string_data else secret.get("data")
        for key, value in string_data.items():
            cast(JSON, data)[key] = base64.b64encode(str(value).encode()).decode()

    # --- the scheduler, autoscaler and kubelet ---------------------------------------------

    def _add_node(
        self,
        name: str,
        labels: dict[str, str],
        gpus: int,
        taints: Iterable[Taint | JSON],
        *,
        ready: bool = True,
    ) -> JSON:
        """Registers a node: Ready (or NotReady, tainted not-ready, until `_node_ready`), its
        `gpus` allocatable (0 until `_node_gpus` for a node whose driver is installing)."""
        taint_list = [
            {"key": t.key, "value": t.value, "effect": t.effect} if isinstance(t, Taint) else t
            for t in taints
        ]
        capacity = {"cpu": "8", "memory": "32863744Ki", "pods": "110"}
        if gpus:
            capacity[GPU_RESOURCE] = str(gpus)
        node: JSON = {
            "metadata": {"name": name, "labels": {**labels, _HOSTNAME_LABEL: name}},
            "spec": {"providerID": f"gce://fake-project/us-central1-a/{name}"},
            "status": {
                "capacity": capacity,
                "allocatable": dict(capacity),
                "conditions": [_node_ready_condition(ready)],
            },
        }
        if not ready:
            taint_list.append({"key": _NOT_READY_TAINT, "effect": "NoSchedule"})
        if taint_list:
            node["spec"]["taints"] = taint_list
        with self._lock:
            return self._store("nodes", node)

    def _node_ready(self, name: str) -> None:
        """The kubelet reports the node Ready; the node lifecycle controller lifts its taint."""

        def ready(node: JSON) -> None:
            node["status"]["conditions"] = [_node_ready_condition(True)]
            taints = [t for t in node["spec"].get("taints") or [] if t["key"] != _NOT_READY_TAINT]
            node["spec"].pop("taints", None)
            if taints:
                node["spec"]["taints"] = taints

        self._update_node(name, ready)

    def _node_gpus(self, name: str, gpus: int) -> None:
        """The device plugin advertises the node's GPUs (capacity and allocatable)."""

        def advertised(node: JSON) -> None:
            for key in ("capacity", "allocatable"):
                node["status"][key][GPU_RESOURCE] = str(gpus)

        self._update_node(name, advertised)

    def _update_node(self, name: str, mutate: Callable[[JSON], None]) -> None:
        with self._lock:
            node = self._objects["nodes"].get(("", name))
            if node is not None:
                self._update("nodes", ("", name), node["metadata"]["uid"], mutate)

    def _free_gpus(self, node: JSON) -> int:
        allocatable = int(node["status"]["allocatable"].get(GPU_RESOURCE, "0"))
        name = node["metadata"]["name"]
        used = sum(
            _gpu_request(pod)
            for pod in self._objects["pods"].values()
            if pod.get("spec", {}).get("nodeName") == name and not _is_terminal(pod)
        )
        return allocatable - used

    def _node_failure(self, pod: JSON, node: JSON) -> str | None:
        """Why `node` cannot take `pod`, in the default profile's filter order, or None."""
        taint = _untolerated(pod, node["spec"].get("taints") or [])
        if taint is not None:
            return _taint_reason(taint)
        if not _selector_matches(pod, node["metadata"].get("labels") or {}):
            return _SELECTOR_REASON
        if _gpu_request(pod) > self._free_gpus(node):
            return f"Insufficient {GPU_RESOURCE}"
        return None

    def _fitting_node(self, pod: JSON) -> JSON | None:
        for node in sorted(self._objects["nodes"].values(), key=lambda n: n["metadata"]["name"]):
            if self._node_failure(pod, node) is None:
                return node
        return None

    def _pool_failure(self, pod: JSON, pool: FakeNodePool) -> str | None:
        """Why a new node of `pool` would not take `pod` (the autoscaler's reason), or None."""
        taints = [{"key": t.key, "value": t.value, "effect": t.effect} for t in pool.taints]
        taint = _untolerated(pod, taints)
        labels = {**pool.labels, _GKE_NODEPOOL_LABEL: pool.name}
        if taint is not None:
            return _taint_reason(taint)
        if not _selector_matches(pod, labels):
            return _SELECTOR_REASON
        if _gpu_request(pod) > pool.gpus_per_node:
            return f"Insufficient {GPU_RESOURCE}"
        if self._pool_sizes[pool.name] >= pool.max_nodes:
            return "max node group size reached"
        return None

    def _fitting_pool(self, pod: JSON) -> FakeNodePool | None:
        return next((p for p in self._pools if self._pool_failure(pod, p) is None), None)

    def _plan(self, pod: JSON) -> None:
        """Chooses the new pod's script (outside the lock: a custom scheduler may call us)."""
        snapshot = copy.deepcopy(pod)
        forced = self._scheduler is not None
        try:
            script = self._scheduler(snapshot) if self._scheduler else self.default_script(snapshot)
        except Exception:
            self._report_error(f"scheduler callback failed:\n{traceback.format_exc()}")
            return
        key = (pod["metadata"]["namespace"], pod["metadata"]["name"])
        uid = pod["metadata"]["uid"]
        self._timeline.call_later(
            script.schedule_delay, lambda: self._schedule(key, uid, script, forced)
        )

    def _schedule(self, key: tuple[str, str], uid: str, script: PodScript, forced: bool) -> None:
        with self._lock:
            pod = self._objects["pods"].get(key)
            if (
                pod is None
                or pod["metadata"]["uid"] != uid
                or pod.get("metadata", {}).get("deletionTimestamp")
            ):
                return
            outcome = script.outcome
            if outcome is Outcome.SCALE_UP or outcome is Outcome.UNSCHEDULABLE:
                self._fail_scheduling(key, uid, script)
                return
            node = self._fitting_node(pod)
            if node is None and not forced:
                # The cluster changed since the pod was created: decide again, as the real
                # scheduler would on its next attempt.
                again = self.default_script(pod)
                self._fail_scheduling(key, uid, again)
                return
            if node is None:
                node = self._forced_node(pod)
            self._bind(key, uid, node["metadata"]["name"], script)

    def _forced_node(self, pod: JSON) -> JSON:
        """A node for a pod a custom scheduler said runs, even if none fits."""
        nodes = sorted(self._objects["nodes"].values(), key=lambda n: n["metadata"]["name"])
        for node in nodes:
            if _selector_matches(pod, node["metadata"].get("labels") or {}):
                return node
        return self._new_pool_node(pod, self._matching_pool(pod))

    def _matching_pool(self, pod: JSON) -> FakeNodePool:
        """The pool a scale-up for `pod` grows: a fitting one, else a selector match, else one
        made from the pod's nodeSelector."""
        pool = self._fitting_pool(pod)
        if pool is None:
            pool = next(
                (
                    p
                    for p in self._pools
                    if _selector_matches(pod, {**p.labels, _GKE_NODEPOOL_LABEL: p.name})
                ),
                None,
            )
        if pool is None:
            selector = dict((pod.get("spec") or {}).get("nodeSelector") or {})
            pool = FakeNodePool("scripted", selector, max(_gpu_request(pod), 1), 1_000, ())
        return pool

    def _new_pool_node(
        self, pod: JSON, pool: FakeNodePool, *, ready: bool = True, gpus: bool = True
    ) -> JSON:
        self._pool_sizes[pool.name] += 1
        name = f"gke-fake-{pool.name}-{secrets.token_hex(4)}"
        labels = {**pool.labels, _GKE_NODEPOOL_LABEL: pool.name}
        return self._add_node(
            name, labels, pool.gpus_per_node if gpus else 0, pool.taints, ready=ready
        )

    def _fail_scheduling(self, key: tuple[str, str], uid: str, script: PodScript) -> None:
        """FailedScheduling, then the autoscaler's scale-up (SCALE_UP) or refusal."""
        pod = self._objects["pods"][key]
        nodes = sorted(self._objects["nodes"].values(), key=lambda n: n["metadata"]["name"])
        reasons = [
            self._node_failure(pod, node) or f"Insufficient {GPU_RESOURCE}" for node in nodes
        ]
        message = script.message or _failed_scheduling_message(reasons)

        def unschedulable(p: JSON) -> None:
            _set_condition(p, "PodScheduled", "False", "Unschedulable", message)

        self._update("pods", key, uid, unschedulable)
        self._event(pod, "Warning", "FailedScheduling", message, _SCHEDULER)
        if script.outcome is Outcome.SCALE_UP:
            pool = self._matching_pool(pod)
            size = self._pool_sizes[pool.name]
            group = (
                "https://www.googleapis.com/compute/v1/projects/fake-project/zones/us-central1-a/"
                f"instanceGroups/gke-fake-{pool.name}-grp"
            )
            info = f"[{{{group} {size}->{size + 1} (max: {pool.max_nodes})}}]"
            self._timeline.call_later(
                script.step_delay,
                lambda: self._pod_event(
                    key,
                    uid,
                    "Normal",
                    "TriggeredScaleUp",
                    f"pod triggered scale-up: {info}",
                    _AUTOSCALER,
                ),
            )
            self._pool_sizes[pool.name] += 1  # reserved now, as the autoscaler's target size
            not_ready, driver = script.node_not_ready_seconds, script.driver_delay

            # The node registers (NotReady for `not_ready` seconds), turns Ready, and offers
            # its GPUs `driver` seconds later; the scheduler binds the pod then. With both 0,
            # all of it is one step.
            def node_registered() -> None:
                with self._lock:
                    self._pool_sizes[pool.name] -= 1  # _new_pool_node counts it again
                    node = self._new_pool_node(
                        pod, pool, ready=not not_ready, gpus=not not_ready and not driver
                    )
                    name = node["metadata"]["name"]
                    if not_ready:
                        self._timeline.call_later(not_ready, lambda: node_ready(name))
                    else:
                        node_ready(name, registered_ready=True)

            def node_ready(name: str, *, registered_ready: bool = False) -> None:
                if not registered_ready:
                    self._node_ready(name)
                if driver:
                    self._timeline.call_later(driver, lambda: gpus_allocatable(name))
                else:
                    gpus_allocatable(name, advertised=registered_ready)

            def gpus_allocatable(name: str, *, advertised: bool = False) -> None:
                with self._lock:
                    if not advertised:
                        self._node_gpus(name, pool.gpus_per_node)
                    self._bind(key, uid, name, _continue_as_run(script))

            self._timeline.call_later(
                script.step_delay + script.scale_up_delay - not_ready, node_registered
            )
        else:
            pool_reasons = [
                self._pool_failure(pod, p) or "max node group size reached" for p in self._pools
            ]
            refusal = (
                f"pod didn't trigger scale-up: {_histogram(pool_reasons)}"
                if pool_reasons
                else "pod didn't trigger scale-up (it wouldn't fit if a new node is added)"
            )
            self._timeline.call_later(
                script.step_delay,
                lambda: self._pod_event(
                    key, uid, "Normal", "NotTriggerScaleUp", refusal, _AUTOSCALER
                ),
            )

    def _bind(self, key: tuple[str, str], uid: str, node_name: str, script: PodScript) -> None:
        """The scheduler binds the pod; the kubelet then runs its script step by step."""
        namespace, name = key

        def bound(pod: JSON) -> None:
            pod["spec"]["nodeName"] = node_name
            _set_condition(pod, "PodScheduled", "True")

        with self._lock:
            pod = self._update("pods", key, uid, bound)
            if pod is None:
                return
            self._event(
                pod,
                "Normal",
                "Scheduled",
                f"Successfully assigned {namespace}/{name} to {node_name}",
                _SCHEDULER,
            )
        self._timeline.call_later(script.step_delay, lambda: self._kubelet_start(key, uid, script))

    def _kubelet_start(self, key: tuple[str, str], uid: str, script: PodScript) -> None:
        """The kubelet admits the pod: startTime, containers waiting in ContainerCreating."""

        if not self._alive(key, uid):
            return

        def admitted(pod: JSON) -> None:
            status = pod["status"]
            status["startTime"] = _now()
            status["hostIP"] = "10.128.0.10"
            status["hostIPs"] = [{"ip": "10.128.0.10"}]
            names = [c["name"] for c in pod["spec"]["containers"]]
            unready = f"containers with unready status: [{' '.join(names)}]"
            _set_condition(pod, "PodReadyToStartContainers", "False")
            _set_condition(pod, "Initialized", "True")
            _set_condition(pod, "Ready", "False", "ContainersNotReady", unready)
            _set_condition(pod, "ContainersReady", "False", "ContainersNotReady", unready)
            status["containerStatuses"] = [
                {
                    "name": c["name"],
                    "image": c["image"],
                    "imageID": "",
                    "ready": False,
                    "restartCount": 0,
                    "started": False,
                    "state": {"waiting": {"reason": "ContainerCreating"}},
                    "lastState": {},
                }
                for c in pod["spec"]["containers"]
            ]

        with self._lock:
            pod = self._update("pods", key, uid, admitted)
            if pod is None:
                return
            deadline = pod["spec"].get("activeDeadlineSeconds")
        if isinstance(deadline, int):
            self._timeline.call_later(
                deadline * self._deadline_scale, lambda: self._deadline(key, uid)
            )
        self._timeline.call_later(script.step_delay, lambda: self._mount(key, uid, script, True))

    def _mount(self, key: tuple[str, str], uid: str, script: PodScript, first: bool) -> None:
        """Waits (FailedMount) until every non-optional Secret volume exists, then pulls."""
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is None or pod["metadata"]["uid"] != uid or _is_terminal(pod):
                return
            missing = [
                (volume["name"], volume["secret"].get("secretName", ""))
                for volume in pod["spec"].get("volumes") or []
                if "secret" in volume
                and not volume["secret"].get("optional")
                and (key[0], volume["secret"].get("secretName", "")) not in self._objects["secrets"]
            ]
            if missing:
                if first:
                    volume, secret_name = missing[0]
                    self._event(
                        pod,
                        "Warning",
                        "FailedMount",
                        f'MountVolume.SetUp failed for volume "{volume}" : secret '
                        f'"{secret_name}" not found',
                        _KUBELET,
                    )
                self._timeline.call_later(
                    script.step_delay, lambda: self._mount(key, uid, script, False)
                )
                return

        def sandbox_ready(p: JSON) -> None:
            _set_condition(p, "PodReadyToStartContainers", "True")
            p["status"]["podIP"] = f"10.8.{random.randint(0, 255)}.{random.randint(2, 254)}"
            p["status"]["podIPs"] = [{"ip": p["status"]["podIP"]}]

        self._update("pods", key, uid, sandbox_ready)
        self._pod_container_events(key, uid, "Normal", "Pulling", 'Pulling image "{image}"')
        self._timeline.call_later(script.step_delay, lambda: self._pulled(key, uid, script))

    def _alive(self, key: tuple[str, str], uid: str) -> bool:
        """Whether the pod with `uid` still exists and has not finished (its script goes on)."""
        with self._lock:
            pod = self._objects["pods"].get(key)
            return pod is not None and pod["metadata"]["uid"] == uid and not _is_terminal(pod)

    def _pulled(self, key: tuple[str, str], uid: str, script: PodScript) -> None:
        if not self._alive(key, uid):
            return
        if script.outcome is Outcome.IMAGE_PULL_ERROR:
            self._image_pull_failed(key, uid, script)
            return
        self._pod_container_events(
            key,
            uid,
            "Normal",
            "Pulled",
            'Successfully pulled image "{image}" in 812ms (812ms including waiting). '
            "Image size: 1523478112 bytes.",
        )
        self._pod_container_events(key, uid, "Normal", "Created", "Created container: {name}")
        self._pod_container_events(key, uid, "Normal", "Started", "Started container {name}")

        def running(pod: JSON) -> None:
            pod["status"]["phase"] = "Running"
            for condition in ("Ready", "ContainersReady"):
                _set_condition(pod, condition, "True")
            for status in pod["status"]["containerStatuses"]:
                status.update(
                    ready=True,
                    started=True,
                    containerID=f"containerd://{secrets.token_hex(32)}",
                    imageID=f"{status['image'].split('@')[0].split(':')[0]}@sha256:"
                    f"{secrets.token_hex(32)}",
                    state={"running": {"startedAt": _now()}},
                )

        pod = self._update("pods", key, uid, running)
        if pod is None:
            return
        snapshot = copy.deepcopy(pod)
        with self._lock:
            callbacks = list(self._running_callbacks)
        for callback in callbacks:
            try:
                callback(copy.deepcopy(snapshot))
            except Exception:
                self._report_error(f"on_pod_running callback failed:\n{traceback.format_exc()}")
        self._runner_output(key, uid, script)
        if script.outcome in (Outcome.CRASH, Outcome.SUCCEED):

            def exited() -> None:
                self._terminate(key, uid, script.exit_code)

            self._timeline.call_later(script.run_duration, exited)

    def _runner_output(self, key: tuple[str, str], uid: str, script: PodScript) -> None:
        """The started runner writes its first lines, and later connects (see PodScript)."""
        for line in RUNNER_START_LINES:
            self._write_log(key, uid, line)
        delay = self.runner_connect_delay if script.connect_delay is None else script.connect_delay
        if math.isfinite(delay):
            self._timeline.call_later(delay, lambda: self._runner_connected(key, uid))

    def _runner_connected(self, key: tuple[str, str], uid: str) -> None:
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is None or pod["metadata"]["uid"] != uid or _is_terminal(pod):
                return
            snapshot = copy.deepcopy(pod)
            callbacks = list(self._listening_callbacks)
        for callback in callbacks:
            try:
                callback(copy.deepcopy(snapshot))
            except Exception:
                self._report_error(
                    f"on_runner_listening callback failed:\n{traceback.format_exc()}"
                )
        stamp = datetime.now(UTC).strftime("%Y-%m-%d %H:%M:%SZ")
        for line in (*RUNNER_CONNECTED_LINES, f"{stamp}{RUNNER_LISTENING_SUFFIX}"):
            self._write_log(key, uid, line)

    def _write_log(self, key: tuple[str, str], uid: str, line: str) -> None:
        """Appends to the first container's log if the pod still is the one with `uid`."""
        with self._changed:
            pod = self._objects["pods"].get(key)
            if pod is None or pod["metadata"]["uid"] != uid:
                return
            container = pod["spec"]["containers"][0]["name"]
            self._container_log(key, uid, container).append(_LogLine(time.time(), line))
            self._changed.notify_all()

    def _container_log(self, key: tuple[str, str], uid: str, container: str) -> list[_LogLine]:
        """The log lines of a container of the pod with `uid` (caller holds the lock); a new
        pod of an earlier pod's name starts with empty logs."""
        stored = self._logs.get(key)
        if stored is None or stored[0] != uid:
            stored = (uid, {})
            self._logs[key] = stored
        return stored[1].setdefault(container, [])

    def _image_pull_failed(self, key: tuple[str, str], uid: str, script: PodScript) -> None:
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is None or pod["metadata"]["uid"] != uid or _is_terminal(pod):
                return
            images = {c["name"]: c["image"] for c in pod["spec"]["containers"]}
        errors = {
            name: script.message
            or f'rpc error: code = NotFound desc = failed to pull and unpack image "{image}": '
            f'failed to resolve reference "{image}": {image}: not found'
            for name, image in images.items()
        }
        for name, image in images.items():
            self._container_event(
                key,
                uid,
                name,
                "Warning",
                "Failed",
                f'Failed to pull image "{image}": {errors[name]}',
            )
            self._container_event(key, uid, name, "Warning", "Failed", "Error: ErrImagePull")

        def waiting(reason: str, messages: Mapping[str, str]) -> Callable[[JSON], None]:
            def mutate(pod: JSON) -> None:
                for status in pod["status"]["containerStatuses"]:
                    status["state"] = {
                        "waiting": {"reason": reason, "message": messages[status["name"]]}
                    }

            return mutate

        self._update("pods", key, uid, waiting("ErrImagePull", errors))

        def back_off() -> None:
            if not self._alive(key, uid):
                return
            messages = {name: f'Back-off pulling image "{image}"' for name, image in images.items()}
            for name in images:
                self._container_event(key, uid, name, "Normal", "BackOff", messages[name])
                self._container_event(
                    key, uid, name, "Warning", "Failed", "Error: ImagePullBackOff"
                )
            self._update("pods", key, uid, waiting("ImagePullBackOff", messages))

        self._timeline.call_later(script.step_delay, back_off)

    def _terminate(
        self, key: tuple[str, str], uid: str, exit_code: int, reason: str | None = None
    ) -> JSON | None:
        """The containers exit with `exit_code`; the pod becomes Succeeded or Failed, unless
        its restartPolicy restarts them (then see `_back_off`)."""

        def terminated(pod: JSON) -> None:
            succeeded = exit_code == 0
            policy = pod["spec"].get("restartPolicy", "Always")
            if policy == "Always" or policy == "OnFailure" and not succeeded:
                _back_off(pod, exit_code, reason)
                return
            pod["status"]["phase"] = "Succeeded" if succeeded else "Failed"
            why = "PodCompleted" if succeeded else "PodFailed"
            for condition in ("Ready", "ContainersReady"):
                _set_condition(pod, condition, "False", why)
            _set_condition(pod, "PodReadyToStartContainers", "False")
            for status in pod["status"].get("containerStatuses") or []:
                started = (status["state"].get("running") or {}).get("startedAt", _now())
                status.update(ready=False, started=False)
                status["state"] = {
                    "terminated": {
                        "exitCode": exit_code,
                        "reason": reason or ("Completed" if succeeded else "Error"),
                        "startedAt": started,
                        "finishedAt": _now(),
                        "containerID": status.get("containerID", ""),
                    }
                }

        with self._lock:
            current = self._objects["pods"].get(key)
            if current is None or current["metadata"]["uid"] != uid or _is_terminal(current):
                return current
            pod = self._update("pods", key, uid, terminated)
            self._update_quota_usage()
            return pod

    def _deadline(self, key: tuple[str, str], uid: str) -> None:
        """The kubelet fails a pod past its activeDeadlineSeconds."""

        def exceeded(pod: JSON) -> None:
            pod["status"].update(
                phase="Failed", reason="DeadlineExceeded", message=_DEADLINE_MESSAGE
            )
            for condition in ("Ready", "ContainersReady"):
                _set_condition(pod, condition, "False", "PodFailed")
            _set_condition(pod, "PodReadyToStartContainers", "False")
            _kill_containers(pod, 137)

        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is None or pod["metadata"]["uid"] != uid or _is_terminal(pod):
                return
            updated = self._update("pods", key, uid, exceeded)
            if updated is not None:
                self._event(updated, "Warning", "DeadlineExceeded", _DEADLINE_MESSAGE, _KUBELET)
            self._update_quota_usage()

    def _delete_pod(self, key: tuple[str, str], grace: int | None) -> JSON:
        """Deletes a pod: at once if unscheduled, finished or grace 0; else gracefully."""
        pod = self._objects["pods"][key]
        if pod["metadata"].get("deletionTimestamp"):
            return copy.deepcopy(pod)
        if grace is None:
            grace = int(pod["spec"].get("terminationGracePeriodSeconds", 30))
        if grace == 0 or not pod["spec"].get("nodeName") or _is_terminal(pod):
            return self._remove("pods", key)
        uid = pod["metadata"]["uid"]

        def terminating(p: JSON) -> None:
            p["metadata"]["deletionTimestamp"] = _now()
            p["metadata"]["deletionGracePeriodSeconds"] = grace

        updated = self._update("pods", key, uid, terminating)
        self._replace_replica(pod)
        for container in pod["spec"]["containers"]:
            self._container_event(
                key,
                uid,
                container["name"],
                "Normal",
                "Killing",
                f"Stopping container {container['name']}",
            )

        def gone() -> None:
            with self._lock:
                current = self._objects["pods"].get(key)
                if current is not None and current["metadata"]["uid"] == uid:
                    self._remove("pods", key)

        self._timeline.call_later(self._termination_delay, gone)
        return copy.deepcopy(cast(JSON, updated))

    # --- events ---------------------------------------------------------------------------

    def _event(
        self,
        pod: JSON,
        event_type: str,
        reason: str,
        message: str,
        component: str,
        field_path: str | None = None,
    ) -> None:
        host = pod["spec"].get("nodeName") if component == _KUBELET else None
        involved: JSON = {
            "kind": "Pod",
            "namespace": pod["metadata"]["namespace"],
            "name": pod["metadata"]["name"],
            "uid": pod["metadata"]["uid"],
            "apiVersion": "v1",
            "resourceVersion": pod["metadata"]["resourceVersion"],
        }
        if field_path:
            involved["fieldPath"] = field_path
        source: JSON = {"component": component}
        if host:
            source["host"] = host
        now = _now()
        event = {
            "metadata": {
                "name": f"{pod['metadata']['name']}.{secrets.token_hex(8)}",
                "namespace": pod["metadata"]["namespace"],
            },
            "involvedObject": involved,
            "reason": reason,
            "message": message,
            "source": source,
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "type": event_type,
            "eventTime": None,
            "reportingComponent": component,
            "reportingInstance": host or f"{component}-fake",
        }
        with self._lock:
            self._store("events", event)

    def _pod_event(
        self,
        key: tuple[str, str],
        uid: str,
        event_type: str,
        reason: str,
        message: str,
        component: str,
    ) -> None:
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is not None and pod["metadata"]["uid"] == uid:
                self._event(pod, event_type, reason, message, component)

    def _container_event(
        self,
        key: tuple[str, str],
        uid: str,
        container: str,
        event_type: str,
        reason: str,
        message: str,
    ) -> None:
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is not None and pod["metadata"]["uid"] == uid:
                self._event(
                    pod, event_type, reason, message, _KUBELET, f"spec.containers{{{container}}}"
                )

    def _pod_container_events(
        self, key: tuple[str, str], uid: str, event_type: str, reason: str, template: str
    ) -> None:
        with self._lock:
            pod = self._objects["pods"].get(key)
            if pod is None or pod["metadata"]["uid"] != uid:
                return
            for container in pod["spec"]["containers"]:
                message = template.format(name=container["name"], image=container["image"])
                self._container_event(key, uid, container["name"], event_type, reason, message)

    def _report_error(self, message: str) -> None:
        with self._lock:
            self.errors.append(message)

    # --- request handling (called from _Handler threads) --------------------------------------

    def _take_fault(self, method: str, path: str) -> _Fault | None:
        with self._lock:
            for fault in self._faults:
                if fault.method in ("*", method) and fnmatch.fnmatchcase(path, fault.path_pattern):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    def _record_request(self, request: RecordedRequest) -> None:
        with self._lock:
            self._requests.append(request)

    def _list(self, resource: _Resource, namespace: str | None, query: Mapping[str, str]) -> JSON:
        matches = self._matcher(resource, query)
        limit = _int_param(query, "limit")
        token = query.get("continue")
        with self._lock:
            items: list[JSON] | None
            if token:
                snapshot_id, offset = _decode_continue(token)
                items = self._snapshots.get(snapshot_id)
                if items is None:
                    raise ApiError(
                        410,
                        "The provided continue parameter is too old to display a consistent list "
                        "result. You can start a new list without the continue parameter.",
                    )
                snapshot_version = int(snapshot_id.split("-")[0])
            else:
                items = [
                    obj
                    for (ns, _), obj in sorted(self._objects[resource.plural].items())
                    if (namespace is None or ns == namespace) and matches(obj)
                ]
                snapshot_version, offset = self._resource_version, 0
                snapshot_id = f"{snapshot_version}-{uuid.uuid4().hex}"
            page = items[offset : offset + limit] if limit else items[offset:]
            metadata: JSON = {"resourceVersion": str(snapshot_version)}
            remaining = len(items) - offset - len(page)
            if limit and remaining > 0:
                # Later pages come from this snapshot, as the API server's consistent lists.
                self._snapshots[snapshot_id] = items
                while len(self._snapshots) > 64:
                    self._snapshots.pop(next(iter(self._snapshots)))
                metadata["continue"] = _encode_continue(snapshot_id, offset + len(page))
                metadata["remainingItemCount"] = remaining
            return {
                "kind": f"{resource.kind}List",
                "apiVersion": resource.api_version,
                "metadata": metadata,
                "items": [
                    {k: v for k, v in obj.items() if k not in ("kind", "apiVersion")}
                    for obj in page
                ],
            }

    def _matcher(self, resource: _Resource, query: Mapping[str, str]) -> Callable[[JSON], bool]:
        labels = parse_label_selector(query.get("labelSelector", ""))
        fields = _parse_field_selector(query.get("fieldSelector", ""), resource)
        return lambda obj: labels.matches(obj["metadata"].get("labels") or {}) and fields(obj)

    def _watch(
        self,
        resource: _Resource,
        namespace: str | None,
        query: Mapping[str, str],
        write: Callable[[JSON], bool],
        disconnected: Callable[[], bool],
    ) -> None:
        """Streams watch events to `write` until timeoutSeconds, a disconnect or `stop()`."""
        matches = self._matcher(resource, query)
        timeout = _int_param(query, "timeoutSeconds")
        deadline = time.monotonic() + timeout if timeout > 0 else None
        requested = query.get("resourceVersion", "")

        def in_scope(obj: JSON) -> bool:
            return namespace is None or obj["metadata"].get("namespace") == namespace

        initial: list[JSON]
        cursor: int | None
        with self._lock:
            # The compaction in effect for this snapshot: a later one ends the watch with 410.
            history_start = self._history_start
            if requested in ("", "0"):
                initial = [
                    {"type": "ADDED", "object": obj}
                    for (ns, _), obj in sorted(self._objects[resource.plural].items())
                    if in_scope(obj) and matches(obj)
                ]
                cursor = len(self._history)
            else:
                if not requested.isdigit():
                    raise ApiError(400, f"invalid resourceVersion: {requested!r}")
                since = int(requested)
                if since < self._history_start:
                    initial = [_gone_event(since, self._history_start)]
                    cursor = None
                else:
                    initial = []
                    cursor = next(
                        (i for i, c in enumerate(self._history) if c.resource_version > since),
                        len(self._history),
                    )
        for event in initial:
            if not write(event):
                return
        if cursor is None:
            return
        while not self._stopping.is_set():
            with self._changed:
                if self._history_start != history_start:
                    write(_gone_event(history_start, self._history_start))
                    return
                if cursor >= len(self._history):
                    wait = _WATCH_POLL_SECONDS
                    if deadline is not None:
                        wait = min(wait, deadline - time.monotonic())
                    if wait > 0:
                        self._changed.wait(wait)
                changes = self._history[cursor:]
                cursor += len(changes)
            for change in changes:
                if change.plural != resource.plural:
                    continue
                seen = _watch_event(change, in_scope, matches)
                if seen is not None and not write(seen):
                    return
            if deadline is not None and time.monotonic() >= deadline:
                return
            if not changes and disconnected():
                return

    def _open_log(
        self, namespace: str, name: str, query: Mapping[str, str]
    ) -> tuple[tuple[str, str], str, str, int | None]:
        """Checks a log request as the API server and the kubelet do.

        Returns:
            (pod key, pod uid, container, index of the first line to send), the index None
            for a pod not yet on a node (the API server then answers an empty log).
        """
        tail = _int_param(query, "tailLines") if "tailLines" in query else None
        since = _int_param(query, "sinceSeconds") if "sinceSeconds" in query else None
        if since == 0:
            raise ApiError(400, "sinceSeconds: Invalid value: 0: must be greater than 0")
        key = (namespace, name)
        with self._lock:
            self._check_namespace(namespace)
            pod = self._objects["pods"].get(key)
            if pod is None:
                raise ApiError(
                    404, f'pods "{name}" not found', details={"name": name, "kind": "pods"}
                )
            names = [c["name"] for c in pod["spec"]["containers"]]
            container = query.get("container") or ""
            if not container:
                if len(names) != 1:
                    raise ApiError(
                        400,
                        f"a container name must be specified for pod {name}, choose one of: "
                        f"[{' '.join(names)}]",
                    )
                container = names[0]
            elif container not in names:
                raise ApiError(400, f"container {container} is not valid for pod {name}")
            uid = pod["metadata"]["uid"]
            if not pod["spec"].get("nodeName"):
                return key, uid, container, None
            statuses = pod["status"].get("containerStatuses") or []
            status = next((s for s in statuses if s["name"] == container), None)
            state = (status or {}).get("state") or {"waiting": {"reason": "ContainerCreating"}}
            if "waiting" in state:
                raise ApiError(400, _log_waiting_message(container, name, state["waiting"]))
            lines = self._container_log(key, uid, container)
            start = 0
            if since is not None:
                cutoff = time.time() - since
                # From the line after the last older one (a real log is in time order).
                start = max((i + 1 for i, line in enumerate(lines) if line.at < cutoff), default=0)
            if tail is not None:
                start = max(start, len(lines) - tail)
            return key, uid, container, start

    def _stream_log(
        self,
        key: tuple[str, str],
        uid: str,
        container: str,
        start: int,
        follow: bool,
        write: Callable[[str], bool],
        disconnected: Callable[[], bool],
    ) -> None:
        """Writes the log from line `start`; with `follow`, then each new line, until the
        container terminates, the pod goes, the client leaves or `stop()`."""
        with self._changed:
            breaks = self._log_breaks
        with self._counted_follow(follow):
            self._write_log_lines(key, uid, container, start, follow, write, disconnected,
                                  breaks)

    @contextlib.contextmanager
    def _counted_follow(self, follow: bool) -> Iterator[None]:
        """Counts a follow in `open_log_follows` while it is served."""
        if not follow:
            yield
            return
        with self._changed:
            self._open_log_follows += 1
            self._changed.notify_all()
        try:
            yield
        finally:
            with self._changed:
                self._open_log_follows -= 1
                self._changed.notify_all()

    def _write_log_lines(self, key: tuple[str, str], uid: str, container: str, start: int,
                         follow: bool, write: Callable[[str], bool],
                         disconnected: Callable[[], bool], breaks: int) -> None:
        cursor = start
        while True:
            with self._changed:
                pod = self._objects["pods"].get(key)
                present = pod is not None and pod["metadata"]["uid"] == uid
                lines = self._container_log(key, uid, container) if present else []
                new = [line.text for line in lines[cursor:]]
                cursor += len(new)
                ended = (not present or _container_terminated(cast(JSON, pod), container)
                         or self._log_breaks != breaks)
                waiting = follow and not new and not ended and not self._stopping.is_set()
                if waiting:
                    self._changed.wait(_WATCH_POLL_SECONDS)
            for text in new:
                if not write(text):
                    return
            if not follow or ended or self._stopping.is_set():
                return
            if not new and disconnected():
                return

    def _authorize(self, method: str, path: str, query: Mapping[str, str]) -> None:
        """Refuses, as RBAC would, a request the configured Role rules do not allow."""
        if self._rbac is None:
            return
        log = re.fullmatch(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log", path)
        route = _route(path)
        if log is not None:
            resource, namespace, verb = "pods/log", log.group(1), "get"
        elif route is not None:
            named = route[2] is not None
            resource, namespace = route[0].plural, route[1]
            verb = {"POST": "create", "PUT": "update", "PATCH": "patch"}.get(method) or (
                ("get" if named else "watch" if query.get("watch") in ("true", "1") else "list")
                if method == "GET" else ("delete" if named else "deletecollection"))
        else:
            return
        group = route[0].group if route is not None else ""
        # A Role lives in a namespace: it can never grant a cluster-scoped resource.
        cluster_scoped = route is not None and not route[0].namespaced
        rules = self._cluster_rbac + ([] if cluster_scoped else self._rbac)
        if any(group in groups and resource in resources and verb in verbs
               for groups, resources, verbs in rules):
            return
        self.forbidden.append(f"{verb} {resource}")
        where = f' in the namespace "{namespace}"' if namespace else " at the cluster scope"
        raise ApiError(403, f'{resource} is forbidden: User "system:serviceaccount:'
                            f'{self.namespace}:base-runner" cannot {verb} resource '
                            f'"{resource}" in API group "{group}"{where}')

    def _handle(
        self,
        method: str,
        path: str,
        query: Mapping[str, str],
        body: Any,
        content_type: str = "application/json",
    ) -> tuple[int, JSON]:
        """Answers one non-watch request: (status, JSON body)."""
        if path == "/version":
            return 200, {
                "major": "1",
                "minor": "33",
                "gitVersion": f"v{KUBERNETES_VERSION}.0-fake",
                "platform": "linux/amd64",
            }
        route = _route(path)
        if route is None:
            raise ApiError(404, "the server could not find the requested resource")
        resource, namespace, name = route
        if resource.plural == "tokenreviews":
            if method != "POST" or name is not None:
                raise ApiError(405, f"the server does not allow this method on the requested "
                                    f"resource ({method} {path})", reason="MethodNotAllowed")
            return 201, self.review_token(body)
        updatable = resource.plural in _UPDATABLE and name is not None
        if method not in ("GET", "POST", "DELETE") and not (
            updatable and method in ("PUT", "PATCH")
        ):
            raise ApiError(405, f"the fake does not implement {method} on {resource.plural}")
        if name is None:
            if method == "GET":
                return 200, self._list(resource, namespace, query)
            if method == "POST":
                if namespace is None:
                    raise ApiError(405, f"create {resource.plural} in a namespace")
                return 201, self._create(resource.plural, namespace, body)
            return 200, self._delete_collection(resource, namespace, query)
        key = (namespace or "", name)
        with self._lock:
            obj = self._objects[resource.plural].get(key)
            if obj is None:
                raise ApiError(
                    404,
                    f'{resource.plural} "{name}" not found',
                    details={"name": name, "kind": resource.plural},
                )
            if method == "GET":
                return 200, copy.deepcopy(obj)
            if method == "POST":
                raise ApiError(405, f"POST to a named {resource.kind} is not allowed")
            if method == "PUT":
                return 200, self._replace_object(resource, key, body)
            if method == "PATCH":
                return 200, self._patch_object(resource, key, body, content_type)
            return 200, self._delete(resource, key, query, body)

    def _replace_object(self, resource: _Resource, key: tuple[str, str], body: Any) -> JSON:
        """PUT: the whole object, checked against the stored one's resourceVersion if given."""
        if not isinstance(body, dict):
            raise ApiError(400, f"the body of a {resource.kind} update must be a JSON object")
        obj = copy.deepcopy(body)
        obj.setdefault("apiVersion", "v1")
        obj.setdefault("kind", resource.kind)
        if obj["kind"] != resource.kind or obj["apiVersion"] != resource.api_version:
            raise ApiError(
                400,
                f"the API version in the data ({obj['apiVersion']}) and kind ({obj['kind']}) do "
                f"not match the path's ({resource.api_version}, {resource.kind})",
            )
        metadata = obj.setdefault("metadata", {})
        if not isinstance(metadata, dict):
            raise ApiError(400, "metadata must be a JSON object")
        if metadata.get("name", key[1]) != key[1]:
            raise ApiError(
                400,
                f"the name of the object ({metadata.get('name')}) does not match the name on "
                f"the URL ({key[1]})",
            )
        if metadata.get("namespace", key[0]) != key[0]:
            raise ApiError(
                400,
                "the namespace of the provided object does not match the namespace sent on "
                "the request",
            )
        metadata["name"], metadata["namespace"] = key[1], key[0]
        return self._update_object(resource, key, obj)

    def _patch_object(
        self, resource: _Resource, key: tuple[str, str], body: Any, content_type: str
    ) -> JSON:
        """PATCH: a JSON patch, a JSON merge patch, or a strategic merge patch (for a
        ConfigMap, whose fields carry no list merge strategy, the same as a merge patch)."""
        media = content_type.split(";")[0].strip().lower()
        current = copy.deepcopy(self._objects[resource.plural][key])
        if media == "application/json-patch+json":
            if not isinstance(body, list):
                raise ApiError(400, "the body of a JSON patch must be a list of operations")
            patched = _json_patch(current, body)
        elif media in ("application/merge-patch+json", "application/strategic-merge-patch+json"):
            if not isinstance(body, dict):
                raise ApiError(400, "the body of a merge patch must be a JSON object")
            patched = _merge_patch(current, body)
        else:
            raise ApiError(
                415,
                f"the body of the request was in an unknown format - accepted media types "
                f"include: {', '.join(_PATCH_MEDIA_TYPES)}",
                reason="UnsupportedMediaType",
            )
        if not isinstance(patched, dict) or not isinstance(patched.get("metadata"), dict):
            raise ApiError(422, f"the patch leaves no {resource.kind} object")
        metadata = patched["metadata"]
        if metadata.get("name") != key[1] or metadata.get("namespace") != key[0]:
            raise ApiError(400, "a patch may not change metadata.name or metadata.namespace")
        # A patch naming no resourceVersion applies to the latest; one naming it is checked.
        if "resourceVersion" not in _patched_metadata(body):
            metadata.pop("resourceVersion", None)
        return self._update_object(resource, key, patched)

    def _update_object(self, resource: _Resource, key: tuple[str, str], obj: JSON) -> JSON:
        """Stores `obj` over the stored object (caller holds the lock): optimistic
        concurrency on resourceVersion, the stored uid and creation time, validation, and no
        new resourceVersion when nothing changed (as the API server's no-op update)."""
        stored = self._objects[resource.plural][key]
        metadata = obj["metadata"]
        name = key[1]
        wanted = metadata.get("resourceVersion")
        if wanted not in (None, "") and str(wanted) != stored["metadata"]["resourceVersion"]:
            raise ApiError(
                409,
                f'Operation cannot be fulfilled on {resource.plural} "{name}": the object has '
                "been modified; please apply your changes to the latest version and try again",
                reason="Conflict",
                details={"name": name, "kind": resource.plural},
            )
        uid = metadata.get("uid")
        if uid not in (None, "") and uid != stored["metadata"]["uid"]:
            raise ApiError(
                409,
                f"Precondition failed: UID in precondition: {uid}, UID in object meta: "
                f"{stored['metadata']['uid']}",
                reason="Conflict",
                details={"name": name, "kind": resource.plural},
            )
        for server_field in ("uid", "creationTimestamp", "resourceVersion"):
            metadata[server_field] = stored["metadata"][server_field]
        if stored.get("immutable") is True and (
            any(obj.get(f) != stored.get(f) for f in ("data", "binaryData"))
            or obj.get("immutable") is not True
        ):
            raise ApiError(
                422,
                f'{resource.kind} "{name}" is invalid: [data: Forbidden: field is immutable when '
                "`immutable` is set, immutable: Forbidden: field is immutable when `immutable` "
                "is set]",
                details={"name": name, "kind": resource.kind},
            )
        self._validate(obj)
        if obj == stored:
            return copy.deepcopy(stored)
        return copy.deepcopy(self._replace(resource.plural, key, obj))

    def _delete(
        self, resource: _Resource, key: tuple[str, str], query: Mapping[str, str], body: Any
    ) -> JSON:
        if not resource.writable:
            raise ApiError(405, f"the fake serves {resource.plural} read-only")
        options = body if isinstance(body, dict) else {}
        grace_text = query.get("gracePeriodSeconds")
        grace = _int_param(query, "gracePeriodSeconds") if grace_text else None
        if grace is None and isinstance(options.get("gracePeriodSeconds"), int):
            grace = options["gracePeriodSeconds"]
        preconditions = options.get("preconditions") or {}
        obj = self._objects[resource.plural][key]
        expected_uid = preconditions.get("uid")
        if expected_uid and expected_uid != obj["metadata"]["uid"]:
            raise ApiError(
                409,
                f"Precondition failed: UID in precondition: {expected_uid}, UID in object meta: "
                f"{obj['metadata']['uid']}",
                reason="Conflict",
                details={"name": key[1], "kind": resource.plural},
            )
        orphan = (query.get("propagationPolicy") or options.get("propagationPolicy")) == "Orphan"
        if resource.plural == "pods":
            if orphan:
                self._orphan_dependents(obj["metadata"]["uid"], key[0])
            return self._delete_pod(key, grace)
        removed = self._remove(resource.plural, key)
        return {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Success",
            "details": {"name": key[1], "kind": resource.plural, "uid": removed["metadata"]["uid"]},
        }

    def _orphan_dependents(self, owner_uid: str, namespace: str) -> None:
        for key, secret in list(self._objects["secrets"].items()):
            owners = secret["metadata"].get("ownerReferences") or []
            if key[0] == namespace and any(ref.get("uid") == owner_uid for ref in owners):
                updated = copy.deepcopy(secret)
                remaining = [ref for ref in owners if ref.get("uid") != owner_uid]
                if remaining:
                    updated["metadata"]["ownerReferences"] = remaining
                else:
                    del updated["metadata"]["ownerReferences"]  # omitted when empty, as stored
                self._replace("secrets", key, updated)

    def _delete_collection(
        self, resource: _Resource, namespace: str | None, query: Mapping[str, str]
    ) -> JSON:
        if namespace is None or not resource.writable:
            raise ApiError(405, f"deletecollection of {resource.plural} needs a namespace")
        matches = self._matcher(resource, query)
        with self._lock:
            keys = [
                key
                for key, obj in sorted(self._objects[resource.plural].items())
                if key[0] == namespace and matches(obj)
            ]
            for key in keys:
                self._delete(resource, key, query, None)
        return {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Success"}


#: Resources the fake lets PUT and PATCH change (others answer 405).
_UPDATABLE = frozenset({"configmaps"})
_PATCH_MEDIA_TYPES = (
    "application/json-patch+json",
    "application/merge-patch+json",
    "application/apply-patch+yaml",
    "application/strategic-merge-patch+json",
)
_ROOT_CA_PEM = (
    "-----BEGIN CERTIFICATE-----\nMIIFakeKubernetesRootCertificateAuthorityForTests\n"
    "-----END CERTIFICATE-----\n"
)


def _root_ca_config_map(namespace: str) -> JSON:
    """The ConfigMap the root CA publisher keeps in every namespace."""
    return {
        "metadata": {
            "name": "kube-root-ca.crt",
            "namespace": namespace,
            "annotations": {
                "kubernetes.io/description": "Contains a CA bundle that can be used to verify "
                "the kube-apiserver when using internal endpoints such as the internal service "
                "IP or kubernetes.default.svc. No other usage is guaranteed across "
                "distributions of Kubernetes clusters."
            },
        },
        "data": {"ca.crt": _ROOT_CA_PEM},
    }


def _merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch: objects merge key by key, null removes, the rest replaces."""
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    result = copy.deepcopy(target) if isinstance(target, dict) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = _merge_patch(result.get(key), value)
    return result


def _patched_metadata(patch: Any) -> JSON:
    """The metadata a merge patch sets, or that a JSON patch's operations touch."""
    if isinstance(patch, dict):
        metadata = patch.get("metadata")
        return metadata if isinstance(metadata, dict) else {}
    touched: JSON = {}
    for operation in patch if isinstance(patch, list) else []:
        path = str(operation.get("path", "")) if isinstance(operation, dict) else ""
        if path.startswith("/metadata/"):
            touched[path.split("/")[2].replace("~1", "/").replace("~0", "~")] = True
    return touched


def _json_patch(document: JSON, operations: list[Any]) -> Any:
    """RFC 6902 JSON patch (add, remove, replace, move, copy, test), as the API server applies
    it: a failing operation is a 422 (a failed `test` included)."""

    def fail(message: str) -> ApiError:
        return ApiError(422, f"the server rejected our request due to an error in our request: "
                             f"{message}")

    def split(path: str) -> list[str]:
        if path == "":
            return []
        if not path.startswith("/"):
            raise fail(f"invalid JSON pointer {path!r}")
        return [part.replace("~1", "/").replace("~0", "~") for part in path[1:].split("/")]

    def parent(doc: Any, parts: list[str]) -> tuple[Any, str]:
        node = doc
        for part in parts[:-1]:
            if isinstance(node, dict) and part in node:
                node = node[part]
            elif isinstance(node, list) and part.isdigit() and int(part) < len(node):
                node = node[int(part)]
            else:
                raise fail(f"missing path component {part!r}")
        return node, parts[-1]

    def get(doc: Any, path: str) -> Any:
        parts = split(path)
        if not parts:
            return doc
        node, last = parent(doc, parts)
        if isinstance(node, dict) and last in node:
            return node[last]
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            return node[int(last)]
        raise fail(f"no value at {path!r}")

    def remove(doc: Any, path: str) -> Any:
        parts = split(path)
        if not parts:
            raise fail("cannot remove the whole document")
        node, last = parent(doc, parts)
        if isinstance(node, dict) and last in node:
            return node.pop(last)
        if isinstance(node, list) and last.isdigit() and int(last) < len(node):
            return node.pop(int(last))
        raise fail(f"no value to remove at {path!r}")

    def add(doc: Any, path: str, value: Any, *, replace: bool = False) -> Any:
        parts = split(path)
        if not parts:
            return value
        node, last = parent(doc, parts)
        if isinstance(node, dict):
            if replace and last not in node:
                raise fail(f"no value to replace at {path!r}")
            node[last] = value
        elif isinstance(node, list):
            if last == "-" and not replace:
                node.append(value)
            elif last.isdigit() and int(last) <= len(node) - (1 if replace else 0):
                if replace:
                    node[int(last)] = value
                else:
                    node.insert(int(last), value)
            else:
                raise fail(f"index out of range at {path!r}")
        else:
            raise fail(f"cannot add at {path!r}")
        return doc

    doc: Any = copy.deepcopy(document)
    for operation in operations:
        if not isinstance(operation, dict) or not isinstance(operation.get("path"), str):
            raise fail(f"invalid operation {operation!r}")
        op, path = operation.get("op"), operation["path"]
        if op in ("add", "replace", "test") and "value" not in operation:
            raise fail(f"operation {op} at {path!r} needs a value")
        if op == "add":
            doc = add(doc, path, copy.deepcopy(operation["value"]))
        elif op == "replace":
            doc = add(doc, path, copy.deepcopy(operation["value"]), replace=True)
        elif op == "remove":
            remove(doc, path)
        elif op in ("move", "copy"):
            source = str(operation.get("from", ""))
            value = remove(doc, source) if op == "move" else copy.deepcopy(get(doc, source))
            doc = add(doc, path, value)
        elif op == "test":
            if get(doc, path) != operation["value"]:
                raise fail(f"testing value at {path!r} failed")
        else:
            raise fail(f"unexpected operation {op!r}")
    return doc


def _continue_as_run(script: PodScript) -> PodScript:
    """The script a scaled-up pod continues with once its node is there: it runs."""
    return PodScript(
        Outcome.RUN,
        schedule_delay=script.schedule_delay,
        step_delay=script.step_delay,
        scale_up_delay=script.scale_up_delay,
        node_not_ready_seconds=script.node_not_ready_seconds,
        driver_delay=script.driver_delay,
        run_duration=script.run_duration,
        exit_code=script.exit_code,
        connect_delay=script.connect_delay,
    )


def _qos_class(spec: JSON) -> str:
    containers = spec.get("containers") or []
    resources = [c.get("resources") or {} for c in containers]
    if not any(r.get("requests") or r.get("limits") for r in resources):
        return "BestEffort"
    guaranteed = all(
        all((r.get("limits") or {}).get(name) is not None for name in ("cpu", "memory"))
        and (r.get("requests") or {}) == (r.get("limits") or {})
        for r in resources
    )
    return "Guaranteed" if guaranteed else "Burstable"


def _back_off(pod: JSON, exit_code: int, reason: str | None = None) -> None:
    """The kubelet restarts exited containers, after a back-off (10 s, doubling, capped at
    300 s): the pod stays Running, each container waits in CrashLoopBackOff with its exit in
    `lastState` and its restartCount one higher. The fake does not start it again."""
    for condition in ("Ready", "ContainersReady"):
        _set_condition(pod, condition, "False", "ContainersNotReady",
                       "containers with unready status")
    name, namespace, uid = (pod["metadata"][k] for k in ("name", "namespace", "uid"))
    for status in pod["status"].get("containerStatuses") or []:
        started = (status["state"].get("running") or {}).get("startedAt", _now())
        restarts = int(status.get("restartCount", 0)) + 1
        status.update(ready=False, started=False, restartCount=restarts)
        status["lastState"] = {"terminated": {
            "exitCode": exit_code,
            "reason": reason or ("Completed" if exit_code == 0 else "Error"),
            "startedAt": started, "finishedAt": _now(),
            "containerID": status.get("containerID", "")}}
        delay = min(300, 10 * 2 ** (restarts - 1))
        status["state"] = {"waiting": {
            "reason": "CrashLoopBackOff",
            "message": f"back-off {delay}s restarting failed container={status['name']} "
                       f"pod={name}_{namespace}({uid})"}}


_SHUTDOWN_MESSAGE = "Pod was terminated in response to imminent node shutdown."
_PODGC_MESSAGE = "PodGC: node no longer exists"
_UNKNOWN_CONTAINER_MESSAGE = "The container could not be located when the pod was terminated"


def _kill_containers(pod: JSON, exit_code: int) -> None:
    """The kubelet stops a pod's containers: a running one ends with `exit_code` ("Error");
    one never started is reported terminated with 137, "ContainerStatusUnknown", as the
    kubelet does for a container of a terminal pod it has no record of running."""
    spec, status = pod["spec"], pod["status"]
    for group, spec_key in (("initContainerStatuses", "initContainers"),
                            ("containerStatuses", "containers")):
        containers = spec.get(spec_key) or []
        if not containers:
            continue
        statuses = status.setdefault(group, [])
        known = {s["name"] for s in statuses}
        statuses.extend(
            {"name": c["name"], "image": c["image"], "imageID": "", "ready": False,
             "restartCount": 0, "started": False, "state": {}, "lastState": {}}
            for c in containers if c["name"] not in known
        )
        for container in statuses:
            state = container.get("state") or {}
            if "terminated" in state:
                continue
            container.update(ready=False, started=False)
            running = state.get("running")
            if running is not None:
                container["state"] = {"terminated": {
                    "exitCode": exit_code, "reason": "Error", "startedAt": running["startedAt"],
                    "finishedAt": _now(), "containerID": container.get("containerID", "")}}
            else:
                container["state"] = {"terminated": {
                    "exitCode": 137, "reason": "ContainerStatusUnknown",
                    "message": _UNKNOWN_CONTAINER_MESSAGE, "startedAt": None,
                    "finishedAt": None}}


def _shut_down(pod: JSON) -> None:
    """The kubelet's graceful node shutdown ends a pod (nodeshutdown manager)."""
    pod["status"].update(phase="Failed", reason="Terminated", message=_SHUTDOWN_MESSAGE)
    _set_condition(pod, "DisruptionTarget", "True", "TerminationByKubelet", _SHUTDOWN_MESSAGE)
    for condition in ("Ready", "ContainersReady"):
        _set_condition(pod, condition, "False", "PodFailed")
    _set_condition(pod, "PodReadyToStartContainers", "False")
    _kill_containers(pod, 143)


def _collected(pod: JSON) -> None:
    """PodGC fails an unfinished pod whose node is gone before deleting it."""
    pod["status"]["phase"] = "Failed"
    _set_condition(pod, "DisruptionTarget", "True", "DeletionByPodGC", _PODGC_MESSAGE)


def _set_condition(
    pod: JSON,
    condition_type: str,
    status: str,
    reason: str | None = None,
    message: str | None = None,
) -> None:
    conditions: list[JSON] = pod["status"].setdefault("conditions", [])
    condition = next((c for c in conditions if c["type"] == condition_type), None)
    if condition is None:
        condition = {"type": condition_type, "lastProbeTime": None}
        conditions.append(condition)
    if condition.get("status") != status:
        condition["lastTransitionTime"] = _now()
    condition["status"] = status
    for name, value in (("reason", reason), ("message", message)):
        if value is None:
            condition.pop(name, None)
        else:
            condition[name] = value


def _gone_event(requested: int, oldest: int) -> JSON:
    return {
        "type": "ERROR",
        "object": {
            "kind": "Status",
            "apiVersion": "v1",
            "metadata": {},
            "status": "Failure",
            "message": f"too old resource version: {requested} ({oldest})",
            "reason": "Expired",
            "code": 410,
        },
    }


def _watch_event(
    change: _Change, in_scope: Callable[[JSON], bool], matches: Callable[[JSON], bool]
) -> JSON | None:
    """The event a filtered watch sees: an object entering the selection is ADDED, one leaving
    it is DELETED, as the API server's watch filter reports them."""
    if not in_scope(change.obj):
        return None
    now = matches(change.obj)
    before = change.previous is not None and matches(change.previous)
    if change.type == "MODIFIED":
        if now and before:
            return {"type": "MODIFIED", "object": change.obj}
        if now:
            return {"type": "ADDED", "object": change.obj}
        if before:
            return {"type": "DELETED", "object": change.obj}
        return None
    if change.type == "DELETED":
        return {"type": "DELETED", "object": change.obj} if before else None
    return {"type": change.type, "object": change.obj} if now else None


def _log_waiting_message(container: str, pod: str, waiting: JSON) -> str:
    """The kubelet's refusal to read the log of a container that has not started."""
    reason = waiting.get("reason", "")
    if reason in ("ErrImagePull", "ImagePullBackOff"):
        why = "trying and failing to pull image"
    elif reason == "InvalidImageName":
        why = "image can't be pulled"
    else:
        why = reason
    return f'container "{container}" in pod "{pod}" is waiting to start: {why}'


def _container_terminated(pod: JSON, container: str) -> bool:
    statuses = pod.get("status", {}).get("containerStatuses") or []
    return any(s["name"] == container and "terminated" in (s.get("state") or {}) for s in statuses)


def _int_param(query: Mapping[str, str], name: str) -> int:
    """A non-negative integer query parameter (0 when absent)."""
    text = query.get(name) or "0"
    if not text.isdigit():
        raise ApiError(400, f"{name}: Invalid value: {text!r}: must be a non-negative integer")
    return int(text)


def _encode_continue(snapshot_id: str, offset: int) -> str:
    raw = json.dumps({"snapshot": snapshot_id, "offset": offset}).encode()
    return base64.urlsafe_b64encode(raw).decode()


def _decode_continue(token: str) -> tuple[str, int]:
    try:
        data = json.loads(base64.urlsafe_b64decode(token.encode()))
        return str(data["snapshot"]), int(data["offset"])
    except (ValueError, KeyError, TypeError) as error:
        raise ApiError(400, f"continue key is not valid: {error}") from error


_LOG_PATH = re.compile(r"/api/v1/namespaces/([^/]+)/pods/([^/]+)/log")
# Core resources live under /api/v1, those of a named group under /apis/<group>/v1.
_GROUP_PREFIX = r"/(?:api|apis/(?P<group>[a-z0-9.-]+))/v1"
_NAMESPACED_PATH = re.compile(_GROUP_PREFIX + r"/namespaces/([^/]+)/([a-z]+)(?:/([^/]+))?")
_CLUSTER_PATH = re.compile(_GROUP_PREFIX + r"/([a-z]+)(?:/([^/]+))?")


def _route(path: str) -> tuple[_Resource, str | None, str | None] | None:
    """(resource, namespace, name) of a path, or None if the fake does not serve it (a
    resource asked for under another group's prefix included)."""
    match = _NAMESPACED_PATH.fullmatch(path)
    if match is not None and match.group(3) in _RESOURCES:
        resource = _RESOURCES[match.group(3)]
        if not resource.namespaced or resource.group != (match.group("group") or ""):
            return None
        return resource, match.group(2), match.group(4)
    match = _CLUSTER_PATH.fullmatch(path)
    if match is not None and match.group(2) in _RESOURCES:
        resource = _RESOURCES[match.group(2)]
        if resource.group != (match.group("group") or ""):
            return None
        if resource.namespaced and match.group(3) is not None:
            return None
        return resource, None, match.group(3)
    return None


def _parse_rules(rules: Iterable[Mapping[str, Any]]) -> list[tuple[set[str], set[str], set[str]]]:
    """(API groups, resources, verbs) of RBAC rules given in snake or camel case."""
    return [(set(rule.get("api_groups", rule.get("apiGroups", []))),
             set(rule["resources"]), set(rule["verbs"])) for rule in rules]


# --- Threads: the simulation clock and the HTTP server --------------------------------------------


class _Timeline:
    """Runs scheduled simulation steps in order on one thread (scales to thousands of pods)."""

    def __init__(self, report: Callable[[str], None]) -> None:
        self._report = report
        self._queue: list[tuple[float, int, Callable[[], None]]] = []
        self._sequence = itertools.count()
        self._condition = threading.Condition()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="fake-kube-timeline", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        with self._condition:
            self._stopped = True
            self._condition.notify_all()
        if self._thread.is_alive():
            self._thread.join(timeout=5)

    def call_later(self, delay: float, action: Callable[[], None]) -> None:
        with self._condition:
            heapq.heappush(self._queue, (time.monotonic() + delay, next(self._sequence), action))
            self._condition.notify_all()

    def _run(self) -> None:
        while True:
            with self._condition:
                while not self._stopped:
                    if self._queue and self._queue[0][0] <= time.monotonic():
                        break
                    timeout = self._queue[0][0] - time.monotonic() if self._queue else None
                    self._condition.wait(timeout)
                if self._stopped:
                    return
                _, _, action = heapq.heappop(self._queue)
            try:
                action()
            except Exception:
                self._report(f"simulation step failed:\n{traceback.format_exc()}")


class _Server(http.server.ThreadingHTTPServer):
    """ThreadingHTTPServer that can close idle keep-alive connections and join its handlers."""

    daemon_threads = True

    def __init__(
        self, address: tuple[str, int], handler: type[_Handler], fake: FakeKubernetes
    ) -> None:
        self.fake = fake
        self._connections: set[socket.socket] = set()
        self._handler_threads: set[threading.Thread] = set()
        self._busy_threads: set[threading.Thread] = set()
        self._connections_lock = threading.Lock()
        self._idle = threading.Condition(self._connections_lock)
        super().__init__(address, handler)

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        with self._connections_lock:
            self._connections.add(request)
            self._handler_threads.add(threading.current_thread())
        try:
            super().process_request_thread(request, client_address)
        finally:
            with self._connections_lock:
                self._connections.discard(request)
                self._handler_threads.discard(threading.current_thread())

    @contextlib.contextmanager
    def busy(self) -> Iterator[None]:
        """Marks the current handler thread as answering a request."""
        with self._connections_lock:
            self._busy_threads.add(threading.current_thread())
        try:
            yield
        finally:
            with self._idle:
                self._busy_threads.discard(threading.current_thread())
                self._idle.notify_all()

    def join_busy_handlers(self, timeout: float) -> None:
        """Waits until no handler is answering a request (or `timeout` passes)."""
        deadline = time.monotonic() + timeout
        with self._idle:
            while self._busy_threads and (remaining := deadline - time.monotonic()) > 0:
                self._idle.wait(remaining)

    def close_connections(self) -> None:
        with self._connections_lock:
            connections = list(self._connections)
        for connection in connections:
            with contextlib.suppress(OSError):
                connection.shutdown(socket.SHUT_RDWR)

    def join_handlers(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        with self._connections_lock:
            threads = list(self._handler_threads)
        for thread in threads:
            thread.join(max(0.0, deadline - time.monotonic()))


class _Handler(http.server.BaseHTTPRequestHandler):
    """One HTTP/1.1 connection to the fake (keep-alive; chunked watch streams)."""

    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # Headers and body go out in separate writes; without TCP_NODELAY, Nagle's algorithm
        # and the client's delayed ACK stall every response by ~40 ms.
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        """Keeps test output quiet; `FakeKubernetes.requests` records every request."""

    def do_GET(self) -> None:
        self._serve("GET")

    def do_POST(self) -> None:
        self._serve("POST")

    def do_DELETE(self) -> None:
        self._serve("DELETE")

    def do_PUT(self) -> None:
        self._serve("PUT")

    def do_PATCH(self) -> None:
        self._serve("PATCH")

    def _serve(self, method: str) -> None:
        with self.server.busy():
            self._answer(method)

    def _answer(self, method: str) -> None:
        fake = self.server.fake
        url = urlsplit(self.path)
        query = {key: values[-1] for key, values in parse_qs(url.query).items()}
        headers = {key: value for key, value in self.headers.items()}
        length = int(self.headers.get("Content-Length") or 0)
        raw = self.rfile.read(length) if length else b""
        body: Any = None
        status: int
        payload: Any
        try:
            if raw:
                try:
                    body = json.loads(raw)
                except ValueError as error:
                    raise ApiError(400, f"the request body is not JSON: {error}") from error
            fault = fake._take_fault(method, url.path)
            if fault is not None and fault.delay > 0:
                fake._stopping.wait(fault.delay)
            if fault is not None and fault.drop:
                fake._record_request(RecordedRequest(method, url.path, query, headers, body, 0))
                self.close_connection = True
                with contextlib.suppress(OSError):
                    self.connection.shutdown(socket.SHUT_RDWR)
                return
            if fault is not None and fault.status is not None:
                status = fault.status
                payload = (
                    fault.body
                    if fault.body is not None
                    else ApiError(
                        status, f"injected fault: {status} on {method} {url.path}"
                    ).status()
                )
            else:
                if self.headers.get("Authorization") != f"Bearer {fake.token}":
                    raise ApiError(401, "Unauthorized")
                fake._authorize(method, url.path, query)
                log = _LOG_PATH.fullmatch(url.path)
                if log is not None:
                    if method != "GET":
                        raise ApiError(405, f"the server does not allow {method} on pods/log")
                    self._pod_log(url.path, log.group(1), log.group(2), query, headers)
                    return
                if method == "GET" and query.get("watch") in ("true", "1"):
                    self._watch(url.path, query, headers)
                    return
                fake._run_request_hooks(method, url.path, after=False)
                status, payload = fake._handle(
                    method, url.path, query, body, self.headers.get("Content-Type") or ""
                )
                fake._run_request_hooks(method, url.path, after=True)
        except ApiError as error:
            status, payload = error.code, error.status()
        except Exception:
            fake._report_error(f"{method} {self.path} failed:\n{traceback.format_exc()}")
            status, payload = 500, ApiError(500, "the fake API server failed").status()
        fake._record_request(RecordedRequest(method, url.path, query, headers, body, status))
        self._send_json(status, payload)

    def _send_json(self, status: int, payload: Any) -> None:
        data = json.dumps(payload, separators=(",", ":")).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)

    def _pod_log(
        self,
        path: str,
        namespace: str,
        name: str,
        query: Mapping[str, str],
        headers: Mapping[str, str],
    ) -> None:
        """Answers a pod log request: text/plain; chunked and open with follow=true."""
        fake = self.server.fake
        key, uid, container, start = fake._open_log(namespace, name, query)
        follow = query.get("follow") in ("true", "1")
        fake._record_request(RecordedRequest("GET", path, query, headers, None, 200))
        if start is None or not follow:
            lines: list[str] = []

            def collect(line: str) -> bool:
                lines.append(line)
                return True

            if start is not None:
                fake._stream_log(key, uid, container, start, False, collect, lambda: False)
            self._send_text("".join(f"{line}\n" for line in lines))
            return
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True

        def write(line: str) -> bool:
            data = line.encode() + b"\n"
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            except OSError:
                return False
            return True

        fake._stream_log(key, uid, container, start, True, write, self._disconnected)
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()

    def _send_text(self, text: str) -> None:
        data = text.encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        with contextlib.suppress(OSError):
            self.wfile.write(data)

    def _disconnected(self) -> bool:
        """Whether the client closed its end (a readable socket with nothing to read)."""
        try:
            readable, _, _ = select.select([self.connection], [], [], 0)
            return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def _watch(self, path: str, query: Mapping[str, str], headers: Mapping[str, str]) -> None:
        fake = self.server.fake
        route = _route(path)
        if route is None or route[2] is not None:
            raise ApiError(404, "the server could not find the requested resource")
        resource, namespace, _ = route
        fake._matcher(resource, query)  # a bad selector is a 400 before the stream starts
        fake._record_request(RecordedRequest("GET", path, query, headers, None, 200))
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        self.close_connection = True

        def write(event: JSON) -> bool:
            data = json.dumps(event, separators=(",", ":")).encode() + b"\n"
            try:
                self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))
                self.wfile.flush()
            except OSError:
                return False
            return True

        def disconnected() -> bool:
            try:
                readable, _, _ = select.select([self.connection], [], [], 0)
                return bool(readable) and self.connection.recv(1, socket.MSG_PEEK) == b""
            except OSError:
                return True

        try:
            fake._watch(resource, namespace, query, write, disconnected)
        except ApiError as error:
            write({"type": "ERROR", "object": error.status()})
        with contextlib.suppress(OSError):
            self.wfile.write(b"0\r\n\r\n")
            self.wfile.flush()
