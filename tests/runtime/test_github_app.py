"""The broker's GitHub credential: App installation tokens and the rotated PAT, over real HTTP.

Every test drives the real GitHubClient against the fake GitHub, which verifies the App JWT
(signature, iss, iat, exp) and accepts installation tokens only within what they were
narrowed to.
"""

from __future__ import annotations

import os
import re
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_runners import contract
from gpu_runners.errors import GitHubAuthError, UsageError
from gpu_runners.github_api import GitHubClient, PatFile, RunnerScope, Token
from gpu_runners.github_app import (
    ORGANIZATION_RUNNER_PERMISSIONS,
    RECOVERY_PERMISSIONS,
    REPOSITORY_RUNNER_PERMISSIONS,
    GitHubApp,
    GitHubAppError,
    GitHubAppTokens,
    token_source_from_environ,
)
from tests.fakes.github_api import FakeGitHub
from tests.fakes.github_app_auth import AppKeyPair, new_app_key
from tests.runtime.fake_wiring import FAST_GITHUB_POLICY

APP_ID = 424242
CLIENT_ID = "Iv23liBrokerApp00001"
INSTALLATION_ID = 5151
ACCESS_TOKENS = r"^/app/installations/\d+/access_tokens$"


class Clock:
    """Seconds since the epoch that a test moves by hand; shared by the fake and the broker."""

    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(scope="module")
def app_key() -> AppKeyPair:
    return new_app_key()


@pytest.fixture
def clock() -> Clock:
    return Clock(time.time())


@pytest.fixture
def key_file(tmp_path: Path, app_key: AppKeyPair) -> Path:
    path = tmp_path / contract.APP_KEY_SECRET_KEY
    path.write_bytes(app_key.private_pem)
    return path


@pytest.fixture
def app_github(fake_github: FakeGitHub, app_key: AppKeyPair, clock: Clock) -> FakeGitHub:
    """The fake with the App installed on acme/models with the runner permissions."""
    fake_github.clock = clock
    fake_github.register_app(APP_ID, CLIENT_ID, app_key.public_pem)
    fake_github.install_app(APP_ID, INSTALLATION_ID, dict(REPOSITORY_RUNNER_PERMISSIONS),
                            repository_ids={fake_github.repository_id})
    return fake_github


def app_tokens(fake: FakeGitHub, key_file: Path, clock: Clock, *,
               installation_id: int = INSTALLATION_ID,
               permissions: dict[str, str] | None = None) -> GitHubAppTokens:
    return GitHubAppTokens(
        GitHubApp(CLIENT_ID, installation_id, key_file),
        repository_ids=(fake.repository_id,),
        permissions=permissions or dict(REPOSITORY_RUNNER_PERMISSIONS),
        api_url=fake.url, policy=FAST_GITHUB_POLICY, clock=clock)


def client(fake: FakeGitHub, tokens: GitHubAppTokens | PatFile,
           scope: RunnerScope | None = None) -> GitHubClient:
    return GitHubClient(tokens, scope or RunnerScope(repository="acme/models"), api_url=fake.url,
                        policy=FAST_GITHUB_POLICY)


def mints(fake: FakeGitHub) -> int:
    return len(fake.requests_to(ACCESS_TOKENS, "POST"))


# --- minting ---------------------------------------------------------------------------------


def test_installation_token_is_minted_with_a_jwt_github_accepts(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    github = client(app_github, app_tokens(app_github, key_file, clock))
    assert list(github.list_runners()) == []
    [claims] = app_github.app_authority.presented_claims
    assert claims["iss"] == CLIENT_ID
    assert claims["iat"] == int(clock.now) - 60
    assert claims["exp"] - claims["iat"] == 600  # GitHub's ceiling, reached exactly
    [request] = app_github.requests_to(ACCESS_TOKENS, "POST")
    assert request.body == {"repository_ids": [app_github.repository_id],
                            "permissions": {"administration": "write", "actions": "read"}}
    [token] = app_github.installation_tokens()
    listed = app_github.requests_to(r"/actions/runners$", "GET")
    assert listed[-1].headers["authorization"] == f"Bearer {token.value}"


def test_narrowed_repository_token_does_everything_the_broker_asks(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    # The fake refuses an installation token outside its permissions (403): these calls
    # passing proves Administration: write and Actions: read are enough for spawn and reap.
    github = client(app_github, app_tokens(app_github, key_file, clock))
    jit = github.generate_jit_config("gpu-9-1", ["gpu-9-1"])
    assert github.find_runner("gpu-9-1") == jit.runner
    app_github.set_run_status(9, "completed", "success")
    status = github.get_run_status("acme/models", 9)
    assert status is not None and status.completed
    assert github.delete_runner(jit.runner.id) is True


def test_organisation_runners_need_only_the_self_hosted_runners_permission(
        app_key: AppKeyPair, key_file: Path, clock: Clock) -> None:
    with FakeGitHub(org="acme-org") as fake:
        fake.clock = clock
        fake.register_app(APP_ID, CLIENT_ID, app_key.public_pem)
        fake.install_app(APP_ID, INSTALLATION_ID, dict(ORGANIZATION_RUNNER_PERMISSIONS))
        tokens = app_tokens(fake, key_file, clock,
                            permissions=dict(ORGANIZATION_RUNNER_PERMISSIONS))
        github = client(fake, tokens, RunnerScope(organization="acme-org"))
        jit = github.generate_jit_config("gpu-3-1", ["gpu-3-1"])
        assert github.get_runner(jit.runner.id) is not None
        [request] = fake.requests_to(ACCESS_TOKENS, "POST")
        assert request.body["permissions"] == {"organization_self_hosted_runners": "write",
                                               "actions": "read"}


def test_many_requests_from_many_threads_share_one_mint(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    github = client(app_github, app_tokens(app_github, key_file, clock))
    errors: list[BaseException] = []

    def work() -> None:
        try:
            for _ in range(5):
                list(github.list_runners())
        except BaseException as e:  # reported below, not lost in the thread
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(8)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=30)
    assert errors == []
    assert len(app_github.requests_to(r"/actions/runners$", "GET")) == 40
    assert mints(app_github) == 1


def test_token_is_replaced_five_minutes_before_it_expires(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    app_github.set_installation_token_lifetime(900)
    github = client(app_github, app_tokens(app_github, key_file, clock))
    list(github.list_runners())
    clock.now += 599  # 301 s of life left: still cached
    list(github.list_runners())
    assert mints(app_github) == 1
    clock.now += 2  # 299 s left: within the margin, a new token before the old one lapses
    list(github.list_runners())
    assert mints(app_github) == 2
    first, second = app_github.installation_tokens()
    used = app_github.requests_to(r"/actions/runners$", "GET")[-1].headers["authorization"]
    assert used == f"Bearer {second.value}" and first.expires_at > clock.now


def test_revoked_installation_token_is_reminted_once_and_the_call_succeeds(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    github = client(app_github, app_tokens(app_github, key_file, clock))
    list(github.list_runners())
    [revoked] = app_github.installation_tokens()
    app_github.revoke_installation_token(revoked.value)
    jit = github.generate_jit_config("gpu-4-1", ["gpu-4-1"])
    assert jit.runner.name == "gpu-4-1"
    attempts = app_github.requests_to(r"/generate-jitconfig$", "POST")
    assert [r.headers["authorization"] for r in attempts] == [
        f"Bearer {revoked.value}", f"Bearer {app_github.installation_tokens()[1].value}"]
    assert mints(app_github) == 2


def test_revoked_app_key_names_the_config_key_and_touches_no_runner(
        app_github: FakeGitHub, app_key: AppKeyPair, key_file: Path, clock: Clock) -> None:
    app_github.remove_app_key(APP_ID, app_key.public_pem)
    github = client(app_github, app_tokens(app_github, key_file, clock))
    with pytest.raises(GitHubAppError) as refused:
        github.generate_jit_config("gpu-5-1", ["gpu-5-1"])
    message = str(refused.value)
    assert "githubAppPrivateKey" in message and "pulumi config set --secret" in message
    assert f"GitHub App {CLIENT_ID} installation {INSTALLATION_ID}" in message
    assert "PRIVATE KEY" not in message and "ghs_" not in message
    assert app_github.requests_to(r"/actions/") == []  # nothing half-done
    assert app_github.runners == {}
    assert mints(app_github) == 1  # a refused key is not retried


def test_key_rotated_on_disk_signs_the_next_mint_without_a_restart(
        app_github: FakeGitHub, app_key: AppKeyPair, key_file: Path, clock: Clock) -> None:
    tokens = app_tokens(app_github, key_file, clock)
    github = client(app_github, tokens)
    list(github.list_runners())
    # The operator generates a new key, `pulumi up` updates the Secret, the kubelet the file,
    # and the old key is deleted from the App.
    rotated = new_app_key()
    app_github.add_app_key(APP_ID, rotated.public_pem)
    key_file.write_bytes(rotated.private_pem)
    app_github.remove_app_key(APP_ID, app_key.public_pem)
    clock.now += 3600  # the first token has lapsed
    list(github.list_runners())
    assert mints(app_github) == 2
    assert tokens.mints == 2


def test_wrong_installation_id_names_its_config_key(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    github = client(app_github, app_tokens(app_github, key_file, clock, installation_id=999))
    with pytest.raises(GitHubAppError, match="githubAppInstallationId") as refused:
        list(github.list_runners())
    assert refused.value.status == 404


def test_permissions_beyond_the_installation_are_named(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    tokens = app_tokens(app_github, key_file, clock,
                        permissions={"organization_self_hosted_runners": "write"})
    with pytest.raises(GitHubAppError, match="organization_self_hosted_runners: write"):
        list(client(app_github, tokens).list_runners())


def test_a_github_outage_during_refresh_keeps_the_still_valid_token(
        app_github: FakeGitHub, key_file: Path, clock: Clock,
        caplog: pytest.LogCaptureFixture) -> None:
    tokens = app_tokens(app_github, key_file, clock)
    github = client(app_github, tokens)
    list(github.list_runners())
    [first] = app_github.installation_tokens()
    clock.now += 3600 - 200  # due for refresh, 200 s of life left
    app_github.inject("POST", ACCESS_TOKENS, 503, times=FAST_GITHUB_POLICY.attempts)
    with caplog.at_level("WARNING", logger="gpu_runners.github_app"):
        list(github.list_runners())
    used = app_github.requests_to(r"/actions/runners$", "GET")[-1].headers["authorization"]
    assert used == f"Bearer {first.value}"
    [warning] = caplog.messages
    # GitHub's expires_at has whole seconds: 199 or 200 s are left.
    assert re.search(r"stays in use for (199|200) s more", warning) and "503" in warning
    assert first.value not in warning
    clock.now += 31  # past the pause after a failed refresh: GitHub is back
    list(github.list_runners())
    assert tokens.mints == 2


def test_malformed_key_file_is_refused_without_echoing_it(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    key_file.write_text("-----BEGIN RSA PRIVATE KEY-----\nnot-really-a-key\n")
    with pytest.raises(GitHubAppError) as refused:
        list(client(app_github, app_tokens(app_github, key_file, clock)).list_runners())
    assert "githubAppPrivateKey" in str(refused.value)
    assert "not-really-a-key" not in str(refused.value)
    assert app_github.requests == []


# --- the PAT file ----------------------------------------------------------------------------


def kubelet_update(directory: Path, name: str, value: str, generation: int) -> None:
    """Rewrites a Secret volume file as the kubelet does: a new directory, symlinks swapped."""
    data = directory / f"..{generation}"
    data.mkdir()
    (data / name).write_text(value)
    link = directory / "..data_tmp"
    link.symlink_to(data.name)
    os.replace(link, directory / "..data")
    if not (directory / name).is_symlink():
        (directory / name).symlink_to(f"..data/{name}")


@pytest.fixture
def pat_volume(tmp_path: Path) -> Iterator[Path]:
    directory = tmp_path / "github-credential"
    directory.mkdir()
    kubelet_update(directory, contract.PAT_SECRET_KEY, "ghp_fake\n", 1)
    yield directory


def test_rotated_pat_file_is_used_by_the_next_request(
        fake_github: FakeGitHub, pat_volume: Path) -> None:
    github = client(fake_github, PatFile(pat_volume / contract.PAT_SECRET_KEY))
    list(github.list_runners())
    fake_github.token = "ghp_rotated"  # GitHub now accepts only the new PAT
    kubelet_update(pat_volume, contract.PAT_SECRET_KEY, "ghp_rotated\n", 2)
    list(github.list_runners())
    sent = [r.headers["authorization"] for r in fake_github.requests_to(r"/actions/runners$")]
    assert sent == ["Bearer ghp_fake", "Bearer ghp_rotated"]


def test_a_401_rereads_the_pat_file_and_retries_once(
        fake_github: FakeGitHub, pat_volume: Path) -> None:
    tokens = PatFile(pat_volume / contract.PAT_SECRET_KEY)
    github = client(fake_github, tokens)
    tokens.current()  # read before the rotation, as by an earlier request
    fake_github.token = "ghp_new1"
    # Rewritten in place with the same size and mtime: the stat sees no change, the 401 does.
    path = pat_volume / "..1" / contract.PAT_SECRET_KEY
    before = path.stat()
    path.write_text("ghp_new1\n")
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))
    list(github.list_runners())
    sent = [r.headers["authorization"] for r in fake_github.requests_to(r"/actions/runners$")]
    assert sent == ["Bearer ghp_fake", "Bearer ghp_new1"]


def test_a_wrong_pat_is_refused_after_one_reread_naming_the_file(
        fake_github: FakeGitHub, pat_volume: Path) -> None:
    kubelet_update(pat_volume, contract.PAT_SECRET_KEY, "ghp_wrong\n", 2)
    github = client(fake_github, PatFile(pat_volume / contract.PAT_SECRET_KEY))
    with pytest.raises(Exception, match=f"file {pat_volume / contract.PAT_SECRET_KEY}"):
        list(github.list_runners())
    assert len(fake_github.requests_to(r"/actions/runners$")) == 1


def test_unreadable_pat_file_keeps_the_last_pat_for_runs_in_progress(pat_volume: Path) -> None:
    tokens = PatFile(pat_volume / contract.PAT_SECRET_KEY)
    (pat_volume / contract.PAT_SECRET_KEY).unlink()
    assert tokens.current().value == "ghp_fake"


def test_missing_pat_file_is_a_usage_error(tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="cannot be read"):
        PatFile(tmp_path / "absent")


# --- choosing the source from the broker's environment ---------------------------------------


def app_environ(key_file: Path, **overrides: str) -> dict[str, str]:
    environ = {contract.ENV_GITHUB_APP_ID: CLIENT_ID,
               contract.ENV_GITHUB_APP_INSTALLATION_ID: str(INSTALLATION_ID),
               contract.ENV_GITHUB_APP_PRIVATE_KEY_FILE: str(key_file),
               contract.ENV_API_URL: "https://ghe.example.com/api/v3"}
    environ.update(overrides)
    return {name: value for name, value in environ.items() if value}


def test_app_variables_choose_the_app_narrowed_to_the_repository(key_file: Path) -> None:
    source = token_source_from_environ(app_environ(key_file), repository_id=74,
                                       organization=False)
    assert isinstance(source, GitHubAppTokens)
    assert source.app == GitHubApp(CLIENT_ID, INSTALLATION_ID, key_file)


@pytest.mark.parametrize("missing", [contract.ENV_GITHUB_APP_ID,
                                     contract.ENV_GITHUB_APP_INSTALLATION_ID,
                                     contract.ENV_GITHUB_APP_PRIVATE_KEY_FILE])
def test_half_set_app_names_the_missing_variable(key_file: Path, missing: str) -> None:
    with pytest.raises(UsageError) as refused:
        token_source_from_environ(app_environ(key_file, **{missing: ""}), repository_id=74,
                                  organization=False)
    assert f"{missing} is not set" in str(refused.value)


def test_installation_id_must_be_a_number(key_file: Path) -> None:
    environ = app_environ(key_file, **{contract.ENV_GITHUB_APP_INSTALLATION_ID: "acme"})
    with pytest.raises(UsageError, match="GITHUB_APP_INSTALLATION_ID='acme' is not"):
        token_source_from_environ(environ, repository_id=74, organization=True)


def test_unusable_app_key_fails_the_broker_at_start(tmp_path: Path) -> None:
    key = tmp_path / "key.pem"
    key.write_text("ghp_pasted_a_pat_instead")
    with pytest.raises(GitHubAppError, match="githubAppPrivateKey") as refused:
        token_source_from_environ(app_environ(key), repository_id=74, organization=False)
    assert "ghp_pasted_a_pat_instead" not in str(refused.value)


def test_without_an_app_the_pat_file_is_the_source(pat_volume: Path) -> None:
    environ = {contract.ENV_PAT_FILE: str(pat_volume / contract.PAT_SECRET_KEY)}
    source = token_source_from_environ(environ, repository_id=74, organization=False)
    assert isinstance(source, PatFile)
    token = source.current()
    assert token.value == "ghp_fake" and contract.ENV_PAT_FILE in token.source


def test_a_missing_permission_is_explained_in_the_apps_terms(
        app_github: FakeGitHub, key_file: Path, clock: Clock) -> None:
    tokens = app_tokens(app_github, key_file, clock, permissions={"actions": "read"})
    with pytest.raises(GitHubAuthError) as refused:
        client(app_github, tokens).generate_jit_config("gpu-6-1", ["gpu-6-1"])
    message = str(refused.value)
    assert refused.value.status == 403
    assert f"GitHub App {CLIENT_ID} installation {INSTALLATION_ID}" in message
    assert "the GitHub App needs the repository permission Administration: read and write" in (
        message)
    assert app_github.runner_named("gpu-6-1") is None


def test_the_recovery_token_asks_for_actions_write_alone_and_re_runs_a_failed_run(
        fake_github: FakeGitHub, app_key: AppKeyPair, key_file: Path) -> None:
    fake_github.register_app(APP_ID, CLIENT_ID, app_key.public_pem)
    fake_github.install_app(APP_ID, INSTALLATION_ID,
                            {**REPOSITORY_RUNNER_PERMISSIONS, "actions": "write"},
                            repository_ids={fake_github.repository_id})
    environ = app_environ(key_file, **{contract.ENV_API_URL: fake_github.url})
    tokens = token_source_from_environ(environ, repository_id=fake_github.repository_id,
                                       organization=False, permissions=RECOVERY_PERMISSIONS)
    fake_github.add_job(9, "train", ["gpu-9-1"])  # queued: no runner carries its label
    assert isinstance(tokens, GitHubAppTokens)
    github = client(fake_github, tokens)
    assert github.cancel_run("acme/models", 9) is True  # a queued job: the run ends cancelled
    github.rerun_failed_jobs("acme/models", 9)

    [mint] = fake_github.requests_to(ACCESS_TOKENS, "POST")
    assert mint.body["permissions"] == {"actions": "write"}
    assert fake_github.workflow_runs[9]["run_attempt"] == 2
    assert github.cancel_run("acme/models", 9) is True


def test_without_actions_write_the_re_run_is_refused_naming_the_permission(
        fake_github: FakeGitHub) -> None:
    fake_github.add_job(9, "train", ["gpu-9-1"])
    runner_only = GitHubClient(Token(fake_github.token, "the test token"),
                               RunnerScope(repository="acme/models"), api_url=fake_github.url,
                               policy=FAST_GITHUB_POLICY)
    fake_github.inject("POST", r"/rerun-failed-jobs$", status=403,
                       body={"message": "Resource not accessible by integration"})
    with pytest.raises(GitHubAuthError, match="Actions: write"):
        runner_only.rerun_failed_jobs("acme/models", 9)
