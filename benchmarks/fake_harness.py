"""The fake servers the benchmarks run against, wired to gpu_runners' real clients.

Benchmarks are scripts (`python -m benchmarks.<name>`), not tests: they print figures, using
the test suite's fakes.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from gpu_runners import contract
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, FakeNodePool

REPO_ROOT = Path(__file__).resolve().parents[1]

#: One L4 pool big enough that every spawn of a benchmark gets a node.
LARGE_GPU_POOL = FakeNodePool(
    "gpu-nvidia-l4",
    {contract.NODE_GPU_LABEL: "true", contract.GKE_ACCELERATOR_LABEL: "nvidia-l4"},
    gpus_per_node=1,
    max_nodes=10_000,
)


@contextmanager
def fake_servers(**kube_options: Any) -> Iterator[tuple[FakeKubernetes, FakeGitHub]]:
    """Both fakes started, with a kubeconfig written; stopped afterwards."""
    kube_options.setdefault("node_pools", [LARGE_GPU_POOL])
    with tempfile.TemporaryDirectory() as scratch, FakeGitHub() as github:
        kube = FakeKubernetes(**kube_options).start()
        try:
            kube.write_kubeconfig(Path(scratch) / "kubeconfig")
            yield kube, github
        finally:
            kube.stop()


class RunnerClock:
    """Turns a pod's runner online on GitHub when it connects, `lag` seconds after its
    container starts (the fake prints "Listening for Jobs" at that moment); records when."""

    def __init__(self, kube: FakeKubernetes, github: FakeGitHub, lag: float = 0.0) -> None:
        self.online_at: dict[str, float] = {}
        self._github = github
        self._lock = threading.Lock()
        kube.runner_connect_delay = lag
        kube.on_runner_listening(self._online)

    def _online(self, pod: dict[str, Any]) -> None:
        name = pod["metadata"]["annotations"][contract.ANNOTATION_RUNNER_NAME]
        self._github.set_runner_status(name, "online")
        with self._lock:
            self.online_at[name] = time.monotonic()


def summary(values: list[float], unit: str = "s") -> str:
    """min / median / max of a series, for one line of a report."""
    return (f"min {min(values):.3f}{unit}  median {statistics.median(values):.3f}{unit}  "
            f"max {max(values):.3f}{unit}  (n={len(values)})")


def timed(step: Callable[[], object]) -> float:
    """Seconds `step` takes."""
    start = time.perf_counter()
    step()
    return time.perf_counter() - start


# --- fakes in their own process ---------------------------------------------------------------
#
# In one process, the fakes and the code under test share one interpreter lock, and a
# benchmark then measures the fakes' Python as much as gpu_runners. A real API server is
# elsewhere; so are these, for the figures where throughput matters.


def serve_scenario(setup: Callable[[FakeKubernetes, FakeGitHub], None],
                   **kube_options: Any) -> None:
    """Child side: start both fakes, `setup` them, print where they are, serve until stdin
    gives a line, then print every request received since the setup, as JSON, and exit."""
    with fake_servers(**kube_options) as (kube, github):
        setup(kube, github)
        kube_mark, github_mark = len(kube.requests), len(github.requests)
        print(json.dumps({"kubeconfig": str(kube.kubeconfig_path), "github_url": github.url,
                          "token": github.token}), flush=True)
        sys.stdin.readline()
        print(json.dumps({
            "kube": [[r.method, r.path, dict(r.query)] for r in kube.requests[kube_mark:]],
            "github": [[r.method, r.path, {k: v[-1] for k, v in r.query.items()}]
                       for r in github.requests[github_mark:]],
            "pods_left": len(kube.pods()),
            "runners_left": len(github.runners),
        }), flush=True)


@dataclass
class ServedFakes:
    """Parent side: where the fakes of a `serve_scenario` child listen."""

    kubeconfig: str
    github_url: str
    token: str
    process: subprocess.Popen[str]

    def requests(self) -> dict[str, Any]:
        """Ends the child; returns the requests it received and what was left."""
        assert self.process.stdin is not None and self.process.stdout is not None
        self.process.stdin.write("report\n")
        self.process.stdin.flush()
        report: dict[str, Any] = json.loads(self.process.stdout.readline())
        self.process.wait(timeout=30)
        return report


@contextmanager
def fakes_in_subprocess(module: str) -> Iterator[ServedFakes]:
    """Runs `python -m <module> --serve` (which calls serve_scenario); yields where it serves."""
    process = subprocess.Popen([sys.executable, "-m", module, "--serve"], cwd=REPO_ROOT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert process.stdout is not None
        info = json.loads(process.stdout.readline())
        yield ServedFakes(info["kubeconfig"], info["github_url"], info["token"], process)
    finally:
        if process.poll() is None:
            process.kill()
            process.wait()
