"""The broker on a GitHub App: runs spawned and removed with installation tokens only, and a
revoked token or a rotated key mid-run does not fail the run.

The broker is built as its entry point builds it (settings, then `token_source_from_environ`,
then the GitHub client), served over real HTTP on the fakes. The fake GitHub is given no PAT
the broker knows, so every runner call that succeeds was made with an installation token.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from gpu_runners import broker_api, contract
from gpu_runners.broker.app import broker_app
from gpu_runners.broker.oidc import OidcVerifier
from gpu_runners.broker.settings import BrokerSettings
from gpu_runners.github_api import GitHubClient, RunnerScope
from gpu_runners.github_app import (
    REPOSITORY_RUNNER_PERMISSIONS,
    GitHubAppTokens,
    token_source_from_environ,
)
from tests.broker.broker_harness import REPOSITORY_ID, BrokerProcess, ServedBroker, delete, spawn
from tests.fakes.github_api import FakeGitHub, RecordedRequest
from tests.fakes.github_app_auth import AppKeyPair, new_app_key
from tests.fakes.kube_api import FakeKubernetes
from tests.fakes.oidc_issuer import FakeOidcIssuer
from tests.runtime.fake_wiring import FAST_GITHUB_POLICY, kube_client_for

APP_ID = 31337
CLIENT_ID = "Iv23liBrokerE2E00001"
INSTALLATION_ID = 8080
RUNNER_CALLS = r"/actions/runners"


@pytest.fixture(scope="module")
def app_key() -> AppKeyPair:
    return new_app_key()


@pytest.fixture
def key_file(tmp_path: Path, app_key: AppKeyPair) -> Path:
    path = tmp_path / contract.APP_KEY_SECRET_KEY
    path.write_bytes(app_key.private_pem)
    return path


@pytest.fixture
def app_env(env: dict[str, str], fake_github: FakeGitHub, app_key: AppKeyPair,
            key_file: Path) -> dict[str, str]:
    """The broker's environment with the App instead of the PAT, as the stack sets it."""
    fake_github.repository_id = int(REPOSITORY_ID)
    fake_github.register_app(APP_ID, CLIENT_ID, app_key.public_pem)
    fake_github.install_app(APP_ID, INSTALLATION_ID, dict(REPOSITORY_RUNNER_PERMISSIONS),
                            repository_ids={fake_github.repository_id})
    fake_github.token = "ghp_the_broker_was_never_given"
    app = {key: value for key, value in env.items() if key != contract.ENV_PAT_FILE}
    app.update({contract.ENV_GITHUB_APP_ID: CLIENT_ID,
                contract.ENV_GITHUB_APP_INSTALLATION_ID: str(INSTALLATION_ID),
                contract.ENV_GITHUB_APP_PRIVATE_KEY_FILE: str(key_file)})
    return app


@pytest.fixture
def app_broker(app_env: dict[str, str], fake_kube: FakeKubernetes) -> Iterator[ServedBroker]:
    settings = BrokerSettings.from_environ(app_env)
    tokens = token_source_from_environ(app_env, repository_id=settings.repository_id,
                                       organization=False)
    assert isinstance(tokens, GitHubAppTokens)
    github = GitHubClient(tokens, RunnerScope(repository=settings.repository),
                          api_url=settings.api_url, policy=FAST_GITHUB_POLICY)
    app = broker_app(settings, kube=kube_client_for(fake_kube), github=github,
                     verifier=OidcVerifier(settings.oidc_policy()), reconcile=False)
    broker = ServedBroker(app).start()
    yield broker
    broker.stop()


def bearer_tokens(fake: FakeGitHub) -> set[str]:
    return {r.headers["authorization"].split(" ", 1)[1] for r in fake.requests_to(RUNNER_CALLS)}


def test_a_run_is_spawned_and_removed_with_installation_tokens_only(
        app_broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_github: FakeGitHub) -> None:
    started = spawn(app_broker.url, fake_oidc.mint())
    assert started.last.event == broker_api.READY
    assert [r["name"] for r in fake_github.runners.values()] == ["gpu-123-1"]
    assert delete(app_broker.url, fake_oidc.mint()).status == 200
    assert fake_github.runners == {}
    [token] = fake_github.installation_tokens()
    assert bearer_tokens(fake_github) == {token.value}  # one mint served the whole run


def test_a_token_revoked_while_the_runner_registers_is_reminted_and_the_run_goes_on(
        app_broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_github: FakeGitHub) -> None:
    revoked: list[str] = []

    def revoke_on_registration(request: RecordedRequest) -> None:
        # GitHub revokes the token just as the run's registration request arrives.
        if request.path.endswith("/generate-jitconfig") and not revoked:
            [token] = fake_github.installation_tokens()
            fake_github.revoke_installation_token(token.value)
            revoked.append(token.value)

    fake_github.on_request(revoke_on_registration)
    started = spawn(app_broker.url, fake_oidc.mint())
    assert started.last.event == broker_api.READY
    registrations = fake_github.requests_to(r"/generate-jitconfig$", "POST")
    [_, fresh] = fake_github.installation_tokens()
    assert [r.headers["authorization"] for r in registrations] == [
        f"Bearer {revoked[0]}", f"Bearer {fresh.value}"]
    assert [r["name"] for r in fake_github.runners.values()] == ["gpu-123-1"]


def test_a_key_rotated_mid_run_signs_the_next_mint_and_cleanup_works(
        app_broker: ServedBroker, fake_oidc: FakeOidcIssuer, fake_github: FakeGitHub,
        app_key: AppKeyPair, key_file: Path) -> None:
    assert spawn(app_broker.url, fake_oidc.mint()).last.event == broker_api.READY
    # `pulumi up` with a new key: the kubelet rewrites the file, the operator then deletes the
    # old key from the App, and GitHub drops the tokens it signed for.
    rotated = new_app_key()
    fake_github.add_app_key(APP_ID, rotated.public_pem)
    key_file.write_bytes(rotated.private_pem)
    fake_github.remove_app_key(APP_ID, app_key.public_pem)
    for token in fake_github.installation_tokens():
        fake_github.revoke_installation_token(token.value)

    assert delete(app_broker.url, fake_oidc.mint()).status == 200
    assert fake_github.runners == {}
    assert len(fake_github.installation_tokens()) == 2


def test_the_broker_process_runs_on_the_app_alone(
        app_env: dict[str, str], fake_oidc: FakeOidcIssuer, fake_github: FakeGitHub,
        tmp_path: Path) -> None:
    # The entry point itself (`python -m gpu_runners.broker`), with the App's variables the
    # stack sets and no PAT file: it must choose the App and serve a run with its tokens.
    broker = BrokerProcess(app_env, tmp_path / "broker.log").start()
    try:
        started = spawn(broker.url, fake_oidc.mint())
        removed = delete(broker.url, fake_oidc.mint())
    finally:
        broker.stop()

    assert started.last.event == broker_api.READY, started.last
    assert removed.status == 200
    assert fake_github.runners == {}
    assert fake_github.token not in bearer_tokens(fake_github)
    assert len(fake_github.installation_tokens()) >= 1
