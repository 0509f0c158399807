"""The broker's record of each run it serves: what to spawn again, and how often it has.

Recovering a run from a Spot preemption needs what no other object keeps: the spawn the
policy decided (image digest, GPUs, sizes, deadline), the preemptions so far (the retry cap
must hold across broker restarts), and where a recovery stands. A pod is no place for it (a
preempted pod is garbage-collected with its node), nor is the JIT Secret (owned by the pod).
So each run attempt the broker spawns for gets a ConfigMap in the runner namespace,
`gpu-<run_id>-<attempt>-run`, labelled like the run's pod. The broker alone may read or
write it; it holds no credential.

It is created before the pod, updated with optimistic concurrency (a replace names the
resourceVersion it read), and deleted by the run's `cleanup` (DELETE), by the reaper when it
removes the run's pod, and by the recovery pass once nothing can need it.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from kubernetes.client import V1ConfigMap, V1ObjectMeta, V1Pod

from gpu_runners import contract
from gpu_runners.errors import AlreadyExistsError
from gpu_runners.kube import KubeClient
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.run_identity import RunIdentity
from gpu_runners.spawn import SpawnRequest

LOGGER = logging.getLogger(__name__)

#: Suffix of a run record's ConfigMap name after the runner name.
RECORD_SUFFIX = "-run"
#: The ConfigMap key holding the record's JSON.
RECORD_KEY = "record.json"
#: Version of the record's JSON: a broker refuses (and leaves alone) records it cannot read.
RECORD_VERSION = 1


class RecoveryState(enum.Enum):
    """Where a run's recovery stands."""

    #: Spawning or serving; a lost pod is looked into when it happens.
    ACTIVE = "active"
    #: The pod was lost during the job; the failed jobs are re-run once the run completes.
    AWAITING_RUN_END = "awaiting-run-end"
    #: The re-run was asked for (recorded first, so a restarted broker checks GitHub before
    #: asking twice); the replacement pod follows.
    RERUN_REQUESTED = "rerun-requested"
    #: A replacement is due: the old pod and registration are removed, then spawn runs again
    #: (a restarted broker finds this state and does both).
    REPLACING = "replacing"
    #: The retries are spent, or a replacement could not start: nothing more is tried.
    GAVE_UP = "gave-up"


@dataclass(frozen=True)
class Preemption:
    """One pod lost to its node.

    Attributes:
        attempt: The run attempt whose job the lost runner served.
        stage: How far the pod had got: a spawn stage ("scheduled", "image pulling", ...),
            "idle" (online, no job taken) or "job" (the job was running on it).
        cause: What happened to the node (pod_disruption's words).
        pool: The GPU pool it was lost on ("" when not known).
        retry_pool: The pool the replacement was pinned to ("" for the same choice of pools).
        at: When the broker saw it (UTC).
        retried: Whether a replacement followed (False: the retries were spent, or nothing
            was left to retry).
    """

    attempt: int
    stage: str
    cause: str
    pool: str
    retry_pool: str
    at: datetime
    retried: bool = True

    def describe(self) -> str:
        """One line for summaries: what was lost, where, and where the retry went."""
        where = f" on pool {self.pool}" if self.pool else ""
        if not self.retried:
            outcome = "not retried"
        else:
            outcome = "retried on " + (f"pool {self.retry_pool}" if self.retry_pool
                                       else "the same GPU pools")
        return (f"preempted on attempt {self.attempt} ({_stage_words(self.stage)}){where}: "
                f"{self.cause}; {outcome}")


@dataclass(frozen=True)
class RunRecord:
    """What the broker keeps about one run attempt it spawned for.

    Attributes:
        request: The spawn as the policy decided it (the identity is the run attempt whose
            label the runner carries: the one the `setup` job printed).
        serving_attempt: The run attempt whose jobs the runner serves: the identity's attempt,
            or a later one after the broker re-ran the run's failed jobs (they still target
            the label the first attempt's `setup` printed).
        state: Where the recovery stands.
        online: Whether a runner of this record came online (the label was handed out), so a
            lost pod from then on is the recovery pass's to handle, not a spawn's.
        preemptions: Each pod lost so far; their number is the retries spent.
        rerun_attempt: With RERUN_REQUESTED, the attempt the re-run creates.
        resource_version: The ConfigMap's version this was read at (None before creation).
    """

    request: SpawnRequest
    serving_attempt: int
    state: RecoveryState = RecoveryState.ACTIVE
    online: bool = False
    preemptions: tuple[Preemption, ...] = ()
    rerun_attempt: int | None = None
    resource_version: str | None = field(default=None, compare=False)

    @property
    def identity(self) -> RunIdentity:
        """The run attempt whose label the runner carries."""
        return self.request.identity

    @property
    def retries(self) -> int:
        """Replacements started (or asked for) so far: what `maxPreemptionRetries` caps."""
        return sum(1 for preemption in self.preemptions if preemption.retried)

    def preemption_lines(self) -> tuple[str, ...]:
        """One line per preemption, oldest first, for summaries."""
        return tuple(preemption.describe() for preemption in self.preemptions)

    def with_changes(self, **changes: Any) -> RunRecord:
        """A copy with fields changed (the resource version kept, for the replace)."""
        return dataclasses.replace(self, **changes)


def record_name(identity: RunIdentity) -> str:
    """The ConfigMap name of a run attempt's record."""
    return f"{identity.runner_name}{RECORD_SUFFIX}"


class RunRecords:
    """The run records of one runner namespace (blocking calls: run them in a worker thread)."""

    def __init__(self, kube: KubeClient, namespace: str) -> None:
        self.kube = kube
        self.namespace = namespace

    def create(self, record: RunRecord) -> RunRecord:
        """Stores a new record; when the run has one already (a replayed POST, a restarted
        broker), that one is returned instead, with its preemptions."""
        try:
            created = self.kube.create_config_map(self.namespace, _to_config_map(record))
        except AlreadyExistsError:
            existing = self.read(record.identity)
            if existing is None:
                raise
            return existing
        return _with_version(record, created)

    def read(self, identity: RunIdentity) -> RunRecord | None:
        """The run attempt's record, or None (also for one this broker cannot read)."""
        config_map = self.kube.read_config_map(self.namespace, record_name(identity))
        return None if config_map is None else _from_config_map(config_map)

    def save(self, record: RunRecord) -> RunRecord:
        """Replaces the stored record with this one.

        Raises:
            AlreadyExistsError: It changed since `record` was read (409), or
            KubernetesError: it is gone (404) or the call failed.
        """
        replaced = self.kube.replace_config_map(self.namespace, _to_config_map(record))
        return _with_version(record, replaced)

    def delete(self, identity: RunIdentity) -> bool:
        """Deletes the run attempt's record; False if there was none."""
        return self.kube.delete_config_map(self.namespace, record_name(identity))

    def read_for_pod(self, pod: V1Pod) -> RunRecord | None:
        """The record of the run attempt whose runner a pod is (the pod's name), or None."""
        name = pod.metadata.name if pod.metadata is not None else None
        if not name:
            return None
        config_map = self.kube.read_config_map(self.namespace, f"{name}{RECORD_SUFFIX}")
        return None if config_map is None else _from_config_map(config_map)

    def delete_for_pod(self, pod: V1Pod) -> None:
        """Deletes the record of the run attempt whose runner a pod is, if there is one."""
        name = pod.metadata.name if pod.metadata is not None else None
        if name:
            self.kube.delete_config_map(self.namespace, f"{name}{RECORD_SUFFIX}")

    def list(self, run_id: int | None = None) -> list[RunRecord]:
        """Every readable record in the namespace (of one run id, if given); unreadable ones
        are logged and skipped."""
        selector = (f"{contract.LABEL_MANAGED_BY}={contract.MANAGED_BY},"
                    f"{contract.LABEL_COMPONENT}={contract.RUN_RECORD_COMPONENT}")
        if run_id is not None:
            selector += f",{contract.LABEL_RUN_ID}={run_id}"
        records = []
        for config_map in self.kube.list_config_maps(self.namespace, selector):
            record = _from_config_map(config_map)
            if record is not None:
                records.append(record)
        return records


# --- the ConfigMap form --------------------------------------------------------------------------


def _to_config_map(record: RunRecord) -> V1ConfigMap:
    identity = record.identity
    labels = {**identity.selector_labels(),
              contract.LABEL_NAME: contract.GPU_RUNNER_APP,
              contract.LABEL_COMPONENT: contract.RUN_RECORD_COMPONENT}
    body = {
        "version": RECORD_VERSION,
        "request": _request_json(record.request),
        "servingAttempt": record.serving_attempt,
        "state": record.state.value,
        "online": record.online,
        "preemptions": [_preemption_json(p) for p in record.preemptions],
        "rerunAttempt": record.rerun_attempt,
    }
    return V1ConfigMap(
        metadata=V1ObjectMeta(name=record_name(identity), labels=labels,
                              resource_version=record.resource_version,
                              annotations={contract.ANNOTATION_RUN_URL: identity.run_url}),
        data={RECORD_KEY: json.dumps(body, sort_keys=True)},
    )


def _with_version(record: RunRecord, stored: V1ConfigMap) -> RunRecord:
    version = stored.metadata.resource_version if stored.metadata else None
    return dataclasses.replace(record, resource_version=version)


def _from_config_map(config_map: V1ConfigMap) -> RunRecord | None:
    name = config_map.metadata.name if config_map.metadata else "?"
    try:
        body = json.loads((config_map.data or {})[RECORD_KEY])
        if body.get("version") != RECORD_VERSION:
            raise ValueError(f"version {body.get('version')!r}, not {RECORD_VERSION}")
        record = RunRecord(
            request=_request_from_json(body["request"]),
            serving_attempt=_positive(body["servingAttempt"], "servingAttempt"),
            state=RecoveryState(body["state"]),
            online=bool(body["online"]),
            preemptions=tuple(_preemption_from_json(p) for p in body["preemptions"]),
            rerun_attempt=(None if body.get("rerunAttempt") is None
                           else _positive(body["rerunAttempt"], "rerunAttempt")),
        )
    except (KeyError, TypeError, ValueError, AttributeError) as e:
        LOGGER.warning("run record %s is unreadable and left alone: %s", name, e)
        return None
    if record_name(record.identity) != name:
        LOGGER.warning("run record %s describes %s and is left alone", name,
                       record.identity.runner_name)
        return None
    return _with_version(record, config_map)


def _positive(value: Any, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ValueError(f"{what} is {value!r}, not a positive integer")
    return value


def _request_json(request: SpawnRequest) -> dict[str, Any]:
    data = {f.name: getattr(request, f.name) for f in dataclasses.fields(request)}
    data["identity"] = dataclasses.asdict(request.identity)
    data["pod"] = {f.name: _plain(getattr(request.pod, f.name))
                   for f in dataclasses.fields(request.pod)}
    data["gpu_types"] = list(request.gpu_types)
    return data


def _plain(value: Any) -> Any:
    if isinstance(value, Mapping):
        return dict(value)
    return list(value) if isinstance(value, tuple) else value


def _request_from_json(data: Mapping[str, Any]) -> SpawnRequest:
    fields = {f.name for f in dataclasses.fields(SpawnRequest)}
    if set(data) != fields:
        raise ValueError(f"request fields {sorted(data)}, expected {sorted(fields)}")
    pod_fields = {f.name for f in dataclasses.fields(RunnerPodOptions)}
    if set(data["pod"]) - pod_fields:
        raise ValueError(f"unknown pod fields {sorted(set(data['pod']) - pod_fields)}")
    values = dict(data)
    values["identity"] = RunIdentity(**data["identity"])
    pod = dict(data["pod"])
    pod["avoid_node_pools"] = tuple(pod.get("avoid_node_pools", ()))
    values["pod"] = RunnerPodOptions(**pod)
    values["gpu_types"] = tuple(data["gpu_types"])
    return SpawnRequest(**values)


def _preemption_json(preemption: Preemption) -> dict[str, Any]:
    data = dataclasses.asdict(preemption)
    data["at"] = preemption.at.isoformat()
    return data


def _preemption_from_json(data: Mapping[str, Any]) -> Preemption:
    return Preemption(
        attempt=_positive(data["attempt"], "attempt"), stage=str(data["stage"]),
        cause=str(data["cause"]), pool=str(data["pool"]), retry_pool=str(data["retry_pool"]),
        at=datetime.fromisoformat(data["at"]), retried=bool(data["retried"]),
    )


def _stage_words(stage: str) -> str:
    if stage == "job":
        return "during the job"
    if stage == "idle":
        return "online, before it took the job"
    return f"while starting: {stage}"
