"""A cancelled setup still removes its runner: real signals to a `spawn` subprocess."""

from __future__ import annotations

import signal
import subprocess
import time

import pytest

from gpu_runners.broker_api import DeleteOutcome
from tests.client.cli_process import start_cli
from tests.fakes.broker_stub import BrokerStub, Hangup, Slow, Stream, Wait, progress

REMOVED = DeleteOutcome(pods=["gpu-123-1"], secrets=["gpu-123-1-jit"],
                        registrations=["gpu-123-1"])


def start_waiting_spawn(broker: BrokerStub, env: dict[str, str]) -> subprocess.Popen[str]:
    """A spawn whose runner never comes: the broker streams a line, then only heartbeats."""
    broker.answer_spawn(Stream([progress("created pod gpu-123-1 in namespace github-runners"),
                                Wait(120, heartbeat_every=0.5)]))
    process = start_cli(env, "spawn", "--timeout", "10m")
    assert process.stdout is not None
    first = process.stdout.readline()
    assert first.endswith("] created pod gpu-123-1 in namespace github-runners\n"), first
    return process


def finish(process: subprocess.Popen[str], timeout: float = 15.0) -> tuple[str, str]:
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()
    return stdout, stderr


@pytest.mark.parametrize(("signum", "code"), [(signal.SIGTERM, 143), (signal.SIGINT, 130)])
def test_a_signal_during_spawn_sends_delete_at_once_and_exits_with_the_signals_code(
    broker: BrokerStub, job_env: dict[str, str], signum: signal.Signals, code: int,
) -> None:
    broker.answer_delete(REMOVED)
    process = start_waiting_spawn(broker, job_env)

    sent = time.monotonic()
    process.send_signal(signum)
    stdout, stderr = finish(process)

    (delete,) = broker.calls("DELETE")
    assert delete.at - sent < 1.0
    assert delete.refusal is None and delete.claims is not None
    assert (delete.claims.run_id, delete.claims.run_attempt) == (123, 1)
    assert delete.jti != broker.calls("POST")[0].jti
    assert process.returncode == code, stderr
    assert stderr == f"spawn: interrupted by signal {int(signum)}\n"
    assert stdout.splitlines()[-1].endswith(
        f"] removed pod gpu-123-1, secret gpu-123-1-jit, runner registration gpu-123-1 after: "
        f"signal {int(signum)}"
    )


def test_a_second_signal_does_not_cut_the_removal_short(
    broker: BrokerStub, job_env: dict[str, str],
) -> None:
    # Actions sends SIGINT, then SIGTERM 7.5 s later; here the second comes mid-DELETE.
    broker.answer_delete(Slow(1.0, REMOVED))
    process = start_waiting_spawn(broker, job_env)

    process.send_signal(signal.SIGINT)
    deadline = time.monotonic() + 5
    while not broker.calls("DELETE") and time.monotonic() < deadline:
        time.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    stdout, stderr = finish(process)

    assert len(broker.calls("DELETE")) == 1
    assert process.returncode == 130, stderr
    assert stdout.splitlines()[-1].endswith("after: signal 2")


def test_a_broker_that_does_not_answer_the_delete_leaves_the_rest_to_its_reaper(
    broker: BrokerStub, job_env: dict[str, str],
) -> None:
    broker.answer_delete(*[Slow(30.0, REMOVED)] * 3)
    process = start_waiting_spawn(broker, job_env)

    sent = time.monotonic()
    process.send_signal(signal.SIGTERM)
    stdout, _ = finish(process)

    # Within GitHub's 7.5 s between SIGINT and SIGTERM, whatever the broker does.
    assert time.monotonic() - sent < 7.5
    assert process.returncode == 143
    assert "cleanup: could not remove this run's runner" in stdout.splitlines()[-1]
    assert stdout.splitlines()[-1].endswith("the broker's reaper will")


def test_a_dropped_delete_is_asked_again_within_the_budget(
    broker: BrokerStub, job_env: dict[str, str],
) -> None:
    broker.answer_delete(Hangup(), REMOVED)
    process = start_waiting_spawn(broker, job_env)

    process.send_signal(signal.SIGTERM)
    stdout, _ = finish(process)

    assert len(broker.calls("DELETE")) == 2
    assert process.returncode == 143
    assert stdout.splitlines()[-1].endswith("after: signal 15")
