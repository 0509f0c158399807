"""The whole program, stack by stack: what each stack exports and declares on GitHub and GCP."""

from __future__ import annotations

import json

import pytest

from gpu_runners import contract
from tests.harness.mock_stack import TEST_SECRETS, ProgramRun, run_program

SEED_SECRETS = {"GCP_K8S_CLUSTER_NAME", "GCP_K8S_CLUSTER_ZONE", "GCP_K8S_KUBECONFIG",
                "GOOGLE_SERVICE_ACCOUNT_KEY"}


@pytest.fixture(scope="module")
def dev() -> ProgramRun:
    return run_program("dev")


@pytest.fixture(scope="module")
def seed() -> ProgramRun:
    return run_program("dev", {"seedCompatibility": True})


def variables(run: ProgramRun) -> dict[str, str]:
    return {v.inputs["variableName"]: v.inputs["value"]
            for v in run.of_type("github:index/actionsVariable:ActionsVariable")}


def secret_names(run: ProgramRun) -> set[str]:
    return {s.inputs["secretName"]
            for s in run.of_type("github:index/actionsSecret:ActionsSecret")}


def test_dev_exports_what_operators_need_and_keeps_the_kubeconfig_secret(dev: ProgramRun) -> None:
    assert set(dev.outputs) == {"clusterName", "clusterLocation", "kubeconfig", "runnerImage",
                                "runnerNamespace", "repositorySecrets",
                                "workloadIdentityProvider", "ciServiceAccount", "brokerImage",
                                "brokerNamespace", "brokerUrl", "brokerAudience",
                                "imageMirrors"}
    assert dev.secret_outputs == {"kubeconfig"}
    for token in TEST_SECRETS.values():
        assert token not in json.dumps(dev.outputs)


def test_workflow_variables_point_at_the_cluster_and_the_keyless_identity(dev: ProgramRun) -> None:
    assert variables(dev) == {
        contract.VAR_CLUSTER_NAME: "gpu-runners-dev",
        contract.VAR_CLUSTER_LOCATION: "us-central1-a",
        contract.VAR_RUNNER_NAMESPACE: contract.DEFAULT_NAMESPACE,
        contract.VAR_BASE_RUNNER_LABEL: contract.BASE_RUNNER_LABEL,
        contract.VAR_WORKLOAD_IDENTITY_PROVIDER: dev.outputs["workloadIdentityProvider"],
        contract.VAR_CI_SERVICE_ACCOUNT: dev.outputs["ciServiceAccount"],
    }
    assert dev.outputs["workloadIdentityProvider"].endswith(
        "/workloadIdentityPools/github-actions/providers/github")


def test_main_is_protected_by_reviews_and_requires_no_check_by_default(dev: ProgramRun) -> None:
    protection = dev.one("github:index/branchProtection:BranchProtection").inputs
    assert protection["pattern"] == "main"
    assert protection["allowsForcePushes"] is False
    assert protection["allowsDeletions"] is False
    assert protection["enforceAdmins"] is True
    (reviews,) = protection["requiredPullRequestReviews"]
    assert reviews["requiredApprovingReviewCount"] == 1
    # The repository the runners serve has checks of its own, which only its team can name:
    # a default name that never reports there would block every merge, admins included.
    assert protection.get("requiredStatusChecks") in (None, [])


def test_branch_protection_can_be_left_off_for_a_free_plans_private_repository() -> None:
    run = run_program("dev", {"branchProtection": False, "commitExampleWorkflow": True})
    assert run.of_type("github:index/branchProtection:BranchProtection") == []
    # Everything else on the GitHub side is still declared.
    assert run.of_type("github:index/repositoryFile:RepositoryFile")
    assert [r for r in run.resources if r.typ.endswith(":ForkPrWorkflows")]


def test_private_repository_turns_fork_pr_workflows_off(dev: ProgramRun) -> None:
    (fork,) = [r for r in dev.resources if r.typ.endswith(":ForkPrWorkflows")]
    assert fork.inputs["run_workflows_from_fork_pull_requests"] is False
    assert fork.inputs["repository"] == "Vision-Models"
    assert fork.is_secret("token")


def test_github_resources_go_through_the_explicit_provider(dev: ProgramRun) -> None:
    provider = dev.one("pulumi:providers:github")
    assert provider.inputs["owner"] == "Acme-ML"
    assert provider.is_secret("token")
    for resource in dev.resources:
        if resource.typ.startswith("github:"):
            assert "pulumi:providers:github::github::" in resource.provider, resource.name


def test_no_seed_secret_and_no_key_without_seed_compatibility(dev: ProgramRun) -> None:
    assert secret_names(dev) & SEED_SECRETS == set()
    assert dev.of_type("gcp:serviceaccount/key:Key") == []


def test_seed_compatibility_creates_exactly_the_seed_workflows_secrets(seed: ProgramRun) -> None:
    assert secret_names(seed) == SEED_SECRETS
    assert seed.outputs["repositorySecrets"] == sorted(SEED_SECRETS)
    secrets = {s.inputs["secretName"]: s
               for s in seed.of_type("github:index/actionsSecret:ActionsSecret")}
    for secret in secrets.values():
        assert secret.is_secret("value"), secret.inputs["secretName"]
    assert secrets["GCP_K8S_CLUSTER_NAME"].inputs["value"] == "gpu-runners-dev"
    assert secrets["GCP_K8S_CLUSTER_ZONE"].inputs["value"] == "us-central1-a"
    assert "namespace: github-runners" in secrets["GCP_K8S_KUBECONFIG"].inputs["value"]
    assert len(seed.of_type("gcp:serviceaccount/key:Key")) == 1


def test_extra_actions_secrets_from_config_are_secrets() -> None:
    run = run_program("dev", secrets={**TEST_SECRETS,
                                      "actionsSecrets": {"DVC_REMOTE_KEY": "s3cr3t-value"}})
    (secret,) = run.of_type("github:index/actionsSecret:ActionsSecret")
    assert secret.inputs["secretName"] == "DVC_REMOTE_KEY"
    assert secret.inputs["value"] == "s3cr3t-value"
    assert secret.is_secret("value")


def test_existing_cluster_mode_declares_only_the_runner_plane_and_github() -> None:
    run = run_program("dev", {"clusterMode": "existing", "kubeconfigContext": "onprem",
                              "gpuQuota": 2})
    assert variables(run) == {contract.VAR_RUNNER_NAMESPACE: contract.DEFAULT_NAMESPACE,
                              contract.VAR_BASE_RUNNER_LABEL: contract.BASE_RUNNER_LABEL}
    assert "kubeconfig" not in run.outputs


def test_the_default_stack_pulls_the_runner_image_with_a_secret(dev: ProgramRun) -> None:
    # GHCR creates a package private: without a pull Secret the base runner (and the broker)
    # would sit in ImagePullBackOff until the update times out.
    pull_secrets = {r.inputs["metadata"]["namespace"]: r.manifest()
                    for r in dev.kubernetes_objects()
                    if r.inputs["kind"] == "Secret"
                    and r.inputs.get("type") == "kubernetes.io/dockerconfigjson"}
    assert set(pull_secrets) == {contract.DEFAULT_NAMESPACE, contract.DEFAULT_BROKER_NAMESPACE}
    deployments = [r.manifest() for r in dev.kubernetes_objects()
                   if r.inputs["kind"] == "Deployment"]
    assert len(deployments) == 2
    for deployment in deployments:
        pull_secret = pull_secrets[deployment["metadata"]["namespace"]]
        name = pull_secret["metadata"]["name"]
        assert deployment["spec"]["template"]["spec"]["imagePullSecrets"] == [{"name": name}]
        assert json.loads(pull_secret["data"][".dockerconfigjson"] if "data" in pull_secret
                          else pull_secret["stringData"][".dockerconfigjson"])["auths"]["ghcr.io"]
