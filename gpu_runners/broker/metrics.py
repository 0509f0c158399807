"""The broker's Prometheus series, `gpu_runners_broker_<thing>_<unit>`.

Each series is declared once here (name, help, labels); `BrokerMetrics` registers them in the
registry it is given, so every test (and the process) has its own. Label values are bounded:
outcomes and refusal reasons are API error codes, stages are spawn's stage names, and the
repository is the stack's one. Never a run id.
"""

from __future__ import annotations

from collections.abc import Iterable
from datetime import datetime

from kubernetes.client import V1Pod
from prometheus_client import CollectorRegistry, Counter, Histogram

from gpu_runners.broker.gpu_cap import pod_gpus

PREFIX = "gpu_runners_broker"
#: Stage durations range from a warm node (seconds) to a scale-up plus a large pull (minutes).
STAGE_BUCKETS = (1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 240.0, 480.0, 900.0, 1800.0)


class BrokerMetrics:
    """The broker's series, registered in `registry`."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        self.spawns = Counter(
            f"{PREFIX}_spawns", "Spawns that ended, by outcome (ready or an API error code).",
            ["outcome"], registry=registry)
        self.stage_seconds = Histogram(
            f"{PREFIX}_stage_duration_seconds",
            "Seconds from a spawn's start to each stage it reached.", ["stage"],
            buckets=STAGE_BUCKETS, registry=registry)
        self.gpu_seconds = Counter(
            f"{PREFIX}_gpu_seconds", "GPU-seconds of runner pods removed by the broker (GPUs "
            "times seconds from pod start to removal).", ["repository"], registry=registry)
        self.waits = Counter(
            f"{PREFIX}_quota_waits", "Pod creates that had to wait: kind=quota for a "
            "ResourceQuota, kind=cap for the per-repository GPU cap.", ["kind"],
            registry=registry)
        self.refused = Counter(
            f"{PREFIX}_requests_refused", "Requests refused before any work, by reason (API "
            "error code).", ["reason"], registry=registry)
        self.preemptions = Counter(
            f"{PREFIX}_preemptions", "GPU runner pods lost to their node (Spot reclaim, node "
            "removed), by stage (a spawn stage, idle, job), pool, and what the broker did "
            "(replaced, rerun, gave_up, none).", ["stage", "pool", "action"],
            registry=registry)
        self.recovery_passes = Counter(
            f"{PREFIX}_recovery_passes", "Preemption recovery passes, by outcome (ok or "
            "failed: a run's step failed and is tried again next pass).", ["outcome"],
            registry=registry)
        self.reap_passes = Counter(
            f"{PREFIX}_reap_passes", "Reaper passes, by outcome (ok or failed).", ["outcome"],
            registry=registry)

    def spawn_ended(self, outcome: str, stage_seconds: dict[str, float] | None = None) -> None:
        """Counts a finished spawn and, for a ready one, the seconds to each stage."""
        self.spawns.labels(outcome=outcome).inc()
        for stage, seconds in (stage_seconds or {}).items():
            self.stage_seconds.labels(stage=stage).observe(seconds)

    def runners_removed(self, repository: str, pods: Iterable[V1Pod], now: datetime) -> None:
        """Adds the GPU-seconds of removed runner pods: GPUs times seconds since pod start."""
        total = 0.0
        for pod in pods:
            started = pod.status.start_time if pod.status else None
            if started is not None:
                total += pod_gpus(pod) * max(0.0, (now - started).total_seconds())
        if total:
            self.gpu_seconds.labels(repository=repository).inc(total)
