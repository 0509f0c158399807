"""Human-readable progress lines, each stamped with the seconds since the command started."""

from __future__ import annotations

import re
import sys
import threading
import time
from collections.abc import Callable
from typing import TextIO

# The stamp `ProgressLog.line` puts before each line: `[  12.3s] `.
_STAMP = re.compile(r"^\[\s*\d+(?:\.\d+)?s\]\s+")


def unstamped(text: str) -> str:
    """`text` without the leading elapsed-time stamp of a `ProgressLog` line, if it has one.

    For lines relayed from another log (the broker's spawn stream): that log's clock started
    when the broker began the spawn, perhaps for an earlier request, so the relaying log puts
    its own stamp instead of showing two.
    """
    return _STAMP.sub("", text, count=1)


class ProgressLog:
    """Writes `[  12.3s] scheduled on node ...` lines and flushes each one.

    Flushing matters: the GitHub Actions log shows a step's output as it arrives, and a user
    watching a GPU node come up should see each stage when it happens, not at the end.

    Args:
        stream: Where lines go (stdout by default; None discards them, for library use).
        clock: Monotonic clock, replaceable in tests.
        prefix: Put before each line (e.g. the runner name when many spawns share a stream).
        sink: Also called with each rendered line (e.g. the broker's per-run event stream).
    """

    def __init__(
        self,
        stream: TextIO | None = sys.stdout,
        *,
        clock: Callable[[], float] = time.monotonic,
        prefix: str = "",
        sink: Callable[[str], None] | None = None,
    ) -> None:
        self._stream = stream
        self._clock = clock
        self._start = clock()
        self._prefix = prefix
        self._sink = sink
        self._lock = threading.Lock()
        self.lines: list[str] = []

    @property
    def start(self) -> float:
        """The clock reading the elapsed times count from."""
        return self._start

    def elapsed(self) -> float:
        """Seconds since the log was created."""
        return self._clock() - self._start

    def line(self, text: str) -> None:
        """Writes one progress line (newlines in `text` are flattened to keep it one line)."""
        flat = " ".join(text.split())
        rendered = f"[{self.elapsed():7.1f}s] {self._prefix}{flat}"
        with self._lock:
            self.lines.append(rendered)
            if self._stream is not None:
                self._stream.write(rendered + "\n")
                self._stream.flush()
            if self._sink is not None:
                self._sink(rendered)
