"""A scriptable stub of the runner broker's HTTP API (`gpu_runners.broker_api`), over real HTTP.

`BrokerStub` listens on 127.0.0.1 (an ephemeral port) in a daemon thread and answers the
broker's paths the way the broker documents them. It checks every request's bearer token with
the broker's own verifier (`gpu_runners.broker.oidc.OidcVerifier`) against a `FakeOidcIssuer`:
signature, issuer, the broker's audience only, and each `jti` accepted once. A refused token gets
the broker's JSON error body with 401 (403 for a policy refusal) and nothing is played.

What a verified request gets is scripted by the test:

- `POST /v1/runner`: the body must parse with `SpawnAsk.from_json` (else 400 `usage`); then the
  next answer queued with `answer_spawn`, by default a stream of one progress line and `ready`
  for the token's run. An answer is a `Stream` of steps (`Emit` an event after a delay, `Wait`
  with or without heartbeats, `Drop` the connection mid-stream), a `Refuse` (an error status
  before any stream, with the broker's body or any other), or a `Hangup` (the connection closed
  without an answer);
- `DELETE /v1/runner`: the next answer queued with `answer_delete`: a `DeleteOutcome`, a
  `Refuse` or a `Hangup`, each possibly `Slow`; by default an empty outcome (all gone), as the
  broker answers a repeated delete;
- `GET /v1/runners`: `runners`; `GET /v1/runner`: the token's run among `runners`, else 404.

Every request is recorded in `requests` with its arrival time and what the token said.
"""

from __future__ import annotations

import http.server
import json
import socket
import threading
import time
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import jwt

from gpu_runners import broker_api, contract
from gpu_runners.broker.oidc import OidcPolicy, OidcVerifier, RunClaims, TokenRejectedError
from gpu_runners.broker_api import (
    DeleteOutcome,
    ProtocolError,
    RunnerView,
    SpawnAsk,
    SpawnResult,
    StreamEvent,
)
from tests.fakes.loopback_server import LoopbackServer
from tests.fakes.oidc_issuer import FakeOidcIssuer

# --- what a test scripts ---------------------------------------------------------------------


@dataclass(frozen=True)
class Emit:
    """Send one stream event, `after` seconds after the previous step."""

    event: StreamEvent
    after: float = 0.0


@dataclass(frozen=True)
class Wait:
    """Send nothing but heartbeats (every `heartbeat_every` seconds, if set) for `seconds`."""

    seconds: float
    heartbeat_every: float | None = None


@dataclass(frozen=True)
class Drop:
    """Close the connection mid-stream, without the chunked stream's last chunk."""


@dataclass(frozen=True)
class Stream:
    """A 200 NDJSON answer made of these steps; it ends cleanly after the last one."""

    steps: Sequence[Emit | Wait | Drop]


@dataclass(frozen=True)
class Refuse:
    """An error answered before any stream.

    Attributes:
        status: The HTTP status.
        code: The broker's error code for its JSON body; None sends `raw` instead (a proxy's
            answer, not the broker's).
        message: The body's message.
        raw: The body when `code` is None.
    """

    status: int
    code: str | None = None
    message: str = ""
    raw: bytes = b"<html><body>Bad Gateway</body></html>"


@dataclass(frozen=True)
class Hangup:
    """Close the connection without any answer (a broker killed mid-request)."""


@dataclass(frozen=True)
class Slow:
    """Answer a DELETE with `answer` after `seconds` (a broker waiting for a busy runner)."""

    seconds: float
    answer: DeleteOutcome | Refuse | Hangup


SpawnAnswer = Stream | Refuse | Hangup
DeleteAnswer = DeleteOutcome | Refuse | Hangup | Slow


def progress(line: str, *, after: float = 0.0) -> Emit:
    """A progress event."""
    return Emit(StreamEvent(broker_api.PROGRESS, line=line), after)


def ready(result: SpawnResult, *, after: float = 0.0) -> Emit:
    """The `ready` event of a spawn."""
    return Emit(StreamEvent(broker_api.READY, result=result), after)


def failed(code: str, message: str, *, after: float = 0.0) -> Emit:
    """The `failed` event of a spawn."""
    return Emit(StreamEvent(broker_api.FAILED, error=code, message=message), after)


def result_for(run_id: int, attempt: int, **fields: Any) -> SpawnResult:
    """The SpawnResult the broker sends for a run, overridable per field."""
    label = f"{contract.GPU_RUNNER_PREFIX}{run_id}-{attempt}"
    values: dict[str, Any] = {
        "label": label, "namespace": contract.DEFAULT_NAMESPACE, "pod_name": label,
        "node": "gke-gpu-nvidia-l4-0", "gpu_type": "nvidia-l4", "gpu_count": 1,
        "node_added": True, "reused": False, "seconds": 42.5,
        "stage_seconds": {"created": 0.2, "online": 42.5},
        "run_url": f"https://github.com/acme/models/actions/runs/{run_id}/attempts/{attempt}",
    }
    values.update(fields)
    return SpawnResult(**values)


# --- what the stub records -------------------------------------------------------------------


@dataclass
class BrokerRequest:
    """One request the stub received.

    Attributes:
        method: HTTP method.
        path: URL path without the query string.
        headers: Request headers, keys lower-cased (the Authorization header included).
        body: The JSON body parsed, or None.
        at: time.monotonic() when the request line arrived.
        audience: `aud` of the bearer token, read without verification (None: no token).
        jti: `jti` of the bearer token, read without verification.
        claims: The verified run claims; None when the token was refused.
        refusal: Why the token was refused, None when it was accepted.
    """

    method: str
    path: str
    headers: dict[str, str]
    body: Any
    at: float
    audience: Any = None
    jti: Any = None
    claims: RunClaims | None = None
    refusal: str | None = None


@dataclass
class _Queues:
    spawn: list[SpawnAnswer] = field(default_factory=list)
    delete: list[DeleteAnswer] = field(default_factory=list)


class BrokerStub(LoopbackServer):
    """The broker's HTTP surface, scripted per test; tokens checked against `issuer`.

    Args:
        issuer: The fake OIDC issuer whose tokens are accepted.
        audience: The only audience accepted.
    """

    server_name = "broker-stub"

    def __init__(self, issuer: FakeOidcIssuer,
                 audience: str = contract.DEFAULT_BROKER_AUDIENCE) -> None:
        super().__init__()
        self.issuer = issuer
        self.audience = audience
        self.requests: list[BrokerRequest] = []
        #: What GET /v1/runners lists (and GET /v1/runner finds the token's run in).
        self.runners: list[RunnerView] = []
        self._queues = _Queues()
        self._verifier = OidcVerifier(OidcPolicy(
            issuer=issuer.issuer,
            audience=audience,
            repository_id=issuer.job_claims["repository_id"],
            repository_owner_id=issuer.job_claims["repository_owner_id"],
            allowed_events=frozenset(contract.DEFAULT_ALLOWED_EVENTS),
        ))
        self._lock = threading.Lock()

    # --- scripting ---------------------------------------------------------------------------

    def answer_spawn(self, *answers: SpawnAnswer) -> None:
        """Queues answers to the next POSTs, in order."""
        with self._lock:
            self._queues.spawn.extend(answers)

    def answer_delete(self, *answers: DeleteAnswer) -> None:
        """Queues answers to the next DELETEs, in order."""
        with self._lock:
            self._queues.delete.extend(answers)

    def calls(self, method: str, path: str = broker_api.RUNNER_PATH) -> list[BrokerRequest]:
        """The recorded requests with this method and path, in order."""
        with self._lock:
            return [r for r in self.requests if r.method == method and r.path == path]

    # --- request handling --------------------------------------------------------------------

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        stub = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "BrokerStub"

            def do_GET(self) -> None:
                stub._handle(self, "GET")

            def do_POST(self) -> None:
                stub._handle(self, "POST")

            def do_DELETE(self) -> None:
                stub._handle(self, "DELETE")

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean; `requests` is the log

        return Handler

    def _handle(self, handler: http.server.BaseHTTPRequestHandler, method: str) -> None:
        handler.close_connection = True
        arrived = time.monotonic()
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        headers = {key.lower(): value for key, value in handler.headers.items()}
        request = BrokerRequest(method, urllib.parse.urlsplit(handler.path).path, headers,
                                _json_or_none(raw), arrived)
        with self._lock:
            self.requests.append(request)
        refused = self._refusal_code(request)
        if refused is not None:
            _send_error(handler, refused, request.refusal or "refused")
            return
        assert request.claims is not None
        route = (method, request.path)
        if route == ("POST", broker_api.RUNNER_PATH):
            self._spawn(handler, request.claims, raw)
        elif route == ("DELETE", broker_api.RUNNER_PATH):
            self._delete(handler)
        elif route == ("GET", broker_api.RUNNERS_PATH):
            _send_json(handler, 200, [view.to_json() for view in self.runners])
        elif route == ("GET", broker_api.RUNNER_PATH):
            mine = [view for view in self.runners if (view.run_id, view.attempt)
                    == (request.claims.run_id, request.claims.run_attempt)]
            if mine:
                _send_json(handler, 200, mine[0].to_json())
            else:
                _send_error(handler, broker_api.NOT_FOUND, "this run has no GPU runner")
        else:
            _send_error(handler, broker_api.NOT_FOUND, f"no route {method} {request.path}")

    def _refusal_code(self, request: BrokerRequest) -> str | None:
        """Verifies the bearer token as the broker does; the error code if it is refused."""
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            request.refusal = "no bearer token"
            return broker_api.UNAUTHORIZED
        try:
            unverified = jwt.decode(token.strip(), options={"verify_signature": False})
        except jwt.PyJWTError:
            unverified = {}
        request.audience = unverified.get("aud")
        request.jti = unverified.get("jti")
        try:
            request.claims = self._verifier.verify(token.strip())
        except TokenRejectedError as e:
            request.refusal = e.reason
            return e.code
        return None

    def _spawn(self, handler: http.server.BaseHTTPRequestHandler, claims: RunClaims,
               raw: bytes) -> None:
        if len(raw) > broker_api.MAX_BODY_BYTES:
            _send_error(handler, broker_api.USAGE, "request body too large")
            return
        try:
            SpawnAsk.from_json(json.loads(raw))
        except (ValueError, ProtocolError) as e:
            _send_error(handler, broker_api.USAGE, str(e))
            return
        with self._lock:
            answer: SpawnAnswer = (self._queues.spawn.pop(0) if self._queues.spawn else Stream([
                progress(f"spawning GPU runner gpu-{claims.run_id}-{claims.run_attempt}"),
                ready(result_for(claims.run_id, claims.run_attempt)),
            ]))
        if isinstance(answer, Stream):
            self._stream(handler, answer)
        else:
            self._refuse_or_hang_up(handler, answer)

    def _delete(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        with self._lock:
            answer: DeleteAnswer = (self._queues.delete.pop(0) if self._queues.delete
                                    else DeleteOutcome())
        if isinstance(answer, Slow):
            if self._stopping.wait(answer.seconds):
                return
            answer = answer.answer
        if isinstance(answer, DeleteOutcome):
            _send_json(handler, 200, answer.to_json())
        else:
            self._refuse_or_hang_up(handler, answer)

    def _refuse_or_hang_up(self, handler: http.server.BaseHTTPRequestHandler,
                           answer: Refuse | Hangup) -> None:
        if isinstance(answer, Hangup):
            handler.connection.shutdown(socket.SHUT_RDWR)
        elif answer.code is not None:
            _send_json(handler, answer.status, broker_api.error_body(answer.code, answer.message))
        else:
            _send_bytes(handler, answer.status, answer.raw, "text/html")

    def _stream(self, handler: http.server.BaseHTTPRequestHandler, stream: Stream) -> None:
        handler.send_response(200)
        handler.send_header("Content-Type", broker_api.NDJSON)
        handler.send_header("Transfer-Encoding", "chunked")
        handler.send_header("Connection", "close")
        handler.end_headers()
        try:
            for step in stream.steps:
                if isinstance(step, Drop):
                    handler.wfile.flush()
                    handler.connection.shutdown(socket.SHUT_RDWR)
                    return
                if isinstance(step, Wait):
                    self._wait(handler, step)
                    continue
                if self._stopping.wait(step.after):
                    return
                _chunk(handler, step.event.encode())
            handler.wfile.write(b"0\r\n\r\n")
            handler.wfile.flush()
        except OSError:
            return  # the client went away (as a signalled spawn does); nothing more to send

    def _wait(self, handler: http.server.BaseHTTPRequestHandler, step: Wait) -> None:
        end = time.monotonic() + step.seconds
        while (left := end - time.monotonic()) > 0:
            pause = min(left, step.heartbeat_every) if step.heartbeat_every else left
            if self._stopping.wait(pause):
                return
            if step.heartbeat_every and time.monotonic() < end:
                _chunk(handler, StreamEvent(broker_api.HEARTBEAT).encode())


def _chunk(handler: http.server.BaseHTTPRequestHandler, data: bytes) -> None:
    handler.wfile.write(f"{len(data):x}\r\n".encode() + data + b"\r\n")
    handler.wfile.flush()


def _json_or_none(raw: bytes) -> Any:
    try:
        return json.loads(raw) if raw else None
    except ValueError:
        return None


def _send_error(handler: http.server.BaseHTTPRequestHandler, code: str, message: str) -> None:
    _send_json(handler, broker_api.ERROR_STATUS.get(code, 500),
               broker_api.error_body(code, message))


def _send_json(handler: http.server.BaseHTTPRequestHandler, status: int, body: Any) -> None:
    _send_bytes(handler, status, json.dumps(body).encode(), "application/json")


def _send_bytes(handler: http.server.BaseHTTPRequestHandler, status: int, payload: bytes,
                content_type: str) -> None:
    handler.send_response(status)
    handler.send_header("Content-Type", content_type)
    handler.send_header("Content-Length", str(len(payload)))
    handler.send_header("Connection", "close")
    handler.end_headers()
    handler.wfile.write(payload)
    handler.wfile.flush()
