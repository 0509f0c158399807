"""`BrokerClient` with short timings: heartbeats, silence and the spawn's own deadline."""

from __future__ import annotations

import pytest

from gpu_runners import broker_api
from gpu_runners.broker_api import SpawnAsk
from gpu_runners.broker_client import (
    BrokerClient,
    BrokerEndpoint,
    BrokerError,
    BrokerUnreachableError,
    ClientTimings,
    JobTokenSource,
)
from tests.fakes.broker_stub import BrokerStub, Stream, Wait, progress, ready, result_for
from tests.fakes.oidc_issuer import FakeOidcIssuer

#: The stream counts as dropped after 0.5 s without a line (the product waits three heartbeats).
FAST = ClientTimings(read_seconds=0.5, backoff_first_seconds=0.05, backoff_max_seconds=0.2,
                     verdict_grace_seconds=0.5)


def client_for(broker: BrokerStub, fake_oidc: FakeOidcIssuer) -> BrokerClient:
    tokens = JobTokenSource.from_environ({
        "ACTIONS_ID_TOKEN_REQUEST_URL": fake_oidc.request_url,
        "ACTIONS_ID_TOKEN_REQUEST_TOKEN": fake_oidc.request_token,
    })
    return BrokerClient(BrokerEndpoint.parse(broker.url), tokens, timings=FAST)


def test_heartbeats_keep_a_slow_spawn_alive_past_the_read_timeout(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer,
) -> None:
    broker.answer_spawn(Stream([progress("waiting for a GPU node"),
                                Wait(1.5, heartbeat_every=0.2),
                                ready(result_for(123, 1))]))
    lines: list[str] = []

    result = client_for(broker, fake_oidc).spawn(SpawnAsk(timeout_seconds=30),
                                                 on_progress=lines.append)

    assert result.label == "gpu-123-1"
    assert lines == ["waiting for a GPU node"]  # heartbeats are not shown
    assert len(broker.calls("POST")) == 1


def test_a_silent_stream_counts_as_dropped_and_is_posted_again(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer,
) -> None:
    broker.answer_spawn(Stream([progress("waiting for a GPU node"), Wait(1.5)]))
    lines: list[str] = []

    result = client_for(broker, fake_oidc).spawn(SpawnAsk(timeout_seconds=30),
                                                 on_progress=lines.append)

    assert result.label == "gpu-123-1"
    assert lines[:2] == ["waiting for a GPU node",
                         "no word from the broker for 0.5s; asking the broker again in 0.1s"]
    assert len(broker.calls("POST")) == 2


def test_a_stream_without_verdict_past_the_timeout_fails_as_a_timeout(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer,
) -> None:
    broker.answer_spawn(Stream([Wait(10, heartbeat_every=0.1)]))

    with pytest.raises(BrokerError) as raised:
        client_for(broker, fake_oidc).spawn(SpawnAsk(timeout_seconds=1), on_progress=print)

    assert raised.value.code == broker_api.TIMEOUT
    assert raised.value.exit_code == 8
    assert str(raised.value) == ("the runner was not online within --timeout (1s) and the "
                                 "broker said nothing")


def test_a_broker_that_keeps_dropping_gives_up_at_the_timeout(
    broker: BrokerStub, fake_oidc: FakeOidcIssuer,
) -> None:
    broker.answer_spawn(*[Stream([Wait(0.1)])] * 50)

    with pytest.raises(BrokerUnreachableError) as raised:
        client_for(broker, fake_oidc).spawn(SpawnAsk(timeout_seconds=1), on_progress=print)

    assert raised.value.exit_code == 10
    assert "the broker's stream ended before the runner was ready" in str(raised.value)
    posts = broker.calls("POST")
    assert 3 <= len(posts) <= 12
    assert len({post.jti for post in posts}) == len(posts)


def test_the_token_url_keeps_its_query_encodes_the_audience_and_repr_hides_the_bearer() -> None:
    source = JobTokenSource("https://pipelines.example/idtoken?api-version=2.0",
                            "s3cret-request-token", "https://broker/a b&c")
    bare = JobTokenSource("https://pipelines.example/idtoken", "s3cret-request-token",
                          "gpu-runners-broker")

    assert source.token_url() == ("https://pipelines.example/idtoken?api-version=2.0"
                                  "&audience=https%3A%2F%2Fbroker%2Fa%20b%26c")
    assert bare.token_url() == "https://pipelines.example/idtoken?audience=gpu-runners-broker"
    assert "s3cret-request-token" not in repr(source)
