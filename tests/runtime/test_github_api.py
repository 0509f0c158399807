"""The GitHub client over real HTTP against the fake GitHub: calls, retries, errors."""

from __future__ import annotations

import dataclasses
import time

import pytest

from gpu_runners.errors import (
    GitHubAuthError,
    GitHubConflictError,
    GitHubError,
    GitHubNotFoundError,
    GitHubRateLimitError,
    RunnerBusyError,
    UsageError,
)
from gpu_runners.github_api import GitHubClient, RunnerScope, Token
from tests.fakes.github_api import FakeGitHub
from tests.runtime.fake_wiring import FAST_GITHUB_POLICY, github_client_for

RUNNERS = r"/repos/acme/models/actions/runners$"
JIT = r"/actions/runners/generate-jitconfig$"


class RecordedSleep:
    """Stands in for time.sleep: records each wait instead of waiting."""

    def __init__(self) -> None:
        self.waits: list[float] = []

    def __call__(self, seconds: float) -> None:
        self.waits.append(seconds)


def test_jit_config_registers_a_named_single_use_runner(
    fake_github: FakeGitHub, github: GitHubClient
) -> None:
    jit = github.generate_jit_config("gpu-1-1", ["gpu-1-1"])

    (request,) = fake_github.requests_to(JIT, "POST")
    assert request.body == {"name": "gpu-1-1", "runner_group_id": 1,
                            "labels": ["gpu-1-1"]}
    assert request.headers["authorization"] == "Bearer ghp_fake"
    assert request.headers["x-github-api-version"] == "2022-11-28"
    assert jit.runner.name == "gpu-1-1"
    assert jit.encoded_jit_config == fake_github.jit_configs[jit.runner.id]
    assert jit.encoded_jit_config not in repr(jit)


def test_a_taken_runner_name_is_a_conflict(fake_github: FakeGitHub, github: GitHubClient) -> None:
    fake_github.add_runner("gpu-1-1", ["gpu-1-1"], status="offline")

    with pytest.raises(GitHubConflictError, match="already exists"):
        github.generate_jit_config("gpu-1-1", ["gpu-1-1"])


def test_runner_lookup_by_name_and_id(fake_github: FakeGitHub, github: GitHubClient) -> None:
    fake_github.add_runner("gpu-1-1", ["gpu-1-1"], status="online", busy=True)
    fake_github.add_runner("gpu-2-1", ["gpu-2-1"], status="offline")

    found = github.find_runner("gpu-2-1")

    assert found is not None and (found.name, found.online, found.busy) == ("gpu-2-1", False, False)
    assert fake_github.requests_to(RUNNERS)[-1].query["name"] == ["gpu-2-1"]
    runner = github.get_runner(found.id)
    assert runner == found
    assert github.find_runner("gpu-3-1") is None
    assert github.get_runner(999) is None


def test_listing_follows_every_page(fake_github: FakeGitHub) -> None:
    with FakeGitHub(page_size_max=2) as small_pages:
        for index in range(5):
            small_pages.add_runner(f"gpu-{index}-1", [f"gpu-{index}-1"])

        names = [runner.name for runner in github_client_for(small_pages).list_runners()]

        assert names == [f"gpu-{index}-1" for index in range(5)]
        assert [r.query.get("page") for r in small_pages.requests_to(RUNNERS)] == [
            None, ["2"], ["3"],
        ]


MALFORMED_PAGE = {
    "total_count": 3,
    "runners": [
        {"id": 1, "name": "gpu-1-1", "status": "offline", "busy": False, "labels": []},
        {"id": "two", "name": "gpu-2-1"},
        {"id": 3, "name": "gpu-3-1", "labels": "gpu-3-1"},
    ],
}


def test_a_malformed_runner_entry_is_a_github_error_not_a_crash(
    fake_github: FakeGitHub, github: GitHubClient
) -> None:
    fake_github.inject("GET", RUNNERS, 200, body=MALFORMED_PAGE)

    with pytest.raises(GitHubError, match="holds a malformed runner: the entry named 'gpu-2-1' "
                                          "has no integer id"):
        list(github.list_runners())


def test_a_caller_may_skip_malformed_runner_entries_and_keep_the_others(
    fake_github: FakeGitHub, github: GitHubClient
) -> None:
    fake_github.inject("GET", RUNNERS, 200, body=MALFORMED_PAGE)
    problems: list[str] = []

    names = [runner.name for runner in github.list_runners(on_malformed=problems.append)]

    assert names == ["gpu-1-1"]
    reasons = [problem.split("malformed runner: ")[1] for problem in problems]
    assert reasons[0] == "the entry named 'gpu-2-1' has no integer id"
    assert reasons[1].startswith("runner gpu-3-1 (id 3): TypeError")  # labels not a list
    assert len(reasons) == 2


def test_deleting_a_busy_runner_says_it_is_busy_and_a_gone_one_is_no_error(
    fake_github: FakeGitHub, github: GitHubClient
) -> None:
    busy = fake_github.add_runner("gpu-1-1", ["gpu-1-1"], busy=True)

    with pytest.raises(RunnerBusyError, match="still running a job"):
        github.delete_runner(busy["id"])
    fake_github.set_runner_status("gpu-1-1", "offline")
    assert github.delete_runner(busy["id"]) is True
    assert github.delete_runner(busy["id"]) is False
    assert fake_github.runner_named("gpu-1-1") is None


def test_run_status_reports_completion_and_unknown_runs(
    fake_github: FakeGitHub, github: GitHubClient
) -> None:
    fake_github.set_run_status(11, "in_progress")
    fake_github.set_run_status(12, "completed", "cancelled")

    running = github.get_run_status("acme/models", 11)
    done = github.get_run_status("acme/models", 12)

    assert running is not None and not running.completed
    assert done is not None and done.completed and done.conclusion == "cancelled"
    assert github.get_run_status("acme/models", 13) is None


# --- retries ------------------------------------------------------------------------------------


def test_server_errors_are_retried_with_growing_backoff(fake_github: FakeGitHub) -> None:
    sleep = RecordedSleep()
    client = github_client_for(fake_github, sleep=sleep)
    fake_github.inject("POST", JIT, 502, times=2)

    jit = client.generate_jit_config("gpu-1-1", ["gpu-1-1"])

    assert jit.runner.name == "gpu-1-1"
    assert len(fake_github.requests_to(JIT)) == 3
    assert len(sleep.waits) == 2
    assert 0 < sleep.waits[0] <= 0.01 and 0 < sleep.waits[1] <= 0.02


def test_dropped_connections_and_slow_answers_are_retried(fake_github: FakeGitHub) -> None:
    impatient = github_client_for(fake_github).with_policy(
        dataclasses.replace(FAST_GITHUB_POLICY, timeout=0.2)
    )
    fake_github.inject("GET", RUNNERS, None, drop=True)
    fake_github.inject("GET", RUNNERS, None, delay=1.0)  # beyond the 0.2 s socket timeout
    fake_github.add_runner("gpu-1-1", ["gpu-1-1"])

    runner = impatient.find_runner("gpu-1-1")

    assert runner is not None
    assert len(fake_github.requests_to(RUNNERS)) == 3


def test_too_many_requests_waits_as_long_as_retry_after_says(fake_github: FakeGitHub) -> None:
    sleep = RecordedSleep()
    fake_github.inject("GET", RUNNERS, 429, headers={"Retry-After": "3"})

    runners = list(github_client_for(fake_github, sleep=sleep).list_runners())

    assert runners == []
    assert sleep.waits == [3.0]


def test_exhausted_rate_limit_waits_until_the_reset(fake_github: FakeGitHub) -> None:
    sleep = RecordedSleep()
    reset = int(time.time()) + 4
    fake_github.inject("GET", RUNNERS, 403, body={"message": "API rate limit exceeded"},
                       headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})

    list(github_client_for(fake_github, sleep=sleep).list_runners())

    (wait,) = sleep.waits
    assert 3.0 <= wait <= 5.0


def test_a_rate_limit_reset_beyond_the_wait_budget_fails_at_once(fake_github: FakeGitHub) -> None:
    sleep = RecordedSleep()
    reset = int(time.time()) + 3600
    fake_github.inject("GET", RUNNERS, 403, body={"message": "API rate limit exceeded"},
                       headers={"X-RateLimit-Remaining": "0", "X-RateLimit-Reset": str(reset)})

    with pytest.raises(GitHubRateLimitError, match="resets in 3[56]\\d\\ds"):
        list(github_client_for(fake_github, sleep=sleep).list_runners())
    assert sleep.waits == []


def test_persistent_server_errors_fail_after_the_attempts(fake_github: FakeGitHub) -> None:
    fake_github.inject("GET", RUNNERS, 503, times=10)

    with pytest.raises(GitHubError, match="GitHub answered 503 for GET .* 4 times"):
        list(github_client_for(fake_github).list_runners())
    assert len(fake_github.requests_to(RUNNERS)) == FAST_GITHUB_POLICY.attempts


# --- errors a user can act on ---------------------------------------------------------------


def test_a_wrong_token_is_reported_with_its_source(fake_github: FakeGitHub) -> None:
    client = GitHubClient(Token("ghp_wrong", "env GITHUB_RUNNER_PAT"),
                          RunnerScope(repository="acme/models"), api_url=fake_github.url,
                          policy=FAST_GITHUB_POLICY)

    with pytest.raises(GitHubAuthError) as error:
        client.generate_jit_config("gpu-1-1", ["gpu-1-1"])

    assert "rejected the token from env GITHUB_RUNNER_PAT" in str(error.value)
    assert "401 Bad credentials" in str(error.value)
    assert len(fake_github.requests_to(JIT)) == 1  # a wrong token is not retried


def test_a_missing_classic_scope_is_named(fake_github: FakeGitHub, github: GitHubClient) -> None:
    fake_github.inject("POST", JIT, 403, body={"message": "Resource not accessible by token"},
                       headers={"X-Accepted-OAuth-Scopes": "repo", "X-OAuth-Scopes": "read:org"})

    with pytest.raises(GitHubAuthError) as error:
        github.generate_jit_config("gpu-1-1", ["gpu-1-1"])

    assert "needs the classic scope(s) 'repo'; the token has 'read:org'" in str(error.value)


def test_a_fine_grained_token_without_permission_is_told_which_one(
    fake_github: FakeGitHub, github: GitHubClient
) -> None:
    fake_github.inject("POST", JIT, 403,
                       body={"message": "Resource not accessible by personal access token"})

    with pytest.raises(GitHubAuthError, match="Administration: read and write"):
        github.generate_jit_config("gpu-1-1", ["gpu-1-1"])


def test_a_wrong_repository_is_named_in_the_404(fake_github: FakeGitHub) -> None:
    client = GitHubClient(Token(fake_github.token, "test"), RunnerScope(repository="acme/modles"),
                          api_url=fake_github.url, policy=FAST_GITHUB_POLICY)

    with pytest.raises(GitHubNotFoundError) as error:
        client.generate_jit_config("gpu-1-1", ["gpu-1-1"])

    assert "repository 'acme/modles' does not exist or the token" in str(error.value)


def test_an_api_url_that_is_not_http_is_refused() -> None:
    with pytest.raises(UsageError, match="GITHUB_API_URL='file:///etc/passwd'"):
        GitHubClient(Token("t", "test"), RunnerScope(repository="acme/models"),
                     api_url="file:///etc/passwd")


# --- organisation scope -----------------------------------------------------------------------


def test_organisation_runners_use_the_org_routes_and_named_groups() -> None:
    with FakeGitHub(org="acme") as fake:
        client = github_client_for(fake, organization="acme")

        group = client.runner_group_id("Default")
        jit = client.generate_jit_config("gpu-5-1", ["gpu-5-1"], runner_group_id=group)

        assert group == 1
        assert fake.requests_to(r"^/orgs/acme/actions/runners/generate-jitconfig$", "POST")
        assert client.find_runner("gpu-5-1") == jit.runner
        with pytest.raises(UsageError, match="no runner group 'GPU' in organisation 'acme'"):
            client.runner_group_id("GPU")
