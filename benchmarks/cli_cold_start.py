"""Client cold start: wall time of `python -m gpu_runners` in a fresh process (target <= 0.2 s).

Three figures for the thin client: `--help`; a spawn refused for a bad argument (what a typo
costs: nothing is sent, not even the HTTP client is imported); and a whole spawn against a
local broker stub that answers `ready` at once (token request to the fake OIDC issuer, POST,
stream, step outputs). The last line is what the client no longer pays: importing the official
Kubernetes client, which the pre-broker CLI needed for every command that talked.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

from benchmarks.fake_harness import REPO_ROOT, summary, timed
from gpu_runners import contract
from tests.fakes.broker_stub import BrokerStub, Stream, ready, result_for
from tests.fakes.oidc_issuer import FakeOidcIssuer

RUNS = 10


def run(args: list[str], env: dict[str, str], expect: int = 0) -> float:
    """Seconds one `python -m gpu_runners <args>` takes; its exit code must be `expect`."""
    def once() -> None:
        done = subprocess.run([sys.executable, "-m", "gpu_runners", *args], env=env,
                              cwd=REPO_ROOT, capture_output=True, check=False)
        if done.returncode != expect:
            raise RuntimeError(f"{args} exited {done.returncode}: {done.stderr.decode()}")
    return timed(once)


def main() -> None:
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("GITHUB_", "GPU_RUNNERS_", "ACTIONS_"))}
    env["PYTHONPATH"] = str(REPO_ROOT)
    run(["--help"], env)  # first run writes the bytecode caches; not counted
    # The interpreter alone, so that a loaded machine's figures can be read against it.
    bare = [timed(lambda: subprocess.run([sys.executable, "-c", "pass"], check=True))
            for _ in range(RUNS)]
    print(f"python -c pass (the floor)            {summary(bare)}")
    helps = [run(["--help"], env) for _ in range(RUNS)]
    print(f"python -m gpu_runners --help          {summary(helps)}")
    bad = [run(["spawn", "--gpus", "0"], env, expect=2) for _ in range(RUNS)]
    print(f"spawn --gpus 0 (refused, exit 2)      {summary(bad)}")
    with FakeOidcIssuer() as issuer, BrokerStub(issuer) as broker, \
            tempfile.TemporaryDirectory() as scratch:
        broker.answer_spawn(*[Stream([ready(result_for(123, 1))])] * (RUNS + 1))
        env.update({
            contract.ENV_BROKER_URL: broker.url,
            contract.ENV_ID_TOKEN_REQUEST_URL: issuer.request_url,
            contract.ENV_ID_TOKEN_REQUEST_TOKEN: issuer.request_token,
            contract.ENV_GITHUB_OUTPUT: str(Path(scratch) / "output"),
        })
        run(["spawn"], env)
        spawns = [run(["spawn"], env) for _ in range(RUNS)]
    print(f"spawn, broker stub answers at once    {summary(spawns)}")
    baseline = [timed(lambda: subprocess.run([sys.executable, "-c", "import kubernetes.client"],
                                             check=True)) for _ in range(RUNS)]
    print(f"python -c 'import kubernetes.client'  {summary(baseline)}")


if __name__ == "__main__":
    main()
