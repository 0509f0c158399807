"""The policy pack: each policy against resources that pass and resources that fail.

Resource properties are built the way the program registers them: SDK input dicts in Python
(snake_case) form, translated to wire names by the Pulumi SDK's own serializer for the
resource's Args type, sent through a protobuf Struct (numbers become floats), then unpacked
by pulumi_policy's deserializer and unknown-checking proxy, as the analyzer does. A policy that
reads a wrong property name therefore fails these tests. The last tests run the pack itself,
as the Pulumi CLI starts it, and talk to it over gRPC.
"""

from __future__ import annotations

import asyncio
import json
import os
import selectors
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from importlib.metadata import packages_distributions, requires
from pathlib import Path
from typing import Any

import grpc
import pulumi_gcp as gcp
import pulumi_github as github
import pulumi_kubernetes as k8s
import pytest
from google.protobuf import empty_pb2, json_format, struct_pb2
from packaging.requirements import Requirement
from pulumi.runtime import rpc
from pulumi.runtime.proto import analyzer_pb2, analyzer_pb2_grpc
from pulumi_policy import (
    EnforcementLevel,
    PolicyCustomTimeouts,
    PolicyResource,
    PolicyResourceOptions,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.deserialize import SPECIAL_SECRET_SIG, SPECIAL_SIG_KEY, deserialize_properties
from pulumi_policy.proxy import UNKNOWN_STRING_VALUE, UnknownValueError, unknown_checking_proxy

from gpu_runners import contract
from policy import policies
from tests.harness import mock_stack
from tests.harness.mock_stack import ProgramRun

REPO_ROOT = Path(__file__).resolve().parent.parent
PROJECT = "gpu-runners"
DIGEST = "sha256:" + "a1" * 32
RUNNER_IMAGE = f"ghcr.io/acme/gpu-runner:1.0@{DIGEST}"


# --- building what the analyzer receives ---------------------------------------------------------


def wire_props(args_type: type, inputs: Mapping[str, Any]) -> dict[str, Any]:
    """Translate SDK inputs to the wire names and value types the engine sends a policy pack."""
    unknown = [key for key in inputs if not isinstance(getattr(args_type, key, None), property)]
    assert not unknown, f"{args_type.__name__} has no input {unknown}"
    # A private loop: asyncio.run would also unset the thread's event loop, which the Pulumi
    # mocks of the other tests keep using.
    loop = asyncio.new_event_loop()
    try:
        struct = loop.run_until_complete(rpc.serialize_properties(dict(inputs), {}, typ=args_type))
    finally:
        loop.close()
    wire: dict[str, Any] = json_format.MessageToDict(struct)
    return wire


def analyzer_view(props: Mapping[str, Any]) -> Mapping[str, Any]:
    """What `validate` sees: the Struct round trip, secrets unwrapped, unknowns guarded."""
    struct = struct_pb2.Struct()
    struct.update(props)
    return unknown_checking_proxy(deserialize_properties(json_format.MessageToDict(struct)))


def urn(resource_type: str, name: str, stack: str = "dev") -> str:
    return f"urn:pulumi:{stack}::{PROJECT}::{resource_type}::{name}"


def options(secret_outputs: Sequence[str] = ()) -> PolicyResourceOptions:
    return PolicyResourceOptions(protect=False, ignore_changes=[], delete_before_replace=None,
                                 aliases=[], custom_timeouts=PolicyCustomTimeouts(0, 0, 0),
                                 additional_secret_outputs=list(secret_outputs))


def policy_named(name: str) -> ResourceValidationPolicy | StackValidationPolicy:
    return next(p for p in policies.POLICIES if p.name == name)


def violations(policy_name: str, resource_type: str, props: Mapping[str, Any], *,
               name: str = "res", stack: str = "dev", secret_outputs: Sequence[str] = (),
               config: Mapping[str, Any] | None = None) -> list[str]:
    """Run one resource policy the way the analyzer does and collect its messages."""
    policy = policy_named(policy_name)
    assert isinstance(policy, ResourceValidationPolicy)
    messages: list[str] = []
    args = ResourceValidationArgs(resource_type, analyzer_view(props), urn(resource_type, name,
                                  stack), name, options(secret_outputs), None, config)
    policy.validate(args, lambda message, _urn: messages.append(message))
    return messages


def stack_resource(resource_type: str, name: str, props: Mapping[str, Any]) -> PolicyResource:
    return PolicyResource(resource_type, analyzer_view(props), urn(resource_type, name), name,
                          options(), None, None, [], {})


def stack_violations(policy_name: str,
                     resources: list[PolicyResource]) -> list[tuple[str, str | None]]:
    policy = policy_named(policy_name)
    assert isinstance(policy, StackValidationPolicy)
    reported: list[tuple[str, str | None]] = []
    policy.validate(StackValidationArgs(resources),
                    lambda message, resource_urn: reported.append((message, resource_urn)))
    return reported


# --- resources as the components declare them ----------------------------------------------------


def gpu_pool(autoscaling: Mapping[str, Any] | None = None, *, warm: bool = False,
             **extra: Any) -> dict[str, Any]:
    labels = {contract.NODE_GPU_LABEL: "true"}
    if warm:
        labels[contract.NODE_WARM_POOL_LABEL] = "true"
    inputs: dict[str, Any] = {
        "cluster": "projects/p/locations/us-central1-a/clusters/gpu-runners",
        "node_config": {
            "machine_type": "g2-standard-8",
            "labels": labels,
            "guest_accelerators": [{"type": "nvidia-l4", "count": 1}],
        },
        **extra,
    }
    if autoscaling is not None:
        inputs["autoscaling"] = autoscaling
    return wire_props(gcp.container.NodePoolArgs, inputs)


def cluster(**overrides: Any) -> dict[str, Any]:
    inputs = {
        "location": "us-central1-a",
        "workload_identity_config": {"workload_pool": "acme-ci.svc.id.goog"},
        "datapath_provider": "ADVANCED_DATAPATH",
        "deletion_protection": True,
        **overrides,
    }
    return wire_props(gcp.container.ClusterArgs, {k: v for k, v in inputs.items()
                                                  if v is not None})


def restricted_container(name: str = "runner", **security: Any) -> dict[str, Any]:
    return {
        "name": name,
        "image": RUNNER_IMAGE,
        "security_context": {
            "allow_privilege_escalation": False,
            "capabilities": {"drop": ["ALL"]},
            **security,
        },
        "resources": {"requests": {"cpu": "500m", "memory": "1Gi"},
                      "limits": {"memory": "2Gi"}},
    }


def runner_pod_spec(*, containers: list[dict[str, Any]] | None = None,
                    **overrides: Any) -> dict[str, Any]:
    """A pod spec like the base runner's: non-root, RuntimeDefault, the PAT as a file, no token."""
    return {
        "service_account_name": contract.BASE_RUNNER_SERVICE_ACCOUNT,
        "automount_service_account_token": False,
        "node_selector": {contract.NODE_GPU_LABEL: "false"},
        "security_context": {"run_as_non_root": True, "run_as_user": contract.RUNNER_UID,
                             "seccomp_profile": {"type": "RuntimeDefault"}},
        "containers": containers if containers is not None else [restricted_container()],
        "volumes": [{"name": "pat", "secret": {"secret_name": contract.PAT_SECRET_NAME}}],
        **overrides,
    }


def deployment(**pod_spec: Any) -> dict[str, Any]:
    labels = {contract.LABEL_NAME: contract.BASE_RUNNER_APP}
    return wire_props(k8s.apps.v1.DeploymentInitArgs, {
        "metadata": {"name": "base-runner", "namespace": contract.DEFAULT_NAMESPACE},
        "spec": {"selector": {"match_labels": labels},
                 "template": {"metadata": {"labels": labels}, "spec": runner_pod_spec(**pod_spec)}},
    })


def cronjob(**pod_spec: Any) -> dict[str, Any]:
    return wire_props(k8s.batch.v1.CronJobInitArgs, {
        "metadata": {"name": "reaper", "namespace": contract.DEFAULT_NAMESPACE},
        "spec": {"schedule": "*/5 * * * *", "job_template": {"spec": {"template": {
            "spec": {"restart_policy": "Never", **runner_pod_spec(**pod_spec)}}}}},
    })


def pod(*, containers: list[dict[str, Any]] | None = None, **pod_spec: Any) -> dict[str, Any]:
    """A pod like the per-run GPU pod: no service-account token, a GPU limit."""
    if containers is None:
        gpu_container = restricted_container()
        gpu_container["resources"] = {"limits": {contract.GPU_RESOURCE: "1"}}
        containers = [gpu_container]
    spec = runner_pod_spec(containers=containers, **pod_spec)
    spec.update(automount_service_account_token=False, restart_policy="Never",
                node_selector={contract.NODE_GPU_LABEL: "true"})
    return wire_props(k8s.core.v1.PodInitArgs, {
        "metadata": {"name": "gpu-1234-1", "namespace": contract.DEFAULT_NAMESPACE},
        "spec": spec,
    })


WORKLOADS = {
    "kubernetes:apps/v1:Deployment": deployment,
    "kubernetes:batch/v1:CronJob": cronjob,
    "kubernetes:core/v1:Pod": pod,
}


def namespace(level: str | None) -> dict[str, Any]:
    labels = {} if level is None else {contract.PSA_ENFORCE_LABEL: level}
    return wire_props(k8s.core.v1.NamespaceInitArgs, {
        "metadata": {"name": contract.DEFAULT_NAMESPACE, "labels": labels}})


def actions_secret(name: str = "RUNNER_TOKEN", **values: Any) -> dict[str, Any]:
    return wire_props(github.ActionsSecretArgs,
                      {"repository": "ml-repo", "secret_name": name, **values})


def branch_protection(pattern: str = "main", **flags: Any) -> dict[str, Any]:
    return wire_props(github.BranchProtectionArgs,
                      {"repository_id": "ml-repo", "pattern": pattern, **flags})


def service_account_key() -> dict[str, Any]:
    return wire_props(gcp.serviceaccount.KeyArgs,
                      {"service_account_id": "projects/p/serviceAccounts/ci@p.iam"})


# --- GPU node pools ------------------------------------------------------------------------------


def test_gpu_pool_autoscaling_from_zero_passes() -> None:
    props = gpu_pool({"total_min_node_count": 0, "total_max_node_count": 2})
    assert props["autoscaling"]["totalMinNodeCount"] == 0.0  # the float the engine sends
    assert violations("gpu-node-pool-scales-to-zero", policies.GKE_NODE_POOL, props) == []


def test_gpu_pool_with_total_minimum_above_zero_is_rejected() -> None:
    props = gpu_pool({"total_min_node_count": 2, "total_max_node_count": 4})
    [message] = violations("gpu-node-pool-scales-to-zero", policies.GKE_NODE_POOL, props,
                           name="runners-gpu-l4")
    assert "GPU node pool 'runners-gpu-l4' keeps 2 GPU node(s) running" in message
    assert "autoscaling.totalMinNodeCount = 2" in message
    assert contract.NODE_WARM_POOL_LABEL in message


def test_gpu_pool_with_per_zone_minimum_above_zero_is_rejected() -> None:
    props = gpu_pool({"min_node_count": 1, "max_node_count": 2})
    [message] = violations("gpu-node-pool-scales-to-zero", policies.GKE_NODE_POOL, props,
                           name="runners-gpu-t4")
    assert "'runners-gpu-t4'" in message and "autoscaling.minNodeCount = 1" in message


def test_gpu_pool_of_fixed_size_is_rejected() -> None:
    props = gpu_pool(None, node_count=1)
    [message] = violations("gpu-node-pool-scales-to-zero", policies.GKE_NODE_POOL, props,
                           name="fixed")
    assert "'fixed'" in message and "nodeCount = 1 without autoscaling" in message


def test_cpu_pool_may_keep_nodes_running() -> None:
    props = wire_props(gcp.container.NodePoolArgs, {
        "cluster": "c", "autoscaling": {"min_node_count": 1, "max_node_count": 3},
        "node_config": {"labels": {contract.NODE_GPU_LABEL: "false"}}})
    assert violations("gpu-node-pool-scales-to-zero", policies.GKE_NODE_POOL, props) == []
    assert violations("gpu-node-pool-warm", policies.GKE_NODE_POOL, props) == []


def test_warm_labelled_gpu_pool_is_exempt_from_scale_to_zero_but_reported_as_advisory() -> None:
    props = gpu_pool({"total_min_node_count": 1, "total_max_node_count": 2}, warm=True)
    assert violations("gpu-node-pool-scales-to-zero", policies.GKE_NODE_POOL, props) == []
    [message] = violations("gpu-node-pool-warm", policies.GKE_NODE_POOL, props, name="warm-l4")
    assert "GPU node pool 'warm-l4' is a warm pool" in message
    assert "1 GPU node(s) are billed while idle" in message
    assert policy_named("gpu-node-pool-warm").enforcement_level is EnforcementLevel.ADVISORY


def test_warm_pool_advisory_is_silent_for_pools_that_scale_to_zero() -> None:
    props = gpu_pool({"total_min_node_count": 0, "total_max_node_count": 2})
    assert violations("gpu-node-pool-warm", policies.GKE_NODE_POOL, props) == []


# --- GKE cluster ---------------------------------------------------------------------------------


def test_cluster_with_workload_identity_passes() -> None:
    assert violations("gke-workload-identity", policies.GKE_CLUSTER, cluster()) == []


def test_cluster_without_workload_identity_is_rejected() -> None:
    [message] = violations("gke-workload-identity", policies.GKE_CLUSTER,
                           cluster(workload_identity_config=None), name="runners-cluster")
    assert "GKE cluster 'runners-cluster' does not enable workload identity" in message
    assert "workloadIdentityConfig.workloadPool = None" in message


def test_cluster_with_dataplane_v2_or_calico_enforces_network_policies() -> None:
    calico = cluster(datapath_provider=None,
                     network_policy={"enabled": True, "provider": "CALICO"})
    assert violations("gke-network-policy-enforced", policies.GKE_CLUSTER, cluster()) == []
    assert violations("gke-network-policy-enforced", policies.GKE_CLUSTER, calico) == []


def test_cluster_on_legacy_datapath_is_rejected() -> None:
    props = cluster(datapath_provider="LEGACY_DATAPATH")
    [message] = violations("gke-network-policy-enforced", policies.GKE_CLUSTER, props,
                           name="runners-cluster")
    assert "'runners-cluster' does not enforce NetworkPolicies" in message
    assert "'LEGACY_DATAPATH'" in message


@pytest.mark.parametrize("stack", ["prod", "production"])
def test_production_cluster_without_deletion_protection_is_rejected(stack: str) -> None:
    props = cluster(deletion_protection=False)
    [message] = violations("production-deletion-protection", policies.GKE_CLUSTER, props,
                           name="runners-cluster", stack=stack)
    assert (f"GKE cluster 'runners-cluster' in production stack '{stack}' has "
            "deletionProtection = False") in message


def test_production_cluster_with_deletion_protection_passes() -> None:
    assert violations("production-deletion-protection", policies.GKE_CLUSTER, cluster(),
                      stack="prod") == []


def test_dev_cluster_may_turn_deletion_protection_off() -> None:
    props = cluster(deletion_protection=False)
    assert violations("production-deletion-protection", policies.GKE_CLUSTER, props,
                      stack="dev") == []


def test_production_stacks_come_from_policy_config() -> None:
    props = cluster(deletion_protection=False)
    config = {policies.PRODUCTION_STACKS_KEY: ["live"]}
    assert violations("production-deletion-protection", policies.GKE_CLUSTER, props,
                      stack="prod", config=config) == []
    [message] = violations("production-deletion-protection", policies.GKE_CLUSTER, props,
                           stack="live", config=config)
    assert "production stack 'live'" in message


def test_malformed_production_stacks_config_is_reported_with_its_key() -> None:
    [message] = violations("production-deletion-protection", policies.GKE_CLUSTER, cluster(),
                           config={policies.PRODUCTION_STACKS_KEY: "prod"})
    assert message.startswith("policy config productionStacks = 'prod' is invalid")
    assert "a list of stack names" in message


def test_stack_name_is_read_from_the_urn() -> None:
    assert policies.stack_of(urn(policies.GKE_CLUSTER, "c", stack="prod-eu")) == "prod-eu"


# --- Kubernetes ----------------------------------------------------------------------------------


def test_namespace_enforcing_restricted_passes() -> None:
    assert violations("namespace-enforces-restricted", policies.K8S_NAMESPACE,
                      namespace("restricted")) == []


@pytest.mark.parametrize("level", ["baseline", "privileged", None])
def test_namespace_not_enforcing_restricted_is_rejected(level: str | None) -> None:
    [message] = violations("namespace-enforces-restricted", policies.K8S_NAMESPACE,
                           namespace(level))
    assert f"Namespace '{contract.DEFAULT_NAMESPACE}' does not enforce the restricted" in message
    assert f"{contract.PSA_ENFORCE_LABEL} = {level!r}" in message


def seed_compatible_namespace(*, annotated: bool, warn: str | None) -> dict[str, Any]:
    labels = {contract.PSA_ENFORCE_LABEL: contract.PSA_SEED_COMPATIBLE_LEVEL}
    if warn is not None:
        labels["pod-security.kubernetes.io/warn"] = warn
    annotations = {contract.ANNOTATION_SEED_COMPATIBILITY: "true"} if annotated else {}
    return wire_props(k8s.core.v1.NamespaceInitArgs, {
        "metadata": {"name": contract.DEFAULT_NAMESPACE, "labels": labels,
                     "annotations": annotations}})


def test_seed_compatible_namespace_may_enforce_baseline_while_warning_restricted() -> None:
    props = seed_compatible_namespace(annotated=True, warn="restricted")
    assert violations("namespace-enforces-restricted", policies.K8S_NAMESPACE, props) == []


@pytest.mark.parametrize(("annotated", "warn"), [(False, "restricted"), (True, None),
                                                 (True, "baseline")])
def test_baseline_namespace_is_rejected_unless_marked_seed_compatible_and_warning(
        annotated: bool, warn: str | None) -> None:
    props = seed_compatible_namespace(annotated=annotated, warn=warn)
    [message] = violations("namespace-enforces-restricted", policies.K8S_NAMESPACE, props)
    assert "does not enforce the restricted" in message


WORKLOAD_POLICIES = ["no-privileged-or-root-containers", "restricted-pod-security",
                     "images-pinned-by-digest"]


@pytest.mark.parametrize("policy_name", WORKLOAD_POLICIES)
@pytest.mark.parametrize("resource_type", list(WORKLOADS))
def test_restricted_digest_pinned_workloads_pass(resource_type: str, policy_name: str) -> None:
    props = WORKLOADS[resource_type]()
    assert violations(policy_name, resource_type, props) == []


@pytest.mark.parametrize("resource_type", list(WORKLOADS))
def test_privileged_container_is_rejected_in_every_workload_kind(resource_type: str) -> None:
    props = WORKLOADS[resource_type](containers=[restricted_container(privileged=True)])
    [message] = violations("no-privileged-or-root-containers", resource_type, props,
                           name="runner")
    kind = resource_type.rsplit(":", 1)[-1]
    assert message == (f"{kind} 'runner': containers 'runner' is privileged "
                       "(securityContext.privileged: true).")


def test_container_that_may_escalate_privileges_is_rejected() -> None:
    container = restricted_container()
    del container["security_context"]["allow_privilege_escalation"]
    [message] = violations("no-privileged-or-root-containers", "kubernetes:apps/v1:Deployment",
                           deployment(containers=[container]), name="base-runner")
    assert message.startswith("Deployment 'base-runner': containers 'runner' may escalate")
    assert "allowPrivilegeEscalation: false" in message


def test_init_container_is_checked_like_containers() -> None:
    init = restricted_container("setup", allow_privilege_escalation=True)
    props = deployment(init_containers=[init])
    [message] = violations("no-privileged-or-root-containers", "kubernetes:apps/v1:Deployment",
                           props, name="base-runner")
    assert "initContainers 'setup' may escalate privileges" in message


def test_run_as_non_root_may_come_from_the_pod_or_the_container() -> None:
    container_level = deployment(
        security_context={"seccomp_profile": {"type": "RuntimeDefault"}},
        containers=[restricted_container(run_as_non_root=True)])
    assert violations("no-privileged-or-root-containers", "kubernetes:apps/v1:Deployment",
                      container_level) == []


def test_workload_that_may_run_as_root_is_rejected() -> None:
    props = deployment(security_context={"seccomp_profile": {"type": "RuntimeDefault"}})
    [message] = violations("no-privileged-or-root-containers", "kubernetes:apps/v1:Deployment",
                           props, name="base-runner")
    assert "containers 'runner' may run as root: set runAsNonRoot: true" in message


def test_container_overriding_the_pods_non_root_setting_is_rejected() -> None:
    props = deployment(containers=[restricted_container(run_as_non_root=False)])
    [message] = violations("no-privileged-or-root-containers", "kubernetes:apps/v1:Deployment",
                           props)
    assert "containers 'runner' may run as root" in message


def test_uid_zero_is_rejected_even_from_the_pod_security_context() -> None:
    props = cronjob(security_context={"run_as_non_root": True, "run_as_user": 0,
                                      "seccomp_profile": {"type": "RuntimeDefault"}})
    [message] = violations("no-privileged-or-root-containers", "kubernetes:batch/v1:CronJob",
                           props, name="reaper")
    assert message == (f"CronJob 'reaper': containers 'runner' runs as root (runAsUser: 0); "
                       f"use uid {contract.RUNNER_UID}.")


def test_pod_sharing_the_host_network_is_rejected() -> None:
    [message] = violations("no-privileged-or-root-containers", "kubernetes:core/v1:Pod",
                           pod(host_network=True), name="gpu-1234-1")
    assert message == "Pod 'gpu-1234-1' shares the node's namespaces (hostNetwork: true)."


def test_container_keeping_capabilities_is_rejected() -> None:
    container = restricted_container()
    container["security_context"]["capabilities"] = {"add": ["SYS_ADMIN", "NET_BIND_SERVICE"]}
    messages = violations("restricted-pod-security", "kubernetes:apps/v1:Deployment",
                          deployment(containers=[container]), name="base-runner")
    assert messages == [
        "Deployment 'base-runner': containers 'runner' does not drop all capabilities: set "
        "securityContext.capabilities.drop: [ALL].",
        "Deployment 'base-runner': containers 'runner' adds capabilities ['SYS_ADMIN']; only "
        "NET_BIND_SERVICE is allowed.",
    ]


def test_unconfined_seccomp_profile_is_rejected() -> None:
    props = deployment(containers=[restricted_container(
        seccomp_profile={"type": "Unconfined"})])
    [message] = violations("restricted-pod-security", "kubernetes:apps/v1:Deployment", props)
    assert "containers 'runner' has seccomp profile 'Unconfined'" in message


def test_missing_seccomp_profile_is_rejected() -> None:
    props = deployment(security_context={"run_as_non_root": True})
    [message] = violations("restricted-pod-security", "kubernetes:apps/v1:Deployment", props)
    assert "containers 'runner' has seccomp profile None" in message


def test_host_path_volume_is_rejected() -> None:
    props = pod(volumes=[{"name": "docker", "host_path": {"path": "/var/run/docker.sock"}}])
    [message] = violations("restricted-pod-security", "kubernetes:core/v1:Pod", props,
                           name="gpu-1234-1")
    assert message.startswith("Pod 'gpu-1234-1': volume 'docker' is a hostPath")


@pytest.mark.parametrize("image", [
    "ghcr.io/acme/gpu-runner:1.0",
    "ghcr.io/acme/gpu-runner:latest",
    "ghcr.io/acme/gpu-runner@sha256:abc123",
    f"ghcr.io/acme/gpu-runner@{DIGEST.upper()}",
])
def test_image_not_pinned_by_digest_is_rejected(image: str) -> None:
    container = restricted_container()
    container["image"] = image
    [message] = violations("images-pinned-by-digest", "kubernetes:batch/v1:CronJob",
                           cronjob(containers=[container]), name="reaper")
    assert message == (f"CronJob 'reaper': containers 'runner' image {image!r} is not pinned "
                       "by digest: use <name>@sha256:<64 hex digits>.")


def test_image_unknown_at_preview_defers_the_digest_check() -> None:
    props = deployment()
    props["spec"]["template"]["spec"]["containers"][0]["image"] = UNKNOWN_STRING_VALUE
    with pytest.raises(UnknownValueError):
        violations("images-pinned-by-digest", "kubernetes:apps/v1:Deployment", props)
    # The other checks do not read the image, so they still run at preview.
    assert violations("no-privileged-or-root-containers", "kubernetes:apps/v1:Deployment",
                      props) == []


def test_non_workload_resources_are_ignored_by_workload_policies() -> None:
    for policy_name in WORKLOAD_POLICIES:
        assert violations(policy_name, policies.K8S_NAMESPACE, namespace(None)) == []


# --- GitHub --------------------------------------------------------------------------------------

# --- pods that run workflow code: no rights, no token ----------------------------------------


BROKER_ACCOUNT = {"kind": "ServiceAccount", "name": contract.BROKER_NAME,
                  "namespace": contract.DEFAULT_BROKER_NAMESPACE}


def role_binding(*subjects: dict[str, Any],
                 cluster_wide: bool = False) -> tuple[str, dict[str, Any]]:
    """A RoleBinding (or ClusterRoleBinding) of the spawner rules to `subjects`."""
    if cluster_wide:
        return policies.CLUSTER_ROLE_BINDING, wire_props(k8s.rbac.v1.ClusterRoleBindingInitArgs, {
            "metadata": {"name": "spawner"},
            "role_ref": {"api_group": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                         "name": "spawner"},
            "subjects": list(subjects)})
    return policies.ROLE_BINDING, wire_props(k8s.rbac.v1.RoleBindingInitArgs, {
        "metadata": {"name": "spawner", "namespace": contract.DEFAULT_NAMESPACE},
        "role_ref": {"api_group": "rbac.authorization.k8s.io", "kind": "Role", "name": "spawner"},
        "subjects": list(subjects)})


def test_binding_the_brokers_account_or_the_seed_guides_user_passes() -> None:
    seed_user = {"kind": "User", "api_group": "rbac.authorization.k8s.io",
                 "name": "gpu-runners-dev-github-ci@acme-ml-ci.iam.gserviceaccount.com"}
    for subject in (BROKER_ACCOUNT, seed_user):
        resource_type, props = role_binding(subject)
        assert violations("no-rights-for-workflow-pods", resource_type, props) == []


@pytest.mark.parametrize("cluster_wide", [False, True], ids=["RoleBinding", "ClusterRoleBinding"])
@pytest.mark.parametrize("account", sorted(policies.WORKFLOW_SERVICE_ACCOUNTS))
def test_binding_that_grants_a_workflow_pods_account_anything_is_rejected(
        account: str, cluster_wide: bool) -> None:
    resource_type, props = role_binding(
        BROKER_ACCOUNT, {"kind": "ServiceAccount", "name": account,
                         "namespace": contract.DEFAULT_NAMESPACE}, cluster_wide=cluster_wide)
    [message] = violations("no-rights-for-workflow-pods", resource_type, props, name="spawner")
    kind = "ClusterRoleBinding" if cluster_wide else "RoleBinding"
    assert message == (f"{kind} 'spawner' grants rights to ServiceAccount '{account}', whose "
                       f"pods run workflow code: only the broker may act on runner pods.")


@pytest.mark.parametrize("group", ["system:serviceaccounts", "system:authenticated",
                                   f"system:serviceaccounts:{contract.DEFAULT_NAMESPACE}"])
def test_binding_to_a_group_that_takes_in_every_account_is_rejected(group: str) -> None:
    resource_type, props = role_binding(
        {"kind": "Group", "api_group": "rbac.authorization.k8s.io", "name": group})
    [message] = violations("no-rights-for-workflow-pods", resource_type, props, name="spawner")
    assert f"grants rights to group '{group}'" in message


@pytest.mark.parametrize("resource_type", ["kubernetes:apps/v1:Deployment",
                                           "kubernetes:batch/v1:CronJob"])
def test_workflow_pod_that_may_mount_its_token_is_rejected(resource_type: str) -> None:
    build = WORKLOADS[resource_type]
    unset = build()
    pod_spec = policies.POD_SPEC_PATHS[resource_type]
    template = unset
    for key in pod_spec:
        template = template[key]
    del template["automountServiceAccountToken"]  # the API's default: mounted
    for props in (unset, build(automount_service_account_token=True)):
        [message] = violations("workflow-pods-mount-no-token", resource_type, props, name="br")
        assert message.endswith(f"runs workflow code as '{contract.BASE_RUNNER_SERVICE_ACCOUNT}' "
                                "and may mount its token: set automountServiceAccountToken: "
                                "false in the pod spec.")
    assert violations("workflow-pods-mount-no-token", resource_type,
                      build(automount_service_account_token=False)) == []


def test_gpu_pod_without_a_token_and_the_brokers_pod_with_one_pass() -> None:
    assert violations("workflow-pods-mount-no-token", "kubernetes:core/v1:Pod", pod()) == []
    broker = deployment(service_account_name=contract.BROKER_NAME,
                        automount_service_account_token=True)
    assert violations("workflow-pods-mount-no-token", "kubernetes:apps/v1:Deployment",
                      broker) == []


def broker_namespace_resource() -> PolicyResource:
    return stack_resource(policies.K8S_NAMESPACE, "broker-namespace", wire_props(
        k8s.core.v1.NamespaceInitArgs, {"metadata": {
            "name": contract.DEFAULT_BROKER_NAMESPACE,
            "labels": {contract.LABEL_COMPONENT: contract.BROKER_COMPONENT,
                       contract.PSA_ENFORCE_LABEL: contract.PSA_LEVEL}}}))


def namespaced_role(namespace: str) -> PolicyResource:
    return stack_resource(policies.ROLE, "reader", wire_props(k8s.rbac.v1.RoleInitArgs, {
        "metadata": {"name": "secret-reader", "namespace": namespace},
        "rules": [{"api_groups": [""], "resources": ["secrets"], "verbs": ["get"]}]}))


def test_roles_outside_the_brokers_namespace_pass() -> None:
    resources = [broker_namespace_resource(), namespaced_role(contract.DEFAULT_NAMESPACE)]
    assert stack_violations("broker-namespace-grants-nothing", resources) == []


def test_role_or_binding_in_the_brokers_namespace_is_rejected() -> None:
    role = namespaced_role(contract.DEFAULT_BROKER_NAMESPACE)
    resource_type, props = role_binding(BROKER_ACCOUNT)
    props["metadata"]["namespace"] = contract.DEFAULT_BROKER_NAMESPACE
    binding = stack_resource(resource_type, "binding", props)
    reported = stack_violations("broker-namespace-grants-nothing",
                                [broker_namespace_resource(), role, binding])
    assert reported == [
        (f"Role 'reader' is in the broker's namespace '{contract.DEFAULT_BROKER_NAMESPACE}', "
         "which holds the GitHub credential: grant nothing there.", role.urn),
        (f"RoleBinding 'binding' is in the broker's namespace "
         f"'{contract.DEFAULT_BROKER_NAMESPACE}', which holds the GitHub credential: grant "
         "nothing there.", binding.urn),
    ]


SDK_SECRET_OUTPUTS = ["encryptedValue", "plaintextValue", "value", "valueEncrypted"]


def test_actions_secret_set_through_value_and_stored_as_secret_passes() -> None:
    props = actions_secret(value="ghp_example")
    assert violations("actions-secret-from-secret", policies.ACTIONS_SECRET, props,
                      secret_outputs=SDK_SECRET_OUTPUTS) == []


def test_actions_secret_whose_value_arrives_marked_secret_is_checked_the_same() -> None:
    props = actions_secret(value="ghp_example")
    props["value"] = {SPECIAL_SIG_KEY: SPECIAL_SECRET_SIG, "value": ""}
    [message] = violations("actions-secret-from-secret", policies.ACTIONS_SECRET, props,
                           secret_outputs=SDK_SECRET_OUTPUTS)
    assert message == ("Actions secret 'RUNNER_TOKEN' has an empty value: set it from a "
                       "non-empty Pulumi secret.")


@pytest.mark.parametrize("deprecated", ["plaintext_value", "encrypted_value"])
def test_actions_secret_with_deprecated_value_property_is_rejected(deprecated: str) -> None:
    props = actions_secret(**{deprecated: "ghp_example"})
    wire = "plaintextValue" if deprecated == "plaintext_value" else "encryptedValue"
    messages = violations("actions-secret-from-secret", policies.ACTIONS_SECRET, props,
                          secret_outputs=SDK_SECRET_OUTPUTS)
    assert messages == [
        f"Actions secret 'RUNNER_TOKEN' sets the deprecated {wire}: set value from a Pulumi "
        "secret (config get_secret / Output.secret) instead.",
        "Actions secret 'RUNNER_TOKEN' must set exactly one of value and valueEncrypted "
        "(set: none).",
    ]


def test_actions_secret_not_listed_as_secret_output_is_rejected() -> None:
    props = actions_secret(value="ghp_example")
    [message] = violations("actions-secret-from-secret", policies.ACTIONS_SECRET, props,
                           secret_outputs=[])
    assert message == ("Actions secret 'RUNNER_TOKEN' is not stored as a secret: value is "
                       "missing from additionalSecretOutputs, so state would hold it in "
                       "plaintext.")


def test_actions_secret_computed_at_preview_is_still_checked() -> None:
    # A seed secret built from a service-account key is unknown until the key exists.
    props = actions_secret(contract.SEED_SECRET_SERVICE_ACCOUNT_KEY, value="x")
    props["value"] = UNKNOWN_STRING_VALUE
    assert violations("actions-secret-from-secret", policies.ACTIONS_SECRET, props,
                      secret_outputs=SDK_SECRET_OUTPUTS) == []
    [message] = violations("actions-secret-from-secret", policies.ACTIONS_SECRET, props)
    assert message.startswith(
        f"Actions secret '{contract.SEED_SECRET_SERVICE_ACCOUNT_KEY}' is not stored as a secret")


def test_main_branch_protection_forbidding_force_pushes_and_deletion_passes() -> None:
    props = branch_protection(allows_force_pushes=False, allows_deletions=False)
    assert violations("main-branch-protection", policies.BRANCH_PROTECTION, props) == []


def test_main_branch_protection_allowing_force_pushes_or_deletion_is_rejected() -> None:
    props = branch_protection(allows_force_pushes=True)
    messages = violations("main-branch-protection", policies.BRANCH_PROTECTION, props,
                          name="repo-main")
    assert messages == [
        "Branch protection 'repo-main' of 'main' has allowsForcePushes = True: set it to false.",
        "Branch protection 'repo-main' of 'main' has allowsDeletions = None: set it to false.",
    ]


def test_branch_protection_of_other_branches_is_not_checked() -> None:
    props = branch_protection("release/*", allows_force_pushes=True)
    assert violations("main-branch-protection", policies.BRANCH_PROTECTION, props) == []


def test_stack_managing_the_repository_must_protect_main() -> None:
    secret = stack_resource(policies.ACTIONS_SECRET, "repo-token", actions_secret(value="x"))
    protection = stack_resource(policies.BRANCH_PROTECTION, "repo-main",
                                branch_protection(allows_force_pushes=False))
    assert stack_violations("main-branch-protection-declared", [secret, protection]) == []
    [(message, resource_urn)] = stack_violations("main-branch-protection-declared", [secret])
    assert message == ("The stack manages the GitHub repository (ActionsSecret 'repo-token') "
                       "but declares no BranchProtection with pattern 'main'.")
    assert resource_urn is None


def test_stack_without_github_resources_needs_no_branch_protection() -> None:
    assert stack_violations("main-branch-protection-declared",
                            [stack_resource(policies.GKE_CLUSTER, "c", cluster())]) == []


# --- service-account keys ------------------------------------------------------------------------


def test_service_account_key_with_seed_compatibility_secret_passes() -> None:
    key = stack_resource(policies.SERVICE_ACCOUNT_KEY, "seed-key", service_account_key())
    seed = stack_resource(policies.ACTIONS_SECRET, "seed-sa-key", actions_secret(
        contract.SEED_SECRET_SERVICE_ACCOUNT_KEY, value="eyJ0eXBlIjoi"))
    assert stack_violations("service-account-key-only-for-seed", [key, seed]) == []


def test_service_account_key_without_seed_compatibility_is_rejected() -> None:
    key = stack_resource(policies.SERVICE_ACCOUNT_KEY, "ci-key", service_account_key())
    other = stack_resource(policies.ACTIONS_SECRET, "token", actions_secret(value="x"))
    [(message, resource_urn)] = stack_violations("service-account-key-only-for-seed",
                                                 [key, other])
    assert message.startswith("Service account key 'ci-key' is declared but seed "
                              "compatibility is off (no Actions secret "
                              f"{contract.SEED_SECRET_SERVICE_ACCOUNT_KEY})")
    assert resource_urn == key.urn


# --- the program's own stacks against the pack ---------------------------------------------------


def pack_report(run: ProgramRun) -> list[tuple[str, str]]:
    """(policy, message) of every violation the pack reports for a stack, as preview would."""
    reported: list[tuple[str, str]] = []
    resources = [r for r in run.resources if r.custom]
    for policy in policies.POLICIES:
        def report(message: str, _urn: str | None, name: str = policy.name) -> None:
            reported.append((name, message))

        if isinstance(policy, ResourceValidationPolicy):
            for r in resources:
                policy.validate(ResourceValidationArgs(
                    r.typ, analyzer_view(r.inputs), r.urn, r.name,
                    options(r.additional_secret_outputs), None), report)
        else:
            policy.validate(StackValidationArgs([
                PolicyResource(r.typ, analyzer_view(r.outputs), r.urn, r.name,
                               options(r.additional_secret_outputs), None, None, [], {})
                for r in resources]), report)
    return reported


@pytest.mark.parametrize("stack", ["dev", "prod"])
def test_the_programs_stacks_pass_every_policy(stack: str) -> None:
    under_policy = mock_stack.run_program(stack)
    types = {r.typ for r in under_policy.resources}
    # The policies had something to check: every resource kind they guard is declared.
    assert {policies.GKE_CLUSTER, policies.GKE_NODE_POOL, policies.K8S_NAMESPACE,
            "kubernetes:apps/v1:Deployment", policies.ROLE_BINDING,
            policies.BRANCH_PROTECTION} <= types
    assert pack_report(under_policy) == []


def test_the_pack_finds_the_programs_broker_namespace() -> None:
    # So that broker-namespace-grants-nothing passing the program's stacks means something.
    run = mock_stack.run_program("dev", {"brokerNamespace": "ci-broker"})
    resources = [PolicyResource(r.typ, analyzer_view(r.outputs), r.urn, r.name, options(),
                                None, None, [], {}) for r in run.resources if r.custom]
    assert policies.broker_namespaces(resources) == {"ci-broker"}


def test_prod_stack_turning_deletion_protection_off_is_stopped() -> None:
    report = pack_report(mock_stack.run_program("prod", {"deletionProtection": False}))
    assert [name for name, _ in report] == ["production-deletion-protection"]
    assert "in production stack 'prod' has deletionProtection = False" in report[0][1]


def test_seed_compatible_stack_passes_with_its_service_account_key() -> None:
    under_policy = mock_stack.run_program("dev", {"seedCompatibility": True})
    assert under_policy.of_type(policies.SERVICE_ACCOUNT_KEY)
    secrets = under_policy.of_type(policies.ACTIONS_SECRET)
    assert {s.inputs["secretName"] for s in secrets} >= {
        contract.SEED_SECRET_SERVICE_ACCOUNT_KEY}
    assert pack_report(under_policy) == []


def test_warm_gpu_pool_of_a_stack_is_reported_as_advisory_only() -> None:
    pools = [{"name": "l4-warm", "machineType": "g2-standard-8", "acceleratorType": "nvidia-l4",
              "minNodes": 1, "maxNodes": 2}]
    report = pack_report(mock_stack.run_program("dev", {"gpuPools": pools}))
    assert [name for name, _ in report] == ["gpu-node-pool-warm"]
    assert "is a warm pool (autoscaling.totalMinNodeCount = 1)" in report[0][1]


# --- the pack as the Pulumi CLI runs it ----------------------------------------------------------


@dataclass
class RunningPack:
    """The policy pack's analyzer process and a gRPC stub connected to it."""

    process: subprocess.Popen[bytes]
    stub: analyzer_pb2_grpc.AnalyzerStub
    channel: grpc.Channel = field(repr=False)


def _read_port(process: subprocess.Popen[bytes], timeout: float) -> str:
    """The port the pack prints on its first stdout line, waiting at most `timeout` seconds."""
    assert process.stdout is not None
    with selectors.DefaultSelector() as selector:
        selector.register(process.stdout, selectors.EVENT_READ)
        line = process.stdout.readline() if selector.select(timeout) else b""
    if not line.strip().isdigit():
        process.kill()
        _, stderr = process.communicate(timeout=10)
        raise AssertionError(f"policy pack printed no port within {timeout} s: {line!r} "
                             f"{stderr.decode(errors='replace')}")
    return line.decode().strip()


@pytest.fixture(scope="module")
def running_pack() -> Iterator[RunningPack]:
    """Start the pack as the CLI does: `python -m pulumi.policy <engine> .` in policy/."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PULUMI_")}
    # The pack never calls the engine during these requests; the address is only parsed.
    process = subprocess.Popen([sys.executable, "-u", "-m", "pulumi.policy", "127.0.0.1:9", "."],
                               cwd=REPO_ROOT / "policy", env=env,
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        port = _read_port(process, timeout=30)
        channel = grpc.insecure_channel(f"127.0.0.1:{port}")
        grpc.channel_ready_future(channel).result(timeout=10)
        yield RunningPack(process, analyzer_pb2_grpc.AnalyzerStub(channel), channel)
        channel.close()
    finally:
        process.terminate()
        process.communicate(timeout=10)


def _struct(props: Mapping[str, Any]) -> struct_pb2.Struct:
    struct = struct_pb2.Struct()
    struct.update(props)
    return struct


def _analyze(pack: RunningPack, resource_type: str, name: str, props: Mapping[str, Any], *,
             stack: str = "dev",
             secret_outputs: Sequence[str] = ()) -> list[analyzer_pb2.AnalyzeDiagnostic]:
    request = analyzer_pb2.AnalyzeRequest(
        type=resource_type, name=name, urn=urn(resource_type, name, stack),
        properties=_struct(props),
        options=analyzer_pb2.AnalyzerResourceOptions(additionalSecretOutputs=secret_outputs))
    return list(pack.stub.Analyze(request, timeout=10).diagnostics)


def test_pack_declares_every_policy_with_its_enforcement_level(running_pack: RunningPack) -> None:
    info = running_pack.stub.GetAnalyzerInfo(empty_pb2.Empty(),
                                             timeout=10)
    levels = {p.name: analyzer_pb2.EnforcementLevel.Name(p.enforcementLevel)
              for p in info.policies}
    assert info.name == "gpu-runners-security"
    assert levels == {p.name: "ADVISORY" if p.name == "gpu-node-pool-warm" else "MANDATORY"
                      for p in policies.POLICIES}
    schema = next(p for p in info.policies if p.name == "production-deletion-protection")
    assert json_format.MessageToDict(schema.configSchema.properties)[
        policies.PRODUCTION_STACKS_KEY]["default"] == ["prod", "production"]


def test_pack_reports_a_violation_as_mandatory(running_pack: RunningPack) -> None:
    props = gpu_pool({"total_min_node_count": 1, "total_max_node_count": 2})
    [diagnostic] = _analyze(running_pack, policies.GKE_NODE_POOL, "runners-gpu-l4", props)
    assert diagnostic.policyName == "gpu-node-pool-scales-to-zero"
    assert diagnostic.enforcementLevel == analyzer_pb2.MANDATORY
    assert "GPU node pool 'runners-gpu-l4' keeps 1 GPU node(s) running" in diagnostic.message


def test_pack_sees_secret_values_unmarked(running_pack: RunningPack) -> None:
    # The engine marks secret inputs; the SDK unwraps them before any policy runs, so a marked
    # and an unmarked value are indistinguishable and only additionalSecretOutputs tells.
    marked = actions_secret(value="x")
    marked["value"] = {SPECIAL_SIG_KEY: SPECIAL_SECRET_SIG, "value": "ghp_example"}
    plain = actions_secret(value="ghp_example")
    for props in (marked, plain):
        assert _analyze(running_pack, policies.ACTIONS_SECRET, "token", props,
                        secret_outputs=SDK_SECRET_OUTPUTS) == []
        [diagnostic] = _analyze(running_pack, policies.ACTIONS_SECRET, "token", props)
        assert "value is missing from additionalSecretOutputs" in diagnostic.message


def test_pack_defers_a_policy_whose_input_is_unknown_at_preview(running_pack: RunningPack) -> None:
    props = deployment()
    props["spec"]["template"]["spec"]["containers"][0]["image"] = UNKNOWN_STRING_VALUE
    [diagnostic] = _analyze(running_pack, "kubernetes:apps/v1:Deployment", "base-runner", props)
    assert diagnostic.policyName == "images-pinned-by-digest"
    assert diagnostic.enforcementLevel == analyzer_pb2.ADVISORY
    assert "can't run policy 'images-pinned-by-digest'" in diagnostic.message


def test_pack_applies_production_stacks_from_config(running_pack: RunningPack) -> None:
    config = analyzer_pb2.PolicyConfig(enforcementLevel=analyzer_pb2.MANDATORY,
                                       properties=_struct({policies.PRODUCTION_STACKS_KEY:
                                                           ["live"]}))
    running_pack.stub.Configure(analyzer_pb2.ConfigureAnalyzerRequest(
        policyConfig={"production-deletion-protection": config}), timeout=10)
    try:
        props = cluster(deletion_protection=False)
        assert _analyze(running_pack, policies.GKE_CLUSTER, "c", props, stack="prod") == []
        [diagnostic] = _analyze(running_pack, policies.GKE_CLUSTER, "c", props, stack="live")
        assert "production stack 'live'" in diagnostic.message
    finally:
        running_pack.stub.Configure(analyzer_pb2.ConfigureAnalyzerRequest(), timeout=10)


def test_pack_checks_the_whole_stack_for_service_account_keys(running_pack: RunningPack) -> None:
    key_urn = urn(policies.SERVICE_ACCOUNT_KEY, "ci-key")
    request = analyzer_pb2.AnalyzeStackRequest(resources=[analyzer_pb2.AnalyzerResource(
        type=policies.SERVICE_ACCOUNT_KEY, name="ci-key", urn=key_urn,
        properties=_struct(service_account_key()))])
    diagnostics = running_pack.stub.AnalyzeStack(request, timeout=10).diagnostics
    assert [(d.policyName, d.urn) for d in diagnostics] == [
        ("service-account-key-only-for-seed", key_urn)]


def test_pack_imports_only_what_its_requirements_install() -> None:
    # The CLI runs the pack in a virtualenv made from policy/requirements.txt alone, so the
    # pack (and gpu_runners.contract, which it imports) must need nothing else.
    probe = ("import json, sys; import policy.policies; print(json.dumps(sorted("
             "{name.split('.')[0] for name, module in sys.modules.items() "
             "if getattr(module, '__file__', None)})))")
    output = subprocess.run([sys.executable, "-c", probe], cwd=REPO_ROOT, check=True,
                            capture_output=True, text=True, timeout=60).stdout
    modules = set(json.loads(output)) - set(sys.stdlib_module_names) - {"policy", "gpu_runners"}
    # The pins; policy/requirements.txt is their hashed lock (tests/test_requirement_locks.py).
    allowed = _distribution_closure(
        [line for line in (REPO_ROOT / "policy" / "requirements.in").read_text().splitlines()
         if not line.startswith("#")])
    providers = packages_distributions()
    outside = sorted(m for m in modules if not m.startswith("_")
                     and not {_canonical(d) for d in providers.get(m, [])} & allowed)
    assert outside == [], f"imported but not installed by policy/requirements.txt: {outside}"


def _canonical(name: str) -> str:
    return name.lower().replace("_", "-").replace(".", "-")


def _distribution_closure(requirements: list[str]) -> set[str]:
    """Every distribution the requirements install, following install-time dependencies."""
    seen: set[str] = set()
    pending = [Requirement(line).name for line in requirements if line.strip()]
    while pending:
        name = _canonical(pending.pop())
        if name in seen:
            continue
        seen.add(name)
        for spec in requires(name) or []:
            requirement = Requirement(spec)
            if requirement.marker is None or requirement.marker.evaluate({"extra": ""}):
                pending.append(requirement.name)
    return seen
