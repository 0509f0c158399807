"""The broker stub answers like the broker's API: tokens checked, asks parsed strictly, streams.

Driven with plain http.client and the fake issuer's tokens, not with the product's client, so
these tests prove the stub itself.
"""

from __future__ import annotations

import http.client
import json
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_runners import broker_api
from gpu_runners.broker_api import DeleteOutcome, RunnerView, StreamEvent
from tests.fakes.broker_stub import BrokerStub, Drop, Stream, progress
from tests.fakes.oidc_issuer import FakeOidcIssuer


@pytest.fixture
def stub(fake_oidc: FakeOidcIssuer) -> Iterator[BrokerStub]:
    with BrokerStub(fake_oidc) as started:
        yield started


def call(stub: BrokerStub, method: str, path: str, token: str | None,
         body: Any = None) -> tuple[int, str, bytes]:
    """(status, content type, body) of one request, read to its end."""
    host, port = stub.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    headers = {"Authorization": f"Bearer {token}"} if token is not None else {}
    payload = None if body is None else json.dumps(body).encode()
    try:
        connection.request(method, path, body=payload, headers=headers)
        response = connection.getresponse()
        try:
            raw = response.read()
        except http.client.IncompleteRead as e:
            raw = e.partial
        return response.status, response.getheader("Content-Type") or "", raw
    finally:
        connection.close()


def test_a_spawn_streams_progress_then_ready_for_the_tokens_run(
    stub: BrokerStub, fake_oidc: FakeOidcIssuer,
) -> None:
    token = fake_oidc.mint(run_id="77", run_attempt="2")

    status, content_type, raw = call(stub, "POST", broker_api.RUNNER_PATH, token, {"gpus": 1})

    assert (status, content_type) == (200, broker_api.NDJSON)
    events = [StreamEvent.decode(line) for line in raw.splitlines()]
    assert [event.event for event in events] == [broker_api.PROGRESS, broker_api.READY]
    assert events[1].result is not None and events[1].result.label == "gpu-77-2"
    (request,) = stub.requests
    assert request.claims is not None and request.claims.run_id == 77
    assert request.body == {"gpus": 1}


@pytest.mark.parametrize(
    ("token_claims", "status", "reason"),
    [
        ({"aud": "https://github.com/acme"}, 401, "audience"),
        ({"repository_id": "999"}, 403, "repository"),
        ({"event_name": "pull_request_target"}, 403, "event"),
    ],
)
def test_a_token_the_broker_would_refuse_is_refused_before_anything_is_played(
    stub: BrokerStub, fake_oidc: FakeOidcIssuer, token_claims: dict[str, Any], status: int,
    reason: str,
) -> None:
    stub.answer_spawn(Stream([progress("must not be sent")]))

    answer = call(stub, "POST", broker_api.RUNNER_PATH, fake_oidc.mint(**token_claims),
                  {"gpus": 1})

    assert answer[0] == status
    body = json.loads(answer[2])
    assert body["error"] in (broker_api.UNAUTHORIZED, broker_api.FORBIDDEN)
    assert reason in body["message"]
    assert stub.requests[0].claims is None and stub.requests[0].refusal


def test_a_replayed_token_and_a_missing_token_get_401(
    stub: BrokerStub, fake_oidc: FakeOidcIssuer,
) -> None:
    token = fake_oidc.mint()

    first = call(stub, "DELETE", broker_api.RUNNER_PATH, token)
    replay = call(stub, "DELETE", broker_api.RUNNER_PATH, token)
    missing = call(stub, "DELETE", broker_api.RUNNER_PATH, None)

    assert first[0] == 200 and DeleteOutcome.from_json(json.loads(first[2])) == DeleteOutcome()
    assert (replay[0], missing[0]) == (401, 401)
    assert stub.requests[1].jti == stub.requests[0].jti


def test_an_ask_with_an_unknown_field_is_a_usage_error(
    stub: BrokerStub, fake_oidc: FakeOidcIssuer,
) -> None:
    status, _, raw = call(stub, "POST", broker_api.RUNNER_PATH, fake_oidc.mint(),
                          {"gpus": 1, "runId": 5})

    assert status == 400
    assert json.loads(raw)["error"] == broker_api.USAGE


def test_a_dropped_stream_ends_without_its_last_chunk(
    stub: BrokerStub, fake_oidc: FakeOidcIssuer,
) -> None:
    stub.answer_spawn(Stream([progress("created pod gpu-123-1"), Drop()]))
    host, port = stub.url.removeprefix("http://").split(":")
    connection = http.client.HTTPConnection(host, int(port), timeout=5)
    connection.request("POST", broker_api.RUNNER_PATH, body=b'{"gpus": 1}',
                       headers={"Authorization": f"Bearer {fake_oidc.mint()}"})
    response = connection.getresponse()

    first = response.readline()
    with pytest.raises(http.client.IncompleteRead):
        response.read()
    connection.close()

    assert StreamEvent.decode(first).line == "created pod gpu-123-1"


def test_runners_lists_what_the_test_set(stub: BrokerStub, fake_oidc: FakeOidcIssuer) -> None:
    view = RunnerView(name="gpu-123-1", run_id=123, attempt=1, phase="Running", node="n",
                      gpu_type="nvidia-l4", gpus=1, age_seconds=5.0)
    stub.runners = [view]

    status, _, raw = call(stub, "GET", broker_api.RUNNERS_PATH, fake_oidc.mint())
    mine = call(stub, "GET", broker_api.RUNNER_PATH, fake_oidc.mint())
    other = call(stub, "GET", broker_api.RUNNER_PATH, fake_oidc.mint(run_id="9"))

    assert status == 200 and [RunnerView.from_json(v) for v in json.loads(raw)] == [view]
    assert mine[0] == 200 and RunnerView.from_json(json.loads(mine[2])) == view
    assert other[0] == 404
