"""`spawn` against the broker stub over real HTTP: the request, the stream, outputs, errors."""

from __future__ import annotations

import http.server
import socket
import threading
import time
from pathlib import Path

import pytest

from gpu_runners import broker_api, contract
from gpu_runners.broker_api import SpawnAsk
from gpu_runners.cli import main
from tests.client.cli_process import run_cli, start_cli
from tests.fakes.broker_stub import (
    BrokerStub,
    Drop,
    Hangup,
    Refuse,
    Stream,
    Wait,
    failed,
    progress,
    ready,
    result_for,
)
from tests.fakes.oidc_issuer import FakeOidcIssuer


def test_spawn_posts_the_ask_with_a_token_for_the_brokers_audience(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer, job_env: dict[str, str],
) -> None:
    code = main(["spawn", "--gpus", "1", "--gpu-type", "nvidia-tesla-t4,nvidia-l4",
                 "--gpu-type", "nvidia-tesla-t4", "--cpu", "4", "--memory", "16Gi",
                 "--shm-size", "4Gi", "--max-runtime", "2h", "--timeout", "30m",
                 "--scale-up-grace", "90s", "--image", "ghcr.io/acme/runner:2",
                 "--label", "team=vision", "--runner-group", "gpu"], job_env)

    assert code == 0
    (post,) = broker.requests
    assert (post.method, post.path) == ("POST", broker_api.RUNNER_PATH)
    assert post.body == SpawnAsk(
        gpus=1, gpu_types=("nvidia-tesla-t4", "nvidia-l4"), cpu="4", memory="16Gi",
        shm_size="4Gi", max_runtime_seconds=7200, timeout_seconds=1800.0,
        scale_up_grace_seconds=90.0, image="ghcr.io/acme/runner:2", labels={"team": "vision"},
        runner_group="gpu",
    ).to_json()
    assert post.audience == contract.DEFAULT_BROKER_AUDIENCE
    assert post.refusal is None and post.claims is not None
    assert (post.claims.run_id, post.claims.run_attempt) == (123, 1)
    assert fake_oidc.token_audiences == [contract.DEFAULT_BROKER_AUDIENCE]
    assert post.headers["content-type"] == "application/json"


def test_options_left_out_are_left_to_the_broker(
    broker: BrokerStub, job_env: dict[str, str],
) -> None:
    assert main(["spawn"], job_env) == 0

    (post,) = broker.requests
    # No size, runtime, image or group: the stack's defaults and policy apply at the broker.
    assert post.body == {"gpus": 1, "gpuTypes": [], "timeoutSeconds": 1200.0, "labels": {}}


def test_the_token_is_requested_for_the_configured_audience(
    fake_oidc: FakeOidcIssuer, job_env: dict[str, str],
) -> None:
    audience = "https://broker.example.com/acme models?x=1&y"
    with BrokerStub(fake_oidc, audience=audience) as stub:
        env = {**job_env, contract.ENV_BROKER_URL: stub.url,
               contract.ENV_BROKER_AUDIENCE: audience}

        assert main(["spawn"], env) == 0

        # The audience survives URL encoding intact, next to the URL's own api-version.
        assert fake_oidc.token_audiences == [audience]
        assert [r.audience for r in stub.requests] == [audience]


def test_progress_lines_are_printed_as_they_arrive_then_outputs_and_summary_are_written(
    broker: BrokerStub, job_env: dict[str, str],
) -> None:
    broker.answer_spawn(Stream([
        progress("spawning GPU runner gpu-123-1 for https://github.com/acme/models/..."),
        Wait(1.5, heartbeat_every=0.2),
        progress("[  41.9s] runner online"),
        ready(result_for(123, 1, node="gke-gpu-l4-7", node_added=True, gpu_type="nvidia-l4")),
    ]))
    process = start_cli(job_env, "spawn", "--gpu-type", "nvidia-l4")
    try:
        assert process.stdout is not None
        first = process.stdout.readline()
        first_seen = time.monotonic()
        still_running = process.poll() is None
        stdout, stderr = process.communicate(timeout=30)
    finally:
        if process.poll() is None:
            process.kill()
            process.communicate()

    (post,) = broker.requests
    assert first.endswith("] spawning GPU runner gpu-123-1 for https://github.com/acme/models/...\n")
    # The line came while the broker was still waiting, not at the end.
    assert still_running and first_seen - post.at < 1.0
    assert process.returncode == 0, stderr
    lines = stdout.splitlines()
    # The broker's own stamp is replaced by this command's, never shown twice.
    assert lines[-2].endswith("] runner online") and "41.9s" not in lines[-2]
    assert lines[-1].endswith("] ready: runs-on: gpu-123-1")
    assert Path(job_env[contract.ENV_GITHUB_OUTPUT]).read_text() == (
        "label=gpu-123-1\nname=gpu-123-1\npod=gpu-123-1\n"
        f"namespace={contract.DEFAULT_NAMESPACE}\nnode=gke-gpu-l4-7\n"
    )
    summary = Path(job_env[contract.ENV_STEP_SUMMARY]).read_text()
    assert "| Runner label | `gpu-123-1` |" in summary
    assert "| GPUs | 1 x nvidia-l4 |" in summary
    assert "| Node | gke-gpu-l4-7 (added by the autoscaler) |" in summary
    assert stderr == ""


def test_no_token_appears_in_output_files_or_logs(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer, job_env: dict[str, str],
) -> None:
    broker.answer_spawn(Stream([failed(broker_api.NO_CAPACITY, "no GPU capacity")]))
    failure = run_cli({**job_env, "GITHUB_ACTIONS": "true"}, "spawn")
    success = run_cli(job_env, "spawn")

    assert (failure.returncode, success.returncode) == (5, 0)
    tokens = [r.headers["authorization"].removeprefix("Bearer ") for r in broker.requests]
    written = (failure.stdout + failure.stderr + success.stdout + success.stderr
               + Path(job_env[contract.ENV_GITHUB_OUTPUT]).read_text()
               + Path(job_env[contract.ENV_STEP_SUMMARY]).read_text())
    assert len(tokens) == 2
    for secret in (*tokens, fake_oidc.request_token):
        assert secret not in written


# --- the broker's verdicts -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("code", "exit_code"),
    [
        (broker_api.NO_CAPACITY, 5),
        (broker_api.IMAGE_PULL, 6),
        (broker_api.POD_FAILED, 7),
        (broker_api.CANCELLED, 7),
        (broker_api.TIMEOUT, 8),
        (broker_api.GITHUB, 3),
        (broker_api.KUBERNETES, 4),
        (broker_api.FORBIDDEN, 9),
        (broker_api.INTERNAL, 1),
        ("a-code-from-a-newer-broker", 1),
    ],
)
def test_a_failed_stream_exits_with_its_code_one_annotation_and_a_summary_row(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
    code: str, exit_code: int,
) -> None:
    broker.answer_spawn(Stream([progress("created pod gpu-123-1"),
                                failed(code, "no nvidia-l4 GPU capacity and no scale-up coming")]))

    result = main(["spawn"], {**job_env, "GITHUB_ACTIONS": "true"})

    err = capsys.readouterr().err
    assert result == exit_code
    assert err.count("\n") == 1
    assert err.startswith("::error title=gpu_runners spawn::")
    assert "no nvidia-l4 GPU capacity and no scale-up coming" in err
    summary = Path(job_env[contract.ENV_STEP_SUMMARY]).read_text()
    assert "| `spawn` failed | " in summary and "no nvidia-l4 GPU capacity" in summary
    assert Path(job_env[contract.ENV_GITHUB_OUTPUT]).read_text() == ""
    assert len(broker.calls("POST")) == 1  # a verdict is final: no retry


def test_outside_actions_a_failure_is_one_plain_error_line(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    broker.answer_spawn(Stream([failed(broker_api.IMAGE_PULL, "cannot pull ghcr.io/x:1")]))

    assert main(["spawn"], job_env) == 6
    assert capsys.readouterr().err == "error: spawn: cannot pull ghcr.io/x:1\n"


@pytest.mark.parametrize(
    ("answer", "exit_code", "message"),
    [
        (Refuse(403, broker_api.FORBIDDEN, "image ghcr.io/evil:1 is not allowed"), 9,
         "the broker's policy refused this job: image ghcr.io/evil:1 is not allowed"),
        (Refuse(400, broker_api.USAGE, "gpus: 9 is more than the stack's cap (4)"), 2,
         "the broker refused the request: gpus: 9 is more than the stack's cap (4)"),
        (Refuse(502, broker_api.GITHUB, "GitHub refused generate-jitconfig: 403"), 3,
         "GitHub refused generate-jitconfig: 403"),
        (Refuse(502, broker_api.KUBERNETES, "pods is forbidden"), 4, "pods is forbidden"),
        (Refuse(500, broker_api.INTERNAL, "boom"), 1, "boom"),
        (Refuse(404), 1, "answered HTTP 404 without the broker's error body; is --broker"),
    ],
)
def test_an_error_before_the_stream_exits_with_its_code_without_retrying(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
    answer: Refuse, exit_code: int, message: str,
) -> None:
    broker.answer_spawn(answer)

    assert main(["spawn"], job_env) == exit_code
    err = capsys.readouterr().err
    assert err.startswith("error: spawn: ") and message in err and err.count("\n") == 1
    assert len(broker.calls("POST")) == 1


def test_a_token_for_another_audience_is_refused_by_the_broker_exit_9(
    fake_oidc: FakeOidcIssuer, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    with BrokerStub(fake_oidc, audience="the-real-broker") as stub:
        code = main(["spawn"], {**job_env, contract.ENV_BROKER_URL: stub.url})

        assert code == 9
        (post,) = stub.requests
        assert post.audience == contract.DEFAULT_BROKER_AUDIENCE and post.claims is None
    err = capsys.readouterr().err
    assert err.startswith("error: spawn: the broker refused this job's OIDC token: ")


# --- the job's token -------------------------------------------------------------------------


@pytest.mark.parametrize("missing", [contract.ENV_ID_TOKEN_REQUEST_URL,
                                     contract.ENV_ID_TOKEN_REQUEST_TOKEN])
def test_without_id_token_permission_it_says_what_to_add_and_sends_nothing(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer, job_env: dict[str, str],
    capsys: pytest.CaptureFixture[str], missing: str,
) -> None:
    env = {key: value for key, value in job_env.items() if key != missing}

    assert main(["spawn"], env) == 2

    err = capsys.readouterr().err
    assert err == (
        "error: spawn: no OIDC token for this job: ACTIONS_ID_TOKEN_REQUEST_URL and "
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN are not set; add `permissions: id-token: write` to the "
        "job (pull requests from forks get no OIDC token)\n"
    )
    assert broker.requests == [] and fake_oidc.requests == []


def test_a_refused_token_request_exits_3_naming_the_variable_not_the_secret(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer, job_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    env = {**job_env, contract.ENV_ID_TOKEN_REQUEST_TOKEN: "not-the-request-token"}

    assert main(["spawn"], env) == 3

    err = capsys.readouterr().err
    assert err == ("error: spawn: the job's OIDC token endpoint (ACTIONS_ID_TOKEN_REQUEST_URL) "
                   "answered HTTP 401\n")
    assert len(fake_oidc.requests) == 1  # a refusal is not retried
    assert broker.calls("POST") == []


def test_a_token_endpoint_outage_is_retried(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer, job_env: dict[str, str],
) -> None:
    fake_oidc.fail_next(503)

    assert main(["spawn"], job_env) == 0

    assert len(fake_oidc.token_audiences) == 1  # the second token request got a token
    assert len(broker.calls("POST")) == 1


# --- retries ---------------------------------------------------------------------------------


def test_a_dropped_stream_is_posted_again_with_a_fresh_token_and_succeeds(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    broker.answer_spawn(Stream([progress("created pod gpu-123-1"), Drop()]))

    assert main(["spawn"], job_env) == 0

    first, second = broker.calls("POST")
    assert first.body == second.body
    assert first.jti != second.jti and second.refusal is None
    out = capsys.readouterr().out
    assert "asking the broker again in 0.5s" in out
    assert out.splitlines()[-1].endswith("] ready: runs-on: gpu-123-1")


@pytest.mark.parametrize(
    "answer",
    [Hangup(), Refuse(503, broker_api.UNAVAILABLE, "shutting down"), Refuse(502), Refuse(504),
     Stream([progress("created pod gpu-123-1"), failed(broker_api.UNAVAILABLE, "restarting")]),
     Stream([progress("created pod gpu-123-1")])],
    ids=["hangup", "503-unavailable", "502-proxy", "504-proxy", "failed-unavailable",
         "stream-ends-without-verdict"],
)
def test_a_transient_failure_is_retried_until_the_broker_answers(
    broker: BrokerStub, job_env: dict[str, str], answer: Refuse | Hangup | Stream,
) -> None:
    broker.answer_spawn(answer)

    assert main(["spawn"], job_env) == 0

    posts = broker.calls("POST")
    assert len(posts) == 2
    assert len({post.jti for post in posts}) == 2


def test_an_unavailable_broker_until_the_timeout_exits_10(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    broker.answer_spawn(*[Refuse(503, broker_api.UNAVAILABLE, "not ready")] * 10)

    assert main(["spawn", "--timeout", "2s"], job_env) == 10
    assert capsys.readouterr().err == (
        "error: spawn: the broker is unavailable: not ready\n"
    )
    assert 2 <= len(broker.calls("POST")) <= 4


def test_an_unreachable_broker_exits_10_within_the_timeout(
    job_env: dict[str, str],
) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    # Nothing listens on the port any more: every connection is refused.
    started = time.monotonic()

    result = run_cli(job_env, "spawn", "--timeout", "2s", "--broker", f"http://127.0.0.1:{port}")

    assert result.returncode == 10
    assert time.monotonic() - started < 6
    assert result.stderr.startswith(f"error: spawn: no answer from the broker at "
                                     f"http://127.0.0.1:{port} within --timeout (2s): could not "
                                     "connect to the broker")



class RedirectToIssuer(http.server.BaseHTTPRequestHandler):
    """A token endpoint that redirects elsewhere, as a hijacked one would."""

    def do_GET(self) -> None:
        assert isinstance(self.server, RedirectingServer)
        self.send_response(302)
        self.send_header("Location", self.server.location)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:
        pass


class RedirectingServer(http.server.ThreadingHTTPServer):
    """Serves RedirectToIssuer on an ephemeral 127.0.0.1 port, pointing at `location`."""

    def __init__(self, location: str) -> None:
        super().__init__(("127.0.0.1", 0), RedirectToIssuer)
        self.location = location


def test_a_redirected_token_request_is_not_followed_with_the_bearer(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer, job_env: dict[str, str],
    capsys: pytest.CaptureFixture[str],
) -> None:
    server = RedirectingServer(fake_oidc.request_url)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        host, port = server.server_address[:2]
        env = {**job_env, contract.ENV_ID_TOKEN_REQUEST_URL: f"http://{host!s}:{port}/t?v=1"}

        assert main(["spawn"], env) == 3
    finally:
        server.shutdown()
        server.server_close()

    assert "answered HTTP 302" in capsys.readouterr().err
    assert fake_oidc.requests == [] and broker.requests == []


def test_an_annotation_escapes_percent_signs_as_workflow_commands_require(
    broker: BrokerStub, job_env: dict[str, str], capsys: pytest.CaptureFixture[str],
) -> None:
    broker.answer_spawn(Stream([failed(broker_api.NO_CAPACITY, "GPU quota at 100%0A used")]))

    assert main(["spawn"], {**job_env, "GITHUB_ACTIONS": "true"}) == 5
    assert capsys.readouterr().err == ("::error title=gpu_runners spawn::GPU quota at 100%250A "
                                       "used\n")
