"""The client of the runner broker: the job's OIDC token, then the broker's API (`broker_api`).

What `python3 -m gpu_runners spawn|delete|list` calls on the base runner. Standard library only
and no Kubernetes client: the command starts in a fraction of a second and holds no credential
of its own. Every request carries a fresh GitHub Actions OIDC token requested for the broker's
audience; the broker takes the run from it, and accepts each token once, so none is reused.

The spawn answer is an NDJSON stream of `broker_api.StreamEvent`s, read line by line: progress
lines are handed on as they arrive, heartbeats only prove the stream alive (a read times out
after three missed ones). A stream that drops or ends without a verdict, the broker's
`unavailable` (503, or a stream's last event), a 502/503/504 without the broker's error body (a
proxy's), a connection error or a token endpoint outage is answered by POSTing the same ask
again with a fresh token: the broker attaches to the run's spawn in progress or adopts its pod,
so a retry never makes a second runner. Retries back off, capped, until the spawn's --timeout
has passed; `delete` and `list` retry the same way within their own budget.

The token goes into the Authorization header and nowhere else: errors name the environment
variable and the HTTP status, never a token or the token endpoint's URL.
"""

from __future__ import annotations

import http.client
import json
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from typing import IO, Any, NoReturn, TypeVar

from gpu_runners import broker_api, contract
from gpu_runners.broker_api import (
    DeleteOutcome,
    ProtocolError,
    RunnerView,
    SpawnAsk,
    SpawnResult,
    StreamEvent,
)
from gpu_runners.errors import GitHubError, GpuRunnersError, UsageError

#: What a job without an OIDC token must change; fork pull requests cannot get one at all.
MISSING_PERMISSION_HINT = (
    "add `permissions: id-token: write` to the job (pull requests from forks get no OIDC token)"
)
#: Where the broker's Service answers inside the cluster, for error messages.
BROKER_URL_EXAMPLE = (
    f"http://{contract.BROKER_NAME}.{contract.DEFAULT_BROKER_NAMESPACE}.svc:{contract.BROKER_PORT}"
)
#: Longest stream line read; a `ready` event is well under 4 KiB.
MAX_EVENT_BYTES = 64 * 1024
#: Spawn's own wait for the runner when the ask names none (the CLI's --timeout default).
DEFAULT_SPAWN_TIMEOUT_SECONDS = 20 * 60.0
_USER_AGENT = f"gpu-runners-client/{broker_api.API_VERSION}"
_T = TypeVar("_T")

# One-line lead of the messages of refusals a user acts on differently from a spawn failure.
_REFUSAL_LEADS = {
    broker_api.UNAUTHORIZED: "the broker refused this job's OIDC token",
    broker_api.FORBIDDEN: "the broker's policy refused this job",
    broker_api.USAGE: "the broker refused the request",
    broker_api.UNAVAILABLE: "the broker is unavailable",
}


@dataclass(frozen=True)
class ClientTimings:
    """Timeouts and retry pacing; the defaults suit the broker's in-cluster Service.

    Attributes:
        connect_seconds: To open a connection to the broker or the token endpoint.
        read_seconds: Longest silence on the spawn stream before it counts as dropped: three
            heartbeat intervals, so one late heartbeat is not a dead broker.
        request_seconds: Longest wait for the token endpoint's answer.
        backoff_first_seconds: Wait before the first retry; each further one doubles it.
        backoff_max_seconds: Cap of the wait between retries.
        verdict_grace_seconds: How long past --timeout an open stream may still run, so the
            broker's own `timeout` verdict (with its cleanup) arrives instead of a guess.
    """

    connect_seconds: float = 10.0
    read_seconds: float = 3 * broker_api.HEARTBEAT_SECONDS
    request_seconds: float = 30.0
    backoff_first_seconds: float = 0.5
    backoff_max_seconds: float = 10.0
    verdict_grace_seconds: float = 60.0


class BrokerError(GpuRunnersError):
    """The broker's verdict: an error answered before a stream, or a stream's `failed` event.

    Attributes:
        code: The `broker_api` error code; `exit_code` is `broker_api.EXIT_CODES[code]`.
        status: HTTP status of the answer, None for a `failed` event.
    """

    def __init__(self, code: str, message: str, *, status: int | None = None) -> None:
        lead = _REFUSAL_LEADS.get(code)
        super().__init__(f"{lead}: {message}" if lead else message)
        self.code = code
        self.status = status
        self.exit_code = broker_api.EXIT_CODES.get(code, 1)


class BrokerUnreachableError(GpuRunnersError):
    """The broker could not be reached, or kept dropping the stream, until the deadline."""

    exit_code = broker_api.EXIT_UNREACHABLE


class BrokerProtocolError(GpuRunnersError):
    """The broker answered something `broker_api` does not describe (a version mismatch)."""

    exit_code = 1


class _TransientError(Exception):
    """A failure worth a retry: connection, dropped stream, 502/503/504, token endpoint 5xx.

    Attributes:
        reason: One line for the user, without tokens.
        progressed: Whether the attempt got as far as a stream event (the next retry then
            starts the backoff over).
        final: What to raise when no retry is left (None: BrokerUnreachableError).
    """

    def __init__(self, reason: str, *, progressed: bool = False,
                 final: GpuRunnersError | None = None) -> None:
        super().__init__(reason)
        self.reason = reason
        self.progressed = progressed
        self.final = final


# --- the job's OIDC token ----------------------------------------------------------------------


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses redirects: urllib would resend the Authorization header wherever they point."""

    def redirect_request(self, req: urllib.request.Request, fp: IO[bytes], code: int, msg: str,
                         headers: Message, newurl: str) -> urllib.request.Request | None:
        return None


@dataclass(frozen=True)
class JobTokenSource:
    """Fetches the job's OIDC token for one audience, as `core.getIDToken(audience)` does.

    Attributes:
        request_url: `ACTIONS_ID_TOKEN_REQUEST_URL` (it already carries a query string).
        request_token: `ACTIONS_ID_TOKEN_REQUEST_TOKEN`, the bearer of the token request.
        audience: The broker's audience (`GPU_RUNNERS_BROKER_AUDIENCE`).
    """

    request_url: str
    request_token: str = field(repr=False)
    audience: str

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> JobTokenSource:
        """The job's token source from the step's environment.

        Raises:
            UsageError: The runner did not set the request variables (the job lacks
                `permissions: id-token: write`, or runs for a fork's pull request).
        """
        url = (environ.get(contract.ENV_ID_TOKEN_REQUEST_URL) or "").strip()
        token = (environ.get(contract.ENV_ID_TOKEN_REQUEST_TOKEN) or "").strip()
        if not url or not token:
            raise UsageError(
                f"no OIDC token for this job: {contract.ENV_ID_TOKEN_REQUEST_URL} and "
                f"{contract.ENV_ID_TOKEN_REQUEST_TOKEN} are not set; {MISSING_PERMISSION_HINT}"
            )
        audience = (environ.get(contract.ENV_BROKER_AUDIENCE) or "").strip()
        return cls(url, token, audience or contract.DEFAULT_BROKER_AUDIENCE)

    def token_url(self) -> str:
        """The request URL with `audience` appended, URL-encoded like encodeURIComponent."""
        separator = "&" if urllib.parse.urlsplit(self.request_url).query else "?"
        return (f"{self.request_url}{separator}audience="
                f"{urllib.parse.quote(self.audience, safe='')}")

    def fetch(self, timeout: float) -> str:
        """A new token for the audience (each call gets a new `jti`).

        Raises:
            GitHubError: The endpoint refused the request (not retried).
            _TransientError: The endpoint failed in a way worth a retry (5xx, 429, network).
        """
        request = urllib.request.Request(  # noqa: S310 - the runner's https token endpoint
            self.token_url(),
            headers={"Authorization": f"Bearer {self.request_token}",
                     "Accept": "application/json", "User-Agent": _USER_AGENT},
        )
        where = f"the job's OIDC token endpoint ({contract.ENV_ID_TOKEN_REQUEST_URL})"
        try:
            opener = urllib.request.build_opener(_NoRedirects)
            with opener.open(request, timeout=timeout) as response:
                body = json.loads(response.read())
        except urllib.error.HTTPError as e:
            e.close()
            failure = GitHubError(f"{where} answered HTTP {e.code}", status=e.code)
            if e.code == 429 or e.code >= 500:
                raise _TransientError(failure.args[0], final=failure) from None
            raise failure from None
        except (OSError, ValueError) as e:  # URLError, timeouts, a body that is not JSON
            failure = GitHubError(f"{where} failed: {_describe(e)}")
            raise _TransientError(failure.args[0], final=failure) from None
        value = body.get("value") if isinstance(body, dict) else None
        if not isinstance(value, str) or not value:
            raise GitHubError(f"{where} answered without a token (no `value`)")
        return value


# --- the broker --------------------------------------------------------------------------------


@dataclass(frozen=True)
class BrokerEndpoint:
    """Where the broker listens: scheme, host, port and a path prefix (usually empty)."""

    https: bool
    host: str
    port: int | None
    base_path: str

    @classmethod
    def parse(cls, url: str) -> BrokerEndpoint:
        """Parses `--broker` / `GPU_RUNNERS_BROKER_URL`.

        Raises:
            UsageError: Unset, or not an http(s) URL with a host.
        """
        text = url.strip()
        if not text:
            raise UsageError(f"--broker is not set (and {contract.ENV_BROKER_URL} is empty); "
                             f"give the broker's URL, e.g. {BROKER_URL_EXAMPLE}")
        try:
            parts = urllib.parse.urlsplit(text)
            port = parts.port
        except ValueError as e:
            raise UsageError(f"--broker: {text!r} is not a URL ({e})") from e
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise UsageError(f"--broker: {text!r} is not an http(s) URL with a host, e.g. "
                             f"{BROKER_URL_EXAMPLE}")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise UsageError(f"--broker: {text!r} must not carry credentials, a query or a "
                             "fragment")
        return cls(parts.scheme == "https", parts.hostname, port, parts.path.rstrip("/"))

    def __str__(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        port = f":{self.port}" if self.port else ""
        return f"{'https' if self.https else 'http'}://{host}{port}{self.base_path}"


class BrokerClient:
    """The broker's API for one job: spawn, delete and list, each with a fresh token.

    Args:
        endpoint: Where the broker listens.
        tokens: The job's token source.
        timings: Timeouts and retry pacing.
        clock: Monotonic clock.
        sleep: Waits between retries.
    """

    def __init__(
        self,
        endpoint: BrokerEndpoint,
        tokens: JobTokenSource,
        *,
        timings: ClientTimings | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.endpoint = endpoint
        self._tokens = tokens
        self._timings = timings or ClientTimings()
        self._clock = clock
        self._sleep = sleep

    # --- the commands ---------------------------------------------------------------------

    def spawn(self, ask: SpawnAsk, *, on_progress: Callable[[str], None]) -> SpawnResult:
        """Starts this run's GPU runner and follows its progress until it is online.

        Args:
            ask: What the job asks for; sent unchanged on every retry.
            on_progress: Called with each progress line, and with a line per retry.

        Returns:
            The runner, from the stream's `ready` event.

        Raises:
            BrokerError: The broker refused the ask or the spawn failed (its error code).
            BrokerUnreachableError: No verdict before --timeout: connection errors, dropped
                streams or an unavailable broker all the way.
            GitHubError: The job's token could not be fetched.
        """
        timeout = ask.timeout_seconds or DEFAULT_SPAWN_TIMEOUT_SECONDS
        start = self._clock()
        retry_until = start + timeout
        verdict_until = retry_until + self._timings.verdict_grace_seconds
        body = json.dumps(ask.to_json(), separators=(",", ":")).encode()
        return self._retrying(
            lambda: self._spawn_once(body, on_progress, verdict_until, timeout),
            until=retry_until, budget=f"--timeout ({timeout:.0f}s)", on_retry=on_progress,
        )

    def delete(self, *, timeout_seconds: float) -> DeleteOutcome:
        """Removes this run's pod, Secret and registration; already gone is success.

        Args:
            timeout_seconds: Overall budget, retries included.

        Raises:
            BrokerError, BrokerUnreachableError, GitHubError: As for `spawn`.
        """
        data = self._call_json("DELETE", broker_api.RUNNER_PATH, timeout_seconds)
        try:
            return DeleteOutcome.from_json(data)
        except ProtocolError as e:
            raise BrokerProtocolError(f"the broker's delete answer is not understood: {e}") from e

    def list_runners(self, *, timeout_seconds: float) -> list[RunnerView]:
        """Every GPU runner of the repository (`GET /v1/runners`: a JSON list of RunnerViews).

        Raises:
            BrokerError, BrokerUnreachableError, GitHubError: As for `spawn`.
        """
        data = self._call_json("GET", broker_api.RUNNERS_PATH, timeout_seconds)
        try:
            if not isinstance(data, list):
                raise ProtocolError("runners", "expected a JSON list")
            return [RunnerView.from_json(item) for item in data]
        except ProtocolError as e:
            raise BrokerProtocolError(f"the broker's runner list is not understood: {e}") from e

    # --- one spawn attempt ------------------------------------------------------------------

    def _spawn_once(self, body: bytes, on_progress: Callable[[str], None],
                    verdict_until: float, timeout: float) -> SpawnResult:
        progressed = False
        connection = self._connect(self._timings.connect_seconds)
        try:
            token = self._tokens.fetch(self._timings.request_seconds)
            response = self._send(connection, "POST", broker_api.RUNNER_PATH, token, body,
                                  read_seconds=self._timings.read_seconds)
            if not 200 <= response.status < 300:
                self._refuse(response)
            while True:
                if self._clock() >= verdict_until:
                    raise BrokerError(broker_api.TIMEOUT, "the runner was not online within "
                                      f"--timeout ({timeout:.0f}s) and the broker said nothing")
                raw = response.readline(MAX_EVENT_BYTES)
                if not raw:
                    raise _TransientError("the broker's stream ended before the runner was "
                                          "ready", progressed=progressed)
                if not raw.strip():
                    continue
                event = _decode(raw)
                progressed = True
                if event.event == broker_api.PROGRESS:
                    on_progress(event.line)
                elif event.event == broker_api.READY:
                    assert event.result is not None  # decode always parses a ready's result
                    return event.result
                elif event.event == broker_api.FAILED:
                    error = BrokerError(event.error, event.message or event.error)
                    if event.error == broker_api.UNAVAILABLE:
                        # The broker is going away (a rollout): another replica, or this one
                        # restarted, takes the spawn over on the next POST.
                        raise _TransientError(str(error), progressed=True, final=error)
                    raise error
        except TimeoutError:
            raise _TransientError(
                f"no word from the broker for {self._timings.read_seconds:g}s",
                progressed=progressed) from None
        except (OSError, http.client.HTTPException) as e:
            raise _TransientError(f"the connection to the broker failed ({_describe(e)})",
                                  progressed=progressed) from None
        finally:
            connection.close()

    # --- delete and list --------------------------------------------------------------------

    def _call_json(self, method: str, path: str, timeout_seconds: float) -> Any:
        deadline = self._clock() + timeout_seconds
        return self._retrying(lambda: self._call_json_once(method, path, deadline),
                              until=deadline, budget=f"{timeout_seconds:g}s")

    def _call_json_once(self, method: str, path: str, deadline: float) -> Any:
        connection = self._connect(min(self._timings.connect_seconds, self._left(deadline)))
        try:
            token = self._tokens.fetch(min(self._timings.request_seconds, self._left(deadline)))
            response = self._send(connection, method, path, token, None,
                                  read_seconds=self._left(deadline))
            raw = response.read(broker_api.MAX_BODY_BYTES * 64)
            if not 200 <= response.status < 300:
                self._refuse(response, raw)
            try:
                return json.loads(raw)
            except ValueError as e:
                raise BrokerProtocolError(
                    f"the broker answered {method} {path} with something that is not JSON"
                ) from e
        except TimeoutError:
            raise _TransientError("the broker did not answer in time") from None
        except (OSError, http.client.HTTPException) as e:
            raise _TransientError(f"the connection to the broker failed ({_describe(e)})"
                                  ) from None
        finally:
            connection.close()

    # --- HTTP ---------------------------------------------------------------------------------

    def _connect(self, timeout: float) -> http.client.HTTPConnection:
        """An open connection; the broker is inside the cluster, so no proxy is involved."""
        kind = http.client.HTTPSConnection if self.endpoint.https else http.client.HTTPConnection
        connection = kind(self.endpoint.host, self.endpoint.port, timeout=timeout)
        try:
            connection.connect()
        except TimeoutError:
            raise _TransientError(f"could not connect to the broker at {self.endpoint} "
                                  f"within {timeout:g}s") from None
        except OSError as e:
            raise _TransientError(f"could not connect to the broker at {self.endpoint} "
                                  f"({_describe(e)})") from None
        return connection

    def _send(self, connection: http.client.HTTPConnection, method: str, path: str, token: str,
              body: bytes | None, *, read_seconds: float) -> http.client.HTTPResponse:
        if connection.sock is not None:
            # From here on the timeout bounds each read, not the whole answer: a stream that
            # keeps sending heartbeats may run for as long as the spawn takes.
            connection.sock.settimeout(max(read_seconds, 0.001))
        headers = {
            "Authorization": f"Bearer {token}",
            "Accept": f"{broker_api.NDJSON}, application/json",
            "User-Agent": _USER_AGENT,
        }
        if body is not None:
            headers["Content-Type"] = "application/json"
        connection.request(method, self.endpoint.base_path + path, body=body, headers=headers)
        return connection.getresponse()

    def _refuse(self, response: http.client.HTTPResponse, raw: bytes | None = None) -> NoReturn:
        """Raises what a non-2xx answer means: the broker's verdict, or a transient failure."""
        status = response.status
        if raw is None:
            raw = response.read(broker_api.MAX_BODY_BYTES)
        verdict = _error_body(raw)
        if verdict is not None:
            code, message = verdict
            error = BrokerError(code, message, status=status)
            if code == broker_api.UNAVAILABLE:
                raise _TransientError(str(error), final=error)
            raise error
        if status in (502, 503, 504):
            # No verdict in the body: a proxy or the Service answered for a broker that is
            # restarting or not ready yet.
            raise _TransientError(f"the broker's address answered HTTP {status}")
        raise BrokerProtocolError(
            f"{self.endpoint} answered HTTP {status} without the broker's error body; is "
            f"--broker (or {contract.ENV_BROKER_URL}) the broker's URL?"
        )

    # --- retries ------------------------------------------------------------------------------

    def _retrying(self, attempt: Callable[[], _T], *, until: float, budget: str,
                  on_retry: Callable[[str], None] | None = None) -> _T:
        """`attempt()` until it succeeds, raises a verdict, or no retry fits before `until`.

        Every request is idempotent at the broker (keyed by the token's run), so repeating one
        whose answer was lost never makes a second runner.
        """
        failures = 0
        while True:
            try:
                return attempt()
            except _TransientError as e:
                # An attempt that got as far as the stream starts the backoff over.
                failures = 1 if e.progressed else failures + 1
                wait = self._backoff(failures)
                if self._clock() + wait >= until:
                    raise e.final or BrokerUnreachableError(
                        f"no answer from the broker at {self.endpoint} within {budget}: "
                        f"{e.reason}"
                    ) from None
                if on_retry is not None:
                    on_retry(f"{e.reason}; asking the broker again in {wait:.1f}s")
                self._sleep(wait)

    def _backoff(self, failures: int) -> float:
        first = self._timings.backoff_first_seconds
        return float(min(first * 2 ** (failures - 1), self._timings.backoff_max_seconds))

    def _left(self, deadline: float) -> float:
        return max(deadline - self._clock(), 0.001)


def _decode(raw: bytes) -> StreamEvent:
    try:
        return StreamEvent.decode(raw)
    except ProtocolError as e:
        raise BrokerProtocolError(f"the broker's stream is not understood: {e}") from e


def _error_body(raw: bytes) -> tuple[str, str] | None:
    """(code, message) of the broker's JSON error body, None for any other body."""
    try:
        data = json.loads(raw)
    except ValueError:
        return None
    if not isinstance(data, dict) or not isinstance(data.get("error"), str):
        return None
    message = data.get("message")
    return data["error"], " ".join(str(message or data["error"]).split())


def _describe(error: BaseException) -> str:
    """One line for an I/O error: its text, or its kind when it has none."""
    if isinstance(error, urllib.error.URLError) and not isinstance(error.reason, str):
        error = error.reason if isinstance(error.reason, BaseException) else error
    text = " ".join(str(error).split())
    return text or type(error).__name__
