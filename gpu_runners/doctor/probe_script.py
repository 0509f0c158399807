"""The network and image probe run inside the runner image, in the runner namespace.

The doctor sends this file's source as `python3 -c <source>` (standard library only, so it
runs in any image with python3, whichever gpu_runners version that image carries). It reads
its targets from the DOCTOR_PROBE environment variable, tries each one (DNS, TCP connect,
then a verified TLS handshake where asked) and asks the image's Actions runner for its
version. Each finding is one stdout line: MARKER followed by a JSON object. It exits 0 once
every finding is printed; the findings, not the exit code, say what failed.
"""

from __future__ import annotations

import json
import os
import socket
import ssl
import subprocess
import sys
from typing import Any

MARKER = "gpu-runners-doctor-probe "
ENV_PROBE = "DOCTOR_PROBE"
#: A target without a host means the Kubernetes API server, as the kubelet tells every pod.
API_SERVER_HOST_ENV = "KUBERNETES_SERVICE_HOST"
API_SERVER_PORT_ENV = "KUBERNETES_SERVICE_PORT"
CONNECT_TIMEOUT = 5.0


def emit(finding: dict[str, Any]) -> None:
    """Prints one finding line and flushes it (the doctor reads the container's log)."""
    print(MARKER + json.dumps(finding, sort_keys=True), flush=True)


def probe_target(name: str, host: str, port: int, tls: bool) -> dict[str, Any]:
    """Resolves, connects to and (if `tls`) handshakes with one target."""
    finding: dict[str, Any] = {"target": name, "host": host, "port": port, "ok": False}
    try:
        addresses = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except OSError as e:
        finding.update(stage="dns", detail=f"cannot resolve {host}: {e}")
        return finding
    address = addresses[0][4]
    try:
        connection = socket.create_connection((host, port), timeout=CONNECT_TIMEOUT)
    except OSError as e:
        finding.update(stage="connect", detail=f"cannot connect to {host}:{port} "
                                               f"({address[0]}): {e}")
        return finding
    with connection:
        if tls:
            try:
                context = ssl.create_default_context()
                with context.wrap_socket(connection, server_hostname=host):
                    pass
            except (OSError, ssl.SSLError) as e:
                finding.update(stage="tls", detail=f"TLS handshake with {host}:{port} failed: {e}")
                return finding
    finding.update(ok=True, stage="done",
                   detail=f"connected to {host}:{port} ({address[0]})"
                          + (", TLS verified" if tls else ""))
    return finding


def runner_version(listener: str) -> dict[str, Any]:
    """Asks the image's Actions runner for its version (`Runner.Listener --version`)."""
    try:
        # S603: the path is the doctor's constant for the image's runner, not user input.
        done = subprocess.run([listener, "--version"], capture_output=True, text=True,  # noqa: S603
                              timeout=60, check=False)
    except (OSError, subprocess.TimeoutExpired) as e:
        return {"runner_version": None, "detail": f"cannot run {listener} --version: {e}"}
    version = done.stdout.strip().splitlines()[-1].strip() if done.stdout.strip() else ""
    if done.returncode != 0 or not version:
        return {"runner_version": None,
                "detail": f"{listener} --version exited {done.returncode}: "
                          f"{done.stderr.strip()[:200]}"}
    return {"runner_version": version}


def main() -> int:
    """Probes every target named in DOCTOR_PROBE and prints the findings."""
    settings = json.loads(os.environ[ENV_PROBE])
    for target in settings["targets"]:
        host = target["host"] or os.environ.get(API_SERVER_HOST_ENV, "")
        port = int(target["port"] or os.environ.get(API_SERVER_PORT_ENV, "443"))
        if not host:
            emit({"target": target["name"], "host": "", "port": port, "ok": False,
                  "stage": "dns", "detail": f"{API_SERVER_HOST_ENV} is not set in the pod"})
            continue
        emit(probe_target(target["name"], host, port, bool(target["tls"])))
    emit(runner_version(settings["runner_listener"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
