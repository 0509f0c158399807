"""The stack config: every bad input is reported, by key, before anything is declared."""

from __future__ import annotations

from typing import Any

import pytest
import yaml

from components.config import ACCELERATORS, StackConfigError
from gpu_runners import contract
from tests.harness.mock_stack import (
    PROJECT_FILE,
    TEST_SECRETS,
    ProgramRun,
    effective_config,
    project_declarations,
    run_program,
)

L4_POOL = {"name": "l4", "machineType": "g2-standard-8", "acceleratorType": "nvidia-l4",
           "maxNodes": 2}
#: An on-demand L4 pool a Spot L4 pool may fall back to.
L4_ON_DEMAND = {**L4_POOL, "name": "l4-on-demand", "spot": False}


def config_problems(overrides: dict[str, Any], *, secrets: dict[str, Any] | None = None,
                    fill_placeholders: bool = True, stack: str = "dev") -> list[str]:
    """Run the dev stack with overrides; return the problems it was refused for."""
    with pytest.raises(StackConfigError) as refused:
        run_program(stack, overrides, secrets=secrets, fill_placeholders=fill_placeholders)
    return refused.value.problems


def pool(**fields: Any) -> list[dict[str, Any]]:
    return [{**L4_POOL, **fields}]


def with_fallback(target: dict[str, Any], **fields: Any) -> list[dict[str, Any]]:
    """A Spot L4 pool falling back to `target` (the second entry)."""
    return [{**L4_POOL, "spot": True, "onDemandFallback": target["name"], **fields}, target]


BAD_CONFIGS = [
    # (what is wrong, overrides, the key the error must name)
    ("project id with uppercase", {"gcpProject": "Acme-Project"}, "gcpProject"),
    ("project id too short", {"gcpProject": "abc"}, "gcpProject"),
    ("location is not a region or zone", {"location": "us-central"}, "location"),
    ("location with a typo'd zone", {"location": "us-central1-ab"}, "location"),
    ("cluster name with underscore", {"clusterName": "gpu_runners"}, "clusterName"),
    ("cluster name over 40 characters", {"clusterName": "g" * 41}, "clusterName"),
    ("unknown release channel", {"releaseChannel": "NIGHTLY"}, "releaseChannel"),
    ("negative CPU minimum", {"cpuMinNodes": -1}, "cpuMinNodes"),
    ("CPU minimum above maximum", {"cpuMinNodes": 4, "cpuMaxNodes": 2}, "cpuMinNodes"),
    ("GPU pool max of zero", {"gpuPools": pool(maxNodes=0)}, "gpuPools[0].maxNodes"),
    ("GPU pool min above max", {"gpuPools": pool(minNodes=3, maxNodes=2)},
     "gpuPools[0].minNodes"),
    ("negative GPU pool min", {"gpuPools": pool(minNodes=-1)}, "gpuPools[0].minNodes"),
    ("T4 on a G2 machine", {"gpuPools": pool(acceleratorType="nvidia-tesla-t4")},
     "gpuPools[0].machineType"),
    ("L4 on an N1 machine", {"gpuPools": pool(machineType="n1-standard-8")},
     "gpuPools[0].machineType"),
    ("A100 on an N1 machine", {"gpuPools": pool(acceleratorType="nvidia-tesla-a100",
                                                machineType="n1-standard-16")},
     "gpuPools[0].machineType"),
    ("H100 count not what a3-highgpu-8g carries",
     {"gpuPools": pool(acceleratorType="nvidia-h100-80gb", machineType="a3-highgpu-8g",
                       acceleratorCount=4)}, "gpuPools[0].acceleratorCount"),
    ("three T4s", {"gpuPools": pool(acceleratorType="nvidia-tesla-t4",
                                    machineType="n1-standard-8", acceleratorCount=3)},
     "gpuPools[0].acceleratorCount"),
    ("unknown accelerator", {"gpuPools": pool(acceleratorType="nvidia-rtx-4090")},
     "gpuPools[0].acceleratorType"),
    ("pool name with capitals", {"gpuPools": pool(name="L4Pool")}, "gpuPools[0].name"),
    ("pool zone outside a zonal cluster", {"gpuPools": pool(zones=["us-east1-b"])},
     "gpuPools[0].zones[0]"),
    ("misspelt pool field", {"gpuPools": pool(maxNode=2)}, "gpuPools[0].maxNode"),
    ("duplicate pool names", {"gpuPools": [L4_POOL, L4_POOL]}, "gpuPools"),
    ("no GPU pool", {"gpuPools": []}, "gpuPools"),
    ("fallback on an on-demand pool",
     {"gpuPools": with_fallback(L4_ON_DEMAND, spot=False)}, "gpuPools[0].onDemandFallback"),
    ("fallback to an unknown pool", {"gpuPools": pool(onDemandFallback="l4-ondemand")},
     "gpuPools[0].onDemandFallback"),
    ("fallback to itself", {"gpuPools": pool(onDemandFallback="l4")},
     "gpuPools[0].onDemandFallback"),
    ("fallback to another Spot pool", {"gpuPools": with_fallback({**L4_ON_DEMAND, "spot": True})},
     "gpuPools[0].onDemandFallback"),
    ("fallback to a pool of another accelerator",
     {"gpuPools": with_fallback({**L4_ON_DEMAND, "machineType": "n1-standard-8",
                                 "acceleratorType": "nvidia-tesla-t4"})},
     "gpuPools[0].onDemandFallback"),
    ("fallback to a pool of fewer GPUs per node",
     {"gpuPools": with_fallback(L4_ON_DEMAND, machineType="g2-standard-24",
                                acceleratorCount=2)},
     "gpuPools[0].onDemandFallback"),
    ("fallback that is not a pool name", {"gpuPools": pool(onDemandFallback=["l4-on-demand"])},
     "gpuPools[0].onDemandFallback"),
    ("owner with a double hyphen", {"githubOwner": "acme--ml"}, "githubOwner"),
    ("repository given as owner/name", {"githubRepository": "acme/models"}, "githubRepository"),
    ("namespace with capitals", {"runnerNamespace": "GitHub-Runners"}, "runnerNamespace"),
    ("prebuilt image not pinned by digest", {"runnerImage": "ghcr.io/acme/runner:latest"},
     "runnerImage"),
    ("memory quantity with a typo", {"baseRunnerMemory": "4GB"}, "baseRunnerMemory"),
    ("GPU quota smaller than one node", {"gpuPools": pool(machineType="g2-standard-24",
                                                          acceleratorCount=2), "gpuQuota": 1},
     "gpuQuota"),
    ("egress CIDR that is not one", {"egressCidrs": ["github.com"]}, "egressCidrs[0]"),
    ("reaper interval under 30 s", {"reaperIntervalSeconds": 5}, "reaperIntervalSeconds"),
    ("negative preemption retries", {"maxPreemptionRetries": -1}, "maxPreemptionRetries"),
    ("preemption retries above 5", {"maxPreemptionRetries": 6}, "maxPreemptionRetries"),
    ("broker namespace shared with the runners", {"brokerNamespace": "github-runners"},
     "brokerNamespace"),
    ("broker namespace of Kubernetes itself", {"brokerNamespace": "kube-system"},
     "brokerNamespace"),
    ("broker namespace with capitals", {"brokerNamespace": "Broker"}, "brokerNamespace"),
    ("GitHub's default audience", {"brokerAudience": "https://github.com/Acme-ML"},
     "brokerAudience"),
    ("the workload identity provider's default audience",
     {"brokerAudience": "https://iam.googleapis.com/projects/123456789012/locations/global/"
                        "workloadIdentityPools/github-actions/providers/github"},
     "brokerAudience"),
    ("the provider's audience without its scheme",
     {"brokerAudience": "//iam.googleapis.com/projects/1/locations/global/"
                        "workloadIdentityPools/p/providers/github"}, "brokerAudience"),
    ("AWS's default audience", {"brokerAudience": "sts.amazonaws.com"}, "brokerAudience"),
    ("empty audience", {"brokerAudience": ""}, "brokerAudience"),
    ("audience with a space", {"brokerAudience": "gpu runners"}, "brokerAudience"),
    ("OIDC issuer over http", {"oidcIssuer": "http://token.actions.githubusercontent.com"},
     "oidcIssuer"),
    ("OIDC issuer with a trailing slash",
     {"oidcIssuer": "https://token.actions.githubusercontent.com/"}, "oidcIssuer"),
    ("pull_request_target allowed", {"brokerAllowedEvents": ["push", "pull_request_target"]},
     "brokerAllowedEvents[1]"),
    ("workflow_run allowed", {"brokerAllowedEvents": ["workflow_run"]},
     "brokerAllowedEvents[0]"),
    ("no event allowed", {"brokerAllowedEvents": []}, "brokerAllowedEvents"),
    ("event name with capitals", {"brokerAllowedEvents": ["Push"]}, "brokerAllowedEvents[0]"),
    ("ref pattern with a space", {"brokerAllowedRefs": ["refs/heads/ main"]},
     "brokerAllowedRefs[0]"),
    ("empty workflow ref pattern", {"brokerAllowedWorkflowRefs": [""]},
     "brokerAllowedWorkflowRefs[0]"),
    ("image pattern allowing every registry", {"allowedImages": ["*"]}, "allowedImages[0]"),
    ("image pattern with a wildcard registry", {"allowedImages": ["*.io/acme/cuda"]},
     "allowedImages[0]"),
    ("image pattern without a registry", {"allowedImages": ["pytorch/pytorch:*"]},
     "allowedImages[0]"),
    ("negative GPU cap per repository", {"gpuCapPerRepository": -1}, "gpuCapPerRepository"),
    ("GPU cap per repository above the quota", {"gpuCapPerRepository": 2},
     "gpuCapPerRepository"),
    ("prebuilt broker image not pinned by digest",
     {"brokerImage": "ghcr.io/acme/broker:latest"}, "brokerImage"),
    ("IAM role without the roles/ prefix", {"ciServiceAccountRoles": ["storage.admin"]},
     "ciServiceAccountRoles[0]"),
    ("basic role for the CI account",
     {"ciServiceAccountRoles": ["roles/container.clusterViewer", "roles/editor"]},
     "ciServiceAccountRoles[1]"),
    ("reserved workload identity pool prefix", {"workloadIdentityPoolId": "gcp-actions"},
     "workloadIdentityPoolId"),
    ("existing mode without a context", {"clusterMode": "existing"}, "kubeconfigContext"),
    ("unknown cluster mode", {"clusterMode": "eks"}, "clusterMode"),
    ("driver version outside the enum", {"gpuDriverVersion": "R535"}, "gpuDriverVersion"),
    ("maintenance day misspelt", {"maintenanceDays": ["Sat"]}, "maintenanceDays[0]"),
    ("maintenance window under 4 hours", {"maintenanceWindowUtc": "02:00-05:00"},
     "maintenanceWindowUtc"),
    ("maintenance window in local time notation", {"maintenanceWindowUtc": "2am-8am"},
     "maintenanceWindowUtc"),
    ("one 6-hour day: 24 of the 48 hours GKE needs in 32 days", {"maintenanceDays": ["SU"]},
     "maintenanceDays"),
    ("no maintenance day", {"maintenanceDays": []}, "maintenanceDays"),
    ("seed compatibility without GKE", {"clusterMode": "existing", "kubeconfigContext": "onprem",
                                        "seedCompatibility": True}, "seedCompatibility"),
]


@pytest.mark.parametrize(("overrides", "key"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_is_refused_naming_the_key(overrides: dict[str, Any], key: str) -> None:
    problems = config_problems(overrides)
    assert any(p.startswith(key) for p in problems), problems


def test_broker_keys_are_all_reported_at_once_before_any_resource() -> None:
    problems = config_problems({"brokerAudience": "https://github.com/Acme-ML",
                                "oidcIssuer": "token.actions.githubusercontent.com",
                                "brokerAllowedEvents": ["workflow_run"],
                                "allowedImages": ["*"], "reaperIntervalSeconds": 0,
                                "brokerNamespace": "github-runners"})
    named = {p.split(" ")[0] for p in problems}
    assert {"brokerAudience", "oidcIssuer", "brokerAllowedEvents[0]", "allowedImages[0]",
            "reaperIntervalSeconds", "brokerNamespace"} <= named
    from pulumi.runtime import settings
    assert settings.SETTINGS.monitor.infra.resources == []


def test_broker_defaults_are_the_contracts() -> None:
    # Pulumi.yaml holds the defaults the CLI fills in; they must be the runtime's own names.
    declarations = project_declarations()
    assert declarations["brokerNamespace"]["default"] == contract.DEFAULT_BROKER_NAMESPACE
    assert declarations["brokerAudience"]["default"] == contract.DEFAULT_BROKER_AUDIENCE
    assert declarations["oidcIssuer"]["default"] == contract.GITHUB_OIDC_ISSUER
    assert declarations["brokerAllowedEvents"]["default"] == list(
        contract.DEFAULT_ALLOWED_EVENTS)
    assert declarations["maxPreemptionRetries"]["default"] == (
        contract.DEFAULT_MAX_PREEMPTION_RETRIES)


def test_fallback_problems_name_the_key_and_what_the_target_lacks() -> None:
    problems = config_problems({"gpuPools": with_fallback(
        L4_ON_DEMAND, machineType="g2-standard-24", acceleratorCount=2),
        "maxPreemptionRetries": 9})
    assert "gpuPools[0].onDemandFallback = 'l4-on-demand': pool l4-on-demand has 1 GPU(s) " \
        "per node, fewer than this pool's 2: a pod that fits here must fit there" in problems
    assert "maxPreemptionRetries = 9: must be >= 0 and <= 5" in problems


def test_a_spot_pool_may_fall_back_to_a_larger_on_demand_pool() -> None:
    run = run_program("dev", {"gpuPools": with_fallback(
        {**L4_ON_DEMAND, "machineType": "g2-standard-24", "acceleratorCount": 2})})
    pools = {pool.inputs["name"]: pool.inputs
             for pool in run.of_type("gcp:container/nodePool:NodePool")}
    assert pools["l4"]["nodeConfig"]["spot"] is True
    assert pools["l4-on-demand"]["nodeConfig"]["spot"] is False


def test_every_problem_is_listed_at_once() -> None:
    problems = config_problems({"gcpProject": "X", "clusterName": "Bad_Name",
                                "cpuMinNodes": -2, "gpuPools": pool(maxNodes=0)})
    named = {p.split(" ")[0] for p in problems}
    assert {"gcpProject", "clusterName", "cpuMinNodes", "gpuPools[0].maxNodes"} <= named


def test_a_missing_secret_is_named_with_the_command_that_sets_it() -> None:
    problems = config_problems({}, secrets={"githubToken": "ghp_x"})
    assert any(p.startswith("runnerPat is not set") and "pulumi config set --secret runnerPat" in p
               for p in problems), problems


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_stack_placeholders_fail_until_set(stack: str) -> None:
    problems = config_problems({}, fill_placeholders=False, stack=stack)
    placeholders = sorted(p.split(" ")[0] for p in problems if "placeholder" in p)
    assert placeholders == ["gcpProject", "githubOwner", "githubRepository"]


def registered_after_refusal(overrides: dict[str, Any], *,
                             secrets: dict[str, Any] | None = None) -> list[str]:
    """Run a config that must be refused; return the problems and what was registered."""
    with pytest.raises(StackConfigError) as refused:
        run_program("dev", overrides, secrets=secrets)
    # run_program installs fresh mocks per run; a refused run leaves them empty.
    from pulumi.runtime import settings
    monitor = settings.SETTINGS.monitor
    assert monitor.infra.resources == [], refused.value.problems
    return refused.value.problems


@pytest.mark.parametrize(("overrides", "key"), [c[1:] for c in BAD_CONFIGS],
                         ids=[c[0] for c in BAD_CONFIGS])
def test_bad_config_registers_no_resource(overrides: dict[str, Any], key: str) -> None:
    problems = registered_after_refusal(overrides)
    assert any(p.startswith(key) for p in problems), problems


SECRET_CONFLICTS = [
    ("a seed secret's name, in another case", {"seedCompatibility": True},
     {"gcp_k8s_kubeconfig": "x"}, "actionsSecrets.gcp_k8s_kubeconfig"),
    ("two spellings of one secret", {}, {"Wandb_Key": "x", "WANDB_KEY": "y"},
     "actionsSecrets.WANDB_KEY"),
]


@pytest.mark.parametrize(("overrides", "extra_secrets", "key"),
                         [c[1:] for c in SECRET_CONFLICTS], ids=[c[0] for c in SECRET_CONFLICTS])
def test_secret_names_github_would_merge_are_refused_before_any_resource(
        overrides: dict[str, Any], extra_secrets: dict[str, str], key: str) -> None:
    # The components refuse these too, but only after the cluster was declared.
    problems = registered_after_refusal(
        overrides, secrets={**TEST_SECRETS, "actionsSecrets": extra_secrets})
    assert any(p.startswith(key) for p in problems), problems


def test_a_basic_role_is_refused_by_its_config_key_not_a_python_argument() -> None:
    problems = registered_after_refusal({"ciServiceAccountRoles": ["roles/owner"]})
    assert [p for p in problems if "basic role" in p] == [
        "ciServiceAccountRoles[0] = 'roles/owner': not a basic role: any branch of the "
        "repository can impersonate the CI service account, so it would hand the project to "
        "every pull request author; grant predefined roles such as "
        "roles/container.clusterViewer"]
    assert not any("project_roles" in p for p in problems)


def test_error_message_does_not_echo_secret_values() -> None:
    secret_value = "ghp_super_secret_value_123"
    problems = config_problems({"gcpProject": "X"},
                               secrets={"githubToken": secret_value, "runnerPat": secret_value,
                                        "actionsSecrets": {"bad-name": secret_value}})
    assert problems
    assert all(secret_value not in p for p in problems)
    assert any(p.startswith("actionsSecrets.bad-name") for p in problems)


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_stack_file_loads_and_validates(stack: str) -> None:
    run: ProgramRun = run_program(stack)
    assert run.of_type("gcp:container/cluster:Cluster")


def test_pulumi_yaml_declares_every_key_with_type_and_description() -> None:
    declarations = project_declarations()
    for key, declaration in declarations.items():
        assert declaration.get("description"), key
        assert declaration["type"] in {"string", "integer", "boolean", "array"}, key
    # The only required credential is declared secret; the optional ones (runnerPat, the App's
    # key) have defaults, which a secret declaration cannot have, and are checked to be stored
    # as secrets by components/config.py instead.
    secret_keys = {k for k, d in declarations.items() if d.get("secret")}
    assert secret_keys == {"githubToken"}


def test_stack_files_set_only_declared_or_documented_keys() -> None:
    documented_objects = {"gpuPools", "actionsSecrets"}
    text = PROJECT_FILE.read_text()
    assert all(f"#   {key}" in text for key in documented_objects)
    for stack in ("dev", "prod"):
        config, _ = effective_config(stack)
        keys = {k.split(":", 1)[1] for k in config}
        assert keys <= set(project_declarations()) | documented_objects | {
            "githubToken", "runnerPat"}


def test_config_reads_every_declared_key() -> None:
    source = (PROJECT_FILE.parent / "components" / "config.py").read_text()
    unread = [key for key in project_declarations() if f'"{key}"' not in source]
    assert unread == []


def test_every_accelerator_names_its_machine_series() -> None:
    assert {"nvidia-tesla-t4", "nvidia-l4", "nvidia-tesla-a100", "nvidia-h100-80gb"} <= set(
        ACCELERATORS)
    assert ACCELERATORS["nvidia-tesla-t4"].machine_prefixes == ("n1-",)
    assert ACCELERATORS["nvidia-l4"].machine_prefixes == ("g2-",)
    assert ACCELERATORS["nvidia-tesla-a100"].machine_prefixes == ("a2-",)
    assert ACCELERATORS["nvidia-h100-80gb"].machine_prefixes == ("a3-",)


def test_pulumi_yaml_is_a_valid_project_file() -> None:
    project = yaml.safe_load(PROJECT_FILE.read_text())
    assert project["name"] == "gpu-runners"
    assert project["runtime"]["name"] == "python"
    assert project["config"]["pulumi:disable-default-providers"] == {
        "value": ["gcp", "kubernetes", "github", "docker-build"]}
