"""The lifecycle the HTTP fakes share: serve a handler on a free 127.0.0.1 port in a thread.

A fake subclasses `LoopbackServer`, names itself (`server_name`, shown in thread names and
errors) and builds its request handler class in `_handler_class()`; it gets `url`, `start()`,
`stop()` and use as a context manager. `_stopping` is set while it stops, so handlers that
sleep (an injected delay) or stream (an open spawn stream) can end at once.
"""

from __future__ import annotations

import abc
import http.server
import threading
from types import TracebackType
from typing import Self


class LoopbackServer(abc.ABC):
    """Serves `_handler_class()` on an ephemeral 127.0.0.1 port, from start() to stop()."""

    server_name = "fake"

    def __init__(self) -> None:
        self._stopping = threading.Event()
        self._server: http.server.ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    @abc.abstractmethod
    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        """The request handler class, bound to this fake's state."""

    @property
    def url(self) -> str:
        """`http://127.0.0.1:<port>`."""
        if self._server is None:
            raise RuntimeError(f"{self.server_name} is not started: call start() or use it in "
                               "a with block")
        host, port = self._server.server_address[:2]
        return f"http://{host!s}:{port}"

    def start(self) -> Self:
        """Starts serving on an ephemeral 127.0.0.1 port; returns self."""
        if self._server is not None:
            raise RuntimeError(f"{self.server_name} is already started")
        self._stopping.clear()
        server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), self._handler_class())
        server.daemon_threads = True  # a stream still open must not hold up stop()
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever,
                                        kwargs={"poll_interval": 0.05},
                                        name=self.server_name, daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        """Stops serving; handlers waiting on `_stopping` are released at once."""
        if self._server is None:
            return
        self._stopping.set()
        self._server.shutdown()
        self._server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._server = None
        self._thread = None

    def __enter__(self) -> Self:
        return self.start()

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None,
                 traceback: TracebackType | None) -> None:
        self.stop()
