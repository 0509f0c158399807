"""A small GitHub REST client for the runner endpoints gpu_runners uses, on urllib alone.

It mints JIT runner configs, finds, lists and deletes runner registrations, and reads a
workflow run's status, for a repository or an organisation runner scope. Every request has
a socket timeout; 5xx answers, 429s and network errors are retried with exponential backoff,
and rate limits are waited out (`Retry-After`, or `X-RateLimit-Reset` when the remaining
quota is 0) as long as the wait is bounded. Authentication and permission failures become
errors that say which token, which scope or permission, and which repository.

The client asks a `TokenSource` for its token on every request: a fixed token (the CLI), the
PAT in a mounted file, re-read when the kubelet rotates it, or a GitHub App's installation
tokens (gpu_runners.github_app). A 401 drops the source's token and retries once with a fresh
one, so a rotated credential takes over without a restart and without failing a request.
"""

from __future__ import annotations

import email.utils
import http.client
import json
import os
import random
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Protocol

from gpu_runners import contract
from gpu_runners.errors import (
    GitHubAuthError,
    GitHubConflictError,
    GitHubError,
    GitHubNotFoundError,
    GitHubRateLimitError,
    RunnerBusyError,
    UsageError,
)

DEFAULT_API_URL = "https://api.github.com"
API_VERSION = "2022-11-28"
USER_AGENT = "gpu-runners"
#: The "Default" runner group: the only group of a repository, and id 1 in every organisation.
DEFAULT_RUNNER_GROUP_ID = 1
PAGE_SIZE = 100  # GitHub's maximum per_page for the runner list
#: What re-running or cancelling a workflow run needs (the broker's preemption recovery).
ACTIONS_WRITE_HINT = (
    "a GitHub App or fine-grained token needs the repository permission Actions: write; a "
    "classic PAT the repo scope (GitHub also answers 403 for a run still in progress or past "
    "its re-run limits)"
)
_NEXT_LINK = re.compile(r'<([^>]+)>\s*;\s*rel="next"')


# --- Token -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Token:
    """A GitHub token and where it came from (named in errors, never the value).

    Attributes:
        value: The token itself.
        source: Where it came from, in words, e.g. "file /run/pat (GITHUB_PAT_FILE)".
        installation: Whether it is a GitHub App installation token (permission hints
            then name the App's permissions instead of a PAT's scopes).
    """

    value: str
    source: str
    installation: bool = False

    def __repr__(self) -> str:
        return f"Token(source={self.source!r})"


class TokenSource(Protocol):
    """Where a GitHubClient gets its token, asked again for every request."""

    def current(self) -> Token:
        """The token to send now.

        Raises:
            GpuRunnersError: No token can be had (a missing file, a refused App key).
        """
        ...

    def invalidate(self, rejected: Token) -> None:
        """Forgets `rejected`, which GitHub refused (401), if it is still the current one."""
        ...


@dataclass(frozen=True)
class FixedToken:
    """A token that never changes: the CLI's, the tests'."""

    token: Token

    def current(self) -> Token:
        """The one token."""
        return self.token

    def invalidate(self, rejected: Token) -> None:
        """Nothing to forget: there is no other token to try."""


class PatFile:
    """The PAT in a file, read again whenever the file changes.

    A Secret volume (not a subPath mount) is updated by the kubelet within about a minute of
    the Secret's change, by swapping a symlink to a fresh directory: the file's inode and
    mtime change, so a `stat` per request is enough to notice a rotated PAT.

    Args:
        path: The file holding the PAT.
        source: How errors name it; by default "file <path>".

    Raises:
        UsageError: The file cannot be read or is empty (checked once, at construction).
    """

    def __init__(self, path: Path, *, source: str | None = None) -> None:
        self._path = path
        self._source = source or f"file {path}"
        self._lock = threading.Lock()
        self._token: Token | None = None
        self._seen: tuple[int, int, int] | None = None
        self.current()

    def current(self) -> Token:
        """The PAT the file holds now (the last one read while the file is unchanged)."""
        with self._lock:
            try:
                stat = self._path.stat()
                seen = (stat.st_ino, stat.st_mtime_ns, stat.st_size)
                if self._token is not None and seen == self._seen:
                    return self._token
                value = self._path.read_text(encoding="utf-8").strip()
            except OSError as e:
                return self._last_good(f"cannot be read: {e.strerror}")
            if not value:
                return self._last_good("is empty")
            self._token, self._seen = Token(value, self._source), seen
            return self._token

    def invalidate(self, rejected: Token) -> None:
        """Reads the file again on the next request, changed or not."""
        with self._lock:
            self._seen = None

    def _last_good(self, problem: str) -> Token:
        # The kubelet swaps the files atomically, so a failing read is a moment's trouble: a
        # run in progress keeps the PAT it had rather than failing.
        if self._token is not None:
            return self._token
        raise UsageError(f"the PAT {self._source} {problem}")


def load_token(environ: Mapping[str, str]) -> Token:
    """Finds the PAT: the file named by GITHUB_PAT_FILE, the base runner's mount, then env.

    The file comes first because that is how the base runner receives it (a mounted Secret,
    never an env variable a job step could print); GITHUB_RUNNER_PAT (the seed guide's name)
    is preferred over GITHUB_TOKEN because in Actions the latter is usually the workflow
    token, which cannot manage runners.

    Args:
        environ: The process environment.

    Returns:
        The token and a description of its source.

    Raises:
        UsageError: The named file cannot be read or is empty, or no source has a token.
    """
    named_file = environ.get(contract.ENV_PAT_FILE)
    mounted = Path(contract.PAT_MOUNT_DIR) / contract.PAT_SECRET_KEY
    if named_file:
        try:
            value = Path(named_file).read_text(encoding="utf-8").strip()
        except OSError as e:
            raise UsageError(
                f"{contract.ENV_PAT_FILE} names {named_file}, which cannot be read: {e.strerror}"
            ) from e
        if not value:
            raise UsageError(f"{contract.ENV_PAT_FILE} names {named_file}, which is empty")
        return Token(value, f"file {named_file} ({contract.ENV_PAT_FILE})")
    if mounted.is_file():
        value = mounted.read_text(encoding="utf-8").strip()
        if value:
            return Token(value, f"file {mounted}")
    for name in (contract.ENV_PAT_SEED, contract.ENV_GITHUB_TOKEN):
        value = environ.get(name, "").strip()
        if value:
            return Token(value, f"env {name}")
    raise UsageError(
        f"no GitHub token: set {contract.ENV_PAT_FILE} to a file holding a PAT, mount one at "
        f"{mounted}, or set {contract.ENV_PAT_SEED} or {contract.ENV_GITHUB_TOKEN}"
    )


# --- Scope and results ---------------------------------------------------------------------------


@dataclass(frozen=True)
class RunnerScope:
    """Where GPU runners register: one repository, or an organisation.

    Attributes:
        repository: `owner/name` for repository runners (None for an organisation scope).
        organization: Organisation login for organisation runners (None for a repository).
    """

    repository: str | None = None
    organization: str | None = None

    def __post_init__(self) -> None:
        if (self.repository is None) == (self.organization is None):
            raise UsageError("give exactly one runner scope: --repository or --org")

    @property
    def path(self) -> str:
        """URL path prefix of the scope's runner endpoints."""
        if self.organization is not None:
            return f"/orgs/{urllib.parse.quote(self.organization)}"
        return f"/repos/{self.repository}"

    def describe(self) -> str:
        """Human words for the scope, as errors use them."""
        if self.organization is not None:
            return f"organisation {self.organization!r}"
        return f"repository {self.repository!r}"

    def permission_hint(self, *, write: bool, installation: bool = False) -> str:
        """What a token needs for this scope's runner endpoints, for 403 errors.

        Args:
            write: Whether the refused call changes runners.
            installation: Whether the token is a GitHub App installation token.
        """
        access = "read and write" if write else "read"
        if installation:
            permission = (
                "the organisation permission Self-hosted runners"
                if self.organization is not None
                else "the repository permission Administration"
            )
            return (
                f"the GitHub App needs {permission}: {access}, and its installation must "
                "cover the repository (accept the App's new permissions in the installation "
                "settings after changing them)"
            )
        if self.organization is not None:
            return (
                "a classic PAT needs the admin:org scope (and repo for private repositories); "
                f"a fine-grained token needs the organisation permission Self-hosted runners: "
                f"{access}"
            )
        return (
            "a classic PAT needs the repo scope; a fine-grained token needs the repository "
            f"permission Administration: {access}"
        )


@dataclass(frozen=True)
class Runner:
    """A self-hosted runner registration as GitHub reports it."""

    id: int
    name: str
    status: str  # "online" or "offline"
    busy: bool
    labels: tuple[str, ...] = ()

    @property
    def online(self) -> bool:
        """Whether the runner is connected to GitHub and can take a job."""
        return self.status == "online"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Runner:
        """Builds a Runner from GitHub's JSON representation."""
        return cls(
            id=int(data["id"]),
            name=str(data["name"]),
            status=str(data.get("status", "offline")),
            busy=bool(data.get("busy", False)),
            labels=tuple(str(label["name"]) for label in data.get("labels", ())),
        )


def _runner_entry(item: object) -> Runner:
    """A Runner from one entry of a runner list; ValueError naming what is wrong with it."""
    if not isinstance(item, Mapping):
        raise ValueError(f"an entry is a JSON {type(item).__name__}, not an object")
    runner_id, name = item.get("id"), item.get("name")
    if isinstance(runner_id, bool) or not isinstance(runner_id, int):
        raise ValueError(f"the entry named {name!r} has no integer id")
    if not isinstance(name, str) or not name:
        raise ValueError(f"the entry with id {runner_id} has no name")
    try:
        return Runner.from_json(item)
    except (KeyError, TypeError) as e:  # e.g. a label without a name
        raise ValueError(f"runner {name} (id {runner_id}): {type(e).__name__} {e}") from e


@dataclass(frozen=True)
class JitRunner:
    """A freshly registered JIT runner and its single-use config."""

    runner: Runner
    encoded_jit_config: str

    def __repr__(self) -> str:  # the config is a credential: keep it out of logs and tracebacks
        return f"JitRunner(runner={self.runner!r})"


@dataclass(frozen=True)
class RunStatus:
    """A workflow run's status ("queued", "in_progress", "completed", ...), conclusion, attempt.

    `attempt` is the run's latest attempt (`run_attempt`): it grows by one per re-run.
    """

    status: str
    conclusion: str | None
    attempt: int = 1

    @property
    def completed(self) -> bool:
        """Whether the run has ended; nothing of it will need a runner any more."""
        return self.status == "completed"


@dataclass(frozen=True)
class WorkflowJob:
    """One job of one attempt of a workflow run, as GitHub reports it.

    Attributes:
        id: The job id.
        name: The job's name.
        status: "queued", "in_progress", "completed" (or "waiting", "pending", ...).
        conclusion: "success", "failure", "cancelled", "skipped", ... once completed.
        runner_name: The runner GitHub assigned the job to; None while none has it.
        labels: The `runs-on` labels the job asked for.
        completed_at: When it completed (UTC), if it has.
    """

    id: int
    name: str
    status: str
    conclusion: str | None
    runner_name: str | None
    labels: tuple[str, ...] = ()
    completed_at: datetime | None = None

    @property
    def completed(self) -> bool:
        """Whether the job has ended."""
        return self.status == "completed"

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> WorkflowJob:
        """Builds a job from one entry of GitHub's job list; ValueError if it is not one."""
        job_id, status = data.get("id"), data.get("status")
        if isinstance(job_id, bool) or not isinstance(job_id, int):
            raise ValueError("a job has no integer id")
        if not isinstance(status, str):
            raise ValueError(f"job {job_id} has no status string")
        conclusion, runner = data.get("conclusion"), data.get("runner_name")
        labels = data.get("labels") or []
        completed_at = data.get("completed_at")
        return cls(
            id=job_id,
            name=str(data.get("name", "")),
            status=status,
            conclusion=conclusion if isinstance(conclusion, str) else None,
            runner_name=runner if isinstance(runner, str) and runner else None,
            labels=tuple(str(label) for label in labels if isinstance(label, str)),
            completed_at=_parse_time(completed_at) if isinstance(completed_at, str) else None,
        )


def _parse_time(text: str) -> datetime | None:
    try:
        moment = datetime.fromisoformat(text.replace("Z", "+00:00"))
    except ValueError:
        return None
    return moment if moment.tzinfo is not None else moment.replace(tzinfo=UTC)


@dataclass(frozen=True)
class RetryPolicy:
    """How hard the client tries before giving up.

    Attributes:
        attempts: Requests per call, the first included.
        backoff_base: First backoff in seconds; doubled per retry, with jitter.
        backoff_max: Longest single backoff.
        max_wait: Longest rate-limit wait honoured; a later reset is an error at once.
        timeout: Socket timeout of each request.
    """

    attempts: int = 5
    backoff_base: float = 0.5
    backoff_max: float = 20.0
    max_wait: float = 120.0
    timeout: float = 15.0


@dataclass(frozen=True)
class Response:
    """One answer of GitHub: status, headers (keys lower-cased) and the JSON body."""

    status: int
    headers: Mapping[str, str]
    body: Any


class GitHubTransport:
    """Requests to GitHub's REST API with timeouts, retries and rate-limit waits.

    5xx answers, 429s and network errors are retried with exponential backoff; rate limits
    are waited out while the wait is bounded. Any other answer is returned as it is, errors
    included, for the caller to explain in its own words.

    Args:
        api_url: `GITHUB_API_URL` (https://api.github.com or a GHES `/api/v3` URL).
        policy: Timeouts and retries.
        sleep: Waits between retries; replaceable so tests can observe the waits.

    Raises:
        UsageError: `api_url` is not an http(s) URL.
    """

    def __init__(
        self,
        api_url: str = DEFAULT_API_URL,
        *,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        if urllib.parse.urlsplit(api_url).scheme not in ("https", "http"):
            raise UsageError(
                f"{contract.ENV_API_URL}={api_url!r} is not an http(s) URL, e.g. "
                f"{DEFAULT_API_URL}"
            )
        self.api_url = api_url.rstrip("/")
        self.policy = policy or RetryPolicy()
        self.sleep = sleep

    def with_policy(self, policy: RetryPolicy) -> GitHubTransport:
        """A transport like this one with other timeouts and retries."""
        return GitHubTransport(self.api_url, policy=policy, sleep=self.sleep)

    def request(
        self,
        method: str,
        path: str,
        *,
        credential: str,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
    ) -> Response:
        """Sends one API request, retrying what is worth retrying.

        Args:
            method: HTTP method.
            path: Path below the API URL, e.g. /repos/acme/models/actions/runners.
            credential: The bearer token (a PAT, an installation token or an App JWT).
            query: Query parameters.
            body: JSON body.

        Returns:
            The final answer: a success, or an error GitHub does not ask to retry.

        Raises:
            GitHubError: GitHub stayed unreachable or kept failing (5xx) through every
                attempt.
            GitHubRateLimitError: The rate limit stays exhausted longer than the policy waits.
        """
        url = self.api_url + path
        if query:
            url += "?" + urllib.parse.urlencode(query)
        data = json.dumps(body).encode() if body is not None else None
        headers = {
            "Accept": "application/vnd.github+json",
            "Authorization": f"Bearer {credential}",
            "X-GitHub-Api-Version": API_VERSION,
            "User-Agent": USER_AGENT,
        }
        if data is not None:
            headers["Content-Type"] = "application/json"
        what = f"{method} {path}"
        for attempt in range(1, self.policy.attempts + 1):
            last = attempt == self.policy.attempts
            try:
                # S310: the URL is built from api_url, whose scheme __init__ checked.
                request = urllib.request.Request(url, data, headers, method=method)
                response = self._send(request)
            except (OSError, http.client.HTTPException) as e:
                # URLError, timeouts, refused and reset connections, truncated responses.
                if last:
                    raise GitHubError(
                        f"GitHub unreachable for {what} after {attempt} attempts: {_reason(e)}"
                    ) from e
                self.sleep(self._backoff(attempt))
                continue
            if response.status < 400:
                return response
            wait = self._retry_wait(response, attempt)
            if wait is None:
                return response
            if last:
                error = GitHubRateLimitError if response.status in (403, 429) else GitHubError
                raise error(
                    f"GitHub answered {response.status} for {what} {attempt} times: "
                    f"{_message(response.body)}",
                    status=response.status,
                )
            self.sleep(wait)
        raise AssertionError("unreachable: the last attempt returns or raises")

    def _send(self, request: urllib.request.Request) -> Response:
        try:
            with urllib.request.urlopen(request, timeout=self.policy.timeout) as answer:
                return Response(answer.status, _lower(answer.headers), _json(answer.read()))
        except urllib.error.HTTPError as e:
            with e:
                return Response(e.code, _lower(e.headers), _json(e.read()))

    def _backoff(self, attempt: int) -> float:
        ceiling = min(self.policy.backoff_max, self.policy.backoff_base * 2 ** (attempt - 1))
        # Full jitter: concurrent spawns hitting the same outage do not retry in lockstep.
        return random.uniform(ceiling / 2, ceiling)

    def _retry_wait(self, response: Response, attempt: int) -> float | None:
        """Seconds to wait before retrying this response, or None if the answer is final."""
        status, headers = response.status, response.headers
        limited = status in (403, 429)
        primary = limited and headers.get("x-ratelimit-remaining") == "0"
        # GitHub's secondary (abuse) limits answer 403 or 429 with Retry-After, or say so.
        secondary = limited and (
            "retry-after" in headers or "secondary rate limit" in _message(response.body).lower()
        )
        if status == 429 or primary or secondary:
            wait = _retry_after(headers)
            if wait is None and primary:
                wait = _until_reset(headers)
            if wait is None:
                wait = self._backoff(attempt)
            if wait > self.policy.max_wait:
                raise GitHubRateLimitError(
                    f"GitHub rate limit exhausted; it resets in {wait:.0f}s, longer than the "
                    f"{self.policy.max_wait:.0f}s this command waits",
                    status=status,
                )
            return wait
        if status >= 500:
            retry_after = _retry_after(headers)  # a 503 may say when to come back
            return retry_after if retry_after is not None else self._backoff(attempt)
        return None


class GitHubClient:
    """GitHub REST calls for runner management, retried and with clear errors.

    Args:
        tokens: The token, or where to get it for each request (`FixedToken`, `PatFile`,
            gpu_runners.github_app's installation tokens).
        scope: The repository or organisation runners register to.
        api_url: `GITHUB_API_URL` (https://api.github.com or a GHES `/api/v3` URL).
        policy: Timeouts and retries.
        sleep: Waits between retries; replaceable so tests can observe the waits.
    """

    def __init__(
        self,
        tokens: Token | TokenSource,
        scope: RunnerScope,
        *,
        api_url: str = DEFAULT_API_URL,
        policy: RetryPolicy | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self._tokens: TokenSource = FixedToken(tokens) if isinstance(tokens, Token) else tokens
        self.scope = scope
        self._transport = GitHubTransport(api_url, policy=policy, sleep=sleep)

    def with_policy(self, policy: RetryPolicy) -> GitHubClient:
        """A client like this one with other timeouts, e.g. short ones for cleanup on a signal.

        It shares this client's token source (and so an App's cached installation token).
        """
        transport = self._transport
        return GitHubClient(
            self._tokens, self.scope, api_url=transport.api_url, policy=policy,
            sleep=transport.sleep,
        )

    # --- runner endpoints --------------------------------------------------------------------

    def generate_jit_config(
        self, name: str, labels: Sequence[str], *, runner_group_id: int = DEFAULT_RUNNER_GROUP_ID
    ) -> JitRunner:
        """Registers a single-use runner and returns its JIT config.

        Args:
            name: Runner name (unique in the scope).
            labels: Custom labels of the runner (1 to 100).
            runner_group_id: Runner group; 1 (Default) for repository runners.

        Returns:
            The registration and its encoded config.

        Raises:
            GitHubConflictError: A runner with this name is registered already (409).
            GitHubError: Any other failure, after retries.
        """
        response = self._request(
            "POST",
            f"{self.scope.path}/actions/runners/generate-jitconfig",
            body={"name": name, "runner_group_id": runner_group_id, "labels": list(labels)},
            write=True,
        )
        return JitRunner(
            runner=Runner.from_json(response.body["runner"]),
            encoded_jit_config=str(response.body["encoded_jit_config"]),
        )

    def get_runner(self, runner_id: int) -> Runner | None:
        """Returns the runner with this id, or None when it is not registered (any more)."""
        try:
            response = self._request("GET", f"{self.scope.path}/actions/runners/{runner_id}")
        except GitHubNotFoundError:
            return None
        return Runner.from_json(response.body)

    def find_runner(self, name: str) -> Runner | None:
        """Returns the runner registered under exactly this name, or None."""
        for runner in self._runner_pages({"name": name}):
            if runner.name == name:
                return runner
        return None

    def list_runners(
        self, *, on_malformed: Callable[[str], None] | None = None
    ) -> Iterator[Runner]:
        """Yields every runner of the scope, page by page.

        Args:
            on_malformed: Called with a one-line description of each entry of GitHub's answer
                that is not a runner (no integer id, no name), which is then skipped: one bad
                entry need not hide every other runner. Without it, such an entry raises.

        Raises:
            GitHubError: A request failed, an answer holds no runner list, or (without
                `on_malformed`) an entry is not a runner.
        """
        yield from self._runner_pages({}, on_malformed)

    def delete_runner(self, runner_id: int) -> bool:
        """Removes a runner registration.

        Returns:
            True if it was removed, False if it was not registered (already gone).

        Raises:
            RunnerBusyError: The runner is running a job (422); retry once it has stopped.
        """
        what = f"{self.scope.path}/actions/runners/{runner_id}"
        try:
            self._request("DELETE", what, write=True)
        except GitHubNotFoundError:
            return False
        except GitHubError as e:
            if e.status == 422:  # GitHub's answer for a runner that is running a job
                raise RunnerBusyError(
                    f"runner {runner_id} is running a job: {e}", status=422
                ) from e
            raise
        return True

    def runner_group_id(self, name: str) -> int:
        """Returns the id of the organisation runner group with this name.

        Raises:
            UsageError: The scope is a repository, or no group has this name.
        """
        if self.scope.organization is None:
            raise UsageError("--runner-group applies to organisation runners (--org) only")
        path: str | None = f"{self.scope.path}/actions/runner-groups"
        query: dict[str, str] = {"per_page": str(PAGE_SIZE)}
        seen: list[str] = []
        while path is not None:
            response = self._request("GET", path, query=query)
            for group in response.body.get("runner_groups", ()):
                if group.get("name") == name:
                    return int(group["id"])
                seen.append(str(group.get("name")))
            path, query = self._next_page(response, path)
        raise UsageError(
            f"--runner-group: no runner group {name!r} in {self.scope.describe()}; "
            f"groups: {', '.join(seen) or 'none'}"
        )

    def get_run_status(self, repository: str, run_id: int) -> RunStatus | None:
        """Returns a workflow run's status, or None if GitHub does not know the run (404)."""
        try:
            response = self._request("GET", f"/repos/{repository}/actions/runs/{run_id}")
        except GitHubNotFoundError:
            return None
        body = response.body
        status = body.get("status") if isinstance(body, Mapping) else None
        conclusion = body.get("conclusion") if isinstance(body, Mapping) else None
        if not isinstance(status, str) or not (conclusion is None or isinstance(conclusion, str)):
            raise GitHubError(
                f"GitHub's answer about run {run_id} of {repository} has no status string"
            )
        attempt = body.get("run_attempt", 1)
        if isinstance(attempt, bool) or not isinstance(attempt, int) or attempt < 1:
            attempt = 1
        return RunStatus(status=status, conclusion=conclusion, attempt=attempt)

    # --- workflow run endpoints (the broker's preemption recovery) ----------------------------

    def list_run_jobs(self, repository: str, run_id: int, attempt: int) -> list[WorkflowJob]:
        """Every job of one attempt of a workflow run.

        Raises:
            GitHubNotFoundError: GitHub knows no such run or attempt.
            GitHubError: A request failed or an answer holds no job list.
        """
        jobs: list[WorkflowJob] = []
        path = f"/repos/{repository}/actions/runs/{run_id}/attempts/{attempt}/jobs"
        for page, items in self._pages(path, {}, "jobs"):
            for item in items:
                if not isinstance(item, Mapping):
                    raise GitHubError(f"GitHub's answer to GET {page} holds a non-object job")
                try:
                    jobs.append(WorkflowJob.from_json(item))
                except ValueError as e:
                    raise GitHubError(f"GitHub's answer to GET {page}: {e}") from e
        return jobs

    def rerun_failed_jobs(self, repository: str, run_id: int) -> None:
        """Re-runs the failed jobs of a completed run and the jobs that need them.

        Raises:
            GitHubAuthError: The token lacks Actions: write, or GitHub refuses the re-run (a
                run still in progress, or past its re-run limits).
            GitHubError: The request failed.
        """
        self._actions_write("POST", f"/repos/{repository}/actions/runs/{run_id}/rerun-failed-jobs",
                            body={})

    def cancel_run(self, repository: str, run_id: int) -> bool:
        """Cancels a workflow run; False when it had completed already (409).

        Raises:
            GitHubAuthError: The token lacks Actions: write.
            GitHubError: The request failed.
        """
        try:
            self._actions_write("POST", f"/repos/{repository}/actions/runs/{run_id}/cancel")
        except GitHubConflictError:
            return False
        return True

    def _actions_write(self, method: str, path: str,
                       body: Mapping[str, Any] | None = None) -> Response:
        return self._request(method, path, body=body, write=True, permission=ACTIONS_WRITE_HINT)

    # --- transport -----------------------------------------------------------------------------

    def _runner_pages(
        self, filters: Mapping[str, str], on_malformed: Callable[[str], None] | None = None
    ) -> Iterator[Runner]:
        for path, items in self._pages(f"{self.scope.path}/actions/runners", filters, "runners"):
            for item in items:
                try:
                    runner = _runner_entry(item)
                except ValueError as e:
                    problem = f"GitHub's answer to GET {path} holds a malformed runner: {e}"
                    if on_malformed is None:
                        raise GitHubError(problem) from e
                    on_malformed(problem)
                    continue
                yield runner

    def _pages(self, path: str, filters: Mapping[str, str],
               key: str) -> Iterator[tuple[str, list[Any]]]:
        """(path, the `key` list of one page) of a paginated list, page by page.

        Raises:
            GitHubError: A request failed, or a page holds no `key` list.
        """
        page: str | None = path
        query = {**filters, "per_page": str(PAGE_SIZE)}
        while page is not None:
            response = self._request("GET", page, query=query)
            body = response.body
            items = body.get(key) if isinstance(body, Mapping) else None
            if not isinstance(items, list):
                raise GitHubError(f"GitHub's answer to GET {page} holds no list of {key}")
            yield page, items
            page, query = self._next_page(response, page)

    def _next_page(self, response: Response, path: str) -> tuple[str | None, dict[str, str]]:
        """Path and query of the next page: the Link header's rel="next", as GitHub documents.

        Only the query of the link is used (page, per_page, filters), on the same path: the
        token is never sent to a host other than the API's.
        """
        match = _NEXT_LINK.search(response.headers.get("link", ""))
        if match is None:
            return None, {}
        link = match.group(1)
        api_url = self._transport.api_url
        if not link.startswith(api_url):
            raise GitHubError(f"GitHub's next-page link {link!r} leaves {api_url}")
        return path, dict(urllib.parse.parse_qsl(urllib.parse.urlsplit(link).query))

    def _request(
        self,
        method: str,
        path: str,
        *,
        query: Mapping[str, str] | None = None,
        body: Mapping[str, Any] | None = None,
        write: bool = False,
        permission: str | None = None,
    ) -> Response:
        token = self._tokens.current()
        response = self._transport.request(
            method, path, credential=token.value, query=query, body=body
        )
        if response.status == 401:
            # A rotated PAT, a revoked or expired installation token: ask the source for a
            # fresh token and try once more with it; the same token again means it is wrong.
            self._tokens.invalidate(token)
            fresh = self._tokens.current()
            if fresh.value != token.value:
                token = fresh
                response = self._transport.request(
                    method, path, credential=token.value, query=query, body=body
                )
        if response.status >= 400:
            raise self._error(response, f"{method} {path}", token, write=write,
                              permission=permission)
        return response

    def _error(
        self, response: Response, what: str, token: Token, *, write: bool,
        permission: str | None = None,
    ) -> GitHubError:
        status = response.status
        detail = _message(response.body)
        if status == 401:
            return GitHubAuthError(
                f"GitHub rejected the token from {token.source} for {what} "
                f"(401 {detail or 'Bad credentials'}): it is wrong, expired or revoked",
                status=status,
            )
        if status == 403:
            needed = response.headers.get("x-accepted-oauth-scopes")
            granted = response.headers.get("x-oauth-scopes")
            if needed is not None and granted is not None:
                hint = f"this needs the classic scope(s) {needed!r}; the token has {granted!r}"
            elif permission is not None:
                hint = permission
            else:
                hint = self.scope.permission_hint(write=write, installation=token.installation)
            return GitHubAuthError(
                f"GitHub refused {what} for the token from {token.source} "
                f"(403 {detail}): {hint}",
                status=status,
            )
        if status == 404:
            return GitHubNotFoundError(
                f"GitHub answered 404 for {what}: {self.scope.describe()} does not exist or the "
                f"token from {token.source} cannot see it (check --repository/--org, "
                f"{contract.ENV_REPOSITORY} and the token's repository access)",
                status=status,
            )
        if status == 409:
            return GitHubConflictError(f"GitHub answered 409 for {what}: {detail}", status=status)
        return GitHubError(f"GitHub answered {status} for {what}: {detail}", status=status)


def _lower(headers: Mapping[str, str] | Any) -> dict[str, str]:
    return {str(key).lower(): str(value) for key, value in headers.items()}


def _json(raw: bytes) -> Any:
    if not raw:
        return {}
    try:
        return json.loads(raw)
    except ValueError:
        return {"message": raw[:200].decode("utf-8", "replace")}


def _message(body: Any) -> str:
    return str(body.get("message", "")) if isinstance(body, dict) else ""


def _reason(error: BaseException) -> str:
    if isinstance(error, urllib.error.URLError):
        return str(error.reason)
    return str(error) or type(error).__name__


def _retry_after(headers: Mapping[str, str]) -> float | None:
    """Seconds from a Retry-After header: delta-seconds or an HTTP date."""
    value = headers.get("retry-after")
    if value is None:
        return None
    if value.strip().isdigit():
        return float(value)
    try:
        when = email.utils.parsedate_to_datetime(value)
    except (TypeError, ValueError):
        return None
    return max(0.0, when.timestamp() - time.time())


def _until_reset(headers: Mapping[str, str]) -> float | None:
    """Seconds until X-RateLimit-Reset (epoch seconds), plus one for clock skew."""
    value = headers.get("x-ratelimit-reset", "")
    if not value.isdigit():
        return None
    return max(0.0, int(value) - time.time() + 1)


def api_url_from(environ: Mapping[str, str]) -> str:
    """`GITHUB_API_URL`, or https://api.github.com outside Actions."""
    return environ.get(contract.ENV_API_URL) or DEFAULT_API_URL


def scope_from(
    *, repository: str | None, organization: str | None, environ: Mapping[str, str] = os.environ
) -> RunnerScope:
    """The runner scope: `--org`/GITHUB_ORG if given, else `--repository`/GITHUB_REPOSITORY.

    Raises:
        UsageError: Neither is known.
    """
    org = organization or environ.get(contract.ENV_ORGANIZATION)
    if org:
        return RunnerScope(organization=org)
    repo = repository or environ.get(contract.ENV_REPOSITORY)
    if not repo:
        raise UsageError(
            f"no runner scope: give --repository (or {contract.ENV_REPOSITORY}) or --org "
            f"(or {contract.ENV_ORGANIZATION})"
        )
    return RunnerScope(repository=repo)
