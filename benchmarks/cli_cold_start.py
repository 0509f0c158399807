"""CLI cold start: wall time of `python -m gpu_runners` in a fresh process (target <= 0.5 s).

Three figures: `--help`; a spawn refused for a bad argument (what a typo costs; the
Kubernetes client is not imported); and `list` against the fake cluster, which pays the
official client's import (~0.9 s on its own, see the last line) before its first request.
"""

from __future__ import annotations

import os
import subprocess
import sys

from benchmarks.fake_harness import REPO_ROOT, fake_servers, summary, timed

RUNS = 10


def run(args: list[str], env: dict[str, str]) -> float:
    def once() -> None:
        subprocess.run([sys.executable, "-m", "gpu_runners", *args], env=env, cwd=REPO_ROOT,
                       capture_output=True, check=False)
    return timed(once)


def main() -> None:
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "GITHUB_REPOSITORY": "acme/models",
           "GITHUB_RUN_ID": "1", "GPU_RUNNERS_IMAGE": "ghcr.io/acme/runner:1",
           "GITHUB_RUNNER_PAT": "ghp_fake"}
    run(["--help"], env)  # first run writes the bytecode caches; not counted
    helps = [run(["--help"], env) for _ in range(RUNS)]
    print(f"python -m gpu_runners --help        {summary(helps)}")
    bad = [run(["spawn", "--gpus", "0"], env) for _ in range(RUNS)]
    print(f"spawn --gpus 0 (refused, exit 2)    {summary(bad)}")
    with fake_servers() as (kube, _github):
        env["KUBECONFIG"] = str(kube.kubeconfig_path)
        listing = [run(["list"], env) for _ in range(RUNS)]
    print(f"list (kubernetes client imported)   {summary(listing)}")
    baseline = [timed(lambda: subprocess.run([sys.executable, "-c", "import kubernetes.client"],
                                             check=True)) for _ in range(RUNS)]
    print(f"python -c 'import kubernetes.client' {summary(baseline)}")


if __name__ == "__main__":
    main()
