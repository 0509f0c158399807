"""The probe the doctor runs inside the runner image, run here for real as `python3 -c`.

Local sockets stand in for GitHub, the registry and the API server; a small script stands in
for the image's Runner.Listener. The findings are read back with the doctor's own parser.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gpu_runners.doctor import probe_script
from gpu_runners.doctor.probe import findings


@pytest.fixture
def listening() -> Iterator[int]:
    """A port on 127.0.0.1 that accepts connections, and answers anything with junk."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen()
    stop = threading.Event()

    def serve() -> None:
        server.settimeout(0.1)
        while not stop.is_set():
            try:
                connection, _ = server.accept()
            except OSError:
                continue
            with connection:
                connection.sendall(b"HTTP/1.0 400 Bad Request\r\n\r\n")

    thread = threading.Thread(target=serve, daemon=True)
    thread.start()
    yield int(server.getsockname()[1])
    stop.set()
    thread.join(timeout=2)
    server.close()


def closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def run_probe(settings: dict[str, Any], extra_env: dict[str, str]) -> list[dict[str, Any]]:
    source = Path(probe_script.__file__).read_text(encoding="utf-8")
    env = {"PATH": os.environ.get("PATH", ""), probe_script.ENV_PROBE: json.dumps(settings),
           **extra_env}
    done = subprocess.run([sys.executable, "-c", source], env=env, capture_output=True,
                          text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    return findings(done.stdout.splitlines())


def listener_script(tmp_path: Path, body: str) -> str:
    path = tmp_path / "Runner.Listener"
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)
    return str(path)


def test_each_target_is_reported_with_the_stage_it_failed_at(
    listening: int, tmp_path: Path,
) -> None:
    settings = {
        "targets": [
            {"name": "reachable", "host": "127.0.0.1", "port": listening, "tls": False},
            {"name": "refused", "host": "127.0.0.1", "port": closed_port(), "tls": False},
            {"name": "unresolvable", "host": "doctor-probe.invalid", "port": 443, "tls": True},
            {"name": "not TLS", "host": "127.0.0.1", "port": listening, "tls": True},
        ],
        "runner_listener": listener_script(tmp_path, 'echo "2.330.0"'),
    }

    found = {item.get("target", "runner"): item for item in run_probe(settings, {})}

    assert found["reachable"]["ok"] is True
    assert found["reachable"]["detail"] == f"connected to 127.0.0.1:{listening} (127.0.0.1)"
    assert (found["refused"]["ok"], found["refused"]["stage"]) == (False, "connect")
    assert (found["unresolvable"]["ok"], found["unresolvable"]["stage"]) == (False, "dns")
    assert (found["not TLS"]["ok"], found["not TLS"]["stage"]) == (False, "tls")
    assert found["runner"] == {"runner_version": "2.330.0"}


def test_the_api_server_target_is_the_pods_kubernetes_service(
    listening: int, tmp_path: Path,
) -> None:
    settings = {"targets": [{"name": "api", "host": "", "port": 0, "tls": False}],
                "runner_listener": listener_script(tmp_path, "exit 3")}
    pod_env = {probe_script.API_SERVER_HOST_ENV: "127.0.0.1",
               probe_script.API_SERVER_PORT_ENV: str(listening)}

    api, runner = run_probe(settings, pod_env)
    unset, _ = run_probe(settings, {})

    assert api["ok"] is True and api["port"] == listening
    assert (unset["ok"], unset["stage"]) == (False, "dns")
    assert "KUBERNETES_SERVICE_HOST is not set" in unset["detail"]
    assert runner["runner_version"] is None
    assert "exited 3" in runner["detail"]
