"""`delete` and `list` against the broker stub over real HTTP."""

from __future__ import annotations

import pytest

from gpu_runners import broker_api
from gpu_runners.broker_api import DeleteOutcome, RunnerView
from gpu_runners.cli import main
from tests.fakes.broker_stub import BrokerStub, Refuse


def test_delete_prints_what_the_broker_removed(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    broker.answer_delete(DeleteOutcome(pods=["gpu-123-1"], secrets=["gpu-123-1-jit"],
                                       registrations=["gpu-123-1"]))

    assert main(["delete"], job_env) == 0

    lines = capsys.readouterr().out.splitlines()
    assert [line.split("] ", 1)[1] for line in lines] == [
        "deleted pod gpu-123-1",
        "deleted secret gpu-123-1-jit",
        "deleted runner registration gpu-123-1",
    ]
    (request,) = broker.requests
    assert (request.method, request.path, request.body) == ("DELETE", broker_api.RUNNER_PATH, None)
    assert request.claims is not None and request.claims.run_id == 123


def test_delete_is_idempotent_each_time_with_a_fresh_token(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["delete"], job_env) == 0
    assert main(["delete"], job_env) == 0

    out = capsys.readouterr().out.splitlines()
    assert len(out) == 2
    for line in out:
        assert line.endswith("] nothing left of gpu-123-1: pod, secret and registration are gone")
    first, second = broker.calls("DELETE")
    assert first.jti != second.jti and second.refusal is None


def test_delete_retries_an_unavailable_broker(
    broker: BrokerStub, job_env: dict[str, str],
) -> None:
    broker.answer_delete(Refuse(503, broker_api.UNAVAILABLE, "starting"),
                         DeleteOutcome(pods=["gpu-123-1"]))

    assert main(["delete"], job_env) == 0
    assert len(broker.calls("DELETE")) == 2


def test_delete_refused_by_the_broker_exits_9(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    broker.answer_delete(Refuse(403, broker_api.FORBIDDEN, "event pull_request_target"))

    assert main(["delete"], {**job_env, "GITHUB_ACTIONS": "true"}) == 9
    assert capsys.readouterr().err == ("::error title=gpu_runners delete::the broker's policy "
                                       "refused this job: event pull_request_target\n")


def test_list_shows_run_attempt_phase_node_gpu_type_and_age_oldest_first(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    broker.runners = [
        RunnerView(name="gpu-124-1", run_id=124, attempt=1, phase="Pending", node="",
                   gpu_type="nvidia-l4", gpus=1, age_seconds=45),
        RunnerView(name="gpu-123-2", run_id=123, attempt=2, phase="Running",
                   node="gke-gpu-l4-7", gpu_type="nvidia-tesla-t4", gpus=2, age_seconds=7300),
    ]

    assert main(["list"], job_env) == 0

    assert capsys.readouterr().out.splitlines() == [
        "NAME        RUN   ATTEMPT   PHASE     NODE           GPU TYPE          AGE",
        "gpu-123-2   123   2         Running   gke-gpu-l4-7   nvidia-tesla-t4   2h",
        "gpu-124-1   124   1         Pending   <none>         nvidia-l4         45s",
    ]
    (request,) = broker.requests
    assert (request.method, request.path) == ("GET", broker_api.RUNNERS_PATH)
    assert request.refusal is None


def test_list_says_so_when_there_are_no_runners(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    assert main(["list"], job_env) == 0
    assert capsys.readouterr().out == "no GPU runners for this repository\n"
