"""HTTP requests per spawn besides the streams (watches, log follows; target <= 6), and the
delay between the runner going online and spawn returning (target <= 0.5 s), against the fake
servers.

The runner connects (prints "Listening for Jobs", and GitHub lists it online) 0, 2 and 10 s
after its container starts, as a real runner does a few seconds after start. spawn follows
the container's log and asks GitHub once the line comes, so neither figure should grow with
the connect delay.
"""

from __future__ import annotations

import statistics
import time

from benchmarks.fake_harness import RunnerClock, fake_servers, summary
from gpu_runners.github_api import GitHubClient, RunnerScope, Token
from gpu_runners.kube import KubeClient, load_api_client
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import RunIdentity
from gpu_runners.spawn import SpawnRequest, spawn

SPAWNS = 10
LAGS = (0.0, 2.0, 10.0)


def measure(lag: float) -> tuple[list[int], list[int], list[float]]:
    """Per spawn: API requests (Kubernetes and GitHub, no streams), stream requests, delay."""
    requests, watches, delays = [], [], []
    with fake_servers() as (kube, github):
        clock = RunnerClock(kube, github, lag=lag)
        client = KubeClient(load_api_client(kubeconfig=str(kube.kubeconfig_path), environ={}))
        gh = GitHubClient(Token(github.token, "benchmark"), RunnerScope(repository="acme/models"),
                          api_url=github.url)
        for run_id in range(1, SPAWNS + 1):
            kube_before, github_before = len(kube.requests), len(github.requests)
            request = SpawnRequest(
                identity=RunIdentity("acme/models", run_id, 1),
                pod=RunnerPodOptions(namespace="github-runners", image="ghcr.io/acme/runner:1"),
            )
            result = spawn(request, kube=client, github=gh, log=ProgressLog(None))
            returned = time.monotonic()
            delays.append(returned - clock.online_at[result.label])
            sent = kube.requests[kube_before:]
            watches.append(sum(1 for r in sent if r.query.get("watch") == "true"
                               or r.query.get("follow") == "true"))
            requests.append(len(sent) - watches[-1] + len(github.requests) - github_before)
    return requests, watches, delays


def main() -> None:
    for lag in LAGS:
        requests, watches, delays = measure(lag)
        print(f"runner online {lag:.1f}s after its container starts:")
        print(f"  requests per spawn besides streams  median {statistics.median(requests):.0f}  "
              f"max {max(requests)}  (watch and log streams: median "
              f"{statistics.median(watches):.0f})")
        print(f"  online -> spawn returned            {summary(delays)}")


if __name__ == "__main__":
    main()
