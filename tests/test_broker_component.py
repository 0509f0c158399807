"""The runner broker as the stack declares it: alone with the credential and the spawner rights.

Each test runs the whole program under the Pulumi mocks and reads the Kubernetes objects it
would apply: who can reach the broker, what it holds, which rights it has and where, and the
settings (numeric repository ids, policy) its environment carries.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest

from gpu_runners import contract
from gpu_runners.gpu_pools import GpuPool, fallback_pool, parse_gpu_pools
from tests.harness.kubernetes_schema import KUBERNETES_VERSION, strict_errors
from tests.harness.mock_stack import (
    OWNER_ID,
    REPOSITORY_ID,
    TEST_SECRETS,
    ProgramRun,
    RegisteredResource,
    run_program,
    stack_settings,
)
from tests.test_runner_plane import spawner_rules

BROKER_NS = contract.DEFAULT_BROKER_NAMESPACE
RUNNER_NS = contract.DEFAULT_NAMESPACE
DEPLOYMENT = "kubernetes:apps/v1:Deployment"
EXISTING = {"clusterMode": "existing", "kubeconfigContext": "onprem-admin", "gpuQuota": 4,
            "gcpProject": "", "location": ""}
GITHUB_PROVIDER = "pulumi:providers:github::github::"


@pytest.fixture(scope="module")
def dev() -> ProgramRun:
    return run_program("dev")


@pytest.fixture(scope="module")
def private_image() -> ProgramRun:
    return run_program("dev", {"imagePrivate": True})


def manifests(run: ProgramRun, kind: str, namespace: str | None = None) -> list[dict[str, Any]]:
    """The objects of one kind, in one namespace when given."""
    found = [r.manifest() for r in run.kubernetes_objects() if r.inputs["kind"] == kind]
    return [m for m in found if namespace is None or m["metadata"].get("namespace") == namespace]


def broker_deployment(run: ProgramRun) -> dict[str, Any]:
    return run.one(DEPLOYMENT, "broker-deployment").manifest()


def broker_pod(run: ProgramRun) -> dict[str, Any]:
    spec: dict[str, Any] = broker_deployment(run)["spec"]["template"]["spec"]
    return spec


def broker_env(run: ProgramRun) -> dict[str, str]:
    (container,) = broker_pod(run)["containers"]
    return {e["name"]: e["value"] for e in container["env"]}


def pod_specs(run: ProgramRun) -> Iterator[tuple[str, dict[str, Any]]]:
    """Every pod spec the stack declares, with the name of the object holding it."""
    for resource in run.kubernetes_objects():
        manifest = resource.manifest()
        if manifest["kind"] in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield resource.name, manifest["spec"]["template"]["spec"]
        elif manifest["kind"] == "CronJob":
            yield resource.name, manifest["spec"]["jobTemplate"]["spec"]["template"]["spec"]
        elif manifest["kind"] == "Pod":
            yield resource.name, manifest["spec"]


def test_broker_lives_alone_in_a_namespace_enforcing_restricted(dev: ProgramRun) -> None:
    (namespace,) = [n for n in manifests(dev, "Namespace") if n["metadata"]["name"] == BROKER_NS]
    labels = namespace["metadata"]["labels"]
    assert labels["pod-security.kubernetes.io/enforce"] == "restricted"
    assert labels["pod-security.kubernetes.io/warn"] == "restricted"
    in_namespace = sorted(f"{r.inputs['kind']}/{r.manifest()['metadata']['name']}"
                          for r in dev.kubernetes_objects()
                          if r.inputs["metadata"].get("namespace") == BROKER_NS)
    assert in_namespace == [
        f"Deployment/{contract.BROKER_NAME}",
        f"NetworkPolicy/{contract.BROKER_NAME}",
        f"Secret/{contract.IMAGE_PULL_SECRET_NAME}",  # the GHCR package is private by default
        f"Secret/{contract.BROKER_PAT_SECRET_NAME}",
        f"Service/{contract.BROKER_NAME}",
        f"ServiceAccount/{contract.BROKER_NAME}",
    ]


def test_credential_is_a_pulumi_secret_mounted_read_only_into_the_broker_only(
        dev: ProgramRun) -> None:
    (secret,) = [r for r in dev.of_type("kubernetes:core/v1:Secret")
                 if r.inputs["metadata"]["namespace"] == BROKER_NS
                 and r.inputs["type"] == "Opaque"]
    assert secret.manifest()["metadata"]["name"] == contract.BROKER_PAT_SECRET_NAME
    assert secret.inputs["stringData"] == {contract.PAT_SECRET_KEY: TEST_SECRETS["runnerPat"]}
    assert secret.is_secret("stringData.token")

    pod = broker_pod(dev)
    (volume,) = [v for v in pod["volumes"] if "secret" in v]
    assert volume["secret"]["secretName"] == contract.BROKER_PAT_SECRET_NAME
    (container,) = pod["containers"]
    (mount,) = [m for m in container["volumeMounts"] if m["name"] == volume["name"]]
    assert mount == {"name": volume["name"], "mountPath": contract.BROKER_PAT_MOUNT_DIR,
                     "readOnly": True}
    assert broker_env(dev)[contract.ENV_PAT_FILE] == (
        f"{contract.BROKER_PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}")
    # No other pod mounts it, projects it or reads it into its environment.
    for name, spec in pod_specs(dev):
        if name == "broker-deployment":
            continue
        text = json.dumps(spec)
        assert f'"secretName": "{contract.BROKER_PAT_SECRET_NAME}"' not in text, name
        assert contract.BROKER_PAT_MOUNT_DIR not in text, name


def test_no_role_reaches_the_brokers_namespace_and_none_is_cluster_wide(dev: ProgramRun) -> None:
    assert manifests(dev, "Role", BROKER_NS) == []
    assert manifests(dev, "RoleBinding", BROKER_NS) == []
    # The only cluster-wide rights: the broker's account may create TokenReviews (not
    # system:auth-delegator, which adds SubjectAccessReviews) and get a node by name (no list
    # or watch), nothing else.
    (cluster_role,) = manifests(dev, "ClusterRole")
    assert cluster_role["rules"] == [{"apiGroups": ["authentication.k8s.io"],
                                      "resources": ["tokenreviews"], "verbs": ["create"]},
                                     {"apiGroups": [""], "resources": ["nodes"],
                                      "verbs": ["get"]}]
    (cluster_binding,) = manifests(dev, "ClusterRoleBinding")
    assert cluster_binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io",
                                          "kind": "ClusterRole",
                                          "name": cluster_role["metadata"]["name"]}
    assert cluster_binding["subjects"] == [{"kind": "ServiceAccount",
                                            "name": contract.BROKER_NAME,
                                            "namespace": BROKER_NS}]
    # The only rights over Secrets anywhere are the broker's, in the runner namespace.
    secret_rules = [(role["metadata"]["namespace"], role["metadata"]["name"])
                    for role in manifests(dev, "Role")
                    for rule in role["rules"] if "secrets" in rule["resources"]]
    assert secret_rules == [(RUNNER_NS, contract.BROKER_NAME)]


def test_broker_role_is_exactly_the_spawner_rules_and_run_records_in_the_runner_namespace(
        dev: ProgramRun) -> None:
    (role,) = manifests(dev, "Role")
    assert role["metadata"]["namespace"] == RUNNER_NS
    assert role["rules"] == [*spawner_rules(), {
        "apiGroups": [""], "resources": ["configmaps"],
        "verbs": ["create", "get", "list", "update", "delete"]}]
    (binding,) = manifests(dev, "RoleBinding")
    assert binding["metadata"]["namespace"] == RUNNER_NS
    assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role",
                                  "name": role["metadata"]["name"]}
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": contract.BROKER_NAME,
                                    "namespace": BROKER_NS}]
    pod = broker_pod(dev)
    assert pod["serviceAccountName"] == contract.BROKER_NAME
    assert pod["automountServiceAccountToken"] is True


def test_broker_is_one_restricted_replica_replaced_not_rolled(dev: ProgramRun) -> None:
    deployment = broker_deployment(dev)
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsUser"] == contract.BROKER_UID
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert pod["nodeSelector"] == {contract.NODE_GPU_LABEL: "false"}
    (container,) = pod["containers"]
    assert container["command"] == ["python", "-m", "gpu_runners.broker"]
    assert "args" not in container
    security = container["securityContext"]
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    (tmp,) = [m for m in container["volumeMounts"] if m["mountPath"] == "/tmp"]
    (tmp_volume,) = [v for v in pod["volumes"] if v["name"] == tmp["name"]]
    assert "emptyDir" in tmp_volume
    assert container["ports"] == [{"name": "http", "containerPort": contract.BROKER_PORT,
                                   "protocol": "TCP"}]
    assert container["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "http"}
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "http"}
    assert set(container["resources"]) == {"requests", "limits"}
    assert container["image"] == dev.outputs["brokerImage"]


def test_broker_environment_carries_the_resolved_numeric_ids_and_the_default_policy(
        dev: ProgramRun) -> None:
    runner = dev.one(DEPLOYMENT, "runners-base-runner").manifest()
    assert broker_env(dev) == {
        contract.ENV_NAMESPACE: RUNNER_NS,
        contract.ENV_IMAGE: dev.outputs["runnerImage"],
        # Named as GKE names the pool; dev's one pool is Spot, without an on-demand fallback.
        contract.ENV_GPU_POOLS: json.dumps([{"accelerator": "nvidia-l4", "maxGpusPerPod": 1,
                                             "name": "l4-spot", "spot": True}]),
        contract.ENV_MAX_RUNTIME_MINUTES: str(stack_settings("dev")["maxRuntimeMinutes"]),
        contract.ENV_REPOSITORY: "Acme-ML/Vision-Models",
        # As the tokens' claims carry them: decimal strings, never "715823406.0".
        contract.ENV_REPOSITORY_ID: str(REPOSITORY_ID),
        contract.ENV_REPOSITORY_OWNER_ID: str(OWNER_ID),
        contract.ENV_PAT_FILE: f"{contract.BROKER_PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}",
        contract.ENV_OIDC_ISSUER: contract.GITHUB_OIDC_ISSUER,
        contract.ENV_BROKER_AUDIENCE: contract.DEFAULT_BROKER_AUDIENCE,
        contract.ENV_ALLOWED_EVENTS: "push,pull_request,workflow_dispatch,schedule,merge_group",
        contract.ENV_ALLOWED_REFS: "[]",
        contract.ENV_ALLOWED_WORKFLOW_REFS: "[]",
        contract.ENV_ALLOWED_IMAGES: "[]",
        contract.ENV_REQUIRE_IMAGE_DIGESTS: "false",
        # Image streaming is on by default in GKE mode: job images come through the mirror.
        contract.ENV_REGISTRY_MIRRORS: (
            '{"ghcr.io": "us-central1-docker.pkg.dev/acme-ml-ci/gpu-runners-dev-ghcr-io"}'),
        # gpuCapPerRepository 0: the namespace's GPU quota (one L4 in dev).
        contract.ENV_GPU_CAP_PER_REPOSITORY: "1",
        contract.ENV_REAPER_INTERVAL_SECONDS: "300",
        contract.ENV_MAX_PREEMPTION_RETRIES: str(contract.DEFAULT_MAX_PREEMPTION_RETRIES),
        contract.ENV_BROKER_PORT: str(contract.BROKER_PORT),
        # GPU runner pods pull the private runner image with the runner namespace's Secret.
        contract.ENV_IMAGE_PULL_SECRET: contract.IMAGE_PULL_SECRET_NAME,
    }
    assert runner["spec"]["template"]["spec"]["containers"][0]["image"] == broker_env(dev)[
        contract.ENV_IMAGE]


def test_configured_policy_reaches_the_broker_as_written() -> None:
    run = run_program("prod", {
        "brokerAudience": "acme-gpu-broker",
        "oidcIssuer": "https://token.actions.githubusercontent.com/acme-enterprise",
        "brokerAllowedEvents": ["push", "workflow_dispatch"],
        "brokerAllowedRefs": ["refs/heads/main", "refs/tags/v*"],
        "brokerAllowedWorkflowRefs": ["Acme-ML/Vision-Models/.github/workflows/train.yaml@*"],
        "allowedImages": ["ghcr.io/acme-ml/cuda-*@sha256:*"],
        "requireImageDigests": True,
        "gpuCapPerRepository": 4,
        "reaperIntervalSeconds": 120,
        "maxRuntimeMinutes": 480,
    })
    env = broker_env(run)
    assert env[contract.ENV_BROKER_AUDIENCE] == "acme-gpu-broker"
    assert env[contract.ENV_OIDC_ISSUER] == (
        "https://token.actions.githubusercontent.com/acme-enterprise")
    assert env[contract.ENV_ALLOWED_EVENTS] == "push,workflow_dispatch"
    assert json.loads(env[contract.ENV_ALLOWED_REFS]) == ["refs/heads/main", "refs/tags/v*"]
    assert json.loads(env[contract.ENV_ALLOWED_WORKFLOW_REFS]) == [
        "Acme-ML/Vision-Models/.github/workflows/train.yaml@*"]
    assert json.loads(env[contract.ENV_ALLOWED_IMAGES]) == ["ghcr.io/acme-ml/cuda-*@sha256:*"]
    assert env[contract.ENV_REQUIRE_IMAGE_DIGESTS] == "true"
    assert env[contract.ENV_GPU_CAP_PER_REPOSITORY] == "4"
    assert env[contract.ENV_REAPER_INTERVAL_SECONDS] == "120"
    assert env[contract.ENV_MAX_RUNTIME_MINUTES] == "480"
    # prod: two L4 per node, four nodes.
    assert json.loads(env[contract.ENV_GPU_POOLS]) == [
        {"accelerator": "nvidia-l4", "maxGpusPerPod": 2, "name": "l4-x2"}]
    assert run.outputs["brokerAudience"] == "acme-gpu-broker"


def test_spot_pools_reach_the_broker_with_their_fallback_and_the_retry_limit() -> None:
    spot = {"name": "l4-spot", "machineType": "g2-standard-8", "acceleratorType": "nvidia-l4",
            "maxNodes": 2, "spot": True, "onDemandFallback": "l4"}
    on_demand = {"name": "l4", "machineType": "g2-standard-24", "acceleratorType": "nvidia-l4",
                 "acceleratorCount": 2, "maxNodes": 1, "spot": False}
    run = run_program("dev", {"gpuPools": [spot, on_demand], "maxPreemptionRetries": 4})

    env = broker_env(run)
    assert env[contract.ENV_MAX_PREEMPTION_RETRIES] == "4"
    pools = parse_gpu_pools(env[contract.ENV_GPU_POOLS])
    assert pools == (
        GpuPool("nvidia-l4", 1, name="l4-spot", spot=True, on_demand_fallback="l4"),
        GpuPool("nvidia-l4", 2, name="l4", spot=False),
    )
    # The pool names the broker pins a retry with are GKE's node pool names.
    node_pools = {pool.inputs["name"] for pool in run.of_type("gcp:container/nodePool:NodePool")}
    assert {pool.name for pool in pools} <= node_pools
    assert fallback_pool(pools, "l4-spot") == pools[1]


def test_zero_preemption_retries_reach_the_broker_as_recovery_off() -> None:
    env = broker_env(run_program("dev", {"maxPreemptionRetries": 0}))
    assert env[contract.ENV_MAX_PREEMPTION_RETRIES] == "0"


def test_repository_ids_are_looked_up_through_the_explicit_github_provider(
        dev: ProgramRun) -> None:
    # Default providers are disabled: an invoke naming no provider fails on a real engine.
    calls = {i.token: i for i in dev.invokes}
    assert set(calls) == {"github:index/getRepository:getRepository",
                          "github:index/getUser:getUser"}
    for call in calls.values():
        assert GITHUB_PROVIDER in call.provider, call.token
    assert calls["github:index/getRepository:getRepository"].args["fullName"] == (
        "Acme-ML/Vision-Models")
    assert calls["github:index/getUser:getUser"].args["username"] == "Acme-ML"
    provider = dev.one("pulumi:providers:github")
    assert provider.inputs["owner"] == "Acme-ML" and provider.is_secret("token")


def test_credential_never_reaches_env_arguments_or_plain_outputs(
        dev: ProgramRun, private_image: ProgramRun) -> None:
    for run in (dev, private_image):
        credential = TEST_SECRETS["runnerPat"]
        for name, spec in pod_specs(run):
            for container in spec["containers"] + spec.get("initContainers", []):
                exposed = json.dumps([container.get("env", []), container.get("command", []),
                                      container.get("args", []), container.get("envFrom", [])])
                assert credential not in exposed, name
                assert all("secretKeyRef" not in e.get("valueFrom", {})
                           for e in container.get("env", [])), name
        for resource in run.kubernetes_objects():
            assert credential not in json.dumps(resource.manifest(redact_secrets=True)), (
                resource.name)
        for output, value in run.outputs.items():
            assert credential not in json.dumps(value) or output in run.secret_outputs, output


def test_service_exposes_the_broker_port_inside_the_cluster_at_the_exported_url(
        dev: ProgramRun) -> None:
    (service,) = manifests(dev, "Service", BROKER_NS)
    spec = service["spec"]
    assert spec["type"] == "ClusterIP"
    assert spec["ports"] == [{"name": "http", "protocol": "TCP", "port": contract.BROKER_PORT,
                              "targetPort": "http"}]
    pod_labels = broker_deployment(dev)["spec"]["template"]["metadata"]["labels"]
    assert spec["selector"].items() <= pod_labels.items()
    assert dev.outputs["brokerUrl"] == (
        f"http://{service['metadata']['name']}.{BROKER_NS}.svc:{contract.BROKER_PORT}")
    assert dev.outputs["brokerAudience"] == contract.DEFAULT_BROKER_AUDIENCE
    assert dev.outputs["brokerNamespace"] == BROKER_NS


def test_only_base_runner_pods_of_the_runner_namespace_reach_the_broker(dev: ProgramRun) -> None:
    (policy,) = manifests(dev, "NetworkPolicy", BROKER_NS)
    spec = policy["spec"]
    assert spec["podSelector"] == {}  # every pod of the broker's namespace
    assert spec["policyTypes"] == ["Ingress", "Egress"]
    base_labels = dev.one(DEPLOYMENT, "runners-base-runner").manifest()[
        "spec"]["template"]["metadata"]["labels"]
    # One peer with both selectors: pods of that namespace AND with those labels.
    assert spec["ingress"] == [{
        "from": [{"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": RUNNER_NS}},
                  "podSelector": {"matchLabels": {
                      contract.LABEL_NAME: contract.BASE_RUNNER_APP,
                      contract.LABEL_COMPONENT: "runner"}}}],
        "ports": [{"protocol": "TCP", "port": contract.BROKER_PORT}],
    }]
    selected = spec["ingress"][0]["from"][0]["podSelector"]["matchLabels"]
    assert selected.items() <= base_labels.items()


def test_broker_reaches_only_the_api_server_github_and_kube_dns(dev: ProgramRun) -> None:
    (policy,) = manifests(dev, "NetworkPolicy", BROKER_NS)
    api_server, github, dns = policy["spec"]["egress"]
    # GKE: the control plane endpoint the stack created, HTTPS only.
    assert api_server == {"to": [{"ipBlock": {"cidr": "203.0.113.10/32"}}],
                          "ports": [{"protocol": "TCP", "port": 443}]}
    assert github == {"to": [{"ipBlock": {"cidr": "0.0.0.0/0"}}],
                      "ports": [{"protocol": "TCP", "port": 443}]}
    assert dns["to"][0]["podSelector"] == {"matchLabels": {"k8s-app": "kube-dns"}}
    assert {p["port"] for p in dns["ports"]} == {53}


def test_existing_cluster_broker_reaches_its_api_server_through_egress_cidrs() -> None:
    run = run_program("dev", {**EXISTING, "egressCidrs": ["140.82.112.0/20", "10.0.0.0/8"]})
    (policy,) = manifests(run, "NetworkPolicy", BROKER_NS)
    api_server, github, _ = policy["spec"]["egress"]
    cidrs = [{"ipBlock": {"cidr": "140.82.112.0/20"}}, {"ipBlock": {"cidr": "10.0.0.0/8"}}]
    assert api_server == {"to": cidrs, "ports": [{"protocol": "TCP", "port": 443},
                                                 {"protocol": "TCP", "port": 6443}]}
    assert github == {"to": cidrs, "ports": [{"protocol": "TCP", "port": 443}]}
    # The broker goes through the existing cluster's explicit provider too.
    for resource in run.kubernetes_objects():
        assert "pulumi:providers:kubernetes::existing-cluster::" in resource.provider


def test_private_images_give_the_broker_its_pull_secret_and_name_the_runners(
        private_image: ProgramRun) -> None:
    secrets = {(r.inputs["metadata"]["namespace"], r.manifest()["metadata"]["name"]): r
               for r in private_image.of_type("kubernetes:core/v1:Secret")}
    pull = secrets[(BROKER_NS, contract.IMAGE_PULL_SECRET_NAME)]
    assert pull.inputs["type"] == "kubernetes.io/dockerconfigjson"
    assert pull.is_secret("stringData")
    assert (RUNNER_NS, contract.IMAGE_PULL_SECRET_NAME) in secrets
    assert broker_pod(private_image)["imagePullSecrets"] == [
        {"name": contract.IMAGE_PULL_SECRET_NAME}]
    # GPU runner pods pull with the runner namespace's Secret, which the broker names.
    assert broker_env(private_image)[contract.ENV_IMAGE_PULL_SECRET] == (
        contract.IMAGE_PULL_SECRET_NAME)


def test_public_images_need_no_pull_secret_for_the_broker() -> None:
    public = run_program("dev", {"imagePrivate": False})
    assert "imagePullSecrets" not in broker_pod(public)
    assert contract.ENV_IMAGE_PULL_SECRET not in broker_env(public)
    assert [r.inputs["metadata"]["name"] for r in public.of_type("kubernetes:core/v1:Secret")
            if r.inputs["metadata"]["namespace"] == BROKER_NS] == [
        contract.BROKER_PAT_SECRET_NAME]


def test_destroy_removes_the_broker_before_its_credential_and_its_rights(
        dev: ProgramRun) -> None:
    deployment = dev.one(DEPLOYMENT, "broker-deployment")
    for needed in ("broker-credential", "broker-spawner-role", "broker-spawner-binding",
                   "broker-token-review-role", "broker-token-review-binding"):
        (resource,) = [r for r in dev.resources if r.name == needed]
        assert resource.urn in deployment.dependencies, needed
    # And waits for the broker's pod to stop (its last sweep of the base runners'
    # registrations needs its rights and its credential).
    annotations = deployment.manifest()["metadata"]["annotations"]
    assert annotations["pulumi.com/deletionPropagationPolicy"] == "foreground"


def _broker_objects(run: ProgramRun) -> list[RegisteredResource]:
    return [r for r in run.kubernetes_objects() if r.name.startswith("broker-")]


@pytest.mark.parametrize("overrides", [{}, {"imagePrivate": True}, EXISTING],
                         ids=["dev", "private image", "existing cluster"])
def test_every_broker_object_passes_the_strict_schema(overrides: dict[str, Any]) -> None:
    objects = _broker_objects(run_program("dev", overrides))
    kinds = {r.inputs["kind"] for r in objects}
    assert {"Namespace", "Secret", "ServiceAccount", "Role", "RoleBinding", "Deployment",
            "Service", "NetworkPolicy"} <= kinds
    for resource in objects:
        assert strict_errors(resource.manifest(), KUBERNETES_VERSION) == [], resource.name
