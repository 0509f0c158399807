"""reap over 5,000 GPU pods in one namespace (target <= 10 s), against the fake servers.

The namespace holds 2,000 Succeeded and 1,000 Failed pods, 1,000 running pods of completed
runs and 1,000 running pods of runs in progress (each pod its own run); GitHub also lists
1,000 offline leftover registrations of runs it does not know. The fakes run in their own
process (as an API server would be elsewhere), so the figure is reap's and not the fakes'
interpreter lock. Prints the time, the list requests (page size 500), the deletions and the
GitHub requests.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from benchmarks.fake_harness import fakes_in_subprocess, serve_scenario
from gpu_runners.github_api import GitHubClient, RunnerScope, Token
from gpu_runners.kube import KubeClient, load_api_client
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.pod_spec import build_gpu_pod
from gpu_runners.progress import ProgressLog
from gpu_runners.reap import reap
from gpu_runners.run_identity import RunIdentity
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes

OPTIONS = RunnerPodOptions(namespace="github-runners", image="ghcr.io/acme/runner:1")
GROUPS = (("Succeeded", 2000), ("Failed", 1000), ("completed", 1000), ("in_progress", 1000))
LEFTOVER_REGISTRATIONS = 1000


def pod(run_id: int, phase: str) -> dict[str, Any]:
    built = build_gpu_pod(RunIdentity("acme/models", run_id, 1), OPTIONS, "nvidia-l4")
    body: dict[str, Any] = built.model_dump(by_alias=True, exclude_none=True, mode="json")
    body["status"] = {"phase": phase}
    return body


def setup(kube: FakeKubernetes, github: FakeGitHub) -> None:
    run_id = 0
    pods = []
    for state, count in GROUPS:
        for _ in range(count):
            run_id += 1
            pods.append(pod(run_id, state if state in ("Succeeded", "Failed") else "Running"))
            if state in ("completed", "in_progress"):
                github.set_run_status(run_id, state, "success" if state == "completed" else None)
    kube.seed(*pods)
    for leftover in range(LEFTOVER_REGISTRATIONS):
        name = f"gpu-{100_000 + leftover}-1"
        github.add_runner(name, [name], status="offline")


def main() -> None:
    with fakes_in_subprocess("benchmarks.reap_5000_pods") as fakes:
        client = KubeClient(load_api_client(kubeconfig=fakes.kubeconfig, environ={}))
        gh = GitHubClient(Token(fakes.token, "benchmark"), RunnerScope(repository="acme/models"),
                          api_url=fakes.github_url)
        start = time.perf_counter()
        report = reap(namespace="github-runners", kube=client, github=gh, log=ProgressLog(None))
        elapsed = time.perf_counter() - start
        sent = fakes.requests()

    kube = sent["kube"]
    lists = [q for method, path, q in kube if method == "GET" and path.endswith("/pods")]
    collections = [q for method, path, q in kube if method == "DELETE" and path.endswith("/pods")]
    singles = [path for method, path, _ in kube if method == "DELETE" and "/pods/" in path]
    github = sent["github"]
    print(f"reap over {report.pods_seen} pods: {elapsed:.2f}s")
    print(f"  pod list requests {len(lists)} (limit {lists[0].get('limit')}); deletions: "
          f"{len(collections)} by phase ({', '.join(q['fieldSelector'] for q in collections)}), "
          f"{len(singles)} one by one")
    print(f"  GitHub requests {len(github)}: runner list pages "
          f"{sum(1 for _, path, _ in github if path.endswith('/runners'))}, run lookups "
          f"{sum(1 for _, path, _ in github if '/actions/runs/' in path)}, registration "
          f"deletions {sum(1 for method, _, _ in github if method == 'DELETE')}")
    print(f"  removed {report.count('pod')} pods and {report.count('registration')} "
          f"registrations, kept {len(report.kept)} pods, failures {len(report.failures)}; "
          f"left: {sent['pods_left']} pods, {sent['runners_left']} registrations")


if __name__ == "__main__":
    if "--serve" in sys.argv:
        serve_scenario(setup, validate=False)
    else:
        main()
