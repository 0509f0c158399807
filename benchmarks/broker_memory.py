"""Broker memory (RSS) at 100 concurrent runs in flight.

One broker process; 100 runs asked for at once whose runners take a while to connect, so that
every spawn is in flight together (worker thread, watches, log follow, open stream). The
broker's resident memory is sampled every 50 ms: after one warm-up run, its peak, and after
the runs are done.
"""

from __future__ import annotations

import threading

from benchmarks.broker_fleet import broker_fleet, rss_bytes, spawn_concurrently, timed_spawn

RUNS = 100
#: Long enough for all 100 spawns to be waiting for their runners at the same time.
RUNNER_LAG = 5.0
MIB = 1024 * 1024


def main() -> None:
    with broker_fleet(runner_lag=RUNNER_LAG) as fleet:
        process = fleet.broker.process
        assert process is not None
        warm_up = timed_spawn(fleet, 6999, fleet.issuer.mint(run_id="6999"))
        assert warm_up.outcome == "ready", warm_up.outcome
        idle = rss_bytes(process.pid)
        peak = [idle]
        done = threading.Event()

        def sample() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], rss_bytes(process.pid))
                done.wait(0.05)

        sampler = threading.Thread(target=sample, daemon=True)
        sampler.start()
        run_ids = list(range(7000, 7000 + RUNS))
        wall = spawn_concurrently(fleet, run_ids)
        done.set()
        sampler.join()
        after = rss_bytes(process.pid)
        ready = sum(1 for run_id in run_ids if fleet.runs[run_id].outcome == "ready")
        print(f"broker RSS with {RUNS} concurrent runs in flight ({ready} ready, wall "
              f"{wall:.1f}s, runner lag {RUNNER_LAG}s):")
        print(f"  warm {idle / MIB:.1f} MiB, peak {peak[0] / MIB:.1f} MiB "
              f"(+{(peak[0] - idle) / MIB:.1f} MiB, {(peak[0] - idle) / RUNS / 1024:.0f} KiB "
              f"per run), after {after / MIB:.1f} MiB")


if __name__ == "__main__":
    main()
