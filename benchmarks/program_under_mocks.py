"""How long the Pulumi program takes to evaluate for each stack under mocks.

    python -m benchmarks.program_under_mocks [--runs 5]

Prints, per stack, the time of the first run in this process (imports of the provider SDKs
included) and the median of the following runs, with the number of resources registered.
"""

from __future__ import annotations

import argparse
import statistics
import time

from tests.harness.mock_stack import run_program


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5, help="warm runs per stack")
    args = parser.parse_args()
    for stack in ("dev", "prod"):
        started = time.perf_counter()
        resources = len(run_program(stack).resources)
        first = time.perf_counter() - started
        warm = []
        for _ in range(args.runs):
            started = time.perf_counter()
            run_program(stack)
            warm.append(time.perf_counter() - started)
        print(f"{stack}: {resources} resources; first run {first:.2f} s, "
              f"median of {args.runs} warm runs {statistics.median(warm):.3f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
