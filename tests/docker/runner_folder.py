"""A runner folder laid out like the image's, with stand-ins for config.sh, run.sh and
bin/Runner.Listener.

docker/entrypoint.sh runs for real (bash, curl, jq) in such a folder. The stand-ins are small
Python scripts that record each start (arguments, environment, signal state) as one JSON line
in `calls.jsonl`, then act like the runner's scripts: config.sh writes `.runner` when it
registers and deletes it on `remove`; run.sh listens until INT or TERM, or exits at once with a
status the test chose.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parents[2]
ENTRYPOINT = REPO_ROOT / "docker" / "entrypoint.sh"
CALLS_FILE = "calls.jsonl"

_STAND_IN = '''#!{python}
"""Stand-in for the runner's {{script}}, written by tests/docker/runner_folder.py."""
import json
import os
import signal
import sys
from pathlib import Path

folder = Path(__file__).resolve().parent
# The listener lives in bin/; every stand-in records into the runner folder itself.
folder = folder.parent if folder.name == "bin" else folder
script = Path(__file__).name


def record(event, **fields):
    line = json.dumps({{"script": script, "event": event, "pid": os.getpid(), **fields}}) + "\\n"
    fd = os.open(folder / "{calls}", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line.encode())
    finally:
        os.close(fd)


sigint_ignored = signal.getsignal(signal.SIGINT) == signal.SIG_IGN
record(
    "start",
    argv=sys.argv[1:],
    env=dict(os.environ),
    sigint_ignored=sigint_ignored,
    own_process_group=os.getpgrp() == os.getpid(),
)

if script == "config.sh":
    exit_file = folder / "config.exit"
    if exit_file.exists():
        sys.exit(int(exit_file.read_text()))
    dot_runner = folder / ".runner"
    if sys.argv[1:2] == ["remove"]:
        dot_runner.unlink(missing_ok=True)
    elif dot_runner.exists():
        print("Cannot configure the runner because it is already configured.", file=sys.stderr)
        sys.exit(1)
    else:
        dot_runner.write_text(json.dumps({{"agentName": sys.argv[sys.argv.index("--name") + 1]}}))
    sys.exit(0)

behaviour_file = folder / "run.behaviour"
behaviour = behaviour_file.read_text().strip() if behaviour_file.exists() else "listen"
if behaviour.startswith("exit:"):
    sys.exit(int(behaviour.removeprefix("exit:")))


def stop(signum, frame):
    record("signal", signal=signal.Signals(signum).name)
    sys.exit(0)


signal.signal(signal.SIGTERM, stop)
if not sigint_ignored:
    signal.signal(signal.SIGINT, stop)
record("listening")
while True:
    signal.pause()
'''


def wait_until(condition: Callable[[], bool], what: str, timeout: float = 10.0) -> None:
    """Polls `condition` every 10 ms until it holds; fails naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what} did not happen within {timeout}s")
        time.sleep(0.01)


#: The stand-ins, relative to the runner folder. The listener is executed directly by an
#: injected runner's job container (gpu_runners/runner_injection.py); it behaves like run.sh.
STAND_INS = ("config.sh", "run.sh", "bin/Runner.Listener")


class RunnerFolder:
    """A temporary runner folder with recording stand-ins for config.sh, run.sh, the listener."""

    def __init__(self, path: Path, *, create: bool = True) -> None:
        """Lays out the folder at `path`; with create=False, only reads one laid out before
        (a copy of one, say)."""
        self.path = path
        if not create:
            return
        path.mkdir(parents=True, exist_ok=True)
        (path / "bin").mkdir(exist_ok=True)
        source = _STAND_IN.format(python=sys.executable, calls=CALLS_FILE)
        for script in STAND_INS:
            stand_in = path / script
            stand_in.write_text(source)
            stand_in.chmod(0o755)

    def run_exits_with(self, status: int) -> None:
        """Makes run.sh exit at once with `status` instead of listening for signals."""
        (self.path / "run.behaviour").write_text(f"exit:{status}")

    def config_fails_with(self, status: int) -> None:
        """Makes config.sh fail with `status`."""
        (self.path / "config.exit").write_text(str(status))

    def calls(self, script: str | None = None, event: str | None = None) -> list[dict[str, Any]]:
        """The recorded events, in order, optionally of one script and one event kind."""
        calls_file = self.path / CALLS_FILE
        if not calls_file.exists():
            return []
        events = [json.loads(line) for line in calls_file.read_text().splitlines()]
        return [
            e
            for e in events
            if (script is None or e["script"] == script) and (event is None or e["event"] == event)
        ]

    def starts(self, script: str) -> list[dict[str, Any]]:
        """Each start of `script`: its argv, environment and signal state."""
        return self.calls(script, "start")

    def recorded_pids(self) -> set[int]:
        """Every stand-in process that ever started here."""
        return {int(e["pid"]) for e in self.calls()}


@dataclass(frozen=True)
class EntrypointResult:
    """How an entrypoint run ended."""

    returncode: int
    stdout: str
    stderr: str
    seconds: float

    @property
    def output(self) -> str:
        """stdout and stderr together."""
        return self.stdout + self.stderr

    def error_lines(self) -> list[str]:
        """The `entrypoint: error:` lines the script printed."""
        return [line for line in self.stderr.splitlines() if line.startswith("entrypoint: error:")]


class EntrypointProcess:
    """docker/entrypoint.sh started with bash in a runner folder, with exactly `env`."""

    def __init__(self, folder: RunnerFolder, env: Mapping[str, str]) -> None:
        self.folder = folder
        # Files rather than pipes: a test can watch the log while the entrypoint runs.
        self.stdout_path = folder.path.parent / "entrypoint.stdout"
        self.stderr_path = folder.path.parent / "entrypoint.stderr"
        self.started = time.monotonic()
        with self.stdout_path.open("w") as stdout, self.stderr_path.open("w") as stderr:
            self.process = subprocess.Popen(
                ["bash", str(ENTRYPOINT)],
                cwd=folder.path,
                env=dict(env),
                stdin=subprocess.DEVNULL,
                stdout=stdout,
                stderr=stderr,
                # Its own session, so teardown can end whatever it started.
                start_new_session=True,
            )

    @property
    def pid(self) -> int:
        """Process id of the bash running the entrypoint."""
        return self.process.pid

    def wait_until_runner_listens(self, timeout: float = 10.0) -> None:
        """Blocks until run.sh has installed its signal handlers."""
        def listening_or_exited() -> bool:
            return bool(self.folder.calls("run.sh", "listening")) or self.process.poll() is not None

        wait_until(listening_or_exited, "run.sh listening", timeout)
        if self.process.poll() is not None:
            raise AssertionError(
                f"the entrypoint exited {self.process.returncode}:\n{self.stderr_path.read_text()}"
            )

    def wait_until_logged(self, text: str, timeout: float = 10.0) -> None:
        """Blocks until the entrypoint's stderr contains `text`."""
        wait_until(lambda: text in self.stderr_path.read_text(), f"log line {text!r}", timeout)

    def send(self, signum: signal.Signals) -> None:
        """Sends a signal to the entrypoint's bash, as the kubelet does to PID 1."""
        self.process.send_signal(signum)

    def finish(self, timeout: float = 20.0) -> EntrypointResult:
        """Waits for the entrypoint to exit and returns how it ended."""
        returncode = self.process.wait(timeout=timeout)
        return EntrypointResult(
            returncode,
            self.stdout_path.read_text(),
            self.stderr_path.read_text(),
            time.monotonic() - self.started,
        )

    def kill_leftovers(self) -> None:
        """Ends the entrypoint and the stand-ins it started, if a failed test left them."""
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait()
        for pid in self.folder.recorded_pids():
            try:
                # Only a stand-in of this folder: its pid may have been reused since it exited.
                cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
                if str(self.folder.path).encode() in cmdline:
                    os.kill(pid, signal.SIGKILL)
            except (FileNotFoundError, ProcessLookupError):
                pass
