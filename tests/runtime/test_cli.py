"""The command line, in-process (`cli.main`) and as `python -m gpu_runners` subprocesses."""

from __future__ import annotations

import signal
import subprocess
from pathlib import Path

import pytest

from gpu_runners import contract
from gpu_runners.cli import main
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.runtime.fake_wiring import (
    REPO_ROOT,
    cli_command,
    environ_without,
    wait_until,
)


def run_cli(
    env: dict[str, str], *args: str, timeout: float = 30.0
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cli_command(*args), env=env, cwd=REPO_ROOT, capture_output=True,
                          text=True, timeout=timeout, check=False)


def test_help_documents_every_exit_code(cli_env: dict[str, str]) -> None:
    result = run_cli(cli_env, "spawn", "--help")

    assert result.returncode == 0
    for line in ("2    bad arguments", "5    spawn: no GPU capacity",
                 "6    spawn: the runner image",
                 "8    spawn: the runner was not online within --timeout",
                 "130  interrupted by SIGINT", "143  terminated by SIGTERM"):
        assert line in result.stdout


@pytest.mark.parametrize(
    ("args", "drop", "message"),
    [
        (["--gpus", "0"], (), "--gpus: 0 is not allowed; ask for at least 1 GPU"),
        (["--gpus", "2", "--gpu-type", "nvidia-l4"], (),
         "--gpus: 2 is more than a nvidia-l4 node has (1); pools: nvidia-l4 (up to 1)"),
        (["--gpu-type", "nvidia-h100-80gb"], (),
         "--gpu-type: 'nvidia-h100-80gb' is not a GPU pool of this cluster; pools: nvidia-l4"),
        (["--memory", "16GB"], (), "--memory: '16GB' is not a Kubernetes quantity"),
        (["--timeout", "soon"], (), "--timeout: 'soon' is not a positive duration"),
        ([], (contract.ENV_RUN_ID,), "--run-id is required outside GitHub Actions"),
        ([], (contract.ENV_IMAGE,), "--image is empty (and GPU_RUNNERS_IMAGE is not set)"),
        ([], (contract.ENV_PAT_SEED,), "no GitHub token: set GITHUB_PAT_FILE"),
    ],
)
def test_bad_arguments_are_refused_before_any_api_call(
    cli_env: dict[str, str], fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    capsys: pytest.CaptureFixture[str], args: list[str], drop: tuple[str, ...], message: str,
) -> None:
    code = main(["spawn", *args], environ_without(cli_env, *drop))

    err = capsys.readouterr().err
    assert code == 2
    assert err.startswith(f"error: spawn: {message}")
    assert err.count("\n") == 1
    assert fake_kube.requests == [] and fake_github.requests == []


@pytest.mark.usefixtures("runners_come_online")
def test_spawn_command_prints_progress_and_writes_the_label_output_and_summary(
    cli_env: dict[str, str],
) -> None:
    result = run_cli(cli_env, "spawn", "--gpu-type", "nvidia-l4", "--label", "team=vision")

    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert lines[-2].endswith("] runner online")
    assert lines[-1].endswith("] ready: runs-on: gpu-123-1")
    output = Path(cli_env[contract.ENV_GITHUB_OUTPUT]).read_text()
    assert "label=gpu-123-1\n" in output and "name=gpu-123-1\n" in output
    summary = Path(cli_env[contract.ENV_STEP_SUMMARY]).read_text()
    assert "| Runner label | `gpu-123-1` |" in summary
    assert "| GPUs | 1 x nvidia-l4 |" in summary
    assert "(added by the autoscaler)" in summary


def test_spawn_failure_is_one_line_with_its_exit_code_and_a_summary_row(
    cli_env: dict[str, str], fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {**cli_env, "GITHUB_ACTIONS": "true", contract.ENV_GPU_POOLS:
           '[{"accelerator": "nvidia-tesla-t4", "maxGpusPerPod": 4}]'}

    code = main(["spawn", "--gpu-type", "nvidia-tesla-t4"], env)

    err = capsys.readouterr().err
    assert code == 5
    assert err.count("\n") == 1
    assert err.startswith("::error title=gpu_runners spawn::no nvidia-tesla-t4 GPU capacity and "
                          "no scale-up coming: pod didn't trigger scale-up")
    summary = Path(env[contract.ENV_STEP_SUMMARY]).read_text()
    assert "| `spawn` failed | no nvidia-tesla-t4 GPU capacity" in summary
    assert fake_kube.pods() == [] and fake_github.runners == {}


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_the_wait_removes_the_pod_secret_and_registration(
    cli_env: dict[str, str], fake_kube: FakeKubernetes, fake_github: FakeGitHub,
    signum: signal.Signals, code: int,
) -> None:
    # The runner never comes online (no runners_come_online), so spawn waits until signalled.
    process = subprocess.Popen(cli_command("spawn", "--timeout", "2m"), env=cli_env,
                               cwd=REPO_ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                               text=True)
    try:
        wait_until(lambda: bool(fake_kube.secrets()) and bool(fake_github.runners)
                   and fake_kube.pods()[0]["status"]["phase"] == "Running",
                   timeout=15.0, what="spawn to create its pod, secret and registration")
        process.send_signal(signum)
        stdout, stderr = process.communicate(timeout=15)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    assert process.returncode == code, stderr
    assert stderr == f"spawn: interrupted by signal {int(signum)}\n"
    assert stdout.splitlines()[-1].endswith(
        f"removed pod gpu-123-1, secret gpu-123-1-jit, runner registration gpu-123-1 after: "
        f"signal {int(signum)}"
    )
    assert fake_kube.pods() == []
    assert fake_kube.secrets() == []
    assert fake_github.runners == {}


def test_delete_command_succeeds_when_everything_is_already_gone(
    cli_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    code = main(["delete"], cli_env)

    assert code == 0
    assert capsys.readouterr().out.strip().endswith(
        "nothing left of gpu-123-1: pod, secret and registration are gone"
    )


@pytest.mark.usefixtures("runners_come_online")
def test_list_command_shows_run_attempt_phase_node_gpu_type_and_age(
    cli_env: dict[str, str], capsys: pytest.CaptureFixture[str], fake_kube: FakeKubernetes,
) -> None:
    assert main(["spawn"], cli_env) == 0
    node = fake_kube.pods()[0]["spec"]["nodeName"]
    capsys.readouterr()

    assert main(["list"], cli_env) == 0

    header, row = capsys.readouterr().out.splitlines()
    assert header.split() == ["NAME", "RUN", "ATTEMPT", "PHASE", "NODE", "GPU", "TYPE", "AGE"]
    assert row.split()[:6] == ["gpu-123-1", "123", "1", "Running", node, "any"]
    assert row.split()[6].endswith("s")


def test_reap_command_exits_1_when_it_could_not_remove_everything(
    cli_env: dict[str, str], fake_github: FakeGitHub, capsys: pytest.CaptureFixture[str],
) -> None:
    fake_github.add_runner("gpu-9-1", ["gpu-9-1"], status="offline")
    fake_github.set_run_status(9, "completed", "success")
    fake_github.inject("DELETE", r"/actions/runners/\d+$", 403, times=10)

    code = main(["reap"], cli_env)

    out = capsys.readouterr().out
    assert code == 1
    assert "removing registration gpu-9-1: offline, no pod" in out
    assert "could not remove registration gpu-9-1: GitHub refused DELETE" in out
