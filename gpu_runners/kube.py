"""Kubernetes access for gpu_runners: client loading, retried calls with clear errors, watches.

`load_api_client` uses the pod's ServiceAccount when running in a cluster (the base runner,
the reaper CronJob) and a kubeconfig otherwise. `KubeClient` wraps the few CoreV1 calls the
commands make: each has a request timeout, transient failures (5xx, 429, timeouts, dropped
connections) are retried with backoff, and API errors become domain errors that name the
verb, the resource and the namespace. `WatchFeed` runs Kubernetes watches, and follows of a
container's log, in background threads and hands what they see to the caller through one
queue, so a single loop can wait on pods, events, log lines and its own deadlines at once.
"""

from __future__ import annotations

import contextlib
import enum
import json
import queue
import random
import socket
import threading
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import urllib3
from kubernetes import config as kube_config
from kubernetes import watch as kube_watch
from kubernetes.client import (
    ApiClient,
    AuthenticationV1Api,
    Configuration,
    CoreV1Api,
    V1ConfigMap,
    V1DeleteOptions,
    V1Node,
    V1Pod,
    V1Secret,
    V1TokenReview,
    V1TokenReviewSpec,
    V1TokenReviewStatus,
)
from kubernetes.client.exceptions import ApiException
from kubernetes.config.config_exception import ConfigException

from gpu_runners import contract
from gpu_runners.errors import AlreadyExistsError, KubernetesError, QuotaExceededError

T = TypeVar("T")

_RETRIED_STATUSES = frozenset({429, 500, 502, 503, 504})
DEFAULT_PAGE_SIZE = 500
#: Longest log line matched, in bytes: a line is the job's own output too and can be huge
#: (a minified file, a progress bar without newlines); longer ones are skipped unread.
LOG_LINE_LIMIT = 4096
#: Lines re-read when a log follow re-connects, so a line written while it was down is seen
#: without reading the whole log again.
LOG_TAIL_ON_RECONNECT = 200
#: Seconds a followed log may stay silent before the follow re-connects: a real API server
#: sends nothing between lines, and a silent connection may be a dead one.
LOG_IDLE_SECONDS = 60.0
#: A follow that ended sooner than this (the container ended, the server closed it at once)
#: keeps its back-off growing instead of re-connecting in a tight loop.
LOG_HEALTHY_SECONDS = 10.0


def load_api_client(
    *, kubeconfig: str | None = None, context: str | None = None, environ: Mapping[str, str]
) -> ApiClient:
    """Returns an API client: in-cluster credentials by default, else a kubeconfig.

    Args:
        kubeconfig: `--kubeconfig`; when given, it wins over in-cluster credentials.
        context: `--context` inside the kubeconfig; None for its current context.
        environ: The process environment (KUBERNETES_SERVICE_HOST, KUBECONFIG).

    Returns:
        A configured client; nothing has been sent yet.

    Raises:
        KubernetesError: Neither source gives a usable configuration.
    """
    configuration = Configuration()
    try:
        if kubeconfig is None and environ.get("KUBERNETES_SERVICE_HOST"):
            # The loaders of the official client carry no type annotations.
            kube_config.load_incluster_config(configuration)
        else:
            path = kubeconfig or environ.get("KUBECONFIG") or str(Path.home() / ".kube/config")
            kube_config.load_kube_config(
                config_file=path, context=context, client_configuration=configuration
            )
    except (ConfigException, OSError) as e:
        raise KubernetesError(
            "cannot configure the Kubernetes client: not in a cluster (KUBERNETES_SERVICE_HOST "
            f"unset) and no usable kubeconfig (--kubeconfig, KUBECONFIG or ~/.kube/config): {e}"
        ) from e
    return ApiClient(configuration)


@dataclass(frozen=True)
class KubeTimeouts:
    """Per-request timeouts and retries of Kubernetes calls.

    Attributes:
        connect: Seconds to establish a connection.
        read: Seconds to wait for an answer.
        attempts: Requests per call, the first included.
        backoff_base: First backoff in seconds, doubled per retry.
    """

    connect: float = 5.0
    read: float = 30.0
    attempts: int = 4
    backoff_base: float = 0.25


#: For cleanup after a failure or a signal: GitHub Actions sends SIGKILL 7.5 s after SIGINT.
CLEANUP_TIMEOUTS = KubeTimeouts(connect=2.0, read=4.0, attempts=2, backoff_base=0.1)


def _status_message(error: ApiException) -> str:
    """The `message` of the Status object the API server sent, else the HTTP reason."""
    try:
        body = json.loads(error.body or "")
    except ValueError:
        body = None
    if isinstance(body, dict) and body.get("message"):
        return str(body["message"])
    return str(error.reason or "")


class KubeClient:
    """The CoreV1 calls gpu_runners makes, with timeouts, retries and domain errors.

    Args:
        api_client: From `load_api_client`.
        timeouts: Request timeouts and retries.
        sleep: Waits between retries.
    """

    def __init__(
        self,
        api_client: ApiClient,
        *,
        timeouts: KubeTimeouts | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.api_client = api_client
        self.core = CoreV1Api(api_client)
        self.timeouts = timeouts or KubeTimeouts()
        self._sleep = sleep

    def with_timeouts(self, timeouts: KubeTimeouts) -> KubeClient:
        """A client on the same connection pool with other timeouts (e.g. for cleanup)."""
        return KubeClient(self.api_client, timeouts=timeouts, sleep=self._sleep)

    # --- pods ----------------------------------------------------------------------------------

    def create_pod(self, namespace: str, pod: V1Pod) -> V1Pod:
        """Creates a pod.

        Raises:
            AlreadyExistsError: A pod of that name exists.
            QuotaExceededError: A ResourceQuota refused it.
            KubernetesError: Any other failure.
        """
        return self._call(f"create pods in namespace {namespace}", self.core.create_namespaced_pod,
                          namespace, pod)

    def read_pod(self, namespace: str, name: str) -> V1Pod | None:
        """Returns the pod, or None if it does not exist."""
        return self._read(f"get pods in namespace {namespace}", self.core.read_namespaced_pod,
                          name, namespace)

    def read_node(self, name: str) -> V1Node | None:
        """Returns the node, or None if it does not exist."""
        return self._read("get nodes", self.core.read_node, name)

    def delete_pod(self, namespace: str, name: str, *, grace_seconds: int | None = None) -> bool:
        """Deletes a pod; its owned Secret follows by garbage collection.

        Returns:
            False if the pod did not exist (already gone counts as done).
        """
        return self._delete(
            f"delete pods in namespace {namespace}", self.core.delete_namespaced_pod, name,
            namespace, grace_seconds,
        )

    def list_pods(
        self, namespace: str, label_selector: str, *, page_size: int = DEFAULT_PAGE_SIZE
    ) -> Iterator[V1Pod]:
        """Yields the pods matching a label selector, one page of `page_size` at a time."""
        what = f"list pods in namespace {namespace}"
        token: str | None = None
        while True:
            page = self._call(what, self.core.list_namespaced_pod, namespace,
                              label_selector=label_selector, limit=page_size, _continue=token)
            yield from page.items
            token = page.metadata.var_continue if page.metadata else None
            if not token:
                return

    # --- secrets -------------------------------------------------------------------------------

    def create_secret(self, namespace: str, secret: V1Secret) -> V1Secret:
        """Creates a Secret (see `create_pod` for the errors)."""
        return self._call(f"create secrets in namespace {namespace}",
                          self.core.create_namespaced_secret, namespace, secret)

    def read_secret(self, namespace: str, name: str) -> V1Secret | None:
        """Returns the Secret, or None if it does not exist."""
        return self._read(f"get secrets in namespace {namespace}",
                          self.core.read_namespaced_secret, name, namespace)

    def delete_secret(self, namespace: str, name: str) -> bool:
        """Deletes a Secret; False if it did not exist."""
        return self._delete(f"delete secrets in namespace {namespace}",
                            self.core.delete_namespaced_secret, name, namespace, None)

    # --- config maps (the broker's run records) -------------------------------------------------

    def create_config_map(self, namespace: str, config_map: V1ConfigMap) -> V1ConfigMap:
        """Creates a ConfigMap (AlreadyExistsError if one of that name exists)."""
        return self._call(f"create configmaps in namespace {namespace}",
                          self.core.create_namespaced_config_map, namespace, config_map)

    def read_config_map(self, namespace: str, name: str) -> V1ConfigMap | None:
        """Returns the ConfigMap, or None if it does not exist."""
        return self._read(f"get configmaps in namespace {namespace}",
                          self.core.read_namespaced_config_map, name, namespace)

    def replace_config_map(self, namespace: str, config_map: V1ConfigMap) -> V1ConfigMap:
        """Replaces a ConfigMap whose `metadata.resourceVersion` is still the stored one.

        Raises:
            AlreadyExistsError: 409: it changed since it was read (optimistic concurrency).
            KubernetesError: Any other failure (404 if it is gone).
        """
        name = config_map.metadata.name if config_map.metadata else ""
        return self._call(f"update configmaps in namespace {namespace}",
                          self.core.replace_namespaced_config_map, name, namespace, config_map)

    def list_config_maps(self, namespace: str, label_selector: str) -> list[V1ConfigMap]:
        """The ConfigMaps matching a label selector (all pages)."""
        what = f"list configmaps in namespace {namespace}"
        items: list[V1ConfigMap] = []
        token: str | None = None
        while True:
            page = self._call(what, self.core.list_namespaced_config_map, namespace,
                              label_selector=label_selector, limit=DEFAULT_PAGE_SIZE,
                              _continue=token)
            items.extend(page.items)
            token = page.metadata.var_continue if page.metadata else None
            if not token:
                return items

    def delete_config_map(self, namespace: str, name: str) -> bool:
        """Deletes a ConfigMap; False if it did not exist."""
        return self._delete(f"delete configmaps in namespace {namespace}",
                            self.core.delete_namespaced_config_map, name, namespace, None)

    # --- authentication ------------------------------------------------------------------------

    def review_token(self, token: str, audiences: Sequence[str]) -> V1TokenReviewStatus:
        """Asks the API server whom a bearer token belongs to, for `audiences` (TokenReview).

        `audiences` must name the caller's own audience: an empty list would check the token
        for the API server's audience instead. The caller must also find its audience in the
        answer's `audiences`. The token is sent, never put in an error.

        Raises:
            KubernetesError: The review could not be made (e.g. 403: no ClusterRole grants
                `create` on `tokenreviews`).
        """
        if not audiences:
            raise ValueError("review_token: name the audiences the token must be for")
        body = V1TokenReview(spec=V1TokenReviewSpec(token=token, audiences=list(audiences)))
        review = self._call("create tokenreviews (authentication.k8s.io)",
                            AuthenticationV1Api(self.api_client).create_token_review, body)
        return review.status or V1TokenReviewStatus()

    # --- waiting for a deletion ----------------------------------------------------------------

    def wait_pod_gone(self, namespace: str, name: str, uid: str | None, timeout: float) -> bool:
        """Waits, watching, until the pod (with this uid, if given) no longer exists.

        Returns:
            True once it is gone, False if it still exists after `timeout` seconds.
        """
        deadline = time.monotonic() + timeout
        while True:
            current = self.read_pod(namespace, name)
            if current is None or (uid is not None and current.metadata is not None
                                   and current.metadata.uid != uid):
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            version = current.metadata.resource_version if current.metadata else None
            try:
                for event in stream_watch(
                    self.core.list_namespaced_pod, namespace,
                    field_selector=f"metadata.name={name}", resource_version=version,
                    timeout_seconds=max(1, int(remaining)),
                    request_timeout=(self.timeouts.connect, remaining + self.timeouts.connect),
                ):
                    if event.type == "DELETED":
                        return True
            except KubernetesError as e:
                if e.status != 410:
                    raise
                # The version read is already too old to watch from: read again.

    # --- plumbing ------------------------------------------------------------------------------

    def _read(self, what: str, method: Callable[..., T], *args: Any) -> T | None:
        try:
            return self._call(what, method, *args)
        except KubernetesError as e:
            if e.status == 404:
                return None
            raise

    def _delete(
        self, what: str, method: Callable[..., Any], name: str, namespace: str,
        grace_seconds: int | None,
    ) -> bool:
        body = V1DeleteOptions(
            propagation_policy="Background", grace_period_seconds=grace_seconds
        )
        try:
            self._call(what, method, name, namespace, body=body)
        except KubernetesError as e:
            if e.status == 404:
                return False
            raise
        return True

    def _call(self, what: str, method: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        timeouts = self.timeouts
        for attempt in range(1, timeouts.attempts + 1):
            last = attempt == timeouts.attempts
            backoff = timeouts.backoff_base * 2 ** (attempt - 1) * random.uniform(0.5, 1.0)
            try:
                return method(*args, _request_timeout=(timeouts.connect, timeouts.read), **kwargs)
            except ApiException as e:
                if e.status in _RETRIED_STATUSES and not last:
                    self._sleep(_retry_after(e) or backoff)
                    continue
                raise _translate(e, what) from e
            except urllib3.exceptions.HTTPError as e:
                # Read timeouts, refused or reset connections: the request may or may not have
                # been applied; callers of create treat a 409 on retry as "mine already".
                if not last:
                    self._sleep(backoff)
                    continue
                raise KubernetesError(
                    f"Kubernetes API unreachable to {what} after {attempt} attempts: {e}"
                ) from e
        raise AssertionError("unreachable: the last attempt returns or raises")


def _retry_after(error: ApiException) -> float | None:
    headers = error.headers or {}
    value = headers.get("Retry-After") if hasattr(headers, "get") else None
    return float(value) if value is not None and str(value).isdigit() else None


def _translate(error: ApiException, what: str) -> KubernetesError:
    """Turns an API error into a domain error naming what was refused and why."""
    status = int(error.status or 0)
    message = _status_message(error)
    if status == 409:
        return AlreadyExistsError(f"cannot {what}: {message}", status=status)
    if status == 403 and "exceeded quota" in message:
        return QuotaExceededError(f"cannot {what}: {message}", status=status)
    if status == 403:
        return KubernetesError(
            f"not allowed to {what} (403: {message}); the Role bound to the base runner's "
            f"ServiceAccount ({contract.BASE_RUNNER_SERVICE_ACCOUNT}) must grant it",
            status=status,
        )
    if status == 401:
        return KubernetesError(
            f"the Kubernetes API rejected the credentials when trying to {what} (401: "
            f"{message}); check the kubeconfig or the ServiceAccount token",
            status=status,
        )
    return KubernetesError(f"cannot {what} ({status}: {message})", status=status)


# --- watches -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WatchEvent:
    """One watch event: ADDED, MODIFIED or DELETED and the object (a model instance), or a
    BOOKMARK (no object) that only moves the resource version on."""

    type: str
    object: Any
    resource_version: str | None


def stream_watch(
    list_method: Callable[..., Any],
    namespace: str,
    *,
    field_selector: str | None = None,
    label_selector: str | None = None,
    resource_version: str | None = None,
    timeout_seconds: int,
    request_timeout: tuple[float, float],
    on_open: Callable[[kube_watch.Watch], None] | None = None,
) -> Iterator[WatchEvent]:
    """Yields the events of one watch request until the server ends it (`timeout_seconds`).

    Without a resource_version the server first replays the current objects as ADDED, so the
    caller needs no separate list request.

    Raises:
        KubernetesError: The server refused the watch; status 410 means the resource_version
            is too old and the caller should watch again without one.
    """
    watcher = kube_watch.Watch()
    if on_open is not None:
        on_open(watcher)
    kwargs: dict[str, Any] = {
        "timeout_seconds": timeout_seconds,
        "_request_timeout": request_timeout,
    }
    if field_selector:
        kwargs["field_selector"] = field_selector
    if label_selector:
        kwargs["label_selector"] = label_selector
    if resource_version:
        kwargs["resource_version"] = resource_version
        # Bookmarks keep the resource_version fresh on quiet watches, sparing a 410 re-sync.
        kwargs["allow_watch_bookmarks"] = True
    try:
        for raw in watcher.stream(list_method, namespace, **kwargs):
            obj = raw["object"]
            if raw["type"] == "BOOKMARK":  # not deserialized by the client: a plain dict
                yield WatchEvent("BOOKMARK", None, obj["metadata"]["resourceVersion"])
                continue
            version = obj.metadata.resource_version if getattr(obj, "metadata", None) else None
            yield WatchEvent(raw["type"], obj, version)
    except ApiException as e:
        raise _translate(e, f"watch {list_method.__name__.replace('list_namespaced_', '')}s "
                            f"in namespace {namespace}") from e


class LogSignal(enum.Enum):
    """What a followed log tells: never the lines themselves (they are the job's output)."""

    FOLLOWING = "following"  # a follow request is open: new lines are being matched
    MATCHED = "matched"  # a line matched; the follow has ended
    UNREADABLE = "unreadable"  # the log cannot be read now; FeedItem.detail says why


@dataclass(frozen=True)
class FeedItem:
    """What a WatchFeed delivers: a watch event from a named source, that source's failure,
    or news of a followed log."""

    source: str
    event: WatchEvent | None = None
    error: KubernetesError | None = None
    log: LogSignal | None = None
    detail: str = ""


class WatchFeed:
    """Runs watches in daemon threads and merges their events into one queue.

    Each watch re-connects when the server ends it, resumes from the last resource version,
    and re-syncs (watching without a version, which replays the current objects) after a 410.
    A watch the server refuses (401/403/404) is reported once as a FeedItem with an error.
    A log follow (`follow_log`) reports LogSignal items instead: it never fails the feed.

    Args:
        kube: The client whose API the watches use.
        namespace: Namespace of every watch of this feed.
        window_seconds: Length of each watch request; the thread re-connects after it.
    """

    def __init__(self, kube: KubeClient, namespace: str, *, window_seconds: int = 60) -> None:
        self._kube = kube
        self._namespace = namespace
        self._window = window_seconds
        self._queue: queue.Queue[FeedItem] = queue.Queue()
        self._stop = threading.Event()
        self._threads: list[threading.Thread] = []
        self._watchers: dict[str, kube_watch.Watch] = {}
        self._log_responses: dict[str, urllib3.BaseHTTPResponse] = {}
        self._lock = threading.Lock()

    def watch_pods(self, source: str, *, field_selector: str | None = None,
                   label_selector: str | None = None) -> None:
        """Starts a watch on pods; its events arrive tagged with `source`."""
        self._start(source, self._kube.core.list_namespaced_pod, field_selector, label_selector)

    def watch_events(self, source: str, *, field_selector: str) -> None:
        """Starts a watch on core/v1 Events; its events arrive tagged with `source`."""
        self._start(source, self._kube.core.list_namespaced_event, field_selector, None)

    def follow_log(self, source: str, pod: str, *, container: str,
                   matches: Callable[[str], bool]) -> None:
        """Follows a container's log until a line satisfies `matches`.

        Items tagged `source` say FOLLOWING each time a follow request is open, MATCHED once
        (and the follow ends), or UNREADABLE with the reason when a request is refused or a
        stream breaks. It re-connects after a break (re-reading the last
        LOG_TAIL_ON_RECONNECT lines) and stops for good on 401/403/404. Lines are only
        matched (`matches` sees each one, decoded, without its newline), never kept; lines
        longer than LOG_LINE_LIMIT bytes are skipped.
        """
        thread = threading.Thread(
            target=self._follow, name=f"log-{source}", daemon=True,
            args=(source, pod, container, matches),
        )
        self._threads.append(thread)
        thread.start()

    def get(self, timeout: float) -> FeedItem | None:
        """Returns the next item, or None if none arrives within `timeout` seconds."""
        try:
            return self._queue.get(timeout=max(0.0, timeout))
        except queue.Empty:
            return None

    def close(self) -> None:
        """Stops every watch and waits briefly for the threads (they are daemons anyway)."""
        self._stop.set()
        with self._lock:
            watchers = list(self._watchers.values())
        for watcher in watchers:
            watcher.stop()
        with self._lock:
            responses = list(self._log_responses.values())
        for response in responses:
            _shut(response)
        for thread in self._threads:
            thread.join(timeout=2.0)

    def __enter__(self) -> WatchFeed:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def _start(self, source: str, method: Callable[..., Any], field_selector: str | None,
               label_selector: str | None) -> None:
        thread = threading.Thread(
            target=self._run, name=f"watch-{source}", daemon=True,
            args=(source, method, field_selector, label_selector),
        )
        self._threads.append(thread)
        thread.start()

    def _remember(self, source: str) -> Callable[[kube_watch.Watch], None]:
        def remember(watcher: kube_watch.Watch) -> None:
            with self._lock:
                self._watchers[source] = watcher
        return remember

    def _run(self, source: str, method: Callable[..., Any], field_selector: str | None,
             label_selector: str | None) -> None:
        version: str | None = None
        backoff = self._kube.timeouts.backoff_base
        timeouts = self._kube.timeouts
        while not self._stop.is_set():
            try:
                for event in stream_watch(
                    method, self._namespace, field_selector=field_selector,
                    label_selector=label_selector, resource_version=version,
                    timeout_seconds=self._window,
                    request_timeout=(timeouts.connect, self._window + timeouts.read),
                    on_open=self._remember(source),
                ):
                    version = event.resource_version or version
                    if event.type != "BOOKMARK":
                        self._queue.put(FeedItem(source, event=event))
                    backoff = timeouts.backoff_base
            except KubernetesError as e:
                if e.status == 410:
                    version = None  # too old: watch afresh, which replays the current state
                    continue
                if e.status in (401, 403, 404):
                    self._queue.put(FeedItem(source, error=e))
                    return
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)
            except Exception:  # a dropped or garbled stream, of any kind: re-connect
                if self._stop.is_set():
                    return
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 5.0)

    def _follow(self, source: str, pod: str, container: str,
                matches: Callable[[str], bool]) -> None:
        timeouts = self._kube.timeouts
        backoff = timeouts.backoff_base
        tail: int | None = None  # the first request reads the log from its start
        while not self._stop.is_set():
            opened = time.monotonic()
            try:
                if self._follow_once(source, pod, container, matches, tail):
                    self._queue.put(FeedItem(source, log=LogSignal.MATCHED))
                    return
            except ApiException as e:
                self._queue.put(FeedItem(source, log=LogSignal.UNREADABLE,
                                         detail=f"{e.status}: {_status_message(e)}"))
                if e.status in (401, 403, 404):
                    return  # not allowed, or the pod is gone: asking again will not help
            except urllib3.exceptions.ReadTimeoutError:
                pass  # silent for LOG_IDLE_SECONDS: re-connect, the lines missed are re-read
            except Exception as e:  # a refused, dropped or garbled stream, of any kind
                if self._stop.is_set():
                    return
                self._queue.put(FeedItem(source, log=LogSignal.UNREADABLE,
                                         detail=f"{type(e).__name__}: {e}"))
            tail = LOG_TAIL_ON_RECONNECT
            if time.monotonic() - opened >= LOG_HEALTHY_SECONDS:
                backoff = timeouts.backoff_base
            self._stop.wait(backoff)
            backoff = min(backoff * 2, 5.0)

    def _follow_once(self, source: str, pod: str, container: str,
                     matches: Callable[[str], bool], tail: int | None) -> bool:
        """One follow request; True if a line matched, False when the server ended it."""
        kwargs: dict[str, Any] = {"tail_lines": tail} if tail is not None else {}
        # Without preloading, the client returns the raw streaming response (its annotation
        # says str).
        response = cast(urllib3.BaseHTTPResponse, self._kube.core.read_namespaced_pod_log(
            pod, self._namespace, container=container, follow=True, _preload_content=False,
            _request_timeout=(self._kube.timeouts.connect, LOG_IDLE_SECONDS), **kwargs,
        ))
        with self._lock:
            self._log_responses[source] = response
        try:
            if self._stop.is_set():
                return False  # closed while the request was in flight
            self._queue.put(FeedItem(source, log=LogSignal.FOLLOWING))
            return any(matches(line) for line in bounded_lines(response, LOG_LINE_LIMIT))
        finally:
            with self._lock:
                self._log_responses.pop(source, None)
            # Closed, not returned to the pool: the rest of the stream is still unread.
            response.close()
            response.release_conn()


def bounded_lines(response: urllib3.BaseHTTPResponse, limit: int) -> Iterator[str]:
    """The lines of a streamed response as they arrive, without newlines; lines longer than
    `limit` bytes are skipped without being buffered whole."""
    buffer = bytearray()
    skipping = False  # inside a line already known to be too long
    for chunk in response.stream(amt=65536, decode_content=False):
        buffer += chunk
        while (end := buffer.find(b"\n")) >= 0:
            line = bytes(buffer[:end])
            del buffer[: end + 1]
            if skipping:
                skipping = False
            elif len(line) <= limit:
                yield line.rstrip(b"\r").decode("utf-8", errors="replace")
        if len(buffer) > limit:
            buffer.clear()
            skipping = True


def _shut(response: urllib3.BaseHTTPResponse) -> None:
    """Shuts a streaming response's socket so that a thread blocked reading it returns."""
    connection = getattr(response, "connection", None)
    sock = getattr(connection, "sock", None)
    if sock is not None:
        with contextlib.suppress(OSError):  # already closed: the reader is unblocked anyway
            sock.shutdown(socket.SHUT_RDWR)
