"""Broker latency for 100 concurrent spawns, the waits for the node and the runner excluded.

One broker process serves 100 runs asked for at the same moment against the fakes. Printed per
run: the time from sending the request to its first progress line (token verification, policy,
operation start), to the `created pod` line, and from the runner coming online (the fake
GitHub marks it) to the `ready` line reaching the client: the broker's own time, not the
cluster's. p50 and p99 over the runs. One run goes first, alone, to warm the broker up (the
issuer's keys fetched, the first connections made), as a broker in service is.
"""

from __future__ import annotations

from benchmarks.broker_fleet import broker_fleet, percentile, spawn_concurrently, timed_spawn
from benchmarks.fake_harness import summary

RUNS = 100
#: Seconds from a runner container starting to its runner connecting: every run is in flight
#: at once for a while, as when a workflow fans out.
RUNNER_LAG = 1.0


def main() -> None:
    with broker_fleet(runner_lag=RUNNER_LAG) as fleet:
        warm_up = timed_spawn(fleet, 4999, fleet.issuer.mint(run_id="4999"))
        assert warm_up.outcome == "ready", warm_up.outcome
        run_ids = list(range(5000, 5000 + RUNS))
        wall = spawn_concurrently(fleet, run_ids)
        runs = [fleet.runs[run_id] for run_id in run_ids]
        failed = [t.outcome for t in runs if t.outcome != "ready"]
        first = [t.first_line - t.sent for t in runs if t.first_line is not None]
        created = [t.pod_created - t.sent for t in runs if t.pod_created is not None]
        after_online = [
            t.ready - fleet.clock.online_at[f"gpu-{run_id}-1"]
            for run_id, t in zip(run_ids, runs, strict=True)
            if t.ready is not None and f"gpu-{run_id}-1" in fleet.clock.online_at
        ]
        print(f"{RUNS} concurrent spawns through one broker: {RUNS - len(failed)} ready, "
              f"{len(failed)} failed, wall {wall:.2f}s (runner lag {RUNNER_LAG}s)")
        for name, values in (("request -> first progress line", first),
                              ("request -> 'created pod' line", created),
                              ("runner online -> 'ready' at the client", after_online)):
            print(f"  {name:40s} p50 {percentile(values, 0.5) * 1000:7.1f} ms  "
                  f"p99 {percentile(values, 0.99) * 1000:7.1f} ms  "
                  f"({summary(values)})")
        for outcome in failed[:5]:
            print(f"  failed: {outcome}")
        print(f"  pods {len(fleet.kube.pods())}, registrations {len(fleet.github.runners)}")


if __name__ == "__main__":
    main()
