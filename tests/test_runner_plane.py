"""The runner plane: namespace, the base runner's PAT, the base runner, in both cluster modes.

The base runner runs workflow code: it holds no Kubernetes right and no token, and reaches the
broker (tests/test_broker_component.py) only through its OIDC-authenticated client.
"""

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
BASE_RUNNER = "runners-base-runner"


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


def by_kind(run: ProgramRun, kind: str, namespace: str | None = contract.DEFAULT_NAMESPACE
            ) -> list[dict[str, Any]]:
    """The objects of one kind, in the runner namespace unless another (or None: any) is named.

    A Namespace counts as in itself; other cluster-scoped objects as in every namespace.
    """
    manifests = [r.manifest() for r in run.kubernetes_objects() if r.inputs["kind"] == kind]
    return [m for m in manifests if namespace is None or m["metadata"].get(
        "namespace", m["metadata"]["name"] if kind == "Namespace" else namespace) == namespace]


def base_runner(run: ProgramRun) -> dict[str, Any]:
    return run.one(DEPLOYMENT, BASE_RUNNER).manifest()


@pytest.mark.parametrize("variant", ["dev", "prod", "private image", "existing cluster"])
def test_every_kubernetes_object_passes_the_strict_schema(variant: str) -> None:
    run = {"dev": lambda: run_program("dev"), "prod": lambda: run_program("prod"),
           "private image": lambda: run_program("dev", {"imagePrivate": True}),
           "existing cluster": lambda: run_program("dev", EXISTING)}[variant]()
    objects = list(run.kubernetes_objects())
    assert len(objects) >= 15
    for resource in objects:
        assert strict_errors(resource.manifest(), KUBERNETES_VERSION) == [], resource.name


@pytest.mark.parametrize("variant", ["dev", "private image"])
def test_every_pod_template_meets_the_restricted_pod_security_standard(
        variant: str, dev: ProgramRun, private_image: ProgramRun) -> None:
    run = dev if variant == "dev" else private_image
    templates = dict(pod_templates(run))
    uids = {BASE_RUNNER: contract.RUNNER_UID, "broker-deployment": contract.BROKER_UID}
    assert set(templates) == set(uids)
    for name, spec in templates.items():
        pod_security = spec["securityContext"]
        assert pod_security["runAsNonRoot"] is True, name
        assert pod_security["runAsUser"] == uids[name], name
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
            assert security.get("runAsUser", uids[name]) != 0, name
            assert "ports" not in container or all("hostPort" not in p
                                                   for p in container["ports"]), name


def test_both_namespaces_enforce_restricted_pod_security(dev: ProgramRun) -> None:
    namespaces = {n["metadata"]["name"]: n for n in by_kind(dev, "Namespace", namespace=None)}
    assert set(namespaces) == {contract.DEFAULT_NAMESPACE, contract.DEFAULT_BROKER_NAMESPACE}
    for namespace in namespaces.values():
        labels = namespace["metadata"]["labels"]
        assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
        assert labels["pod-security.kubernetes.io/enforce-version"] == "latest"


def test_pat_secret_uses_the_seed_names_and_is_a_pulumi_secret(dev: ProgramRun) -> None:
    (secret,) = [r for r in dev.of_type("kubernetes:core/v1:Secret")
                 if r.inputs["metadata"]["namespace"] == contract.DEFAULT_NAMESPACE]
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


def test_base_runner_mounts_no_secret_but_its_own_registration_pat(dev: ProgramRun,
                                                                   private_image: ProgramRun
                                                                   ) -> None:
    for run in (dev, private_image):
        spec = base_runner(run)["spec"]["template"]["spec"]
        mounted = [v["secret"]["secretName"] for v in spec["volumes"] if "secret" in v]
        projected = [v for v in spec["volumes"] if "projected" in v]
        assert mounted == [contract.PAT_SECRET_NAME] and projected == []
        (container,) = spec["containers"]
        assert all("secretKeyRef" not in e.get("valueFrom", {}) for e in container["env"])
        assert "envFrom" not in container


def test_base_runner_mounts_the_pat_as_a_read_only_file(dev: ProgramRun) -> None:
    spec = base_runner(dev)["spec"]["template"]["spec"]
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
    deployment = base_runner(dev)
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
    assert env == {
        contract.ENV_RUNNER_MODE: "registration",
        contract.ENV_RUNNER_LABELS: "base-runner",
        contract.ENV_REPOSITORY: "Acme-ML/Vision-Models",
        contract.ENV_PAT_FILE: f"{contract.PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}",
        # The client's settings; the cluster's pools, images and limits are the broker's.
        contract.ENV_BROKER_URL: dev.outputs["brokerUrl"],
        contract.ENV_BROKER_AUDIENCE: contract.DEFAULT_BROKER_AUDIENCE,
    }


def test_base_runner_client_follows_the_configured_broker_namespace_and_audience() -> None:
    run = run_program("dev", {"brokerNamespace": "ci-broker", "brokerAudience": "acme-gpu"})
    (container,) = base_runner(run)["spec"]["template"]["spec"]["containers"]
    env = {e["name"]: e["value"] for e in container["env"]}
    assert env[contract.ENV_BROKER_URL] == "http://gpu-runners-broker.ci-broker.svc:8080"
    assert env[contract.ENV_BROKER_URL] == run.outputs["brokerUrl"]
    assert env[contract.ENV_BROKER_AUDIENCE] == "acme-gpu" == run.outputs["brokerAudience"]


def test_prod_runs_two_base_runners(run_prod: ProgramRun) -> None:
    assert base_runner(run_prod)["spec"]["replicas"] == 2


@pytest.fixture(scope="module")
def run_prod() -> ProgramRun:
    return run_program("prod")


def spawner_rules() -> list[dict[str, Any]]:
    """SPAWNER_RULES as the API server receives them (camelCase keys, plain lists)."""
    rules: list[dict[str, Any]] = json.loads(json.dumps(SPAWNER_RULES))
    return [{"apiGroups": r["api_groups"], "resources": r["resources"], "verbs": r["verbs"]}
            for r in rules]


def test_spawner_rules_grant_exactly_what_spawning_needs() -> None:
    rules = {(tuple(r["apiGroups"]), tuple(r["resources"])): sorted(r["verbs"])
             for r in spawner_rules()}
    assert rules == {
        (("",), ("pods",)): ["create", "delete", "get", "list", "watch"],
        (("",), ("pods/log",)): ["get"],
        (("",), ("secrets",)): ["create", "delete", "get"],
        (("",), ("events",)): ["get", "list", "watch"],
    }
    assert len(rules) == len(SPAWNER_RULES)


def subjects_bound(run: ProgramRun) -> list[tuple[str, dict[str, str]]]:
    """(binding name, subject) of every RoleBinding and ClusterRoleBinding the stack declares."""
    return [(b["metadata"]["name"], s)
            for kind in ("RoleBinding", "ClusterRoleBinding")
            for b in by_kind(run, kind, namespace=None) for s in b.get("subjects", [])]


@pytest.mark.parametrize("variant", ["dev", "seed compatibility", "existing cluster"])
def test_the_accounts_of_pods_that_run_workflow_code_have_no_rights(variant: str) -> None:
    run = {"dev": lambda: run_program("dev"),
           "seed compatibility": lambda: run_program("dev", {"seedCompatibility": True}),
           "existing cluster": lambda: run_program("dev", EXISTING)}[variant]()
    workflow_accounts = {contract.BASE_RUNNER_SERVICE_ACCOUNT, contract.GPU_RUNNER_SERVICE_ACCOUNT}
    # No binding names them, nor a group that would take them in.
    for binding, subject in subjects_bound(run):
        assert not (subject["kind"] == "ServiceAccount"
                    and subject["name"] in workflow_accounts), binding
        assert not (subject["kind"] == "Group"
                    and subject["name"].startswith(("system:serviceaccounts",
                                                    "system:authenticated"))), binding
    assert by_kind(run, "ClusterRoleBinding", namespace=None) == []
    accounts = {a["metadata"]["name"]: a for a in by_kind(run, "ServiceAccount")}
    assert set(accounts) == workflow_accounts
    for account in accounts.values():
        assert account["automountServiceAccountToken"] is False
    spec = base_runner(run)["spec"]["template"]["spec"]
    assert spec["serviceAccountName"] == contract.BASE_RUNNER_SERVICE_ACCOUNT
    assert spec["automountServiceAccountToken"] is False


def test_no_role_in_the_runner_namespace_but_the_brokers(dev: ProgramRun) -> None:
    (role,) = by_kind(dev, "Role")
    assert role["metadata"]["name"] == contract.BROKER_NAME
    assert [name for name, _ in subjects_bound(dev)] == [contract.BROKER_NAME]


def network_policies(run: ProgramRun) -> dict[str, dict[str, Any]]:
    return {p["metadata"]["name"]: p for p in by_kind(run, "NetworkPolicy")}


def test_network_policy_denies_ingress_and_limits_egress(dev: ProgramRun) -> None:
    spec = network_policies(dev)["runner-pods"]["spec"]
    assert spec["podSelector"] == {}
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    assert spec["ingress"] == []
    assert spec["egress"][0] == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}]}
    run = run_program("dev", {"egressCidrs": ["140.82.112.0/20", "10.0.0.0/8"]})
    policy = network_policies(run)["runner-pods"]
    assert policy["spec"]["egress"][0]["to"] == [{"ipBlock": {"cidr": "140.82.112.0/20"}},
                                                 {"ipBlock": {"cidr": "10.0.0.0/8"}}]


def test_only_base_runner_pods_may_reach_the_brokers_port(dev: ProgramRun) -> None:
    policies = network_policies(dev)
    assert set(policies) == {"runner-pods", "base-runner-to-broker"}
    spec = policies["base-runner-to-broker"]["spec"]
    template_labels = base_runner(dev)["spec"]["template"]["metadata"]["labels"]
    selected = spec["podSelector"]["matchLabels"]
    assert selected.items() <= template_labels.items()
    assert selected[contract.LABEL_NAME] == contract.BASE_RUNNER_APP
    assert spec["policyTypes"] == ["Egress"] and "ingress" not in spec
    assert spec["egress"] == [{
        "to": [{"namespaceSelector": {"matchLabels": {
                    "kubernetes.io/metadata.name": contract.DEFAULT_BROKER_NAMESPACE}},
                "podSelector": {"matchLabels": {contract.LABEL_NAME: contract.BROKER_NAME}}}],
        "ports": [{"protocol": "TCP", "port": contract.BROKER_PORT}],
    }]
    # GPU runner pods gain nothing: the only rule that selects them allows no ingress at all.
    assert policies["runner-pods"]["spec"]["ingress"] == []


def test_resource_quota_caps_gpus_at_the_pools_maximum(dev: ProgramRun,
                                                      run_prod: ProgramRun) -> None:
    (quota,) = by_kind(dev, "ResourceQuota")
    assert quota["spec"]["hard"] == {"requests.nvidia.com/gpu": "1", "pods": "10"}
    (quota,) = by_kind(run_prod, "ResourceQuota")
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "8"  # 4 nodes x 2 L4
    run = run_program("dev", {"gpuQuota": 3})
    (quota,) = by_kind(run, "ResourceQuota")
    assert quota["spec"]["hard"]["requests.nvidia.com/gpu"] == "3"


def test_no_reaper_job_runs_in_the_runner_namespace(dev: ProgramRun) -> None:
    # The broker reaps, under its own account; no pod here holds the rights to.
    assert by_kind(dev, "CronJob", namespace=None) == [] and by_kind(dev, "Job") == []


def test_private_image_gets_a_pull_secret_used_by_every_pod(private_image: ProgramRun) -> None:
    secrets = {r.manifest()["metadata"]["name"]: r
               for r in private_image.of_type("kubernetes:core/v1:Secret")
               if r.inputs["metadata"]["namespace"] == contract.DEFAULT_NAMESPACE}
    pull = secrets[contract.IMAGE_PULL_SECRET_NAME]
    assert pull.inputs["type"] == "kubernetes.io/dockerconfigjson"
    assert pull.is_secret("stringData")
    auth = json.loads(pull.inputs["stringData"][".dockerconfigjson"])["auths"]["ghcr.io"]
    assert auth["username"] == "Acme-ML"
    for name, spec in pod_templates(private_image):
        assert spec["imagePullSecrets"] == [{"name": contract.IMAGE_PULL_SECRET_NAME}], name


def test_public_image_needs_no_pull_secret(dev: ProgramRun) -> None:
    names = sorted(r.manifest()["metadata"]["name"]
                   for r in dev.of_type("kubernetes:core/v1:Secret"))
    assert names == [contract.BROKER_PAT_SECRET_NAME, contract.PAT_SECRET_NAME]


def test_destroy_removes_the_base_runner_before_its_pat_secret(dev: ProgramRun) -> None:
    # Pulumi deletes a resource before the resources it depends on.
    deployment = dev.one(DEPLOYMENT, BASE_RUNNER)
    secret = dev.one("kubernetes:core/v1:Secret", "runners-pat")
    assert secret.urn in deployment.dependencies


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
    return sorted(f"{r.inputs['kind']}/{r.manifest()['metadata']['name']}" for r in objects
                  if r.inputs["metadata"].get("namespace", r.inputs["metadata"].get("name"))
                  == contract.DEFAULT_NAMESPACE and r.parent.endswith("::runners"))


def test_dev_declares_the_runner_plane_objects(dev: ProgramRun) -> None:
    assert _resource_names(list(dev.kubernetes_objects())) == [
        "Deployment/base-runner",
        "Namespace/github-runners",
        "NetworkPolicy/base-runner-to-broker",
        "NetworkPolicy/runner-pods",
        "ResourceQuota/gpu-runners",
        "Secret/github-runner-pat",
        "ServiceAccount/base-runner",
        "ServiceAccount/gpu-runner",
    ]


def test_seed_compatibility_binds_the_ci_account_and_relaxes_the_namespace_to_baseline() -> None:
    run = run_program("dev", {"seedCompatibility": True})
    bindings = {b["metadata"]["name"]: b for b in by_kind(run, "RoleBinding")}
    seed = bindings["seed-guide-workflow"]
    assert seed["roleRef"]["name"] == "gpu-runner-spawner"
    roles = {r["metadata"]["name"]: r for r in by_kind(run, "Role")}
    assert roles["gpu-runner-spawner"]["rules"] == spawner_rules()
    # The relaxation says what it is on the objects themselves.
    for relaxed in (seed, roles["gpu-runner-spawner"]):
        assert relaxed["metadata"]["annotations"][contract.ANNOTATION_SEED_COMPATIBILITY] == "true"
        assert "seed guide" in relaxed["metadata"]["annotations"]["kubernetes.io/description"]
    assert seed["subjects"] == [{"kind": "User", "apiGroup": "rbac.authorization.k8s.io",
                                 "name": "gpu-runners-dev-github-ci@acme-ml-ci.iam"
                                         ".gserviceaccount.com"}]
    (namespace,) = by_kind(run, "Namespace")
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "baseline"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    assert namespace["metadata"]["annotations"] == {contract.ANNOTATION_SEED_COMPATIBILITY: "true"}


def test_without_seed_compatibility_no_human_or_ci_identity_is_bound(dev: ProgramRun) -> None:
    assert [s["kind"] for _, s in subjects_bound(dev)] == ["ServiceAccount"]
    assert [b["metadata"]["name"] for b in by_kind(dev, "RoleBinding")] == [contract.BROKER_NAME]
