"""`ForkPrWorkflows`: the dynamic resource that turns fork pull request workflows off.

The provider's methods run against the fake GitHub API on 127.0.0.1, in the order the Pulumi
engine calls them (check, then create / diff / update / read / delete), and its serialized form
runs in a separate process as the dynamic provider host runs it. One test constructs the
resource under the Pulumi mocks to prove the token is a secret and stays out of the provider.
"""

from __future__ import annotations

import base64
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from pulumi.dynamic.dynamic import serialize_provider

from components.fork_pr_workflows import (
    DEFAULT_API_URL,
    ForkPrWorkflows,
    ForkPrWorkflowsArgs,
    ForkPrWorkflowsProvider,
)
from tests.fakes.github_api import FakeGitHub
from tests.harness.mock_stack import run_under_mocks

REPO_ROOT = Path(__file__).resolve().parents[1]
ENDPOINT = r"/actions/permissions/fork-pr-workflows-private-repos$"
SETTINGS = tuple(ForkPrWorkflowsProvider.GITHUB_DEFAULTS)
ALL_OFF = dict.fromkeys(SETTINGS, False)
#: Fork pull requests run, with approval, but get no write token and no secrets.
RUN_WITH_APPROVAL = {**ALL_OFF, "run_workflows_from_fork_pull_requests": True,
                     "require_approval_for_fork_pr_workflows": True}


@pytest.fixture
def provider() -> ForkPrWorkflowsProvider:
    return ForkPrWorkflowsProvider()


def checked(provider: ForkPrWorkflowsProvider, github: FakeGitHub,
            **overrides: Any) -> dict[str, Any]:
    """The inputs after check(), as the engine passes them to create, diff and update."""
    news = {"owner": github.owner, "repository": github.repo, "token": github.token,
            "api_url": github.url, **overrides}
    result = provider.check({}, news)
    assert [(f.property, f.reason) for f in result.failures] == []
    return result.inputs


def settings_of(props: dict[str, Any]) -> dict[str, bool]:
    return {key: props[key] for key in SETTINGS}


# --- check ---------------------------------------------------------------------------------------


def test_check_defaults_to_fork_runs_off_on_api_github_com(
        provider: ForkPrWorkflowsProvider) -> None:
    result = provider.check({}, {"owner": "acme", "repository": "models", "token": "ghp_x"})
    assert result.failures == []
    assert result.inputs["api_url"] == DEFAULT_API_URL == "https://api.github.com"
    assert settings_of(result.inputs) == ALL_OFF


def test_check_names_every_invalid_property_and_what_is_allowed(
        provider: ForkPrWorkflowsProvider) -> None:
    result = provider.check({}, {
        "owner": "acme/models", "repository": "", "token": " ", "api_url": "file:///etc/passwd",
        "send_secrets_and_variables": True, "require_approval_for_fork_pr_workflows": "yes",
    })
    reasons = {failure.property: failure.reason for failure in result.failures}
    assert reasons == {
        "owner": "'acme/models' is not a GitHub user or organisation name",
        "repository": "'' is not a repository name without the owner",
        "token": "is required: a token that administers the repository (classic PAT with the "
                 "repo scope)",
        "api_url": "'file:///etc/passwd' is not an http(s) URL such as https://api.github.com",
        "send_secrets_and_variables":
            "can only be true when run_workflows_from_fork_pull_requests is true",
        "require_approval_for_fork_pr_workflows": "'yes' is not a boolean",
    }


def test_check_leaves_values_unknown_during_preview_to_later(
        provider: ForkPrWorkflowsProvider) -> None:
    unknown = ForkPrWorkflowsProvider.UNKNOWN
    result = provider.check({}, {"owner": "acme", "repository": unknown, "token": unknown,
                                 "run_workflows_from_fork_pull_requests": unknown})
    assert result.failures == []


# --- create, read, diff, update, delete against the fake API -------------------------------------


def test_create_turns_fork_pull_request_workflows_off_and_reads_the_result_back(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    fake_github.fork_pr_settings.update(RUN_WITH_APPROVAL)  # someone enabled it by hand
    inputs = checked(provider, fake_github)

    result = provider.create(inputs)

    assert fake_github.fork_pr_settings == ALL_OFF
    calls = fake_github.requests_to(ENDPOINT)
    assert [call.method for call in calls] == ["PUT", "GET"]
    put = calls[0]
    assert put.path == "/repos/acme/models/actions/permissions/fork-pr-workflows-private-repos"
    assert put.body == ALL_OFF
    assert put.headers["authorization"] == f"Bearer {fake_github.token}"
    assert put.headers["accept"] == "application/vnd.github+json"
    assert put.headers["x-github-api-version"] == ForkPrWorkflowsProvider.API_VERSION
    assert result.id == "acme/models"
    assert result.outs == inputs  # what GitHub reports is what was declared


def test_create_with_runs_allowed_sends_exactly_the_declared_settings(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    result = provider.create(checked(provider, fake_github, **RUN_WITH_APPROVAL))
    assert fake_github.requests_to(ENDPOINT, "PUT")[0].body == RUN_WITH_APPROVAL
    assert fake_github.fork_pr_settings == RUN_WITH_APPROVAL
    assert result.outs is not None and settings_of(result.outs) == RUN_WITH_APPROVAL


def test_create_fails_when_github_keeps_another_value(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    # As when an organisation policy overrides the repository: the PUT succeeds, the GET
    # still reports fork runs on.
    fake_github.inject("GET", ENDPOINT, 200, body=RUN_WITH_APPROVAL)
    with pytest.raises(RuntimeError) as raised:
        provider.create(checked(provider, fake_github))
    assert str(raised.value) == (
        "GitHub accepted the fork pull request workflow settings of acme/models but reports "
        "run_workflows_from_fork_pull_requests=True, require_approval_for_fork_pr_workflows=True: "
        "an organization or enterprise policy probably overrides the repository's setting")


def test_diff_of_unchanged_inputs_is_no_change(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    inputs = checked(provider, fake_github)
    outs = provider.create(inputs).outs
    assert outs is not None

    diff = provider.diff("acme/models", outs, checked(provider, fake_github))

    assert diff.changes is False
    assert diff.replaces == []
    assert diff.delete_before_replace is False


def test_diff_of_a_changed_setting_is_an_update_in_place(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    outs = provider.create(checked(provider, fake_github)).outs
    assert outs is not None

    diff = provider.diff("acme/models", outs, checked(provider, fake_github, **RUN_WITH_APPROVAL))

    assert diff.changes is True
    assert diff.replaces == []


def test_diff_of_a_rotated_token_is_an_update_so_delete_uses_the_new_one(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    outs = provider.create(checked(provider, fake_github)).outs
    assert outs is not None
    diff = provider.diff("acme/models", outs, checked(provider, fake_github, token="ghp_new"))
    assert (diff.changes, diff.replaces) == (True, [])


def test_diff_of_another_repository_is_a_replacement(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    outs = provider.create(checked(provider, fake_github)).outs
    assert outs is not None

    diff = provider.diff("acme/models", outs, checked(provider, fake_github, repository="data"))

    assert diff.changes is True
    assert diff.replaces == ["repository"]
    assert diff.delete_before_replace is True


def test_replacing_with_the_same_repository_spelled_differently_keeps_the_new_settings(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    # What the engine does for a replacement the diff asks to delete first.
    olds = provider.create(checked(provider, fake_github)).outs
    assert olds is not None
    news = checked(provider, fake_github, owner="ACME", **RUN_WITH_APPROVAL)
    diff = provider.diff("acme/models", olds, news)
    assert (diff.replaces, diff.delete_before_replace) == (["owner"], True)

    provider.delete("acme/models", olds)
    provider.create(news)

    assert fake_github.fork_pr_settings == RUN_WITH_APPROVAL


def test_diff_of_a_value_unknown_during_preview_is_a_change(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    outs = provider.create(checked(provider, fake_github)).outs
    assert outs is not None
    news = {**outs, "owner": ForkPrWorkflowsProvider.UNKNOWN}
    diff = provider.diff("acme/models", outs, news)
    assert (diff.changes, diff.replaces) == (True, ["owner"])


def test_update_puts_the_new_settings_and_reads_them_back(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    olds = provider.create(checked(provider, fake_github)).outs
    assert olds is not None
    news = checked(provider, fake_github, **RUN_WITH_APPROVAL)

    result = provider.update("acme/models", olds, news)

    assert fake_github.requests_to(ENDPOINT, "PUT")[-1].body == RUN_WITH_APPROVAL
    assert fake_github.fork_pr_settings == RUN_WITH_APPROVAL
    assert result.outs == news


def test_read_reports_a_change_made_outside_pulumi(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    outs = provider.create(checked(provider, fake_github)).outs
    assert outs is not None
    fake_github.fork_pr_settings.update(RUN_WITH_APPROVAL)

    result = provider.read("acme/models", outs)

    assert result.id == "acme/models"
    assert result.outs is not None and settings_of(result.outs) == RUN_WITH_APPROVAL
    # The refreshed state now differs from the declared inputs: the next update re-applies them.
    assert provider.diff("acme/models", result.outs, checked(provider, fake_github)).changes


def test_read_of_a_repository_that_is_gone_reports_the_resource_gone(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    result = provider.read("acme/deleted", checked(provider, fake_github, repository="deleted"))
    assert result.id == ""


def test_delete_restores_githubs_default(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    outs = provider.create(checked(provider, fake_github, **RUN_WITH_APPROVAL)).outs
    assert outs is not None

    provider.delete("acme/models", outs)

    assert fake_github.requests_to(ENDPOINT, "PUT")[-1].body == ALL_OFF
    assert fake_github.fork_pr_settings == ALL_OFF


def test_delete_of_a_repository_that_is_gone_succeeds(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    provider.delete("acme/deleted", checked(provider, fake_github, repository="deleted"))
    assert [call.path for call in fake_github.requests_to(ENDPOINT)] == [
        "/repos/acme/deleted/actions/permissions/fork-pr-workflows-private-repos"]


# --- errors that say what to fix -----------------------------------------------------------------


def test_a_rejected_token_is_a_401_error_naming_the_token_and_its_scope(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    with pytest.raises(PermissionError) as raised:
        provider.create(checked(provider, fake_github, token="ghp_revoked"))
    message = str(raised.value)
    assert message.startswith("GitHub rejected the token for acme/models (401)")
    assert "classic PAT with the repo scope" in message
    assert "GitHub said: Bad credentials" in message
    assert "ghp_revoked" not in message
    assert fake_github.fork_pr_settings == ALL_OFF


def test_a_forbidden_call_is_a_403_error_naming_the_scope_and_policies(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    fake_github.inject("PUT", ENDPOINT, 403)
    with pytest.raises(PermissionError) as raised:
        provider.update("acme/models", {}, checked(provider, fake_github, **RUN_WITH_APPROVAL))
    message = str(raised.value)
    assert message.startswith("GitHub refused PUT of the fork pull request workflow settings of "
                              "acme/models (403)")
    assert "repo scope (classic PAT) or Administration: write (fine-grained)" in message
    assert "organization or enterprise policy" in message


def test_an_unknown_repository_is_a_404_error_naming_it(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    with pytest.raises(LookupError) as raised:
        provider.create(checked(provider, fake_github, owner="acme", repository="modles"))
    message = str(raised.value)
    assert message.startswith(
        f"GitHub does not find repository acme/modles at {fake_github.url} (404)")
    assert "repo scope for a private repository" in message


def test_a_public_repository_is_a_422_error_saying_the_setting_is_for_private_ones(
        provider: ForkPrWorkflowsProvider) -> None:
    with FakeGitHub(private=False) as public, pytest.raises(ValueError) as raised:
        provider.create(checked(provider, public))
    message = str(raised.value)
    assert "(422): the setting exists only for private and internal repositories" in message
    assert "is acme/models public?" in message


def test_an_unanswered_call_fails_within_the_timeout(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub,
        monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(provider, "TIMEOUT_SECONDS", 0.3)  # this instance only
    fake_github.inject("PUT", ENDPOINT, None, delay=5.0)
    started = time.monotonic()
    with pytest.raises(ConnectionError) as raised:
        provider.create(checked(provider, fake_github))
    assert time.monotonic() - started < 3.0
    assert str(raised.value).startswith(
        f"could not reach GitHub at {fake_github.url} for acme/models within 0.3 s")


def test_a_dropped_connection_is_a_connection_error(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    fake_github.inject("PUT", ENDPOINT, None, drop=True)
    with pytest.raises(ConnectionError, match="could not reach GitHub"):
        provider.create(checked(provider, fake_github))


# --- the provider as Pulumi stores and runs it ---------------------------------------------------


def test_serialized_provider_works_in_a_separate_process(
        provider: ForkPrWorkflowsProvider, fake_github: FakeGitHub) -> None:
    # The dynamic provider host loads the provider from the state, in its own process started
    # in the project directory, and calls it with the resource's properties.
    fake_github.fork_pr_settings.update(RUN_WITH_APPROVAL)
    serialized = serialize_provider(provider)
    host = ("import base64, json, sys, dill\n"
            "provider = dill.loads(base64.b64decode(sys.argv[1]))\n"
            "print(json.dumps(provider.create(json.loads(sys.argv[2])).outs))\n")
    inputs = checked(provider, fake_github)
    done = subprocess.run([sys.executable, "-c", host, serialized, json.dumps(inputs)],
                          cwd=REPO_ROOT, capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == inputs
    assert fake_github.fork_pr_settings == ALL_OFF


def test_resource_keeps_the_token_secret_and_out_of_the_serialized_provider() -> None:
    token = "ghp_token_that_must_stay_secret_0123456789"
    # A plain string on purpose: the resource must make it secret itself.
    run = run_under_mocks(lambda: {"id": ForkPrWorkflows("fork-prs", ForkPrWorkflowsArgs(
        owner="acme", repository="models", token=token)).id})

    [registered] = [r for r in run.resources if r.name == "fork-prs"]
    assert registered.typ == "pulumi-python:dynamic/gpu-runners:ForkPrWorkflows"
    assert registered.is_secret("token")
    assert registered.inputs["token"] == token
    assert {key: registered.inputs[key] for key in ("owner", "repository", "api_url")} == {
        "owner": "acme", "repository": "models", "api_url": DEFAULT_API_URL}
    assert settings_of(registered.inputs) == ALL_OFF
    assert registered.additional_secret_outputs == ["token"]
    serialized_provider = base64.b64decode(registered.inputs["__provider"])
    assert token.encode() not in serialized_provider
