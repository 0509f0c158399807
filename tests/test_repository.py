"""The repository's GitHub settings: secrets, variables, main's protection, fork pull requests.

Each test declares the components under fresh recording mocks (`declare`), so it sees exactly
the resources it declared, with their parents, dependencies and `ignore_changes`, and the
warnings the engine received.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import pulumi
import pulumi_gcp as gcp
import pulumi_github as github
import pytest
import yaml

import components.repository
from components.ci_identity import CiIdentity, CiIdentityArgs
from components.cluster import gke_kubeconfig
from components.repository import (
    EXAMPLE_WORKFLOW,
    RepositorySettings,
    RepositorySettingsArgs,
    SeedCompatibility,
    kubeconfig_in_namespace,
    workflow_variables,
)
from gpu_runners import contract
from tests.harness.mock_stack import (
    TEST_SECRETS,
    ProgramRun,
    RegisteredResource,
    run_under_mocks,
)

OWNER, REPOSITORY = "Acme-ML", "Vision-Models"
TOKEN = TEST_SECRETS["githubToken"]
WANDB_KEY = "wandb-secret-key-0123456789"
HF_TOKEN = "hf_plain_string_token_0123456789"
#: The secrets the seed guide's workflow reads (seeds/README.md), spelled out on purpose.
SEED_SECRETS = {"GCP_K8S_CLUSTER_NAME", "GCP_K8S_CLUSTER_ZONE", "GCP_K8S_KUBECONFIG",
                "GOOGLE_SERVICE_ACCOUNT_KEY"}
#: What the mocked serviceaccount.Key holds: base64 of this JSON document.
KEY_JSON = '{"type": "service_account"}'
PROVIDER_NAME = ("projects/123456789012/locations/global/workloadIdentityPools/github-actions/"
                 "providers/github")
CI_EMAIL = "gpu-runners-dev-github-ci@acme-ml-ci.iam.gserviceaccount.com"

ACTIONS_SECRET = "github:index/actionsSecret:ActionsSecret"
ACTIONS_VARIABLE = "github:index/actionsVariable:ActionsVariable"
BRANCH_PROTECTION = "github:index/branchProtection:BranchProtection"
REPOSITORY_FILE = "github:index/repositoryFile:RepositoryFile"
FORK_PR_WORKFLOWS = "pulumi-python:dynamic/gpu-runners:ForkPrWorkflows"


# --- declaring components under fresh mocks ------------------------------------------------------

#: Each test's components run under fresh recording mocks: see `run_under_mocks`.
Declared = ProgramRun
declare = run_under_mocks


def secrets_of(declared: Declared) -> dict[str, RegisteredResource]:
    """Actions secrets by secret name."""
    return {r.inputs["secretName"]: r for r in declared.of_type(ACTIONS_SECRET)}


def github_provider() -> github.Provider:
    return github.Provider("github", owner=OWNER, token=pulumi.Output.secret(TOKEN))


def settings_args(**overrides: Any) -> RepositorySettingsArgs:
    """A private repository with one secret from config and one plain string."""
    args = RepositorySettingsArgs(
        owner=OWNER,
        repository=REPOSITORY,
        private=True,
        github_token=pulumi.Output.secret(TOKEN),
        actions_secrets={"WANDB_API_KEY": pulumi.Output.secret(WANDB_KEY),
                         "HF_TOKEN": HF_TOKEN},
        variables=workflow_variables(runner_namespace=contract.DEFAULT_NAMESPACE),
    )
    return replace(args, **overrides)


def declare_settings(**overrides: Any) -> Declared:
    def build() -> dict[str, Any]:
        repo = RepositorySettings("repo", settings_args(**overrides),
                                  opts=pulumi.ResourceOptions(providers=[github_provider()]))
        return {"secret_names": repo.secret_names, "variables": repo.variables}
    return declare(build)


def declare_with_ci_identity(*, seed: bool) -> Declared:
    """The stack's wiring: CI identity outputs feed the variables, and the seed secrets."""
    def build() -> dict[str, Any]:
        ci = CiIdentity(
            "ci",
            CiIdentityArgs(project="acme-ml-ci", github_owner=OWNER,
                           github_repository=REPOSITORY, account_prefix="gpu-runners-dev",
                           repository_id="715823406", repository_owner_id="129458320",
                           project_roles=["roles/container.clusterViewer"], create_key=seed),
            opts=pulumi.ResourceOptions(providers=[gcp.Provider("gcp", project="acme-ml-ci")]),
        )
        compatibility = None
        if seed:
            assert ci.service_account_key is not None
            compatibility = SeedCompatibility(
                cluster_name="gpu-runners-dev",
                cluster_location="us-central1-a",
                kubeconfig=pulumi.Output.secret(gke_kubeconfig(
                    "gke_acme-ml-ci_us-central1-a_gpu-runners-dev", "203.0.113.10", "Q0E=")),
                namespace=contract.DEFAULT_NAMESPACE,
                service_account_key=ci.service_account_key,
            )
        repo = RepositorySettings(
            "repo",
            settings_args(
                variables=workflow_variables(
                    runner_namespace=contract.DEFAULT_NAMESPACE,
                    cluster_name="gpu-runners-dev",
                    cluster_location="us-central1-a",
                    workload_identity_provider=ci.workload_identity_provider,
                    ci_service_account=ci.service_account_email,
                ),
                seed=compatibility,
            ),
            opts=pulumi.ResourceOptions(providers=[github_provider()]),
        )
        return {"secret_names": repo.secret_names, "variables": repo.variables}
    return declare(build)


@pytest.fixture(scope="module")
def private_repo() -> Declared:
    return declare_settings()


@pytest.fixture(scope="module")
def committed() -> Declared:
    return declare_settings(commit_example_workflow=True)


@pytest.fixture(scope="module")
def wired() -> Declared:
    return declare_with_ci_identity(seed=False)


@pytest.fixture(scope="module")
def seed() -> Declared:
    return declare_with_ci_identity(seed=True)


def plaintext_leaves(value: Any, resource: RegisteredResource,
                     path: str = "") -> Iterator[tuple[str, str]]:
    """Every string input of `resource` that is not under a secret path."""
    if path and resource.is_secret(path):
        return
    if isinstance(value, dict):
        for key, item in value.items():
            yield from plaintext_leaves(item, resource, f"{path}.{key}" if path else key)
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from plaintext_leaves(item, resource, f"{path}.{index}" if path else str(index))
    elif isinstance(value, str):
        yield path, value


# --- Actions secrets ------------------------------------------------------------------------------


def test_actions_secrets_are_set_through_value_as_pulumi_secrets(private_repo: Declared) -> None:
    secrets = secrets_of(private_repo)
    assert set(secrets) == {"WANDB_API_KEY", "HF_TOKEN"}
    for secret_name, expected in (("WANDB_API_KEY", WANDB_KEY), ("HF_TOKEN", HF_TOKEN)):
        secret = secrets[secret_name]
        assert secret.inputs == {"repository": REPOSITORY, "secretName": secret_name,
                                 "value": expected}
        # Also the one passed as a plain string: the component makes every value a secret.
        assert secret.is_secret("value"), secret_name


def test_no_secret_value_is_plaintext_in_any_input_or_output(seed: Declared) -> None:
    secret_values = [WANDB_KEY, HF_TOKEN, TOKEN, KEY_JSON]
    for resource in seed.resources:
        for path, text in plaintext_leaves(resource.inputs, resource):
            leaked = [value for value in secret_values if value in text]
            assert not leaked, f"{resource.name}.{path} holds {leaked} in plaintext"
    assert seed.outputs["secret_names"] == sorted(
        {"WANDB_API_KEY", "HF_TOKEN"} | SEED_SECRETS)
    assert "secret_names" not in seed.secret_outputs
    assert not any(value in json.dumps(seed.outputs) for value in secret_values)


def test_deprecated_github_arguments_are_never_set(seed: Declared, committed: Declared) -> None:
    # The deprecated properties are read from the installed SDK (properties it marks with
    # its deprecation decorator), not listed by hand.
    def deprecated_inputs(typ: str) -> set[str]:
        args_class = getattr(github, typ.rsplit(":", 1)[1] + "Args")
        getters = [p.fget for p in vars(args_class).values() if isinstance(p, property)]
        return {vars(getter)["_pulumi_name"] for getter in getters
                if getter is not None and "_pulumi_deprecated_callable" in vars(getter)}

    assert {"plaintextValue", "encryptedValue"} <= deprecated_inputs(ACTIONS_SECRET)
    checked = set()
    for resource in [*seed.resources, *committed.resources]:
        if resource.custom and resource.typ.startswith("github:index/"):
            assert not deprecated_inputs(resource.typ) & set(resource.inputs), resource.name
            checked.add(resource.typ)
    assert checked == {ACTIONS_SECRET, ACTIONS_VARIABLE, BRANCH_PROTECTION, REPOSITORY_FILE}


# --- Actions variables ----------------------------------------------------------------------------


def test_variables_carry_the_cluster_the_ci_identity_and_the_runner_label(wired: Declared) -> None:
    variables = {v.inputs["variableName"]: v for v in wired.of_type(ACTIONS_VARIABLE)}
    expected = {
        "GPU_RUNNERS_CLUSTER_NAME": "gpu-runners-dev",
        "GPU_RUNNERS_CLUSTER_LOCATION": "us-central1-a",
        "GCP_WORKLOAD_IDENTITY_PROVIDER": PROVIDER_NAME,
        "GCP_CI_SERVICE_ACCOUNT": CI_EMAIL,
        "GPU_RUNNERS_NAMESPACE": "github-runners",
        "GPU_RUNNERS_BASE_LABEL": "base-runner",
    }
    assert {name: v.inputs["value"] for name, v in variables.items()} == expected
    assert all(v.inputs["repository"] == REPOSITORY for v in variables.values())
    assert not any(v.secret_paths for v in variables.values())
    assert wired.outputs["variables"] == expected


def test_without_a_cluster_or_ci_identity_only_the_runner_variables_are_declared() -> None:
    assert workflow_variables(runner_namespace="ml-runners") == {
        "GPU_RUNNERS_NAMESPACE": "ml-runners",
        "GPU_RUNNERS_BASE_LABEL": "base-runner",
    }


def test_the_example_workflow_reads_the_declared_identity_variables() -> None:
    workflow = EXAMPLE_WORKFLOW.read_text()
    assert "${{ vars.GCP_WORKLOAD_IDENTITY_PROVIDER }}" in workflow
    assert "${{ vars.GCP_CI_SERVICE_ACCOUNT }}" in workflow
    assert "[self-hosted, base-runner]" in workflow


# --- branch protection ----------------------------------------------------------------------------


def test_main_requires_reviewed_pull_requests_and_the_configured_checks() -> None:
    declared = declare_settings(required_approvals=2,
                                required_status_checks=["test", "preview (dev)"],
                                enforce_admins=False)
    protection = declared.one(BRANCH_PROTECTION)
    assert protection.inputs == {
        "repositoryId": REPOSITORY,
        "pattern": "main",
        "enforceAdmins": False,
        "allowsForcePushes": False,
        "allowsDeletions": False,
        "requiredPullRequestReviews": [{"requiredApprovingReviewCount": 2,
                                        "dismissStaleReviews": True}],
        "requiredStatusChecks": [{"strict": True, "contexts": ["test", "preview (dev)"]}],
    }


def test_main_protection_defaults_to_one_approval_with_admins_included(
        private_repo: Declared) -> None:
    protection = private_repo.one(BRANCH_PROTECTION).inputs
    assert protection["requiredPullRequestReviews"][0]["requiredApprovingReviewCount"] == 1
    assert protection["enforceAdmins"] is True
    assert protection["allowsForcePushes"] is False
    assert protection["allowsDeletions"] is False
    # No checks configured: no status check block, rather than one requiring nothing.
    assert "requiredStatusChecks" not in protection


# --- seed compatibility ---------------------------------------------------------------------------


def test_seed_compatibility_adds_exactly_the_seed_workflow_secrets(seed: Declared) -> None:
    secrets = secrets_of(seed)
    assert set(secrets) == {"WANDB_API_KEY", "HF_TOKEN"} | SEED_SECRETS
    assert secrets["GCP_K8S_CLUSTER_NAME"].inputs["value"] == "gpu-runners-dev"
    assert secrets["GCP_K8S_CLUSTER_ZONE"].inputs["value"] == "us-central1-a"
    assert all(secret.is_secret("value") for secret in secrets.values())


def test_without_seed_compatibility_no_seed_secret_and_no_key(wired: Declared) -> None:
    assert set(secrets_of(wired)) == {"WANDB_API_KEY", "HF_TOKEN"}
    assert wired.of_type("gcp:serviceaccount/key:Key") == []


def test_seed_key_secret_is_the_json_credentials_file(seed: Declared) -> None:
    key = secrets_of(seed)["GOOGLE_SERVICE_ACCOUNT_KEY"]
    # google-github-actions/auth credentials_json and `docker login -u _json_key` both take
    # the JSON document, not the base64 text the Key resource holds.
    assert json.loads(key.inputs["value"]) == {"type": "service_account"}
    assert key.is_secret("value")


def test_seed_kubeconfig_targets_the_runner_namespace_through_the_exec_plugin(
        seed: Declared) -> None:
    kubeconfig = yaml.safe_load(secrets_of(seed)["GCP_K8S_KUBECONFIG"].inputs["value"])
    context_name = "gke_acme-ml-ci_us-central1-a_gpu-runners-dev"
    assert kubeconfig["current-context"] == context_name
    (context,) = kubeconfig["contexts"]
    assert context == {"name": context_name,
                       "context": {"cluster": context_name, "user": context_name,
                                   "namespace": "github-runners"}}
    (user,) = kubeconfig["users"]
    assert user["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    assert set(user["user"]) == {"exec"}  # no token, no client certificate
    (cluster,) = kubeconfig["clusters"]
    assert cluster["cluster"] == {"server": "https://203.0.113.10",
                                  "certificate-authority-data": "Q0E="}


def test_pointing_a_kubeconfig_at_a_namespace_changes_nothing_else() -> None:
    original = gke_kubeconfig("ctx", "203.0.113.10", "Q0E=")
    changed = yaml.safe_load(kubeconfig_in_namespace(original, "ml-runners"))
    assert changed["contexts"][0]["context"].pop("namespace") == "ml-runners"
    assert changed == yaml.safe_load(original)


def test_a_kubeconfig_without_its_current_context_is_refused() -> None:
    broken = gke_kubeconfig("ctx", "203.0.113.10", "Q0E=").replace(
        "current-context: ctx", "current-context: other")
    with pytest.raises(ValueError, match="current-context: 'other'"):
        kubeconfig_in_namespace(broken, "ml-runners")


# --- fork pull requests ---------------------------------------------------------------------------


def test_private_repository_turns_fork_pull_request_workflows_off(private_repo: Declared) -> None:
    fork_prs = private_repo.one(FORK_PR_WORKFLOWS)
    assert {k: v for k, v in fork_prs.inputs.items() if k != "__provider"} == {
        "owner": OWNER,
        "repository": REPOSITORY,
        "token": TOKEN,
        "api_url": "https://api.github.com",
        "run_workflows_from_fork_pull_requests": False,
        "send_write_tokens_to_workflows": False,
        "send_secrets_and_variables": False,
        "require_approval_for_fork_pr_workflows": False,
    }
    assert fork_prs.is_secret("token")
    assert "RepositorySettings" in fork_prs.parent
    assert private_repo.warnings == []


def test_public_repository_gets_a_warning_that_strangers_code_would_run() -> None:
    declared = declare_settings(private=False)
    assert declared.of_type(FORK_PR_WORKFLOWS) == []
    (warning,) = declared.warnings
    assert "Acme-ML/Vision-Models is public" in warning
    assert "strangers' code" in warning
    assert "self-hosted runners" in warning
    # The rest of the settings still apply.
    assert declared.one(BRANCH_PROTECTION).inputs["pattern"] == "main"


# --- the example workflow -------------------------------------------------------------------------


def test_example_workflow_is_committed_once_before_main_is_protected(
        committed: Declared) -> None:
    workflow = committed.one(REPOSITORY_FILE)
    assert workflow.inputs["file"] == ".github/workflows/gpu-training.yaml"
    assert workflow.inputs["content"] == EXAMPLE_WORKFLOW.read_text()
    assert workflow.inputs["repository"] == REPOSITORY
    assert workflow.inputs["overwriteOnCreate"] is False
    # After the first commit the team owns the file (its training step): no revert, and no
    # push that branch protection would refuse.
    assert workflow.ignore_changes == ["content"]
    assert workflow.urn in committed.one(BRANCH_PROTECTION).dependencies


def test_destroying_the_stack_leaves_the_committed_workflow_in_the_repository(
        committed: Declared) -> None:
    # Without retain_on_delete, deleting the RepositoryFile commits the file's deletion.
    assert committed.one(REPOSITORY_FILE).retain_on_delete is True
    # Nothing else is retained: the rest of the settings go with the stack.
    assert [r.name for r in committed.resources if r.retain_on_delete] == ["repo-example-workflow"]


def test_no_workflow_is_committed_without_the_switch(private_repo: Declared) -> None:
    assert private_repo.of_type(REPOSITORY_FILE) == []
    assert private_repo.one(BRANCH_PROTECTION).dependencies == []


def test_a_missing_example_workflow_names_the_option(monkeypatch: pytest.MonkeyPatch,
                                                     tmp_path: Path) -> None:
    monkeypatch.setattr(components.repository, "EXAMPLE_WORKFLOW", tmp_path / "gone.yaml")
    with pytest.raises(FileNotFoundError, match="commitExampleWorkflow"):
        RepositorySettings("repo", settings_args(commit_example_workflow=True))


# --- providers and argument checks ----------------------------------------------------------------


def test_every_github_resource_goes_through_the_explicit_provider(seed: Declared) -> None:
    github_resources = [r for r in seed.resources
                        if r.custom and r.typ.startswith("github:index/")]
    assert len(github_resources) == 13  # 6 secrets, 6 variables, branch protection
    for resource in github_resources:
        assert resource.provider.startswith(
            "urn:pulumi:test::gpu-runners::pulumi:pulumi:Stack$pulumi:providers:github::github::"
        ), resource.name


@pytest.mark.parametrize(("overrides", "message"), [
    ({"actions_secrets": {"GITHUB_PAT": "x"}}, "'GITHUB_PAT' is not a valid Actions name"),
    ({"actions_secrets": {"9LIVES": "x"}}, "'9LIVES' is not a valid Actions name"),
    ({"variables": {"gpu-pool": "l4"}}, r"variables: 'gpu-pool' is not a valid Actions name"),
    ({"actions_secrets": {"Wandb_Key": "x", "WANDB_KEY": "y"}}, "case-insensitive"),
    ({"actions_secrets": {"gcp_k8s_kubeconfig": "x"},
      "seed": SeedCompatibility("c", "z", "k", "ns", "key")},
     "'gcp_k8s_kubeconfig' is one of the secrets seed compatibility creates"),
    ({"required_approvals": 7}, "required_approvals = 7: GitHub allows 0 to 6"),
])
def test_invalid_settings_are_refused_naming_the_argument(overrides: dict[str, Any],
                                                          message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RepositorySettings("repo", settings_args(**overrides))
