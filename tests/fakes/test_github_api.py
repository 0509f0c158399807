"""The fake GitHub answers like api.github.com: shapes, statuses, pagination, auth, faults.

The client here is plain urllib, so these tests check the fake itself over real HTTP, not the
project's GitHub client.
"""

import base64
import json
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from datetime import datetime, timedelta
from typing import Any

import jwt
import pytest

from tests.fakes.github_api import FakeGitHub, RecordedRequest
from tests.fakes.github_app_auth import AppKeyPair, new_app_key

pytest_plugins = ["tests.fakes.fixtures"]

REPO = "/repos/acme/models"
RUNNERS = f"{REPO}/actions/runners"
FORK_PR = f"{REPO}/actions/permissions/fork-pr-workflows-private-repos"


class Answer:
    """A response as the test sees it: status, lower-cased headers and the parsed JSON body."""

    def __init__(self, status: int, headers: dict[str, str], raw: bytes) -> None:
        self.status = status
        self.headers = headers
        self.body: Any = json.loads(raw) if raw else None


def call(
    github: FakeGitHub,
    method: str,
    path: str,
    body: Any = None,
    *,
    auth: str | None = "Bearer ghp_fake",
    url: str | None = None,
    timeout: float = 5.0,
) -> Answer:
    data = json.dumps(body).encode() if body is not None else None
    headers = {"Accept": "application/vnd.github+json"}
    if auth is not None:
        headers["Authorization"] = auth
    if data is not None:
        headers["Content-Type"] = "application/json"
    # The URL is the local fake's (http://127.0.0.1), never a file: or remote one.
    request = urllib.request.Request(url or github.url + path, data, headers, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            return Answer(response.status, _lower(response.headers), response.read())
    except urllib.error.HTTPError as e:
        with e:
            return Answer(e.code, _lower(e.headers), e.read())


def _lower(headers: Any) -> dict[str, str]:
    return {str(key).lower(): str(value) for key, value in headers.items()}


def jit_body(name: str = "gpu-7-1", **overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "name": name,
        "runner_group_id": 1,
        "labels": ["self-hosted", name],
        "work_folder": "_work",
    }
    body.update(overrides)
    return body


def next_link(answer: Answer) -> str | None:
    for part in answer.headers.get("link", "").split(","):
        url, _, rel = part.partition(";")
        if rel.strip() == 'rel="next"':
            return url.strip().strip("<>")
    return None


# --- tokens and JIT configs ----------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["registration-token", "remove-token"])
def test_runner_tokens_are_created_and_expire_in_one_hour(
    fake_github: FakeGitHub, kind: str
) -> None:
    before = datetime.now().astimezone()
    answer = call(fake_github, "POST", f"{RUNNERS}/{kind}")

    assert answer.status == 201
    assert set(answer.body) == {"token", "expires_at"}
    expires = datetime.fromisoformat(answer.body["expires_at"])
    assert timedelta(minutes=59) < expires - before <= timedelta(hours=1, seconds=5)
    issued = (
        fake_github.registration_tokens
        if kind == "registration-token"
        else fake_github.remove_tokens
    )
    assert issued == [answer.body["token"]]


def test_jitconfig_registers_an_offline_ephemeral_runner_and_encodes_its_config(
    fake_github: FakeGitHub,
) -> None:
    answer = call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig", jit_body("gpu-7-1"))

    assert answer.status == 201
    runner = answer.body["runner"]
    assert runner["name"] == "gpu-7-1"
    assert runner["status"] == "offline"
    assert runner["busy"] is False
    assert [(label["name"], label["type"]) for label in runner["labels"]] == [
        ("self-hosted", "read-only"),
        ("gpu-7-1", "custom"),
    ]
    assert fake_github.runners[runner["id"]]["ephemeral"] is True
    files = json.loads(base64.b64decode(answer.body["encoded_jit_config"]))
    assert set(files) == {".runner", ".credentials", ".credentials_rsaparams"}
    dot_runner = FakeGitHub.decode_jit_config(answer.body["encoded_jit_config"])[".runner"]
    assert dot_runner["agentId"] == runner["id"]
    assert dot_runner["agentName"] == "gpu-7-1"
    assert dot_runner["gitHubUrl"] == "https://github.com/acme/models"
    assert dot_runner["ephemeral"] is True
    assert fake_github.jit_configs[runner["id"]] == answer.body["encoded_jit_config"]


def test_jitconfig_registers_exactly_the_labels_given_and_adds_no_default(
    fake_github: FakeGitHub,
) -> None:
    # GitHub adds no `self-hosted`/OS/architecture label to a JIT registration (config.sh adds
    # those, and a JIT runner never runs it): a fake that added them would hide a runner that
    # other jobs could take.
    answer = call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig",
                  jit_body("gpu-8-2", labels=["gpu-8-2"]))

    assert answer.status == 201
    stored = fake_github.runner_named("gpu-8-2")
    assert stored is not None
    assert [label["name"] for label in answer.body["runner"]["labels"]] == ["gpu-8-2"]
    assert [label["name"] for label in stored["labels"]] == ["gpu-8-2"]


def test_jitconfig_for_a_name_in_use_is_a_409_conflict(fake_github: FakeGitHub) -> None:
    fake_github.add_runner("gpu-7-1", ["gpu-7-1"])

    answer = call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig", jit_body("gpu-7-1"))

    assert answer.status == 409
    assert "already exists" in answer.body["message"]
    assert answer.body["documentation_url"].startswith("https://docs.github.com/rest")
    assert len(fake_github.runners) == 1


@pytest.mark.parametrize(
    ("body", "named"),
    [
        ({"runner_group_id": 1, "labels": ["gpu"]}, '"name"'),
        ({"name": "gpu-1-1", "labels": ["gpu"]}, '"runner_group_id"'),
        ({"name": "gpu-1-1", "runner_group_id": 1, "labels": []}, '"labels"'),
        ({"name": "gpu-1-1", "runner_group_id": 1, "labels": [f"l{i}" for i in range(101)]}, "100"),
    ],
    ids=["no-name", "no-group", "no-labels", "101-labels"],
)
def test_jitconfig_without_required_fields_is_a_422_naming_the_field(
    fake_github: FakeGitHub, body: dict[str, Any], named: str
) -> None:
    answer = call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig", body)

    assert answer.status == 422
    assert named in answer.body["message"]
    assert fake_github.runners == {}


def test_jitconfig_for_an_unknown_runner_group_is_a_404(fake_github: FakeGitHub) -> None:
    answer = call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig", jit_body(runner_group_id=9))

    assert answer.status == 404
    assert fake_github.runners == {}


# --- listing, reading and deleting runners -------------------------------------------------------


def test_runner_list_pages_follow_the_link_header_to_every_runner() -> None:
    with FakeGitHub(page_size_max=2) as github:
        for index in range(5):
            github.add_runner(f"runner-{index}", ["self-hosted", "base-runner"])

        first = call(github, "GET", f"{RUNNERS}?per_page=50")
        assert first.status == 200
        assert first.body["total_count"] == 5
        assert [r["name"] for r in first.body["runners"]] == ["runner-0", "runner-1"]
        assert 'rel="last"' in first.headers["link"]
        assert "page=3" in first.headers["link"].split(",")[-1]

        names = [r["name"] for r in first.body["runners"]]
        link = next_link(first)
        pages = 1
        while link is not None:
            assert link.startswith(github.url + RUNNERS)
            answer = call(github, "GET", "", url=link)
            names += [r["name"] for r in answer.body["runners"]]
            link = next_link(answer)
            pages += 1
            assert pages <= 3

    assert names == [f"runner-{index}" for index in range(5)]
    assert pages == 3


def test_runner_list_name_filter_matches_the_exact_name_only(fake_github: FakeGitHub) -> None:
    fake_github.add_runner("gpu-7-1", ["gpu-7-1"])
    fake_github.add_runner("gpu-7-10", ["gpu-7-10"])

    answer = call(fake_github, "GET", f"{RUNNERS}?name=gpu-7-1")

    assert answer.body["total_count"] == 1
    assert [r["name"] for r in answer.body["runners"]] == ["gpu-7-1"]
    assert "link" not in answer.headers


def test_runner_is_read_by_id_with_its_status_and_labels(fake_github: FakeGitHub) -> None:
    added = fake_github.add_runner("base-1", ["self-hosted", "base-runner"], busy=True)
    fake_github.set_runner_status("base-1", "online", busy=False)

    answer = call(fake_github, "GET", f"{RUNNERS}/{added['id']}")

    assert answer.status == 200
    assert answer.body["name"] == "base-1"
    assert answer.body["os"] == "Linux"
    assert answer.body["status"] == "online"
    assert answer.body["busy"] is False
    assert [label["name"] for label in answer.body["labels"]] == ["self-hosted", "base-runner"]


def test_unknown_runner_id_is_a_404_on_get_and_delete(fake_github: FakeGitHub) -> None:
    assert call(fake_github, "GET", f"{RUNNERS}/999").status == 404
    answer = call(fake_github, "DELETE", f"{RUNNERS}/999")
    assert answer.status == 404
    assert answer.body["message"] == "Not Found"


def test_deleting_an_idle_runner_removes_it(fake_github: FakeGitHub) -> None:
    runner = fake_github.add_runner("gpu-3-1", ["gpu-3-1"], status="offline")

    answer = call(fake_github, "DELETE", f"{RUNNERS}/{runner['id']}")

    assert answer.status == 204
    assert answer.body is None
    assert fake_github.runners == {}


def test_deleting_a_busy_runner_is_refused_with_422(fake_github: FakeGitHub) -> None:
    runner = fake_github.add_runner("gpu-3-1", ["gpu-3-1"], busy=True)

    answer = call(fake_github, "DELETE", f"{RUNNERS}/{runner['id']}")

    assert answer.status == 422
    assert "still running a job" in answer.body["message"]
    assert runner["id"] in fake_github.runners


# --- organisation scope ---------------------------------------------------------------------------


def test_organisation_scope_serves_runner_routes_and_the_default_runner_group() -> None:
    with FakeGitHub(org="acme-ml") as github:
        groups = call(github, "GET", "/orgs/acme-ml/actions/runner-groups")
        created = call(
            github, "POST", "/orgs/acme-ml/actions/runners/generate-jitconfig", jit_body()
        )
        listed = call(github, "GET", "/orgs/acme-ml/actions/runners")
        other_org = call(github, "GET", "/orgs/someone-else/actions/runners")

    assert groups.status == 200
    assert groups.body["total_count"] == 1
    assert groups.body["runner_groups"][0]["id"] == 1
    assert groups.body["runner_groups"][0]["name"] == "Default"
    assert created.status == 201
    dot_runner = FakeGitHub.decode_jit_config(created.body["encoded_jit_config"])[".runner"]
    assert dot_runner["gitHubUrl"] == "https://github.com/acme-ml"
    assert [r["name"] for r in listed.body["runners"]] == ["gpu-7-1"]
    assert other_org.status == 404


def test_organisation_routes_are_404_when_the_fake_has_no_organisation(
    fake_github: FakeGitHub,
) -> None:
    assert call(fake_github, "GET", "/orgs/acme/actions/runner-groups").status == 404


# --- workflow runs, repository, fork PR settings ------------------------------------------------


def test_workflow_run_reports_the_status_the_test_set(fake_github: FakeGitHub) -> None:
    fake_github.set_run_status(42, "in_progress")
    running = call(fake_github, "GET", f"{REPO}/actions/runs/42")
    fake_github.set_run_status(42, "completed", "success")
    done = call(fake_github, "GET", f"{REPO}/actions/runs/42")

    assert running.status == 200
    assert (running.body["status"], running.body["conclusion"]) == ("in_progress", None)
    assert (done.body["status"], done.body["conclusion"]) == ("completed", "success")
    assert done.body["html_url"] == "https://github.com/acme/models/actions/runs/42"
    assert call(fake_github, "GET", f"{REPO}/actions/runs/43").status == 404


def test_set_run_status_rejects_a_completed_run_without_conclusion(fake_github: FakeGitHub) -> None:
    with pytest.raises(ValueError, match="conclusion"):
        fake_github.set_run_status(42, "completed")


def test_repository_object_reports_its_visibility() -> None:
    with FakeGitHub(owner="acme", repo="models", private=False) as github:
        answer = call(github, "GET", REPO)

    assert answer.status == 200
    assert answer.body["name"] == "models"
    assert answer.body["full_name"] == "acme/models"
    assert answer.body["private"] is False
    assert answer.body["visibility"] == "public"


def test_fork_pr_settings_are_read_and_replaced(fake_github: FakeGitHub) -> None:
    before = call(fake_github, "GET", FORK_PR)
    wanted = {
        "run_workflows_from_fork_pull_requests": True,
        "send_write_tokens_to_workflows": False,
        "send_secrets_and_variables": False,
        "require_approval_for_fork_pr_workflows": True,
    }
    put = call(fake_github, "PUT", FORK_PR, wanted)
    after = call(fake_github, "GET", FORK_PR)

    assert before.status == 200
    assert before.body == dict.fromkeys(wanted, False)
    assert put.status == 204
    assert after.body == wanted
    assert fake_github.fork_pr_settings == wanted


@pytest.mark.parametrize(
    "body",
    [
        {"send_write_tokens_to_workflows": False},
        {"run_workflows_from_fork_pull_requests": "yes"},
        {"run_workflows_from_fork_pull_requests": False, "send_everything": True},
    ],
    ids=["required-key-missing", "not-a-boolean", "unknown-key"],
)
def test_fork_pr_settings_put_with_an_invalid_body_is_a_422(
    fake_github: FakeGitHub, body: dict[str, Any]
) -> None:
    answer = call(fake_github, "PUT", FORK_PR, body)

    assert answer.status == 422
    assert fake_github.fork_pr_settings["run_workflows_from_fork_pull_requests"] is False


def test_fork_pr_settings_of_a_public_repository_are_a_422() -> None:
    with FakeGitHub(private=False) as github:
        answer = call(github, "GET", FORK_PR)

    assert answer.status == 422
    assert "private repositories" in answer.body["message"]


# --- auth and routing ----------------------------------------------------------------------------


@pytest.mark.parametrize("auth", ["Bearer ghp_fake", "token ghp_fake"])
def test_both_authorization_schemes_are_accepted(fake_github: FakeGitHub, auth: str) -> None:
    assert call(fake_github, "GET", REPO, auth=auth).status == 200


@pytest.mark.parametrize("auth", [None, "Bearer ghp_wrong", "Basic ghp_fake"])
def test_missing_or_wrong_token_is_401_bad_credentials(
    fake_github: FakeGitHub, auth: str | None
) -> None:
    answer = call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig", jit_body(), auth=auth)

    assert answer.status == 401
    assert answer.body["message"] == "Bad credentials"
    assert answer.body["documentation_url"] == "https://docs.github.com/rest"
    assert fake_github.runners == {}


@pytest.mark.parametrize(
    "path",
    ["/repos/acme/other/actions/runners", "/repos/other/models", "/repos/acme/models/nothing"],
)
def test_unknown_repository_or_route_is_404_not_found(fake_github: FakeGitHub, path: str) -> None:
    answer = call(fake_github, "GET", path)

    assert answer.status == 404
    assert answer.body["message"] == "Not Found"


# --- injected faults -----------------------------------------------------------------------------


def test_injected_fault_answers_exactly_times_then_the_route_answers(
    fake_github: FakeGitHub,
) -> None:
    fake_github.inject(
        "GET",
        r"/actions/runners$",
        429,
        times=2,
        headers={"Retry-After": "1", "X-RateLimit-Remaining": "0", "X-RateLimit-Reset": "99"},
    )

    answers = [call(fake_github, "GET", RUNNERS) for _ in range(3)]

    assert [a.status for a in answers] == [429, 429, 200]
    assert answers[0].headers["retry-after"] == "1"
    assert answers[0].headers["x-ratelimit-remaining"] == "0"
    assert answers[0].headers["x-ratelimit-reset"] == "99"
    assert answers[0].body["message"] == "Too Many Requests"
    assert answers[2].headers["x-ratelimit-remaining"] != "0"
    assert fake_github.pending_faults() == 0


def test_injected_fault_matches_method_and_path_only(fake_github: FakeGitHub) -> None:
    fake_github.inject("DELETE", r"/actions/runners/\d+$", 500, body={"message": "boom"})
    runner = fake_github.add_runner("gpu-1-1", ["gpu-1-1"])

    read = call(fake_github, "GET", f"{RUNNERS}/{runner['id']}")
    deleted = call(fake_github, "DELETE", f"{RUNNERS}/{runner['id']}")
    again = call(fake_github, "DELETE", f"{RUNNERS}/{runner['id']}")

    assert (read.status, deleted.status, again.status) == (200, 500, 204)
    assert deleted.body == {"message": "boom"}


def test_injected_fault_is_answered_before_auth(fake_github: FakeGitHub) -> None:
    fake_github.inject("*", r"^/repos/", 403, body={"message": "Resource not accessible"})

    answer = call(fake_github, "GET", REPO, auth=None)

    assert answer.status == 403
    assert answer.body["message"] == "Resource not accessible"


def test_dropped_connection_is_a_connection_error_for_the_client(fake_github: FakeGitHub) -> None:
    fake_github.inject("POST", r"/generate-jitconfig$", None, drop=True)

    with pytest.raises((ConnectionError, urllib.error.URLError)):
        call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig", jit_body())

    assert fake_github.runners == {}
    assert call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig", jit_body()).status == 201


def test_delayed_answer_times_out_a_client_with_a_shorter_timeout(fake_github: FakeGitHub) -> None:
    fake_github.inject("GET", r"/actions/runs/", None, delay=2.0)
    fake_github.set_run_status(5, "queued")

    started = time.monotonic()
    with pytest.raises((TimeoutError, urllib.error.URLError)):
        call(fake_github, "GET", f"{REPO}/actions/runs/5", timeout=0.2)

    assert time.monotonic() - started < 1.5
    assert call(fake_github, "GET", f"{REPO}/actions/runs/5").body["status"] == "queued"


def test_inject_rejects_a_fault_it_cannot_serve(fake_github: FakeGitHub) -> None:
    with pytest.raises(ValueError, match="drop=True or a delay"):
        fake_github.inject("GET", ".*", None)
    with pytest.raises(ValueError, match="status=None"):
        fake_github.inject("GET", ".*", 500, drop=True)
    with pytest.raises(ValueError, match="times"):
        fake_github.inject("GET", ".*", 500, times=0)


# --- recording -----------------------------------------------------------------------------------


def test_requests_are_recorded_in_order_with_headers_query_and_body(
    fake_github: FakeGitHub,
) -> None:
    call(fake_github, "GET", f"{RUNNERS}?name=gpu-7-1&per_page=100")
    call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig", jit_body("gpu-7-1"))
    call(fake_github, "GET", REPO, auth=None)

    methods_paths = [(r.method, r.path) for r in fake_github.requests]
    assert methods_paths == [
        ("GET", RUNNERS),
        ("POST", f"{RUNNERS}/generate-jitconfig"),
        ("GET", REPO),
    ]
    listed, created, refused = fake_github.requests
    assert listed.query == {"name": ["gpu-7-1"], "per_page": ["100"]}
    assert listed.body is None
    assert created.headers["authorization"] == "Bearer ghp_fake"
    assert created.headers["content-type"] == "application/json"
    assert created.body == jit_body("gpu-7-1")
    assert "authorization" not in refused.headers
    assert fake_github.requests_to(r"/generate-jitconfig$", "post") == [created]
    assert fake_github.requests_to(r"/actions/runners", "DELETE") == []


def test_on_request_callback_sees_each_request_before_it_is_answered(
    fake_github: FakeGitHub,
) -> None:
    seen: list[RecordedRequest] = []

    def go_online(request: RecordedRequest) -> None:
        seen.append(request)
        if request.method == "GET" and request.path.startswith(f"{RUNNERS}/"):
            fake_github.set_runner_status("gpu-1-1", "online")

    runner = fake_github.add_runner("gpu-1-1", ["gpu-1-1"], status="offline")
    fake_github.on_request(go_online)

    answer = call(fake_github, "GET", f"{RUNNERS}/{runner['id']}")

    assert answer.body["status"] == "online"
    assert [r.path for r in seen] == [f"{RUNNERS}/{runner['id']}"]


def test_a_failing_callback_is_answered_as_500_naming_the_error(fake_github: FakeGitHub) -> None:
    def broken(request: RecordedRequest) -> None:
        raise KeyError("no such runner")

    fake_github.on_request(broken)

    answer = call(fake_github, "GET", REPO)

    assert answer.status == 500
    assert "no such runner" in answer.body["message"]


def test_wait_for_requests_returns_once_a_background_client_called(fake_github: FakeGitHub) -> None:
    worker = threading.Thread(target=call, args=(fake_github, "POST", f"{RUNNERS}/remove-token"))
    worker.start()
    try:
        arrived = fake_github.wait_for_requests(r"/remove-token$", "POST", timeout=5)
    finally:
        worker.join(timeout=5)

    assert [r.method for r in arrived] == ["POST"]
    with pytest.raises(TimeoutError, match="0 of 1"):
        fake_github.wait_for_requests(r"/never$", timeout=0.05)


def test_stop_frees_the_port(fake_github: FakeGitHub) -> None:
    url = fake_github.url
    fake_github.stop()

    with pytest.raises(urllib.error.URLError):
        urllib.request.urlopen(url + REPO, timeout=2)
    with pytest.raises(RuntimeError, match="not started"):
        _ = fake_github.url
    assert urllib.parse.urlsplit(url).hostname == "127.0.0.1"


# --- repository ids, token scopes, releases -----------------------------------------------------


def test_the_repository_reports_the_ids_the_test_set(fake_github: FakeGitHub) -> None:
    fake_github.repository_id = 4242
    fake_github.owner_id = 77

    answer = call(fake_github, "GET", REPO)

    assert answer.status == 200
    assert answer.body["id"] == 4242
    assert answer.body["owner"] == {"login": "acme", "id": 77}
    assert answer.body["full_name"] == "acme/models"


def test_x_oauth_scopes_is_sent_only_when_the_token_is_a_classic_pat(
    fake_github: FakeGitHub,
) -> None:
    fine_grained = call(fake_github, "GET", REPO)
    fake_github.oauth_scopes = "repo, workflow"
    classic = call(fake_github, "GET", RUNNERS)

    assert "x-oauth-scopes" not in fine_grained.headers
    assert classic.headers["x-oauth-scopes"] == "repo, workflow"


def test_releases_list_newest_first_and_latest_skips_prereleases(
    fake_github: FakeGitHub,
) -> None:
    now = datetime(2026, 11, 1)
    fake_github.add_release("actions/runner", "v2.329.0", now - timedelta(days=40))
    fake_github.add_release("actions/runner", "v2.330.0", now - timedelta(days=10))
    fake_github.add_release("actions/runner", "v2.331.0", now, prerelease=True)

    listed = call(fake_github, "GET", "/repos/actions/runner/releases")
    latest = call(fake_github, "GET", "/repos/actions/runner/releases/latest")
    other = call(fake_github, "GET", "/repos/actions/other/releases/latest")

    assert [release["tag_name"] for release in listed.body] == [
        "v2.331.0", "v2.330.0", "v2.329.0"]
    assert latest.body["tag_name"] == "v2.330.0"
    assert latest.body["published_at"] == "2026-10-22T00:00:00Z"
    assert other.status == 404


# --- GitHub Apps: App JWTs, installation tokens ---------------------------------------------

APP_ID = 123456
CLIENT_ID = "Iv23liFakeClient0001"
INSTALLATION_ID = 7890
ACCESS_TOKENS = f"/app/installations/{INSTALLATION_ID}/access_tokens"
RUNNER_RIGHTS = {"administration": "write", "actions": "read"}


@pytest.fixture(scope="module")
def app_key() -> AppKeyPair:
    return new_app_key()


@pytest.fixture
def app_github(fake_github: FakeGitHub, app_key: AppKeyPair) -> FakeGitHub:
    """The fake with one App installed on acme/models with the runner permissions."""
    fake_github.register_app(APP_ID, CLIENT_ID, app_key.public_pem)
    fake_github.install_app(APP_ID, INSTALLATION_ID, {**RUNNER_RIGHTS, "contents": "read"},
                            repository_ids={fake_github.repository_id})
    return fake_github


def app_jwt(key: AppKeyPair, *, iss: object = CLIENT_ID, iat: float | None = None,
            exp: float | None = None) -> str:
    now = time.time()
    claims = {"iss": iss, "iat": int(now - 60 if iat is None else iat),
              "exp": int(now + 540 if exp is None else exp)}
    return jwt.encode(claims, key.private_pem, algorithm="RS256")


def mint(github: FakeGitHub, token: str, body: Any = None, *,
         installation: int = INSTALLATION_ID) -> Answer:
    return call(github, "POST", f"/app/installations/{installation}/access_tokens", body,
                auth=f"Bearer {token}")


def test_app_jwt_mints_an_installation_token_that_runner_routes_accept(
        app_github: FakeGitHub, app_key: AppKeyPair) -> None:
    answer = mint(app_github, app_jwt(app_key), {
        "repository_ids": [app_github.repository_id], "permissions": RUNNER_RIGHTS})
    assert answer.status == 201
    assert answer.body["token"].startswith("ghs_")
    assert answer.body["permissions"] == RUNNER_RIGHTS
    assert answer.body["repository_selection"] == "selected"
    expires = datetime.fromisoformat(answer.body["expires_at"]).timestamp()
    assert 3590 <= expires - time.time() <= 3600  # an hour, GitHub's lifetime
    listed = call(app_github, "GET", RUNNERS, auth=f"Bearer {answer.body['token']}")
    assert listed.status == 200


@pytest.mark.parametrize("iss", [CLIENT_ID, str(APP_ID)])
def test_app_jwt_iss_may_be_the_client_id_or_the_app_id(
        app_github: FakeGitHub, app_key: AppKeyPair, iss: str) -> None:
    assert mint(app_github, app_jwt(app_key, iss=iss)).status == 201


def test_app_jwt_with_bad_time_claims_or_issuer_is_refused(
        app_github: FakeGitHub, app_key: AppKeyPair) -> None:
    now = time.time()
    cases = {
        "iat in the future": app_jwt(app_key, iat=now + 120, exp=now + 500),
        "expired": app_jwt(app_key, iat=now - 700, exp=now - 100),
        "longer than 10 minutes": app_jwt(app_key, iat=now - 60, exp=now + 600),
        "unknown issuer": app_jwt(app_key, iss="Iv23liSomeoneElse"),
        "not a JWT": "ghp_fake",
    }
    answers = {case: mint(app_github, token) for case, token in cases.items()}
    assert {case: a.status for case, a in answers.items()} == dict.fromkeys(cases, 401)
    assert "too far in the future" in answers["longer than 10 minutes"].body["message"]
    assert app_github.installation_tokens() == []


def test_app_jwt_signed_by_another_or_removed_key_is_refused(
        app_github: FakeGitHub, app_key: AppKeyPair) -> None:
    stranger = new_app_key()
    assert mint(app_github, app_jwt(stranger)).status == 401
    app_github.add_app_key(APP_ID, stranger.public_pem)
    assert mint(app_github, app_jwt(stranger)).status == 201
    app_github.remove_app_key(APP_ID, app_key.public_pem)
    refused = mint(app_github, app_jwt(app_key))
    assert (refused.status, refused.body["message"]) == (
        401, "A JSON web token could not be decoded")


def test_unknown_installation_is_404(app_github: FakeGitHub, app_key: AppKeyPair) -> None:
    assert mint(app_github, app_jwt(app_key), installation=INSTALLATION_ID + 1).status == 404


def test_narrowing_beyond_the_installation_grant_is_422(
        app_github: FakeGitHub, app_key: AppKeyPair) -> None:
    beyond_level = mint(app_github, app_jwt(app_key), {"permissions": {"contents": "write"}})
    beyond_name = mint(app_github, app_jwt(app_key), {"permissions": {"secrets": "read"}})
    other_repo = mint(app_github, app_jwt(app_key), {"repository_ids": [42]})
    assert [a.status for a in (beyond_level, beyond_name, other_repo)] == [422, 422, 422]
    assert "not granted to this installation" in beyond_level.body["message"]
    assert "not accessible to the parent installation" in other_repo.body["message"]


def test_installation_token_only_reaches_what_it_was_narrowed_to(
        app_github: FakeGitHub, app_key: AppKeyPair) -> None:
    app_github.set_run_status(5, "in_progress")
    read_runs = mint(app_github, app_jwt(app_key), {"permissions": {"actions": "read"}})
    auth = f"Bearer {read_runs.body['token']}"
    assert call(app_github, "GET", f"{REPO}/actions/runs/5", auth=auth).status == 200
    refused = call(app_github, "GET", RUNNERS, auth=auth)
    assert (refused.status, refused.body["message"]) == (
        403, "Resource not accessible by integration")
    administration_read = mint(app_github, app_jwt(app_key),
                               {"permissions": {"administration": "read"}})
    jit = call(app_github, "POST", f"{RUNNERS}/generate-jitconfig",
               {"name": "gpu-1-1", "runner_group_id": 1, "labels": ["gpu-1-1"]},
               auth=f"Bearer {administration_read.body['token']}")
    assert jit.status == 403
    assert app_github.runner_named("gpu-1-1") is None


def test_installation_token_expires_on_the_fake_clock_and_can_be_revoked(
        app_github: FakeGitHub, app_key: AppKeyPair) -> None:
    now = [time.time()]
    app_github.clock = lambda: now[0]
    app_github.set_installation_token_lifetime(120)
    first = mint(app_github, app_jwt(app_key)).body["token"]
    second = mint(app_github, app_jwt(app_key)).body["token"]
    assert call(app_github, "GET", RUNNERS, auth=f"Bearer {first}").status == 200
    app_github.revoke_installation_token(first)
    assert call(app_github, "GET", RUNNERS, auth=f"Bearer {first}").status == 401
    now[0] += 121
    assert call(app_github, "GET", RUNNERS, auth=f"Bearer {second}").status == 401


# --- workflow jobs, dispatch, re-runs and cancellation -------------------------------------------

RUN = f"{REPO}/actions/runs/42"


def job_names(answer: Answer) -> list[tuple[str, str, str | None]]:
    return [(job["name"], job["status"], job["conclusion"]) for job in answer.body["jobs"]]


def register_jit(github: FakeGitHub, name: str) -> None:
    assert call(github, "POST", f"{RUNNERS}/generate-jitconfig", jit_body(name)).status == 201


def test_a_queued_job_waits_for_an_online_idle_runner_with_all_its_labels(
    fake_github: FakeGitHub,
) -> None:
    job = fake_github.add_job(42, "gpu", ["self-hosted", "gpu-7-1"])
    fake_github.add_runner("cpu-1", ["self-hosted", "cpu"])
    fake_github.add_runner("busy-gpu", ["self-hosted", "gpu-7-1"], busy=True)
    register_jit(fake_github, "gpu-7-1")  # registered, offline until it connects

    assert (job["status"], job["conclusion"], job["runner_name"]) == ("queued", None, None)
    assert (job["run_id"], job["run_attempt"]) == (42, 1)
    assert fake_github.jobs(42)[0]["status"] == "queued"
    fake_github.set_runner_status("gpu-7-1", "online")
    [taken] = fake_github.jobs(42)
    runner = fake_github.runner_named("gpu-7-1")
    assert runner is not None
    assert (taken["status"], taken["runner_name"], taken["runner_id"]) == (
        "in_progress", "gpu-7-1", runner["id"])
    assert runner["busy"] is True
    run = call(fake_github, "GET", RUN).body
    assert (run["status"], run["conclusion"], run["run_attempt"]) == ("in_progress", None, 1)


def test_labels_match_case_insensitively_and_a_runner_takes_one_job_at_a_time(
    fake_github: FakeGitHub,
) -> None:
    fake_github.add_runner("gpu-a", ["self-hosted", "GPU"])
    first = fake_github.add_job(42, "one", ["gpu"])
    second = fake_github.add_job(42, "two", ["gpu"])

    assert first["runner_name"] == "gpu-a"
    assert second["status"] == "queued"
    fake_github.complete_job("gpu-a")  # not ephemeral: it idles and takes the next one
    assert [job["runner_name"] for job in fake_github.jobs(42)] == ["gpu-a", "gpu-a"]
    assert fake_github.jobs(42)[1]["status"] == "in_progress"


def test_completing_the_last_job_completes_the_run_and_removes_the_jit_runner(
    fake_github: FakeGitHub,
) -> None:
    register_jit(fake_github, "gpu-7-1")
    fake_github.set_runner_status("gpu-7-1", "online")
    fake_github.add_job(42, "gpu", ["gpu-7-1"])

    done = fake_github.complete_job("gpu-7-1")

    assert (done["status"], done["conclusion"]) == ("completed", "success")
    assert done["completed_at"] is not None
    assert fake_github.runner_named("gpu-7-1") is None
    run = call(fake_github, "GET", RUN).body
    assert (run["status"], run["conclusion"]) == ("completed", "success")


@pytest.mark.parametrize(
    ("conclusions", "run_conclusion"),
    [(["success", "failure", "cancelled"], "failure"),
     (["success", "cancelled"], "cancelled"),
     (["success", "success"], "success")],
)
def test_the_run_concludes_from_its_jobs(
    fake_github: FakeGitHub, conclusions: list[str], run_conclusion: str
) -> None:
    fake_github.add_runner("any", ["x"])
    for index, _ in enumerate(conclusions):
        fake_github.add_job(42, f"job-{index}", ["x"])
    for conclusion in conclusions:
        fake_github.complete_job("any", conclusion)

    assert call(fake_github, "GET", RUN).body["conclusion"] == run_conclusion


def test_jobs_routes_page_with_link_headers_and_404_for_unknown_runs_and_attempts() -> None:
    with FakeGitHub(page_size_max=2) as github:
        for index in range(3):
            github.add_job(42, f"job-{index}", ["x"])

        first = call(github, "GET", f"{RUN}/jobs?per_page=2")
        link = next_link(first)
        assert link is not None
        second = call(github, "GET", "", url=link)
        attempt = call(github, "GET", f"{RUN}/attempts/1/jobs")

        assert first.body["total_count"] == 3
        assert [j["name"] for j in first.body["jobs"] + second.body["jobs"]] == [
            "job-0", "job-1", "job-2"]
        assert attempt.body["total_count"] == 3
        assert call(github, "GET", f"{REPO}/actions/runs/7/jobs").status == 404
        assert call(github, "GET", f"{RUN}/attempts/2/jobs").status == 404
        assert call(github, "GET", f"{RUN}/jobs?filter=newest").status == 422


def test_a_lost_runner_stays_busy_until_github_fails_its_job(fake_github: FakeGitHub) -> None:
    register_jit(fake_github, "gpu-7-1")
    fake_github.set_runner_status("gpu-7-1", "online")
    fake_github.add_job(42, "gpu", ["gpu-7-1"])

    fake_github.lose_runner("gpu-7-1")
    lost = fake_github.runner_named("gpu-7-1")
    assert lost is not None
    assert (lost["status"], lost["busy"]) == ("offline", True)
    assert fake_github.jobs(42)[0]["status"] == "in_progress"
    failed = fake_github.fail_lost_job("gpu-7-1")

    assert (failed["status"], failed["conclusion"]) == ("completed", "failure")
    after = fake_github.runner_named("gpu-7-1")
    assert after is not None
    assert (after["status"], after["busy"]) == ("offline", False)


def test_the_full_story_a_preempted_gpu_job_is_rerun_on_a_new_runner_with_its_label(
    fake_github: FakeGitHub,
) -> None:
    fake_github.add_job(42, "build", ["ubuntu-latest"])
    fake_github.add_runner("hosted", ["ubuntu-latest"])
    fake_github.complete_job("hosted")
    gpu = fake_github.add_job(42, "gpu", ["self-hosted", "gpu-7-1"], needs=("build",))
    fake_github.add_job(42, "cleanup", ["ubuntu-latest"], needs=("gpu",))
    assert gpu["status"] == "queued"
    register_jit(fake_github, "gpu-7-1")
    fake_github.set_runner_status("gpu-7-1", "online")
    assert fake_github.jobs(42)[1]["runner_name"] == "gpu-7-1"

    fake_github.lose_runner("gpu-7-1")
    fake_github.fail_lost_job("gpu-7-1")

    run = call(fake_github, "GET", RUN).body
    assert (run["status"], run["conclusion"]) == ("completed", "failure")
    assert job_names(call(fake_github, "GET", f"{RUN}/jobs")) == [
        ("build", "completed", "success"),
        ("gpu", "completed", "failure"),
        ("cleanup", "completed", "skipped"),
    ]
    rerun = call(fake_github, "POST", f"{RUN}/rerun-failed-jobs", {"enable_debug_logging": False})
    assert (rerun.status, rerun.body) == (201, {})
    run = call(fake_github, "GET", RUN).body
    assert (run["run_attempt"], run["status"], run["conclusion"]) == (2, "queued", None)
    attempt = call(fake_github, "GET", f"{RUN}/attempts/2/jobs").body["jobs"]
    assert [(j["name"], j["status"], j["conclusion"]) for j in attempt] == [
        ("build", "completed", "success"),
        ("gpu", "queued", None),
        ("cleanup", "queued", None),
    ]
    assert attempt[1]["labels"] == ["self-hosted", "gpu-7-1"]
    assert attempt[1]["run_attempt"] == 2 and attempt[1]["id"] != gpu["id"]
    everything = call(fake_github, "GET", f"{RUN}/jobs?filter=all").body
    assert everything["total_count"] == 5  # build once, gpu and cleanup of both attempts

    # A new runner, registered with the job's label, connects.
    registered = call(fake_github, "POST", f"{RUNNERS}/generate-jitconfig",
                      jit_body("gpu-7-1-b", labels=["self-hosted", "gpu-7-1"]))
    assert registered.status == 201
    fake_github.set_runner_status("gpu-7-1-b", "online")

    taken = fake_github.jobs(42)[1]
    assert (taken["status"], taken["runner_name"]) == ("in_progress", "gpu-7-1-b")
    assert call(fake_github, "GET", RUN).body["status"] == "in_progress"
    fake_github.complete_job("gpu-7-1-b")
    fake_github.complete_job("hosted")  # cleanup, on the hosted runner
    run = call(fake_github, "GET", RUN).body
    assert (run["status"], run["conclusion"]) == ("completed", "success")
    assert fake_github.jobs(42, attempt=1)[1]["conclusion"] == "failure"


def test_rerun_failed_jobs_is_refused_while_running_without_failures_and_after_50(
    fake_github: FakeGitHub,
) -> None:
    fake_github.add_runner("any", ["x"])
    fake_github.add_job(42, "job", ["x"])

    running = call(fake_github, "POST", f"{RUN}/rerun-failed-jobs")
    fake_github.complete_job("any")
    succeeded = call(fake_github, "POST", f"{RUN}/rerun-failed-jobs")

    assert (running.status, running.body["message"]) == (403, "This workflow is already running")
    assert (succeeded.status, succeeded.body["message"]) == (
        403, "This workflow run cannot be retried")
    assert call(fake_github, "POST", f"{REPO}/actions/runs/7/rerun-failed-jobs").status == 404
    fake_github.add_job(43, "job", ["x"])
    for _ in range(51):
        fake_github.complete_job("any", "failure")
        answer = call(fake_github, "POST", f"{REPO}/actions/runs/43/rerun-failed-jobs")
    assert answer.status == 403
    assert call(fake_github, "GET", f"{REPO}/actions/runs/43").body["run_attempt"] == 51


def test_cancel_completes_open_jobs_as_cancelled_and_idles_their_runners(
    fake_github: FakeGitHub,
) -> None:
    fake_github.add_runner("any", ["x"])
    fake_github.add_job(42, "running", ["x"])
    fake_github.add_job(42, "queued", ["x"])

    answer = call(fake_github, "POST", f"{RUN}/cancel")

    assert answer.status == 202
    assert [(j["status"], j["conclusion"]) for j in fake_github.jobs(42)] == [
        ("completed", "cancelled"), ("completed", "cancelled")]
    runner = fake_github.runner_named("any")
    assert runner is not None and runner["busy"] is False
    run = call(fake_github, "GET", RUN).body
    assert (run["status"], run["conclusion"]) == ("completed", "cancelled")
    again = call(fake_github, "POST", f"{RUN}/cancel")
    assert (again.status, again.body["message"]) == (
        409, "Cannot cancel a workflow run that is completed.")
    rerun = call(fake_github, "POST", f"{RUN}/rerun-failed-jobs")
    assert rerun.status == 201
    assert [j["runner_name"] for j in fake_github.jobs(42)] == ["any", None]


def test_job_routes_need_actions_read_and_rerun_and_cancel_actions_write(
    fake_github: FakeGitHub, app_key: AppKeyPair
) -> None:
    fake_github.register_app(APP_ID, CLIENT_ID, app_key.public_pem)
    fake_github.install_app(APP_ID, INSTALLATION_ID, {"actions": "read"})
    token = mint(fake_github, app_jwt(app_key)).body["token"]
    fake_github.add_job(42, "job", ["x"])
    auth = f"Bearer {token}"

    assert call(fake_github, "GET", f"{RUN}/jobs", auth=auth).status == 200
    assert call(fake_github, "GET", f"{RUN}/attempts/1/jobs", auth=auth).status == 200
    assert call(fake_github, "POST", f"{RUN}/cancel", auth=auth).status == 403
    assert call(fake_github, "POST", f"{RUN}/rerun-failed-jobs", auth=auth).status == 403
