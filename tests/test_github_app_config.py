"""The GitHub App in the stack: checked whole before anything is declared, and held by the
broker alone: its key in the broker's Secret, as a Pulumi secret, never in env, args or outputs.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec

from gpu_runners import contract
from tests.fakes.github_app_auth import AppKeyPair, new_app_key
from tests.harness.mock_stack import TEST_SECRETS, ProgramRun, run_program
from tests.test_broker_component import BROKER_NS, DEPLOYMENT, broker_env, pod_specs
from tests.test_config import registered_after_refusal

APP = {"githubAppId": "Iv23liBrokerApp00001", "githubAppInstallationId": "5151"}


@pytest.fixture(scope="module")
def app_key() -> AppKeyPair:
    return new_app_key()


def app_secrets(private_key: str) -> dict[str, Any]:
    return {**TEST_SECRETS, "githubAppPrivateKey": private_key}


@pytest.fixture(scope="module")
def with_app(app_key: AppKeyPair) -> ProgramRun:
    return run_program("dev", APP, secrets=app_secrets(app_key.private_pem.decode()))


def credential_secret(run: ProgramRun) -> Any:
    (secret,) = [r for r in run.of_type("kubernetes:core/v1:Secret")
                 if r.inputs["metadata"]["namespace"] == BROKER_NS
                 and r.inputs["type"] == "Opaque"]
    return secret


# --- the config check ------------------------------------------------------------------------


@pytest.mark.parametrize("missing", ["githubAppId", "githubAppInstallationId",
                                     "githubAppPrivateKey"])
def test_half_set_app_is_refused_naming_the_missing_key(app_key: AppKeyPair,
                                                       missing: str) -> None:
    overrides = {key: value for key, value in APP.items() if key != missing}
    secrets = (dict(TEST_SECRETS) if missing == "githubAppPrivateKey"
               else app_secrets(app_key.private_pem.decode()))
    problems = registered_after_refusal(overrides, secrets=secrets)
    assert [p.split(" ")[0] for p in problems] == [missing]
    assert "a GitHub App needs it together with" in problems[0]


def test_every_app_problem_is_listed_at_once() -> None:
    problems = registered_after_refusal(
        {"githubAppId": "my-app", "githubAppInstallationId": "12ab"},
        secrets=app_secrets("-----BEGIN RSA PRIVATE KEY-----\nsecret-material\n"))
    assert [p.split(" ")[0] for p in problems] == [
        "githubAppId", "githubAppInstallationId", "githubAppPrivateKey"]
    assert all("secret-material" not in p for p in problems)
    assert "pulumi config set --secret githubAppPrivateKey < key.pem" in problems[2]


def test_a_non_rsa_key_is_refused() -> None:
    pem = ec.generate_private_key(ec.SECP256R1()).private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption()).decode()
    problems = registered_after_refusal(APP, secrets=app_secrets(pem))
    assert problems == ["githubAppPrivateKey = '<secret>': not an RSA key: GitHub Apps sign with "
                        "RS256; use the key GitHub generated"]


def test_a_plaintext_app_key_is_refused_without_echoing_it(app_key: AppKeyPair) -> None:
    pem = app_key.private_pem.decode()
    problems = registered_after_refusal({**APP, "githubAppPrivateKey": pem})
    assert [p.split(" ")[0] for p in problems] == ["githubAppPrivateKey"]
    assert "stored in plaintext" in problems[0]
    assert all(pem not in p and "PRIVATE KEY" not in p for p in problems)


def test_runner_pat_is_still_required_with_an_app(app_key: AppKeyPair) -> None:
    # The base runner registers itself with it until it gets its config from the broker.
    problems = registered_after_refusal(APP, secrets={
        "githubToken": TEST_SECRETS["githubToken"],
        "githubAppPrivateKey": app_key.private_pem.decode()})
    assert [p.split(" ")[0] for p in problems] == ["runnerPat"]


# --- the broker ------------------------------------------------------------------------------


def test_app_key_is_the_brokers_secret_and_the_pat_is_not(with_app: ProgramRun,
                                                          app_key: AppKeyPair) -> None:
    secret = credential_secret(with_app)
    assert secret.manifest()["metadata"]["name"] == contract.BROKER_PAT_SECRET_NAME
    assert secret.inputs["stringData"] == {
        contract.APP_KEY_SECRET_KEY: app_key.private_pem.decode()}
    assert secret.is_secret(f"stringData.{contract.APP_KEY_SECRET_KEY}")
    broker_objects = [r for r in with_app.kubernetes_objects()
                      if r.inputs["metadata"].get("namespace") == BROKER_NS]
    assert all(TEST_SECRETS["runnerPat"] not in json.dumps(r.manifest()) for r in broker_objects)


def test_broker_environment_names_the_app_and_its_key_file(with_app: ProgramRun) -> None:
    env = broker_env(with_app)
    assert env[contract.ENV_GITHUB_APP_ID] == APP["githubAppId"]
    assert env[contract.ENV_GITHUB_APP_INSTALLATION_ID] == APP["githubAppInstallationId"]
    assert env[contract.ENV_GITHUB_APP_PRIVATE_KEY_FILE] == (
        f"{contract.BROKER_PAT_MOUNT_DIR}/{contract.APP_KEY_SECRET_KEY}")
    assert contract.ENV_PAT_FILE not in env


def test_without_an_app_the_broker_has_the_pat_and_no_app_variables() -> None:
    env = broker_env(run_program("dev"))
    assert env[contract.ENV_PAT_FILE] == (
        f"{contract.BROKER_PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}")
    assert not {contract.ENV_GITHUB_APP_ID, contract.ENV_GITHUB_APP_INSTALLATION_ID,
                contract.ENV_GITHUB_APP_PRIVATE_KEY_FILE} & set(env)


def test_app_key_never_reaches_env_arguments_or_plain_outputs(with_app: ProgramRun,
                                                             app_key: AppKeyPair) -> None:
    marker = app_key.private_pem.decode().splitlines()[1]  # a line of the key's body
    for name, spec in pod_specs(with_app):
        for container in spec["containers"] + spec.get("initContainers", []):
            exposed = json.dumps([container.get("env", []), container.get("command", []),
                                  container.get("args", []), container.get("envFrom", [])])
            assert marker not in exposed, name
    for resource in with_app.kubernetes_objects():
        assert marker not in json.dumps(resource.manifest(redact_secrets=True)), resource.name
    for output, value in with_app.outputs.items():
        assert marker not in json.dumps(value) or output in with_app.secret_outputs, output


def test_a_rotated_app_key_changes_the_secret_and_not_the_broker_pod(
        with_app: ProgramRun) -> None:
    # The pod template is unchanged, so `pulumi up` does not restart the broker (which would
    # end the runs it is streaming); the kubelet refreshes the mounted key instead.
    rotated = run_program("dev", APP, secrets=app_secrets(new_app_key().private_pem.decode()))
    assert (credential_secret(rotated).inputs["stringData"]
            != credential_secret(with_app).inputs["stringData"])
    assert (rotated.one(DEPLOYMENT, "broker-deployment").inputs
            == with_app.one(DEPLOYMENT, "broker-deployment").inputs)
    (volume,) = [v for v in rotated.one(DEPLOYMENT, "broker-deployment").manifest()["spec"][
        "template"]["spec"]["volumes"] if "secret" in v]
    (container,) = rotated.one(DEPLOYMENT, "broker-deployment").manifest()["spec"]["template"][
        "spec"]["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert "subPath" not in mount  # a subPath mount is never refreshed by the kubelet


def test_a_rotated_pat_changes_the_brokers_secret_and_not_its_pod() -> None:
    before = run_program("dev")
    after = run_program("dev", secrets={**TEST_SECRETS, "runnerPat": "ghp_rotated_runner_pat"})
    assert (credential_secret(after).inputs["stringData"]
            == {contract.PAT_SECRET_KEY: "ghp_rotated_runner_pat"})
    assert (after.one(DEPLOYMENT, "broker-deployment").inputs
            == before.one(DEPLOYMENT, "broker-deployment").inputs)
