"""100 concurrent spawns for distinct runs against one fake cluster and one fake GitHub.

Each spawn has its own clients, as each would run in its own base-runner job. Prints the total
time, the per-spawn times, and the collision checks: distinct pods, each Secret owned by its
own pod and holding its own runner's config, one online registration per run.
"""

from __future__ import annotations

import base64
import threading
import time

from benchmarks.fake_harness import RunnerClock, fake_servers, summary
from gpu_runners.broker_api import SpawnResult
from gpu_runners.github_api import GitHubClient, RunnerScope, Token
from gpu_runners.kube import KubeClient, load_api_client
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.progress import ProgressLog
from gpu_runners.run_identity import RunIdentity
from gpu_runners.spawn import SpawnRequest, spawn

SPAWNS = 100


def main() -> None:
    with fake_servers() as (kube, github):
        RunnerClock(kube, github)
        results: dict[int, SpawnResult] = {}
        failures: dict[int, BaseException] = {}
        barrier = threading.Barrier(SPAWNS)

        def one(run_id: int) -> None:
            client = KubeClient(load_api_client(kubeconfig=str(kube.kubeconfig_path), environ={}))
            gh = GitHubClient(Token(github.token, "benchmark"),
                              RunnerScope(repository="acme/models"), api_url=github.url)
            request = SpawnRequest(
                identity=RunIdentity("acme/models", 1000 + run_id, 1),
                pod=RunnerPodOptions(namespace="github-runners", image="ghcr.io/acme/runner:1"),
                wait_timeout_seconds=120,
            )
            barrier.wait()
            try:
                results[run_id] = spawn(request, kube=client, github=gh, log=ProgressLog(None))
            except BaseException as e:  # reported below
                failures[run_id] = e

        threads = [threading.Thread(target=one, args=(i,)) for i in range(SPAWNS)]
        start = time.perf_counter()
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        total = time.perf_counter() - start

        pods = kube.pods()
        secrets = {s["metadata"]["name"]: s for s in kube.secrets()}
        pod_uids = {p["metadata"]["name"]: p["metadata"]["uid"] for p in pods}
        runners = {r["name"]: r for r in github.runners.values()}
        owned = sum(
            1 for name, uid in pod_uids.items()
            if secrets[f"{name}-jit"]["metadata"]["ownerReferences"][0]["uid"] == uid
            and base64.b64decode(secrets[f"{name}-jit"]["data"]["jitconfig"]).decode()
            == github.jit_configs[runners[name]["id"]]
        )
        print(f"{SPAWNS} concurrent spawns: {len(results)} succeeded, {len(failures)} failed, "
              f"total {total:.2f}s")
        print(f"  per spawn  {summary([r.seconds for r in results.values()])}")
        print(f"  distinct pods {len(pod_uids)}, distinct labels "
              f"{len({r.label for r in results.values()})}, secrets owned by their own pod "
              f"with their own runner's config {owned}, online registrations "
              f"{sum(1 for r in runners.values() if r['status'] == 'online')}")
        print(f"  schema validation errors {len(kube.validation_errors)}, fake errors "
              f"{len(kube.errors)}")
        for run_id, error in sorted(failures.items())[:5]:
            print(f"  run {1000 + run_id} failed: {error!r}")


if __name__ == "__main__":
    main()
