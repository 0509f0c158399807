"""The broker served over real HTTP against the fakes, and a small HTTP client for the tests.

`broker_environ` is the environment the stack's broker component would set, pointing at the
fake Kubernetes API (through KUBECONFIG), the fake GitHub and the fake OIDC issuer. The same
environment serves the broker in a thread of the test (`ServedBroker`) or as its own process
(`python -m gpu_runners.broker`, for the restart tests).
"""

from __future__ import annotations

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.parse
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import uvicorn
from starlette.applications import Starlette

from gpu_runners import broker_api, contract
from gpu_runners.broker.app import broker_app
from gpu_runners.broker.oidc import OidcVerifier
from gpu_runners.broker.runs import RunOperations
from gpu_runners.broker.settings import BrokerSettings
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.harness.mock_stack import REPO_ROOT
from tests.runtime.fake_wiring import IMAGE, github_client_for, kube_client_for

REPOSITORY_ID = "74"
OWNER_ID = "65"
GPU_POOLS = '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}]'
MAX_RUNTIME_MINUTES = 180


def broker_environ(kube: FakeKubernetes, github: FakeGitHub, issuer: FakeOidcIssuer,
                   scratch: Path, **overrides: str) -> dict[str, str]:
    """The broker's environment against the fakes; `overrides` replace variables by name."""
    assert kube.kubeconfig_path is not None
    pat = scratch / "github-credential"
    pat.write_text(github.token)
    env = {
        key: value for key, value in os.environ.items()
        if not key.startswith(("GITHUB_", "GPU_RUNNERS_", "KUBERNETES_"))
    }
    env.update({
        "KUBECONFIG": str(kube.kubeconfig_path),
        "PYTHONPATH": str(REPO_ROOT),
        contract.ENV_NAMESPACE: kube.namespace,
        contract.ENV_IMAGE: IMAGE,
        contract.ENV_GPU_POOLS: GPU_POOLS,
        contract.ENV_MAX_RUNTIME_MINUTES: str(MAX_RUNTIME_MINUTES),
        contract.ENV_REPOSITORY: f"{github.owner}/{github.repo}",
        contract.ENV_REPOSITORY_ID: REPOSITORY_ID,
        contract.ENV_REPOSITORY_OWNER_ID: OWNER_ID,
        contract.ENV_PAT_FILE: str(pat),
        contract.ENV_API_URL: github.url,
        contract.ENV_OIDC_ISSUER: issuer.issuer,
        contract.ENV_BROKER_AUDIENCE: issuer.audience,
        contract.ENV_GPU_CAP_PER_REPOSITORY: "4",
        contract.ENV_REAPER_INTERVAL_SECONDS: "3600",
        contract.ENV_BROKER_PORT: str(free_port()),
    })
    env.update(overrides)
    return env


def free_port() -> int:
    """A TCP port free on 127.0.0.1 now."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port: int = probe.getsockname()[1]
        return port


class ServedBroker:
    """The broker app served by uvicorn in a thread of the test, on 127.0.0.1."""

    def __init__(self, app: Starlette) -> None:
        self.app = app
        self._socket = socket.socket()
        self._socket.bind(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._socket.getsockname()[1]}"
        self._server = uvicorn.Server(uvicorn.Config(app, log_config=None, access_log=False,
                                                     lifespan="on"))
        self._thread = threading.Thread(target=self._server.run,
                                        kwargs={"sockets": [self._socket]}, daemon=True)

    @property
    def operations(self) -> RunOperations:
        """The broker's run operations (what is in flight)."""
        operations: RunOperations = self.app.state.operations
        return operations

    def start(self) -> ServedBroker:
        self._thread.start()
        deadline = time.monotonic() + 10
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the broker did not start serving")
            time.sleep(0.01)
        return self

    def stop(self) -> None:
        self._server.should_exit = True
        self._thread.join(timeout=15)
        self._socket.close()


def serve_broker(env: dict[str, str], kube: FakeKubernetes, github: FakeGitHub,
                 **options: Any) -> ServedBroker:
    """Builds the broker from `env` on the product's clients for the fakes and serves it."""
    settings = BrokerSettings.from_environ(env)
    app = broker_app(settings, kube=kube_client_for(kube), github=github_client_for(github),
                     verifier=OidcVerifier(settings.oidc_policy()), **options)
    return ServedBroker(app).start()


# --- the client side -----------------------------------------------------------------------


@dataclass
class Answer:
    """One answer of the broker: status, and the JSON body or the stream's events."""

    status: int
    body: Any = None
    events: list[broker_api.StreamEvent] | None = None

    @property
    def last(self) -> broker_api.StreamEvent:
        """The stream's last event."""
        assert self.events, f"no stream events (status {self.status}, body {self.body})"
        return self.events[-1]

    @property
    def progress(self) -> list[str]:
        """The stream's progress lines."""
        return [e.line for e in self.events or () if e.event == broker_api.PROGRESS]


def call(url: str, method: str, path: str, *, token: str | None = None,
         body: bytes | Iterable[bytes] | None = None, headers: dict[str, str] | None = None,
         timeout: float = 60.0) -> Answer:
    """One request; a spawn stream is read to its end. A body that is not bytes is sent
    chunked, without a Content-Length."""
    parts = urllib.parse.urlsplit(url)
    connection = http.client.HTTPConnection(parts.hostname or "127.0.0.1", parts.port,
                                            timeout=timeout)
    sent = dict(headers or {})
    if token is not None:
        sent["Authorization"] = f"Bearer {token}"
    if body is not None:
        sent.setdefault("Content-Type", "application/json")
    try:
        connection.request(method, path, body=body, headers=sent,
                           encode_chunked=body is not None and not isinstance(body, bytes))
        response = connection.getresponse()
        if response.getheader("Content-Type", "").startswith(broker_api.NDJSON):
            return Answer(response.status, events=list(_events(response)))
        raw = response.read()
        content_type = response.getheader("Content-Type", "")
        return Answer(response.status, json.loads(raw) if "json" in content_type
                      else raw.decode())
    finally:
        connection.close()


def _events(response: http.client.HTTPResponse) -> Iterator[broker_api.StreamEvent]:
    for raw in response:
        if raw.strip():
            yield broker_api.StreamEvent.decode(raw)


def spawn(url: str, token: str, ask: dict[str, Any] | None = None, **options: Any) -> Answer:
    """POST /v1/runner with a JSON ask (default: `{}`)."""
    return call(url, "POST", broker_api.RUNNER_PATH, token=token,
                body=json.dumps(ask or {}).encode(), **options)


def delete(url: str, token: str) -> Answer:
    """DELETE /v1/runner."""
    return call(url, "DELETE", broker_api.RUNNER_PATH, token=token)


class BrokerProcess:
    """`python -m gpu_runners.broker` as its own process, as the Deployment runs it."""

    def __init__(self, env: dict[str, str], log_path: Path) -> None:
        self.env = env
        self.url = f"http://127.0.0.1:{env[contract.ENV_BROKER_PORT]}"
        self._log_path = log_path
        self.process: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 20.0) -> BrokerProcess:
        """Starts it and waits until /healthz answers."""
        with self._log_path.open("ab") as log:
            self.process = subprocess.Popen([sys.executable, "-m", "gpu_runners.broker"],
                                            env=self.env, cwd=REPO_ROOT, stdout=log, stderr=log)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if call(self.url, "GET", broker_api.HEALTH_PATH, timeout=1).status == 200:
                    return self
            except OSError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the broker did not start:\n{self._log_path.read_text()}")
            time.sleep(0.05)

    def log_text(self) -> str:
        """What the broker processes of this log wrote (stdout and stderr)."""
        return self._log_path.read_text()

    def kill(self) -> None:
        """SIGKILL: no cleanup, no graceful anything."""
        if self.process is not None and self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGKILL)

    def wait_killed(self, timeout: float = 10.0) -> int:
        """Waits for the process to end; returns its status (-9 when killed)."""
        assert self.process is not None
        return self.process.wait(timeout)

    def terminate(self, timeout: float = 20.0) -> int:
        """SIGTERM, then waits; returns the exit status."""
        assert self.process is not None
        self.process.terminate()
        return self.process.wait(timeout)

    def stop(self) -> None:
        """Ends the process whatever its state (for teardown)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(10)


def spawn_until_cut(url: str, token: str, ask: dict[str, Any] | None = None) -> Answer | None:
    """POST /v1/runner to a broker about to be killed: the answer, or None if it was cut."""
    try:
        return spawn(url, token, ask, timeout=30)
    except (OSError, http.client.HTTPException, broker_api.ProtocolError):
        return None
