"""The runner plane: namespace, credentials, RBAC, base runner, reaper, in both cluster modes."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from components.runner_plane import SPAWNER_RULES
from gpu_runners import contract
from tests.harness.kubernetes_schema import KUBERNETES_VERSION, strict_errors
from tests.harness.mock_stack import TEST_SECRETS, ProgramRun, RegisteredResource, run_program

PREBUILT = "ghcr.io/acme-ml/vision-models/github-runner@sha256:" + "c" * 64
EXISTING = {"clusterMode": "existing", "kubeconfigContext": "onprem-admin", "gpuQuota": 4,
            "gcpProject": "", "location": ""}
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
CRONJOB = "kubernetes:batch/v1:CronJob"


@pytest.fixture(scope="module")
def dev() -> ProgramRun:
    # The public-package variant (imagePrivate is on by default; see `private_image`).
    return run_program("dev", {"imagePrivate": False})


@pytest.fixture(scope="module")
def private_image() -> ProgramRun:
    return run_program("dev", {"imagePrivate": True})


@pytest.fixture(scope="module")
def existing() -> ProgramRun:
    return run_program("dev", EXISTING)


def pod_templates(run: ProgramRun) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the program declares, with the name of the object holding it."""
    for resource in run.kubernetes_objects():
        manifest = resource.manifest()
        if manifest["kind"] == "Deployment":
            yield resource.name, manifest["spec"]["template"]["spec"]
        elif manifest["kind"] == "CronJob":
            yield resource.name, manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif manifest["kind"] == "Pod":
            yield resource.name, manifest["spec"]


def by_kind(run: ProgramRun, kind: str) -> list[dict[str, Any]]:
    return [r.manifest() for r in run.kubernetes_objects() if r.inputs["kind"] == kind]


@pytest.mark.parametrize("variant", ["dev", "prod", "private image", "existing cluster"])
def test_every_kubernetes_object_passes_the_strict_schema(variant: str) -> None:
    run = {"dev": lambda: run_program("dev"), "prod": lambda: run_program("prod"),
           "private image": lambda: run_program("dev", {"imagePrivate": True}),
           "existing cluster": lambda: run_program("dev", EXISTING)}[variant]()
    objects = list(run.kubernetes_objects())
    assert len(objects) >= 10
    for resource in objects:
        assert strict_errors(resource.manifest(), KUBERNETES_VERSION) == [], resource.name


@pytest.mark.parametrize("variant", ["dev", "private image"])
def test_every_pod_template_meets_the_restricted_pod_security_standard(
        variant: str, dev: ProgramRun, private_image: ProgramRun) -> None:
    run = dev if variant == "dev" else private_image
    templates = dict(pod_templates(run))
    assert set(templates) == {"runners-base-runner", "runners-reaper"}
    for name, spec in templates.items():
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] == contract.RUNNER_UID, name
        assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}, name
        assert not spec.get("hostNetwork") and not spec.get("hostPID"), name
        assert not spec.get("hostIPC"), name
        for volume in spec.get("volumes", []):
            assert "hostPath" not in volume, name
        for container in spec["containers"] + spec.get("initContainers", []):
            security = container["securityContext"]
            assert security["allowPrivilegeEscalation"] is False, name
            assert security.get("privileged", False) is False, name
            assert security["capabilities"] == {"drop": ["ALL"]}, name
            assert security.get("runAsUser", contract.RUNNER_UID) != 0, name
            assert "ports" not in container or all("hostPort" not in p
                                                   for p in container["ports"]), name


def test_namespace_enforces_restricted_pod_security(dev: ProgramRun) -> None:
    (namespace,) = by_kind(dev, "Namespace")
    assert namespace["metadata"]["name"] == contract.DEFAULT_NAMESPACE
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"


def test_pat_secret_uses_the_seed_names_and_is_a_pulumi_secret(dev: ProgramRun) -> None:
    (secret,) = [r for r in dev.of_type("kubernetes:core/v1:Secret")]
    manifest = secret.manifest()
    assert manifest["metadata"]["name"] == "github-runner-pat"
    assert manifest["stringData"] == {"token": TEST_SECRETS["runnerPat"]}
    assert secret.is_secret("stringData.token")


def test_pat_reaches_no_env_var_no_plaintext_input_and_no_output(dev: ProgramRun) -> None:
    pat = TEST_SECRETS["runnerPat"]
    for name, spec in pod_templates(dev):
        for container in spec["containers"]:
            for env in container.get("env", []):
                assert "valueFrom" not in env or "secretKeyRef" not in env["valueFrom"], name
                assert pat not in str(env.get("value", "")), name
    for resource in dev.resources:
        plain = json.dumps(resource.manifest(redact_secrets=True)
                           if resource.typ.startswith("kubernetes:") and resource.custom
                           else {k: v for k, v in resource.inputs.items()
                                 if not resource.is_secret(k)})
        assert pat not in plain, resource.name
    for name, value in dev.outputs.items():
        assert pat not in json.dumps(value) or name in dev.secret_outputs, name


def test_base_runner_mounts_the_pat_as_a_read_only_file(dev: ProgramRun) -> None:
    (deployment,) = by_kind(dev, "Deployment")
    spec = deployment["spec"]["template"]["spec"]
    (volume,) = [v for v in spec["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == contract.PAT_SECRET_NAME
    (container,) = spec["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": contract.PAT_MOUNT_DIR,
                     "readOnly": True}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[contract.ENV_PAT_FILE] == f"{contract.PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}"


def test_base_runner_deployment_listens_for_base_runner_jobs_on_cpu_nodes(
        dev: ProgramRun) -> None:
    (deployment,) = by_kind(dev, "Deployment")
    assert deployment["spec"]["replicas"] == 1
    spec = deployment["spec"]["template"]["spec"]
    assert spec["nodeSelector"] == {"gpu": "false"}
    assert spec["serviceAccountName"] == contract.BASE_RUNNER_SERVICE_ACCOUNT
    assert spec["terminationGracePeriodSeconds"] >= 60
    (container,) = spec["containers"]
    assert container["image"].endswith("@sha256:" + "ab" * 32)
    assert container["resources"] == {"requests": {"cpu": "1", "memory": "4Gi"},
                                      "limits": {"cpu": "1", "memory": "4Gi"}}
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[contract.ENV_RUNNER_LABELS] == "base-runner"
    assert env[contract.ENV_RUNNER_MODE] == "registration"
    assert env[contract.ENV_REPOSITORY] == "Acme-ML/Vision-Models"
    assert env[contract.ENV_NAMESPACE] == contract.DEFAULT_NAMESPACE
    assert env[contract.ENV_IMAGE] == container["image"]
    assert json.loads(env[contract.ENV_GPU_POOLS]) == [
        {"accelerator": "nvidia-l4", "maxGpusPerPod": 1}]


def test_prod_runs_two_base_runners(run_prod: ProgramRun) -> None:
    (deployment,) = by_kind(run_prod, "Deployment")
    assert deployment["spec"]["replicas"] == 2


@pytest.fixture(scope="module")
def run_prod() -> ProgramRun:
    return run_program("prod")


def test_spawner_role_grants_exactly_what_spawning_needs(dev: ProgramRun) -> None:
    (role,) = by_kind(dev, "Role")
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"])
             for r in role["rules"]}
    assert rules == {
        (("",), ("pods",)): ["create", "delete", "get", "list", "watch"],
        (("",), ("pods/log",)): ["get"],
        (("",), ("secrets",)): ["create", "delete", "get"],
        (("",), ("events",)): ["get", "list", "watch"],
    }
    assert len(role["rules"]) == len(SPAWNER_RULES)
    assert not by_kind(dev, "ClusterRole") and not by_kind(dev, "ClusterRoleBinding")
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] + rule["resources"] + rule["apiGroups"]


def test_only_the_base_runner_account_is_bound_and_gpu_pods_get_no_token(
        dev: ProgramRun) -> None:
    (binding,) = by_kind(dev, "RoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount",
                                    "name": contract.BASE_RUNNER_SERVICE_ACCOUNT,
                                    "namespace": contract.DEFAULT_NAMESPACE}]
    accounts = {a["metadata"]["name"]: a for a in by_kind(dev, "ServiceAccount")}
    assert accounts[contract.GPU_RUNNER_SERVICE_ACCOUNT]["automountServiceAccountToken"] is False


def test_network_policy_denies_ingress_and_limits_egress(dev: ProgramRun) -> None:
    (policy,) = by_kind(dev, "NetworkPolicy")
    spec = policy["spec"]
    assert spec["podSelector"] == {}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == []
    assert spec["egress"][0] == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}
    run = run_program("dev", {"egressCidrs": ["140.82.112.0/20", "10.0.0.0/8"]})
    (policy,) = by_kind(run, "NetworkPolicy")
    assert policy["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "140.82.112.0/20"}},
                                                 {"ipBlock": {"cidr": "10.0.0.0/8"}}]


def test_resource_quota_caps_gpus_at_the_pools_maximum(dev: ProgramRun,
                                                      run_prod: ProgramRun) -> None:
    (quota,) = by_kind(dev, "ResourceQuota")
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "1", "pods": "10"}
    (quota,) = by_kind(run_prod, "ResourceQuota")
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "8"  # 4 nodes x 2 L4
    run = run_program("dev", {"gpuQuota": 3})
    (quota,) = by_kind(run, "ResourceQuota")
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "3"


def test_reaper_cron_job_runs_reap_one_at_a_time(dev: ProgramRun) -> None:
    (cron,) = by_kind(dev, "CronJob")
    spec = cron["spec"]
    assert spec["schedule"] == "*/5 * * * *"
    assert spec["concurrencyPolicy"] == "Forbid"
    assert spec["successfulJobsHistoryLimit"] <= 3 and spec["failedJobsHistoryLimit"] <= 3
    pod = spec["jobTemplate"]["spec"]["template"]["spec"]
    assert pod["serviceAccountName"] == contract.BASE_RUNNER_SERVICE_ACCOUNT
    assert pod["restartPolicy"] == "Never"
    (container,) = pod["containers"]
    assert container["command"] == ["python3", "-m", "gpu_runners", "reap"]


def test_private_image_gets_a_pull_secret_used_by_every_pod(private_image: ProgramRun) -> None:
    secrets = {r.manifest()["metadata"]["name"]: r
               for r in private_image.of_type("kubernetes:core/v1:Secret")}
    pull = secrets[contract.IMAGE_PULL_SECRET_NAME]
    assert pull.inputs["type"] == "kubernetes.io/dockerconfigjson"
    assert pull.is_secret("stringData")
    auth = json.loads(pull.inputs["stringData"][".dockerconfigjson"])["auths"]["ghcr.io"]
    assert auth["username"] == "Acme-ML"
    for name, spec in pod_templates(private_image):
        assert spec["imagePullSecrets"] == [{"name": contract.IMAGE_PULL_SECRET_NAME}], name


def test_public_image_needs_no_pull_secret(dev: ProgramRun) -> None:
    names = [r.manifest()["metadata"]["name"] for r in dev.of_type("kubernetes:core/v1:Secret")]
    assert names == [contract.PAT_SECRET_NAME]


def test_destroy_removes_the_base_runner_before_its_pat_secret(dev: ProgramRun) -> None:
    # Pulumi deletes a resource before the resources it depends on.
    deployment = dev.one(DEPLOYMENT)
    secret = dev.one("kubernetes:core/v1:Secret")
    binding = dev.one("kubernetes:rbac.authorization.k8s.io/v1:RoleBinding")
    assert secret.urn in deployment.dependencies
    assert binding.urn in deployment.dependencies
    assert secret.urn in dev.one(CRONJOB).dependencies


def test_every_kubernetes_object_goes_through_the_explicit_provider(
        dev: ProgramRun, existing: ProgramRun) -> None:
    for run, provider in ((dev, "pulumi:providers:kubernetes::gke-k8s::"),
                          (existing, "pulumi:providers:kubernetes::existing-cluster::")):
        objects = list(run.kubernetes_objects())
        assert objects
        for resource in objects:
            assert provider in resource.provider, resource.name


def test_existing_cluster_mode_registers_no_gcp_resource(existing: ProgramRun) -> None:
    gcp = [r.typ for r in existing.resources if r.typ.startswith(("gcp:", "pulumi:providers:gcp"))]
    assert gcp == []
    provider = existing.one("pulumi:providers:kubernetes")
    assert provider.inputs["context"] == "onprem-admin"
    (quota,) = by_kind(existing, "ResourceQuota")
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "4"


def _resource_names(objects: list[RegisteredResource]) -> list[str]:
    return sorted(f"{r.inputs['kind']}/{r.manifest()['metadata']['name']}" for r in objects)


def test_dev_declares_the_runner_plane_objects(dev: ProgramRun) -> None:
    assert _resource_names(list(dev.kubernetes_objects())) == [
        "CronJob/gpu-runner-reaper",
        "Deployment/base-runner",
        "Namespace/github-runners",
        "NetworkPolicy/runner-pods",
        "ResourceQuota/gpu-runners",
        "Role/gpu-runner-spawner",
        "RoleBinding/gpu-runner-spawner",
        "Secret/github-runner-pat",
        "ServiceAccount/base-runner",
        "ServiceAccount/gpu-runner",
    ]


def test_seed_compatibility_binds_the_ci_account_and_relaxes_the_namespace_to_baseline() -> None:
    run = run_program("dev", {"seedCompatibility": True})
    bindings = {b["metadata"]["name"]: b for b in by_kind(run, "RoleBinding")}
    seed = bindings["seed-guide-workflow"]
    assert seed["roleRef"]["name"] == "gpu-runner-spawner"
    assert seed["subjects"] == [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io",
                                 "name": "gpu-runners-dev-github-ci@acme-ml-ci.iam"
                                         ".gserviceaccount.com"}]
    (namespace,) = by_kind(run, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert namespace["metadata"]["annotations"] == {contract.ANNOTATION_SEED_COMPATIBILITY: "true"}


def test_without_seed_compatibility_no_human_or_ci_identity_is_bound(dev: ProgramRun) -> None:
    assert [b["metadata"]["name"] for b in by_kind(dev, "RoleBinding")] == ["gpu-runner-spawner"]
