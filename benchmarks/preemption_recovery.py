"""Recovery time when Spot reclaims the nodes of many idle runners at once.

One broker process (as in its Deployment, its reaper interval an hour: only its pod watch can
wake the recovery) serves RUNS runs against the fakes. Each run's runner comes online and waits
for its job; then every pod's node is reclaimed at the same moment. Printed: the time from the
reclaim to each run's replacement runner being online again (the broker's recovery, the fake
cluster's scheduling and the runner's `RUNNER_LAG` connect time), p50 and p99, and the count of
pods, registrations and JIT configs at the end (one each per run, plus one config per
replacement).
"""

from __future__ import annotations

import time

from benchmarks.broker_fleet import broker_fleet, percentile, spawn_concurrently
from benchmarks.fake_harness import summary

RUNS = 50
RUNNER_LAG = 0.2


def main() -> None:
    with broker_fleet(runner_lag=RUNNER_LAG) as fleet:
        run_ids = list(range(7000, 7000 + RUNS))
        for run_id in run_ids:
            # A queued job the runners cannot take keeps each run going, as a queued `train`
            # on a base runner's label would.
            fleet.github.add_job(run_id, "setup", ["base-runner"])
        spawn_concurrently(fleet, run_ids)
        names = [f"gpu-{run_id}-1" for run_id in run_ids]
        first_uids = {}
        for name in names:
            pod = fleet.kube.pod(name)
            assert pod is not None, f"{name} did not start"
            first_uids[name] = pod["metadata"]["uid"]
        reclaimed = time.monotonic()
        for name in names:
            fleet.kube.preempt_pod(name)
            fleet.github.lose_runner(name)
        back: dict[str, float] = {}
        deadline = reclaimed + 120
        while len(back) < len(names) and time.monotonic() < deadline:
            for name in names:
                if name in back:
                    continue
                pod = fleet.kube.pod(name)
                runner = fleet.github.runner_named(name)
                if (pod is not None and pod["metadata"]["uid"] != first_uids[name]
                        and runner is not None and runner["status"] == "online"):
                    back[name] = time.monotonic() - reclaimed
            time.sleep(0.02)
        times = list(back.values())
        print(f"{RUNS} idle runners reclaimed at once: {len(back)} back online, "
              f"{RUNS - len(back)} not within 120 s (runner lag {RUNNER_LAG}s)")
        if times:
            print(f"  reclaim -> replacement online  p50 {percentile(times, 0.5):.2f} s  "
                  f"p99 {percentile(times, 0.99):.2f} s  ({summary(times)})")
        print(f"  pods {len(fleet.kube.pods())}, registrations {len(fleet.github.runners)}, "
              f"JIT configs minted {len(fleet.github.requests_to(r'/generate-jitconfig$'))}")


if __name__ == "__main__":
    main()
