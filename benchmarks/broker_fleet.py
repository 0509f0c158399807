"""Many concurrent runs through one broker process, for the broker benchmarks.

The broker runs as `python -m gpu_runners.broker` (as in its Deployment) against the fakes of
the test suite, served by this process with a GPU pool large enough for every run; each run
is a client thread with its own token, streaming its spawn over HTTP.
"""

from __future__ import annotations

import http.client
import json
import tempfile
import threading
import time
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

from benchmarks.fake_harness import RunnerClock, fake_servers
from gpu_runners import broker_api, contract
from tests.broker.broker_harness import BrokerProcess, broker_environ
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer


@dataclass
class RunTimes:
    """When one run's request went out and its stream's lines came back (time.monotonic())."""

    sent: float = 0.0
    first_line: float | None = None
    pod_created: float | None = None
    ready: float | None = None
    outcome: str = ""


@dataclass
class Fleet:
    """A broker process on the fakes, and what its runs saw."""

    broker: BrokerProcess
    kube: FakeKubernetes
    github: FakeGitHub
    issuer: FakeOidcIssuer
    clock: RunnerClock
    runs: dict[int, RunTimes] = field(default_factory=dict)


def rss_bytes(pid: int) -> int:
    """Resident memory of a process (Linux /proc)."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for process {pid}")


@contextmanager
def broker_fleet(*, runner_lag: float, gpu_cap: int = 10_000) -> Iterator[Fleet]:
    """Starts the fakes, the issuer and a broker process; stops them afterwards."""
    with tempfile.TemporaryDirectory() as scratch, fake_servers() as (kube, github), \
            FakeOidcIssuer() as issuer:
        clock = RunnerClock(kube, github, lag=runner_lag)
        env = broker_environ(kube, github, issuer, Path(scratch), **{
            contract.ENV_GPU_CAP_PER_REPOSITORY: str(gpu_cap),
            contract.ENV_GPU_POOLS: "",
        })
        broker = BrokerProcess(env, Path(scratch) / "broker.log").start()
        try:
            yield Fleet(broker, kube, github, issuer, clock)
        finally:
            broker.stop()


def timed_spawn(fleet: Fleet, run_id: int, token: str) -> RunTimes:
    """One spawn over HTTP, noting when its first line, pod line and `ready` arrive."""
    times = fleet.runs.setdefault(run_id, RunTimes())
    parts = urllib.parse.urlsplit(fleet.broker.url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                            timeout=300)
    times.sent = time.monotonic()
    connection.request("POST", broker_api.RUNNER_PATH, body=b"{}",
                       headers={"Authorization": f"Bearer {token}",
                                "Content-Type": "application/json"})
    response = connection.getresponse()
    for raw in response:
        now = time.monotonic()
        event = json.loads(raw)
        if event["event"] == broker_api.PROGRESS:
            if times.first_line is None:
                times.first_line = now
            if times.pod_created is None and "created pod" in event["line"]:
                times.pod_created = now
        elif event["event"] in (broker_api.READY, broker_api.FAILED):
            times.ready = now
            times.outcome = event["event"] if event["event"] == broker_api.READY else (
                f"{event['error']}: {event['message']}")
    connection.close()
    return times


def spawn_concurrently(fleet: Fleet, run_ids: list[int]) -> float:
    """Spawns every run at once (one client thread each); returns the wall time."""
    tokens = {run_id: fleet.issuer.mint(run_id=str(run_id)) for run_id in run_ids}
    barrier = threading.Barrier(len(run_ids))

    def one(run_id: int) -> None:
        barrier.wait()
        timed_spawn(fleet, run_id, tokens[run_id])

    threads = [threading.Thread(target=one, args=(run_id,)) for run_id in run_ids]
    start = time.monotonic()
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return time.monotonic() - start


def percentile(values: list[float], fraction: float) -> float:
    """The value below which `fraction` of `values` lie (nearest rank)."""
    ordered = sorted(values)
    index = max(0, min(len(ordered) - 1, round(fraction * len(ordered) + 0.5) - 1))
    return ordered[index]
