"""A stateful fake of the GitHub REST endpoints this project calls, served over real HTTP.

`FakeGitHub` listens on 127.0.0.1 (an ephemeral port) in a daemon thread and answers the
runner, workflow-run, runner-group, repository and fork-PR-settings routes of one repository
(and, optionally, one organisation) the way api.github.com does: the same paths, status codes,
JSON bodies, error bodies (`{"message", "documentation_url", "status"}`) and pagination `Link`
headers. Tests drive its state directly (`add_runner`, `set_runner_status`, `set_run_status`)
and queue faults with `inject` to reproduce outages, rate limits, slow answers and dropped
connections on any route.

Workflow jobs (see `add_job`): each run has attempts, each attempt its jobs. GitHub's dispatch
is emulated: a queued job whose needs have completed goes to the first online, idle runner
carrying all its labels, whenever a job is queued or a runner comes online or idles. Tests end
jobs (`complete_job`, `finish_job`), lose runners (`lose_runner`, then `fail_lost_job`), and the
client re-runs failed jobs (`rerun-failed-jobs`: a new attempt with the failed jobs and their
dependents queued again, with their original labels) or cancels runs.

GitHub Apps (see `register_app`, `install_app`): the fake mints installation tokens for App
JWTs it verifies (tests/fakes/github_app_auth.py) and accepts them on every route like the PAT,
within the permissions and repositories they were narrowed to, until they expire on the fake's
`clock` or are revoked.

Shapes follow GitHub's REST docs ("Self-hosted runners", "Workflow runs", "Self-hosted runner
groups", "GitHub Actions permissions") and octokit's endpoint list. Where GitHub documents a
status but not its wording, the message imitates what GitHub is reported to answer.
"""

from __future__ import annotations

import base64
import http.server
import json
import re
import secrets
import threading
import time
import urllib.parse
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from http import HTTPStatus
from typing import Any

from tests.fakes.github_app_auth import (
    AppAuthority,
    FakeApp,
    FakeInstallation,
    IssuedToken,
    Refusal,
    allows,
    required_permission,
    token_answer,
)
from tests.fakes.loopback_server import LoopbackServer

DOCS = "https://docs.github.com/rest"
DOCS_RUNNERS = f"{DOCS}/actions/self-hosted-runners"
DOCS_RUNS = f"{DOCS}/actions/workflow-runs#get-a-workflow-run"
DOCS_JOBS = f"{DOCS}/actions/workflow-jobs"
DOCS_PERMISSIONS = f"{DOCS}/actions/permissions"
DOCS_RUNNER_GROUPS = f"{DOCS}/actions/self-hosted-runner-groups"
DOCS_REPOS = f"{DOCS}/repos/repos#get-a-repository"

#: GitHub's "Default" runner group: the one group of a repository, id 1 in every organisation.
DEFAULT_RUNNER_GROUP_ID = 1
#: `per_page` when the request gives none (GitHub's documented default).
DEFAULT_PAGE_SIZE = 30
#: Labels GitHub assigns itself; it reports them as "read-only", any other label as "custom".
READ_ONLY_LABELS = frozenset({"self-hosted", "linux", "windows", "macos", "x64", "arm", "arm64"})
RUN_STATUSES = frozenset(
    {"requested", "queued", "pending", "waiting", "in_progress", "action_required", "completed"}
)
RUN_CONCLUSIONS = frozenset(
    {
        "success",
        "failure",
        "neutral",
        "cancelled",
        "skipped",
        "timed_out",
        "action_required",
        "stale",
    }
)
RUNNER_STATUSES = frozenset({"online", "offline"})
FORK_PR_SETTINGS_KEYS = (
    "run_workflows_from_fork_pull_requests",
    "send_write_tokens_to_workflows",
    "send_secrets_and_variables",
    "require_approval_for_fork_pr_workflows",
)
MAX_JIT_LABELS = 100  # generate-jitconfig accepts 1 to 100 labels
#: "A workflow run can be re-run a maximum of 50 times" (full and partial re-runs alike).
MAX_RERUNS = 50
JOB_CONCLUSIONS = frozenset({"success", "failure", "cancelled", "skipped", "neutral", "timed_out"})



@dataclass
class RecordedRequest:
    """One request the fake received, as the client sent it.

    Attributes:
        method: HTTP method, upper case.
        path: URL path without the query string.
        query: Query parameters, each with every value given.
        headers: Request headers, keys lower-cased.
        body: The JSON body parsed, or None when there was none (or it was not JSON).
    """

    method: str
    path: str
    query: dict[str, list[str]]
    headers: dict[str, str]
    body: Any


@dataclass
class _Fault:
    method: str  # upper case, or "*" for any method
    pattern: re.Pattern[str]
    status: int | None
    remaining: int
    headers: dict[str, str]
    body: Any
    delay: float
    drop: bool

    def matches(self, method: str, path: str) -> bool:
        return self.method in ("*", method) and self.pattern.search(path) is not None


@dataclass
class _Answer:
    status: int
    body: Any = None  # JSON-serialisable; None sends no body
    headers: dict[str, str] = field(default_factory=dict)


class _DropConnectionError(Exception):
    """Raised inside the handler to close the connection without an answer."""


def _error(status: int, message: str, documentation_url: str = DOCS) -> _Answer:
    # GitHub's error body; it has carried the status as a string since 2024.
    body = {"message": message, "documentation_url": documentation_url, "status": str(status)}
    return _Answer(status, body)


def _not_found(documentation_url: str = DOCS) -> _Answer:
    return _error(404, "Not Found", documentation_url)


def _validation_failed(message: str, documentation_url: str) -> _Answer:
    return _error(422, f"Invalid request.\n\n{message}", documentation_url)


def _now() -> datetime:
    return datetime.now(UTC)


def _timestamp(moment: datetime) -> str:
    return moment.isoformat(timespec="milliseconds")


def _int_param(values: list[str] | None, default: int) -> int:
    # GitHub ignores a malformed or non-positive page parameter and uses its default.
    if not values:
        return default
    try:
        number = int(values[-1])
    except ValueError:
        return default
    return number if number > 0 else default


class FakeGitHub(LoopbackServer):
    """A fake api.github.com for one repository (and optionally one organisation).

    Runners live in one pool, served under both the repository and the organisation runner
    routes; a test uses one scope at a time. Every request is recorded in `requests` before
    it is answered, including requests answered by an injected fault or refused for auth.

    Args:
        token: The only token the fake accepts (`Bearer <token>` or `token <token>`).
        owner: Owner of the repository the fake serves.
        repo: Name of that repository.
        org: Organisation whose `/orgs/{org}` runner routes the fake serves; None serves none.
        private: Whether the repository is private (public repositories have no fork PR
            workflow settings: GitHub answers 422).
        page_size_max: Largest `per_page` honoured; larger values are clamped, as GitHub does
            with 100.
    """

    server_name = "fake-github"

    def __init__(
        self,
        *,
        token: str = "ghp_fake",
        owner: str = "acme",
        repo: str = "models",
        org: str | None = None,
        private: bool = True,
        page_size_max: int = 100,
    ) -> None:
        super().__init__()
        if page_size_max < 1:
            raise ValueError(f"page_size_max must be at least 1, got {page_size_max}")
        self.token = token
        self.owner = owner
        self.repo = repo
        self.org = org
        self.private = private
        self.page_size_max = page_size_max
        self.requests: list[RecordedRequest] = []
        self.runners: dict[int, dict[str, Any]] = {}
        self.workflow_runs: dict[int, dict[str, Any]] = {}
        self.runner_groups: dict[int, dict[str, Any]] = {
            DEFAULT_RUNNER_GROUP_ID: {
                "id": DEFAULT_RUNNER_GROUP_ID,
                "name": "Default",
                "visibility": "all",
                "default": True,
                "inherited": False,
                "allows_public_repositories": False,
                "restricted_to_workflows": False,
                "selected_workflows": [],
            }
        }
        # GitHub's defaults for a private repository: fork PRs run no workflows.
        self.fork_pr_settings: dict[str, bool] = dict.fromkeys(FORK_PR_SETTINGS_KEYS, False)
        #: Every registration / remove token issued, in order (what config.sh would receive).
        self.registration_tokens: list[str] = []
        self.remove_tokens: list[str] = []
        #: runner id -> the encoded JIT config issued for it.
        self.jit_configs: dict[int, str] = {}
        #: The numeric ids `GET /repos/{owner}/{repo}` reports for the repository and its owner.
        self.repository_id = 1296269
        self.owner_id = 1342004
        #: What `X-OAuth-Scopes` says on every authorised answer, as GitHub does for a classic
        #: PAT (e.g. "repo, workflow"); None sends no such header, as for fine-grained tokens.
        self.oauth_scopes: str | None = None
        #: "owner/name" -> its releases, newest first (see `add_release`); served for any
        #: repository, not only the fake's own (the runner's releases live in actions/runner).
        self.releases: dict[str, list[dict[str, Any]]] = {}
        self._next_release_id = 1
        #: Seconds since the epoch, for installation tokens and App JWTs; tests may move it.
        self.clock: Callable[[], float] = time.time
        #: The registered GitHub Apps, their installations and the tokens minted for them.
        self.app_authority = AppAuthority()
        self._faults: list[_Fault] = []
        self._callbacks: list[Callable[[RecordedRequest], None]] = []
        self._next_runner_id = 1
        self._next_label_id = 1
        #: run id -> its attempts' jobs, attempt 1 first (see `add_job`, `jobs`).
        self._attempts: dict[int, list[list[dict[str, Any]]]] = {}
        #: job id -> the names of the jobs it needs (the workflow's `needs`; not in the JSON).
        self._needs: dict[int, tuple[str, ...]] = {}
        self._next_job_id = 1
        # One lock for all state: handler threads and the test thread both mutate it.
        self._changed = threading.Condition(threading.RLock())

    # --- test controls ---------------------------------------------------------------------

    def inject(
        self,
        method: str,
        path_pattern: str,
        status: int | None,
        *,
        times: int = 1,
        headers: dict[str, str] | None = None,
        body: Any = None,
        delay: float = 0.0,
        drop: bool = False,
    ) -> None:
        """Queues a fault answered before auth and routing, for the next `times` matches.

        Faults are tried in the order queued; the first whose method and path match answers.

        Args:
            method: HTTP method to match, or "*" for any.
            path_pattern: Regular expression searched (`re.search`) in the request path,
                without the query string.
            status: Status to answer; None with `drop` closes the connection without an
                answer, None with only `delay` answers normally after the delay.
            times: How many matching requests the fault answers.
            headers: Extra response headers (e.g. `Retry-After`, `X-RateLimit-Remaining`).
            body: JSON body; by default GitHub's error body with the status's reason phrase.
            delay: Seconds to wait before answering (or dropping), to provoke timeouts.
            drop: Close the connection without a response (a network error for the client).

        Raises:
            ValueError: The combination cannot be served (see above).
        """
        if times < 1:
            raise ValueError(f"inject: times must be at least 1, got {times}")
        if delay < 0:
            raise ValueError(f"inject: delay must be >= 0 seconds, got {delay}")
        if drop and status is not None:
            raise ValueError("inject: drop=True closes the connection; give status=None")
        if status is None and not drop and delay == 0:
            raise ValueError("inject: status=None needs drop=True or a delay > 0")
        if status is not None and not 100 <= status <= 599:
            raise ValueError(f"inject: status must be an HTTP status (100-599), got {status}")
        if body is None and status is not None and status >= 400:
            try:
                phrase = HTTPStatus(status).phrase
            except ValueError:
                phrase = f"HTTP {status}"
            body = {"message": phrase, "documentation_url": DOCS, "status": str(status)}
        fault = _Fault(
            method=method.upper(),
            pattern=re.compile(path_pattern),
            status=status,
            remaining=times,
            headers=dict(headers or {}),
            body=body,
            delay=delay,
            drop=drop,
        )
        with self._changed:
            self._faults.append(fault)

    def pending_faults(self) -> int:
        """How many injected answers are still queued (summed over faults)."""
        with self._changed:
            return sum(fault.remaining for fault in self._faults)

    def add_runner(
        self,
        name: str,
        labels: list[str],
        *,
        status: str = "online",
        busy: bool = False,
        ephemeral: bool = False,
    ) -> dict[str, Any]:
        """Registers a runner as if `config.sh` had run; returns its GitHub representation."""
        if status not in RUNNER_STATUSES:
            raise ValueError(f"add_runner: status must be one of {sorted(RUNNER_STATUSES)}")
        with self._changed:
            if any(runner["name"] == name for runner in self.runners.values()):
                raise ValueError(f"add_runner: a runner named {name!r} exists already")
            runner = self._new_runner(name, labels, os="Linux", ephemeral=ephemeral)
            runner["status"] = status
            runner["busy"] = busy
            self._dispatch()
            self._changed.notify_all()
            return runner

    def add_release(
        self,
        repository: str,
        tag: str,
        published_at: datetime,
        *,
        prerelease: bool = False,
        draft: bool = False,
    ) -> dict[str, Any]:
        """Publishes a release of `repository` ("owner/name"); returns its representation.

        The list route answers releases newest first by `published_at`; `releases/latest` the
        newest that is neither a prerelease nor a draft, as GitHub does.
        """
        with self._changed:
            release: dict[str, Any] = {
                "id": self._next_release_id,
                "tag_name": tag,
                "name": tag,
                "draft": draft,
                "prerelease": prerelease,
                "published_at": None if draft else published_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "created_at": published_at.strftime("%Y-%m-%dT%H:%M:%SZ"),
                "html_url": f"https://github.com/{repository}/releases/tag/{tag}",
            }
            self._next_release_id += 1
            listed = self.releases.setdefault(repository.lower(), [])
            listed.append(release)
            listed.sort(key=lambda item: item["created_at"], reverse=True)
            self._changed.notify_all()
            return release

    def register_app(self, app_id: int, client_id: str, public_key_pem: bytes) -> None:
        """Registers a GitHub App with one public key (more with `add_app_key`)."""
        with self._changed:
            if app_id in self.app_authority.apps:
                raise ValueError(f"register_app: App {app_id} exists already")
            self.app_authority.apps[app_id] = FakeApp(app_id, client_id, [public_key_pem])

    def add_app_key(self, app_id: int, public_key_pem: bytes) -> None:
        """Adds a key to an App, as "Generate a private key" in its settings does."""
        with self._changed:
            self._app(app_id).public_keys.append(public_key_pem)

    def remove_app_key(self, app_id: int, public_key_pem: bytes) -> None:
        """Deletes (revokes) one of an App's keys: JWTs it signs are refused from now on."""
        with self._changed:
            self._app(app_id).public_keys.remove(public_key_pem)

    def install_app(self, app_id: int, installation_id: int, permissions: dict[str, str], *,
                    repository_ids: set[int] | None = None) -> None:
        """Installs an App with these permissions on some repositories (None: all)."""
        with self._changed:
            self._app(app_id)
            self.app_authority.installations[installation_id] = FakeInstallation(
                installation_id, app_id, dict(permissions),
                None if repository_ids is None else frozenset(repository_ids))

    def set_installation_token_lifetime(self, seconds: float) -> None:
        """How long tokens minted from now on live (GitHub: one hour)."""
        with self._changed:
            self.app_authority.token_lifetime = seconds

    def revoke_installation_token(self, value: str) -> None:
        """Revokes an installation token (`DELETE /installation/token`, or GitHub's own doing)."""
        with self._changed:
            self.app_authority.tokens[value].revoked = True

    def installation_tokens(self) -> list[IssuedToken]:
        """Every installation token minted, oldest first."""
        with self._changed:
            return list(self.app_authority.tokens.values())

    def _app(self, app_id: int) -> FakeApp:
        app = self.app_authority.apps.get(app_id)
        if app is None:
            raise KeyError(f"no App {app_id}; Apps: {sorted(self.app_authority.apps)}")
        return app

    def runner_named(self, name: str) -> dict[str, Any] | None:
        """Returns the runner registered under `name`, or None."""
        with self._changed:
            return next((r for r in self.runners.values() if r["name"] == name), None)

    def set_runner_status(self, name: str, status: str, *, busy: bool | None = None) -> None:
        """Changes a runner's status (and busy flag); going offline clears busy by default."""
        if status not in RUNNER_STATUSES:
            raise ValueError(f"set_runner_status: status must be one of {sorted(RUNNER_STATUSES)}")
        with self._changed:
            runner = self.runner_named(name)
            if runner is None:
                known = sorted(r["name"] for r in self.runners.values())
                raise KeyError(f"set_runner_status: no runner named {name!r}; runners: {known}")
            runner["status"] = status
            if busy is not None:
                runner["busy"] = busy
            elif status == "offline":
                runner["busy"] = False
            self._dispatch()
            self._changed.notify_all()

    def finish_job(self, name: str) -> None:
        """The runner named `name` ran its one job: GitHub removes its ephemeral (JIT)
        registration, as it does after the job of a single-use runner.

        Raises:
            KeyError: No runner of that name.
        """
        with self._changed:
            runner = self.runner_named(name)
            if runner is None:
                raise KeyError(f"finish_job: no runner named {name!r}")
            job = self._job_of_runner(name)
            if job is not None:
                self._complete(job, "success")
            del self.runners[runner["id"]]
            self._dispatch()
            self._changed.notify_all()

    # --- workflow jobs ---------------------------------------------------------------------

    def add_job(
        self, run_id: int, name: str, labels: list[str], *, needs: tuple[str, ...] = ()
    ) -> dict[str, Any]:
        """Queues a job in the run's current attempt (creating the run, in progress, attempt
        1, if missing) and dispatches it if a runner fits; returns its GitHub representation.

        Args:
            run_id: The workflow run.
            name: The job's name, unique in the attempt.
            labels: Its `runs-on` labels; a runner must carry all of them (case-insensitive).
            needs: Names of jobs of the same attempt it needs: it waits until they completed,
                and is skipped (conclusion "skipped") when one did not succeed.
        """
        if not labels:
            raise ValueError("add_job: a job runs on at least one label")
        with self._changed:
            run = self.workflow_runs.get(run_id)
            if run is None:
                run = self._new_run(run_id)
                run["status"], run["conclusion"] = "in_progress", None
            attempt = self._current_jobs(run_id)
            if any(job["name"] == name for job in attempt):
                raise ValueError(f"add_job: run {run_id} has a job named {name!r} already")
            known = {job["name"] for job in attempt}
            missing = sorted(set(needs) - known)
            if missing:
                raise ValueError(f"add_job: {name!r} needs unknown jobs {missing}")
            job = self._new_job(run, name, list(labels), tuple(needs))
            attempt.append(job)
            if run["status"] == "completed":
                run["status"], run["conclusion"] = "in_progress", None
            self._settle(run_id)
            self._dispatch()
            self._changed.notify_all()
            return dict(job)

    def jobs(self, run_id: int, attempt: int | None = None) -> list[dict[str, Any]]:
        """Copies of the jobs of one attempt of a run (default: its current attempt).

        Raises:
            KeyError: No such run or attempt.
        """
        with self._changed:
            attempts = self._attempts.get(run_id)
            run = self.workflow_runs.get(run_id)
            if run is None:
                raise KeyError(f"jobs: no workflow run {run_id}")
            number = run["run_attempt"] if attempt is None else attempt
            if attempts is None and number == run["run_attempt"]:
                return []
            if attempts is None or not 1 <= number <= len(attempts):
                raise KeyError(f"jobs: run {run_id} has no attempt {number}")
            return [dict(job) for job in attempts[number - 1]]

    def complete_job(self, runner_name: str, conclusion: str = "success") -> dict[str, Any]:
        """The job on runner `runner_name` ends with `conclusion`; an ephemeral (JIT) runner's
        registration is removed, as after a single-use runner's job, another runner becomes
        idle. Returns the completed job.

        Raises:
            KeyError: No such runner, or it runs no job.
        """
        if conclusion not in JOB_CONCLUSIONS:
            raise ValueError(f"complete_job: conclusion must be one of {sorted(JOB_CONCLUSIONS)}")
        with self._changed:
            runner = self.runner_named(runner_name)
            job = self._job_of_runner(runner_name)
            if runner is None or job is None:
                raise KeyError(f"complete_job: no runner named {runner_name!r} runs a job")
            self._complete(job, conclusion)
            if runner["ephemeral"]:
                del self.runners[runner["id"]]
            else:
                runner["busy"] = False
            self._dispatch()
            self._changed.notify_all()
            return dict(job)

    def lose_runner(self, runner_name: str) -> None:
        """The runner's machine vanished (a Spot VM reclaimed): it goes offline, and stays
        busy while GitHub still counts its job as in progress (see `fail_lost_job`).

        Raises:
            KeyError: No such runner.
        """
        with self._changed:
            runner = self.runner_named(runner_name)
            if runner is None:
                raise KeyError(f"lose_runner: no runner named {runner_name!r}")
            runner["status"] = "offline"
            runner["busy"] = self._job_of_runner(runner_name) is not None
            self._changed.notify_all()

    def fail_lost_job(self, runner_name: str) -> dict[str, Any]:
        """GitHub gives up on a lost runner: its job fails ("The runner has received a
        shutdown signal" / lost communication); the registration stays, offline, not busy.
        Returns the failed job.

        Raises:
            KeyError: No such runner, or it runs no job.
        """
        with self._changed:
            runner = self.runner_named(runner_name)
            job = self._job_of_runner(runner_name)
            if runner is None or job is None:
                raise KeyError(f"fail_lost_job: no runner named {runner_name!r} runs a job")
            self._complete(job, "failure")
            runner["status"], runner["busy"] = "offline", False
            self._dispatch()
            self._changed.notify_all()
            return dict(job)

    def _new_run(self, run_id: int) -> dict[str, Any]:
        api = f"https://api.github.com/repos/{self.owner}/{self.repo}/actions/runs/{run_id}"
        run: dict[str, Any] = {
            "id": run_id,
            "run_attempt": 1,
            "html_url": f"https://github.com/{self.owner}/{self.repo}/actions/runs/{run_id}",
            "jobs_url": f"{api}/jobs",
            "cancel_url": f"{api}/cancel",
            "rerun_url": f"{api}/rerun",
        }
        self.workflow_runs[run_id] = run
        return run

    def _current_jobs(self, run_id: int) -> list[dict[str, Any]]:
        """The jobs of the run's current attempt (caller holds the lock)."""
        run = self.workflow_runs[run_id]
        attempts = self._attempts.setdefault(run_id, [])
        while len(attempts) < run["run_attempt"]:
            attempts.append([])
        return attempts[run["run_attempt"] - 1]

    def _new_job(
        self, run: dict[str, Any], name: str, labels: list[str], needs: tuple[str, ...]
    ) -> dict[str, Any]:
        job_id = self._next_job_id
        self._next_job_id += 1
        now = _timestamp(_now())
        base = f"{self.owner}/{self.repo}"
        job: dict[str, Any] = {
            "id": job_id,
            "run_id": run["id"],
            "run_attempt": run["run_attempt"],
            "run_url": f"https://api.github.com/repos/{base}/actions/runs/{run['id']}",
            "url": f"https://api.github.com/repos/{base}/actions/jobs/{job_id}",
            "html_url": f"https://github.com/{base}/actions/runs/{run['id']}/job/{job_id}",
            "head_sha": "0" * 40,
            "workflow_name": "CI",
            "name": name,
            "status": "queued",
            "conclusion": None,
            "created_at": now,
            "started_at": now,  # GitHub reports the queueing time until a runner takes it
            "completed_at": None,
            "labels": labels,
            "runner_id": None,
            "runner_name": None,
            "runner_group_id": None,
            "runner_group_name": None,
            "steps": [],
        }
        self._needs[job_id] = needs
        return job

    def _job_of_runner(self, runner_name: str) -> dict[str, Any] | None:
        """The in-progress job assigned to the runner of that name (caller holds the lock)."""
        for run_id in sorted(self._attempts):
            for job in self._current_jobs(run_id):
                if job["status"] == "in_progress" and job["runner_name"] == runner_name:
                    return job
        return None

    def _complete(self, job: dict[str, Any], conclusion: str) -> None:
        job.update(status="completed", conclusion=conclusion, completed_at=_timestamp(_now()))
        self._settle(job["run_id"])

    def _settle(self, run_id: int) -> None:
        """Skips queued jobs whose needs did not all succeed, and completes the run once every
        job of its current attempt has (caller holds the lock)."""
        jobs = self._current_jobs(run_id)
        by_name = {job["name"]: job for job in jobs}
        changed = True
        while changed:
            changed = False
            for job in jobs:
                if job["status"] != "queued":
                    continue
                needed = [by_name[name] for name in self._needs.get(job["id"], ())]
                # As without `if: always()`: a need that failed, was cancelled or was itself
                # skipped skips the job.
                if any(n["status"] == "completed" and n["conclusion"] != "success"
                       for n in needed):
                    job.update(status="completed", conclusion="skipped",
                               completed_at=_timestamp(_now()))
                    changed = True
        run = self.workflow_runs[run_id]
        if jobs and all(job["status"] == "completed" for job in jobs):
            conclusions = {job["conclusion"] for job in jobs}
            run["status"] = "completed"
            run["conclusion"] = (
                "failure" if conclusions & {"failure", "timed_out"}
                else "cancelled" if "cancelled" in conclusions
                else "success"
            )

    def _dispatch(self) -> None:
        """Gives each queued job whose needs have completed to the first online, idle runner
        carrying all its labels, as GitHub's job dispatch does (caller holds the lock)."""
        for run_id in sorted(self._attempts):
            run = self.workflow_runs[run_id]
            jobs = self._current_jobs(run_id)
            by_name = {job["name"]: job for job in jobs}
            for job in jobs:
                if job["status"] != "queued" or any(
                    by_name[name]["status"] != "completed" for name in self._needs[job["id"]]
                ):
                    continue
                wanted = {label.lower() for label in job["labels"]}
                runner = next(
                    (
                        runner
                        for _, runner in sorted(self.runners.items())
                        if runner["status"] == "online"
                        and not runner["busy"]
                        and wanted <= {label["name"].lower() for label in runner["labels"]}
                    ),
                    None,
                )
                if runner is None:
                    continue
                runner["busy"] = True
                job.update(
                    status="in_progress",
                    started_at=_timestamp(_now()),
                    runner_id=runner["id"],
                    runner_name=runner["name"],
                    runner_group_id=runner.get("runner_group_id", DEFAULT_RUNNER_GROUP_ID),
                    runner_group_name="Default",
                )
                if run["status"] in ("queued", "pending", "waiting", "requested"):
                    run["status"] = "in_progress"

    def set_run_status(self, run_id: int, status: str, conclusion: str | None = None) -> None:
        """Creates or updates a workflow run; a completed run needs a conclusion, others none."""
        if status not in RUN_STATUSES:
            raise ValueError(f"set_run_status: status must be one of {sorted(RUN_STATUSES)}")
        if status == "completed" and conclusion not in RUN_CONCLUSIONS:
            raise ValueError(
                f"set_run_status: a completed run needs a conclusion in {sorted(RUN_CONCLUSIONS)}"
            )
        if status != "completed" and conclusion is not None:
            raise ValueError("set_run_status: only a completed run has a conclusion")
        with self._changed:
            run = self.workflow_runs.get(run_id) or self._new_run(run_id)
            run["status"] = status
            run["conclusion"] = conclusion
            self._changed.notify_all()

    def requests_to(self, path_pattern: str, method: str | None = None) -> list[RecordedRequest]:
        """The recorded requests whose path matches the regex (and method, if given)."""
        pattern = re.compile(path_pattern)
        with self._changed:
            return [
                request
                for request in self.requests
                if pattern.search(request.path)
                and (method is None or request.method == method.upper())
            ]

    def wait_for_requests(
        self, path_pattern: str, method: str | None = None, *, count: int = 1, timeout: float = 5.0
    ) -> list[RecordedRequest]:
        """Blocks until `count` matching requests arrived (for clients running in background).

        Raises:
            TimeoutError: Fewer arrived within `timeout` seconds; says how many did.
        """
        deadline = time.monotonic() + timeout
        with self._changed:
            while True:
                matching = self.requests_to(path_pattern, method)
                if len(matching) >= count:
                    return matching
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError(
                        f"{len(matching)} of {count} {method or 'any-method'} requests matching "
                        f"{path_pattern!r} arrived within {timeout}s"
                    )
                self._changed.wait(left)

    def on_request(self, callback: Callable[[RecordedRequest], None]) -> None:
        """Calls `callback` with each request once recorded, before it is answered.

        A callback that raises makes the fake answer 500 naming the exception, so the failure
        shows up in the test instead of vanishing in a server thread.
        """
        with self._changed:
            self._callbacks.append(callback)

    @staticmethod
    def decode_jit_config(encoded: str) -> dict[str, Any]:
        """Decodes an `encoded_jit_config` to its files, with `.runner` itself decoded."""
        files: dict[str, Any] = json.loads(base64.b64decode(encoded))
        files[".runner"] = json.loads(base64.b64decode(files[".runner"]))
        return files

    # --- request handling ------------------------------------------------------------------

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "FakeGitHub"

            def do_GET(self) -> None:
                fake._serve(self)

            do_POST = do_PUT = do_DELETE = do_PATCH = do_GET

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean; `requests` is the log

        return Handler

    def _serve(self, handler: http.server.BaseHTTPRequestHandler) -> None:
        request, body_error = self._read(handler)
        with self._changed:
            self.requests.append(request)
            callbacks = list(self._callbacks)
            self._changed.notify_all()
        try:
            answer = self._answer(request, body_error, callbacks)
        except _DropConnectionError:
            handler.close_connection = True
            return
        self._write(handler, answer)

    def _read(self, handler: http.server.BaseHTTPRequestHandler) -> tuple[RecordedRequest, bool]:
        split = urllib.parse.urlsplit(handler.path)
        length = int(handler.headers.get("Content-Length") or 0)
        raw = handler.rfile.read(length) if length else b""
        body: Any = None
        body_error = False
        if raw:
            try:
                body = json.loads(raw)
            except ValueError:
                body_error = True
        request = RecordedRequest(
            method=handler.command.upper(),
            path=split.path,
            query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
            headers={key.lower(): value for key, value in handler.headers.items()},
            body=body,
        )
        return request, body_error

    def _answer(
        self,
        request: RecordedRequest,
        body_error: bool,
        callbacks: list[Callable[[RecordedRequest], None]],
    ) -> _Answer:
        for callback in callbacks:
            try:
                callback(request)
            except Exception as e:  # reported to the client, see on_request
                return _error(500, f"FakeGitHub on_request callback failed: {e!r}")
        fault = self._take_fault(request)
        if fault is not None:
            if fault.delay and self._stopping.wait(fault.delay):
                # The fake is stopping: do not answer a test that has moved on.
                raise _DropConnectionError
            if fault.drop:
                raise _DropConnectionError
            if fault.status is not None:
                return _Answer(fault.status, fault.body, dict(fault.headers))
        if request.method == "POST" and (mint := self._ACCESS_TOKENS.match(request.path)):
            # Authenticated by an App JWT, not by a token: the route checks it itself.
            if body_error:
                return _error(400, "Problems parsing JSON")
            return self._mint_installation_token(request, int(mint.group(1)))
        refusal = self._refused(request)
        if refusal is not None:
            return refusal
        if body_error:
            return _error(400, "Problems parsing JSON")
        with self._changed:
            answer = self._route(request)
            if self.oauth_scopes is not None:
                answer.headers.setdefault("X-OAuth-Scopes", self.oauth_scopes)
            self._changed.notify_all()
            return answer

    def _take_fault(self, request: RecordedRequest) -> _Fault | None:
        with self._changed:
            for fault in self._faults:
                if fault.matches(request.method, request.path):
                    fault.remaining -= 1
                    if fault.remaining == 0:
                        self._faults.remove(fault)
                    return fault
        return None

    _ACCESS_TOKENS = re.compile(r"^/app/installations/(\d+)/access_tokens$")
    _OWN_REPOSITORY = re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)(?:/|$)")

    def _refused(self, request: RecordedRequest) -> _Answer | None:
        """401 for an unknown, expired or revoked credential; 403 for an installation token
        outside its permissions or repositories (GitHub's words for both)."""
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        credential = credential.strip()
        if scheme.lower() not in ("bearer", "token"):
            return _error(401, "Bad credentials")
        if secrets.compare_digest(credential.encode(), self.token.encode()):
            return None
        with self._changed:
            token = self.app_authority.live_token(credential, self.clock())
        if token is None:
            return _error(401, "Bad credentials")
        own = self._OWN_REPOSITORY.match(request.path)
        repository_id = (
            self.repository_id
            if own is not None and (own["owner"].lower(), own["repo"].lower())
            == (self.owner.lower(), self.repo.lower())
            else None
        )
        if not allows(token, required_permission(request.method, request.path), repository_id):
            return _error(403, "Resource not accessible by integration")
        return None

    def _mint_installation_token(self, request: RecordedRequest, installation_id: int
                                 ) -> _Answer:
        docs = f"{DOCS}/apps/apps#create-an-installation-access-token-for-an-app"
        with self._changed:
            minted = self.app_authority.mint(
                request.headers.get("authorization", ""), installation_id, request.body,
                self.clock(), frozenset({self.repository_id}))
            self._changed.notify_all()
        if isinstance(minted, Refusal):
            return _error(minted.status, minted.message, docs)
        return _Answer(201, token_answer(minted))

    def _write(self, handler: http.server.BaseHTTPRequestHandler, answer: _Answer) -> None:
        payload = b"" if answer.body is None else json.dumps(answer.body).encode()
        handler.send_response(answer.status)
        reset = int(time.time()) + 3600
        defaults = {
            "X-GitHub-Media-Type": "github.v3; format=json",
            "X-RateLimit-Limit": "5000",
            "X-RateLimit-Remaining": "4999",
            "X-RateLimit-Reset": str(reset),
        }
        if payload:
            defaults["Content-Type"] = "application/json; charset=utf-8"
        for name, value in {**defaults, **answer.headers}.items():
            handler.send_header(name, value)
        handler.send_header("Content-Length", str(len(payload)))
        handler.end_headers()
        handler.wfile.write(payload)

    # --- routes ----------------------------------------------------------------------------

    _SCOPE = r"^/(?:repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)|orgs/(?P<org>[^/]+))"
    _ROUTES: tuple[tuple[str, re.Pattern[str], str], ...] = (
        ("POST", re.compile(_SCOPE + r"/actions/runners/registration-token$"), "_registration"),
        ("POST", re.compile(_SCOPE + r"/actions/runners/remove-token$"), "_remove_token"),
        ("POST", re.compile(_SCOPE + r"/actions/runners/generate-jitconfig$"), "_jitconfig"),
        ("GET", re.compile(_SCOPE + r"/actions/runners$"), "_list_runners"),
        ("GET", re.compile(_SCOPE + r"/actions/runners/(?P<runner_id>\d+)$"), "_get_runner"),
        ("DELETE", re.compile(_SCOPE + r"/actions/runners/(?P<runner_id>\d+)$"), "_delete_runner"),
        ("GET", re.compile(r"^/orgs/(?P<org>[^/]+)/actions/runner-groups$"), "_runner_groups"),
        (
            "GET",
            re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/actions/runs/(?P<run_id>\d+)$"),
            "_get_run",
        ),
        (
            "GET",
            re.compile(
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/actions/runs/(?P<run_id>\d+)/jobs$"
            ),
            "_list_jobs",
        ),
        (
            "GET",
            re.compile(
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/actions/runs/(?P<run_id>\d+)"
                r"/attempts/(?P<attempt>\d+)/jobs$"
            ),
            "_list_attempt_jobs",
        ),
        (
            "POST",
            re.compile(
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/actions/runs/(?P<run_id>\d+)"
                r"/rerun-failed-jobs$"
            ),
            "_rerun_failed_jobs",
        ),
        (
            "POST",
            re.compile(
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)/actions/runs/(?P<run_id>\d+)/cancel$"
            ),
            "_cancel_run",
        ),
        (
            "GET",
            re.compile(
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)"
                r"/actions/permissions/fork-pr-workflows-private-repos$"
            ),
            "_get_fork_pr_settings",
        ),
        (
            "PUT",
            re.compile(
                r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)"
                r"/actions/permissions/fork-pr-workflows-private-repos$"
            ),
            "_put_fork_pr_settings",
        ),
        ("GET", re.compile(r"^/repos/(?P<owner>[^/]+)/(?P<repo>[^/]+)$"), "_get_repository"),
        (
            "GET",
            re.compile(r"^/repos/(?P<release_owner>[^/]+)/(?P<release_repo>[^/]+)/releases$"),
            "_list_releases",
        ),
        (
            "GET",
            re.compile(
                r"^/repos/(?P<release_owner>[^/]+)/(?P<release_repo>[^/]+)/releases/latest$"
            ),
            "_latest_release",
        ),
    )

    def _route(self, request: RecordedRequest) -> _Answer:
        for method, pattern, handler_name in self._ROUTES:
            match = pattern.match(request.path)
            if match is None or method != request.method:
                continue
            params = {key: value for key, value in match.groupdict().items() if value is not None}
            if not self._known_scope(params):
                return _not_found()
            handler: Callable[[RecordedRequest, dict[str, str]], _Answer] = getattr(
                self, handler_name
            )
            return handler(request, params)
        return _not_found()

    def _known_scope(self, params: dict[str, str]) -> bool:
        # GitHub matches owner, repository and organisation names case-insensitively.
        if "release_owner" in params:
            return True  # releases are served for any repository the test published them in
        if "org" in params:
            return self.org is not None and params["org"].lower() == self.org.lower()
        return (
            params["owner"].lower() == self.owner.lower()
            and params["repo"].lower() == self.repo.lower()
        )

    def _token_answer(self, issued: list[str]) -> _Answer:
        token = secrets.token_hex(15).upper()
        issued.append(token)
        expires_at = _timestamp(_now() + timedelta(hours=1))  # "expires after one hour"
        return _Answer(201, {"token": token, "expires_at": expires_at})

    def _registration(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        return self._token_answer(self.registration_tokens)

    def _remove_token(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        return self._token_answer(self.remove_tokens)

    def _jitconfig(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        docs = f"{DOCS_RUNNERS}#create-configuration-for-a-just-in-time-runner"
        body = request.body
        if not isinstance(body, dict):
            return _validation_failed("The request body must be a JSON object.", docs)
        name, group_id, labels = body.get("name"), body.get("runner_group_id"), body.get("labels")
        work_folder = body.get("work_folder", "_work")
        if not isinstance(name, str) or not name:
            return _validation_failed('"name" wasn\'t supplied.', docs)
        if isinstance(group_id, bool) or not isinstance(group_id, int):
            return _validation_failed('"runner_group_id" wasn\'t supplied.', docs)
        if not isinstance(labels, list) or not all(isinstance(x, str) and x for x in labels):
            return _validation_failed('"labels" must be a list of label names.', docs)
        if not 1 <= len(labels) <= MAX_JIT_LABELS:
            return _validation_failed(
                f'"labels" must hold 1 to {MAX_JIT_LABELS} labels, got {len(labels)}.', docs
            )
        if not isinstance(work_folder, str):
            return _validation_failed('"work_folder" must be a string.', docs)
        if group_id not in self.runner_groups:
            return _not_found(docs)  # GitHub documents 404 for an unknown runner group
        if self.runner_named(name) is not None:
            return _error(
                409, f"Already exists - A runner with the name {name} already exists.", docs
            )
        # GitHub reports "unknown" until the runner first connects and says what it runs on.
        runner = self._new_runner(name, labels, os="unknown", ephemeral=True)
        runner["runner_group_id"] = group_id
        encoded = self._encode_jit_config(runner, group_id, work_folder, params)
        self.jit_configs[runner["id"]] = encoded
        return _Answer(201, {"runner": dict(runner), "encoded_jit_config": encoded})

    def _encode_jit_config(
        self, runner: dict[str, Any], group_id: int, work_folder: str, params: dict[str, str]
    ) -> str:
        # The real blob is base64(JSON) of the runner's config files, each base64 encoded.
        scope_url = (
            f"https://github.com/{params['org']}"
            if "org" in params
            else f"https://github.com/{params['owner']}/{params['repo']}"
        )
        dot_runner = {
            "agentId": runner["id"],
            "agentName": runner["name"],
            "poolId": group_id,
            "poolName": self.runner_groups[group_id]["name"],
            "serverUrl": "https://pipelines.actions.githubusercontent.com/fake",
            "gitHubUrl": scope_url,
            "workFolder": work_folder,
            "ephemeral": True,
        }
        files = {
            ".runner": base64.b64encode(json.dumps(dot_runner).encode()).decode(),
            ".credentials": base64.b64encode(
                json.dumps({"scheme": "OAuth", "data": {"clientId": secrets.token_hex(8)}}).encode()
            ).decode(),
            ".credentials_rsaparams": base64.b64encode(b"{}").decode(),
        }
        return base64.b64encode(json.dumps(files).encode()).decode()

    def _new_runner(
        self, name: str, labels: list[str], *, os: str, ephemeral: bool
    ) -> dict[str, Any]:
        runner_id = self._next_runner_id
        self._next_runner_id += 1
        runner_labels = []
        for label in labels:
            kind = "read-only" if label.lower() in READ_ONLY_LABELS else "custom"
            runner_labels.append({"id": self._next_label_id, "name": label, "type": kind})
            self._next_label_id += 1
        runner: dict[str, Any] = {
            "id": runner_id,
            "name": name,
            "os": os,
            "status": "offline",
            "busy": False,
            "labels": runner_labels,
            "ephemeral": ephemeral,
        }
        self.runners[runner_id] = runner
        return runner

    def _list_runners(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        names = request.query.get("name")
        runners = [
            dict(runner)
            for _, runner in sorted(self.runners.items())
            if names is None or runner["name"] == names[-1]
        ]
        return self._page(request, "runners", runners)

    def _runner_groups(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        groups = [dict(group) for _, group in sorted(self.runner_groups.items())]
        return self._page(request, "runner_groups", groups)

    def _page(self, request: RecordedRequest, key: str, items: list[dict[str, Any]]) -> _Answer:
        chosen, headers = self._page_slice(request, items)
        return _Answer(200, {"total_count": len(items), key: chosen}, headers)

    def _page_list(self, request: RecordedRequest, items: list[dict[str, Any]]) -> _Answer:
        # Some list routes (releases) answer a bare JSON array, paginated the same way.
        chosen, headers = self._page_slice(request, items)
        return _Answer(200, chosen, headers)

    def _page_slice(
        self, request: RecordedRequest, items: list[dict[str, Any]]
    ) -> tuple[list[dict[str, Any]], dict[str, str]]:
        per_page = min(
            _int_param(request.query.get("per_page"), DEFAULT_PAGE_SIZE), self.page_size_max
        )
        page = _int_param(request.query.get("page"), 1)
        last = max(1, -(-len(items) // per_page))
        chosen = items[(page - 1) * per_page : page * per_page]
        links = []

        def link(target: int, rel: str) -> str:
            query = {k: v[-1] for k, v in request.query.items()}
            query.update(per_page=str(per_page), page=str(target))
            return f'<{self.url}{request.path}?{urllib.parse.urlencode(query)}>; rel="{rel}"'

        if page > 1:
            links += [link(page - 1, "prev"), link(1, "first")]
        if page < last:
            links += [link(page + 1, "next"), link(last, "last")]
        headers = {"Link": ", ".join(links)} if links else {}
        return chosen, headers

    def _get_runner(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        runner = self.runners.get(int(params["runner_id"]))
        if runner is None:
            return _not_found(f"{DOCS_RUNNERS}#get-a-self-hosted-runner-for-a-repository")
        return _Answer(200, dict(runner))

    def _delete_runner(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        docs = f"{DOCS_RUNNERS}#delete-a-self-hosted-runner-from-a-repository"
        runner_id = int(params["runner_id"])
        runner = self.runners.get(runner_id)
        if runner is None:
            return _not_found(docs)
        if runner["busy"]:
            # GitHub's answer, as actions-runner-controller's logs quote it.
            message = f'Bad request - Runner "{runner["name"]}" is still running a job'
            return _error(422, message, docs)
        del self.runners[runner_id]
        return _Answer(204)

    def _get_run(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        run = self.workflow_runs.get(int(params["run_id"]))
        if run is None:
            return _not_found(DOCS_RUNS)
        return _Answer(200, dict(run))

    def _list_jobs(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        docs = f"{DOCS_JOBS}#list-jobs-for-a-workflow-run"
        run_id = int(params["run_id"])
        if run_id not in self.workflow_runs:
            return _not_found(docs)
        chosen = (request.query.get("filter") or ["latest"])[-1]
        if chosen not in ("latest", "all"):
            return _validation_failed(
                f"{chosen!r} is not a valid value for filter: use latest or all.", docs
            )
        attempts = self._attempts.get(run_id) or []
        if chosen == "latest":
            jobs = list(self._current_jobs(run_id)) if attempts else []
        else:
            seen: dict[int, dict[str, Any]] = {}
            for attempt in attempts:
                for job in attempt:
                    seen.setdefault(job["id"], job)
            jobs = list(seen.values())
        return self._page(request, "jobs", [dict(job) for job in jobs])

    def _list_attempt_jobs(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        docs = f"{DOCS_JOBS}#list-jobs-for-a-workflow-run-attempt"
        run = self.workflow_runs.get(int(params["run_id"]))
        number = int(params["attempt"])
        if run is None or not 1 <= number <= run["run_attempt"]:
            return _not_found(docs)
        attempts = self._attempts.get(run["id"]) or []
        jobs = attempts[number - 1] if number <= len(attempts) else []
        return self._page(request, "jobs", [dict(job) for job in jobs])

    def _rerun_failed_jobs(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        docs = f"{DOCS}/actions/workflow-runs#re-run-failed-jobs-from-a-workflow-run"
        run = self.workflow_runs.get(int(params["run_id"]))
        if run is None:
            return _not_found(docs)
        body = request.body
        if body is not None and (
            not isinstance(body, dict)
            or not isinstance(body.get("enable_debug_logging", False), bool)
            or set(body) - {"enable_debug_logging"}
        ):
            return _validation_failed('"enable_debug_logging" must be a boolean.', docs)
        if run["status"] != "completed":
            return _error(403, "This workflow is already running", docs)
        jobs = self._current_jobs(run["id"]) if run["id"] in self._attempts else []
        rerun = {
            job["name"]
            for job in jobs
            if job["conclusion"] in ("failure", "cancelled", "timed_out")
        }
        if not rerun or run["run_attempt"] > MAX_RERUNS:
            return _error(403, "This workflow run cannot be retried", docs)
        grew = True
        while grew:  # and every job needing one of them, transitively
            before = len(rerun)
            rerun |= {
                job["name"] for job in jobs if set(self._needs.get(job["id"], ())) & rerun
            }
            grew = len(rerun) > before
        run["run_attempt"] += 1
        run.update(status="queued", conclusion=None)
        run["debug_logging"] = bool((body or {}).get("enable_debug_logging", False))
        self._attempts[run["id"]].append(
            [
                self._new_job(run, job["name"], list(job["labels"]), self._needs[job["id"]])
                if job["name"] in rerun
                else job  # carried into the new attempt as it ran
                for job in jobs
            ]
        )
        self._settle(run["id"])
        self._dispatch()
        return _Answer(201, {})

    def _cancel_run(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        docs = f"{DOCS}/actions/workflow-runs#cancel-a-workflow-run"
        run = self.workflow_runs.get(int(params["run_id"]))
        if run is None:
            return _not_found(docs)
        if run["status"] == "completed":
            return _error(409, "Cannot cancel a workflow run that is completed.", docs)
        now = _timestamp(_now())
        for job in self._current_jobs(run["id"]) if run["id"] in self._attempts else []:
            if job["status"] == "completed":
                continue
            runner = self.runners.get(job["runner_id"]) if job["runner_id"] else None
            if runner is not None:
                runner["busy"] = False
            job.update(status="completed", conclusion="cancelled", completed_at=now)
        run.update(status="completed", conclusion="cancelled")
        self._dispatch()
        return _Answer(202, {})

    def _get_fork_pr_settings(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        if not self.private:
            return self._public_repository_refusal()
        return _Answer(200, dict(self.fork_pr_settings))

    def _put_fork_pr_settings(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        docs = f"{DOCS_PERMISSIONS}#set-private-repo-fork-pr-workflow-settings-for-a-repository"
        if not self.private:
            return self._public_repository_refusal()
        body = request.body
        if not isinstance(body, dict):
            return _validation_failed("The request body must be a JSON object.", docs)
        if not isinstance(body.get(FORK_PR_SETTINGS_KEYS[0]), bool):
            return _validation_failed(
                f'"{FORK_PR_SETTINGS_KEYS[0]}" wasn\'t supplied (a boolean is required).', docs
            )
        unknown = sorted(set(body) - set(FORK_PR_SETTINGS_KEYS))
        if unknown:
            return _validation_failed(
                f"unknown keys {unknown}; allowed: {list(FORK_PR_SETTINGS_KEYS)}", docs
            )
        not_bool = sorted(key for key, value in body.items() if not isinstance(value, bool))
        if not_bool:
            return _validation_failed(f"{not_bool} must be booleans.", docs)
        self.fork_pr_settings.update(body)
        return _Answer(204)

    def _public_repository_refusal(self) -> _Answer:
        # GitHub answers 422 on a public repository: the setting exists for private ones only.
        return _error(
            422,
            "Fork PR workflow settings only apply to internal and private repositories.",
            DOCS_PERMISSIONS,
        )

    def _get_repository(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        return _Answer(
            200,
            {
                "id": self.repository_id,
                "name": self.repo,
                "full_name": f"{self.owner}/{self.repo}",
                "owner": {"login": self.owner, "id": self.owner_id},
                "private": self.private,
                "visibility": "private" if self.private else "public",
                "html_url": f"https://github.com/{self.owner}/{self.repo}",
            },
        )

    def _published_releases(self, params: dict[str, str]) -> list[dict[str, Any]] | None:
        key = f"{params['release_owner']}/{params['release_repo']}".lower()
        return self.releases.get(key)

    def _list_releases(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        releases = self._published_releases(params)
        if releases is None:
            return _not_found(f"{DOCS}/releases/releases#list-releases")
        return self._page_list(request, [dict(release) for release in releases])

    def _latest_release(self, request: RecordedRequest, params: dict[str, str]) -> _Answer:
        docs = f"{DOCS}/releases/releases#get-the-latest-release"
        final = [
            release
            for release in self._published_releases(params) or ()
            if not release["prerelease"] and not release["draft"]
        ]
        if not final:
            return _not_found(docs)
        return _Answer(200, dict(max(final, key=lambda release: release["published_at"])))
