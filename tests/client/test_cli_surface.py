"""What the command line checks before sending anything: help, arguments, environment, imports."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from gpu_runners import contract
from gpu_runners.cli import main
from tests.client.cli_process import REPO_ROOT, run_cli
from tests.fakes.broker_stub import BrokerStub
from tests.fakes.oidc_issuer import FakeOidcIssuer


def test_help_documents_every_exit_code_and_the_broker(job_env: dict[str, str]) -> None:
    result = run_cli(job_env, "spawn", "--help")

    assert result.returncode == 0
    for line in ("2    bad arguments or environment", "5    spawn: no GPU capacity",
                 "6    spawn: the runner image",
                 "8    spawn: the runner was not online within --timeout",
                 "9    the broker refused this job's OIDC token or its ask",
                 "10   the broker is unreachable or unavailable",
                 "130  interrupted by SIGINT", "143  terminated by SIGTERM",
                 "the job needs `permissions: id-token: write`"):
        assert line in result.stdout


def test_spawn_help_lists_todays_options_and_none_of_the_removed_ones(
    job_env: dict[str, str],
) -> None:
    result = run_cli(job_env, "spawn", "--help")

    for option in ("--gpus", "--gpu-type", "--cpu", "--memory", "--shm-size", "--max-runtime",
                   "--timeout", "--scale-up-grace", "--image", "--label", "--runner-group",
                   "--broker"):
        assert option in result.stdout
    for removed in ("--run-id", "--run-attempt", "--repository", "--namespace",
                    "--kubeconfig", "--context", "--org"):
        assert removed not in result.stdout


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--gpus", "0"], "error: spawn: --gpus: 0 is not allowed; ask for at least 1 GPU"),
        (["--gpus", "2", "--gpu-type", "nvidia-l4"],
         "error: spawn: --gpus: 2 is more than a nvidia-l4 node has (1)"),
        (["--gpu-type", "nvidia-h100-80gb"],
         "error: spawn: --gpu-type: 'nvidia-h100-80gb' is not a GPU pool of this cluster"),
        (["--gpu-type", "NVIDIA_L4"], "error: spawn: --gpu-type: 'NVIDIA_L4' is not an "
         "accelerator name"),
        (["--memory", "16GB"], "error: spawn: --memory: '16GB' is not a Kubernetes quantity"),
        (["--shm-size", "8Gi"], "error: spawn: --shm-size: 8Gi must be smaller than --memory"),
        (["--cpu", "lots"], "error: spawn: --cpu: 'lots' is not a Kubernetes quantity"),
        (["--timeout", "soon"], "error: spawn: --timeout: 'soon' is not a positive duration"),
        (["--max-runtime", "0"], "error: spawn: --max-runtime: '0' is not a positive duration"),
        (["--scale-up-grace", "2d"], "error: spawn: --scale-up-grace: '2d' is not a positive"),
        (["--label", "team"], "error: spawn: --label: 'team' is not KEY=VALUE"),
        (["--label", "gpu-runners/run-id=1"],
         "error: spawn: --label: 'gpu-runners/run-id' is set by gpu_runners"),
        (["--runner-group", " "], "error: spawn: --runner-group is empty"),
        (["--broker", "ftp://broker"], "error: spawn: --broker: 'ftp://broker' is not an "
         "http(s) URL with a host"),
        (["--broker", "http://user:pw@broker:8080"],
         "error: spawn: --broker: 'http://user:pw@broker:8080' must not carry credentials"),
    ],
)
def test_bad_arguments_exit_2_with_one_line_and_send_nothing(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer, job_env: dict[str, str],
    capsys: pytest.CaptureFixture[str], args: list[str], message: str,
) -> None:
    code = main(["spawn", *args], job_env)

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(message)
    assert err.count("\n") == 1
    assert broker.requests == [] and fake_oidc.requests == []


def test_without_a_broker_url_it_names_the_option_and_the_variable(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    env = {key: value for key, value in job_env.items() if key != contract.ENV_BROKER_URL}

    assert main(["delete"], env) == 2

    assert capsys.readouterr().err.startswith(
        "error: delete: --broker is not set (and GPU_RUNNERS_BROKER_URL is empty); give the "
        "broker's URL, e.g. http://gpu-runners-broker.gpu-runners-broker.svc:8080"
    )
    assert broker.requests == []


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["spawn", "--run-id", "5"],
         "--run-id is no longer accepted: the broker takes the run from the job's OIDC token"),
        (["delete", "--run-attempt", "2"], "--run-attempt is no longer accepted: the broker takes "
         "the run attempt from the job's OIDC token"),
        (["spawn", "--namespace", "x"], "--namespace is no longer accepted: the broker puts GPU "
         "pods in the stack's namespace"),
        (["list", "--kubeconfig", "k"], "--kubeconfig is no longer accepted: only the broker "
         "talks to the cluster"),
    ],
)
def test_removed_options_are_refused_with_the_reason(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
    args: list[str], message: str,
) -> None:
    with pytest.raises(SystemExit) as exited:
        main(args, job_env)

    assert exited.value.code == 2
    assert capsys.readouterr().err.splitlines()[-1].endswith(f"error: {message}")
    assert broker.requests == []


def test_reap_is_refused_saying_that_the_broker_reaps(
    broker: BrokerStub, job_env: dict[str, str],
) -> None:
    result = run_cli(job_env, "reap", "--dry-run")

    assert result.returncode == 2
    assert result.stderr == (
        "error: reap: reap is no longer a command of this client: the broker removes finished, "
        "expired and orphaned GPU runners itself; nothing was done\n"
    )
    assert broker.requests == []


HEAVY_MODULES = ("kubernetes", "urllib3", "yaml", "gpu_runners.kube", "gpu_runners.spawn")
IMPORTED = """
import json, sys
{code}
print(json.dumps(sorted(m for m in sys.modules
                        if m.split('.')[0] in {heavy!r} or m in {heavy!r})))
"""


@pytest.mark.parametrize(
    "code",
    [
        "import gpu_runners.cli",
        "import gpu_runners.broker_client",
        "from gpu_runners.cli import main\ntry:\n    main(['spawn', '--gpus', '0'], {{}})\n"
        "except SystemExit:\n    pass",
    ],
    ids=["cli", "broker_client", "refused-spawn"],
)
def test_the_client_imports_no_kubernetes_client_nor_its_dependencies(code: str) -> None:
    script = IMPORTED.format(code=code.format(), heavy=HEAVY_MODULES)

    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=True)

    assert json.loads(done.stdout.splitlines()[-1]) == []


def test_a_refused_argument_does_not_even_load_the_http_client() -> None:
    script = ("import sys\nfrom gpu_runners.cli import main\n"
              "code = main(['spawn', '--memory', '1GB'], {})\n"
              "print(code, 'http.client' in sys.modules, 'urllib.request' in sys.modules)")

    done = subprocess.run([sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=60, check=True)

    assert done.stdout.splitlines()[-1] == "2 False False"
