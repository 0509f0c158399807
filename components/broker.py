"""`RunnerBroker`: the one service that holds the GitHub credential and the rights over GPU runners.

Jobs never hold either: they call the broker with their own GitHub Actions OIDC token, and the
broker (gpu_runners/broker) spawns, watches and deletes that run's GPU runner under the stack's
policy. This module declares the broker in a namespace of its own; the numeric GitHub ids its
token checks compare against come from components/repository_ids.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_kubernetes as k8s
from pulumi_kubernetes.core.v1 import EnvVarArgsDict, PodSpecArgsDict

from components.container_image import image_pull_secret
from components.runner_plane import (
    BASE_RUNNER_POD_LABELS,
    DELETION_PROPAGATION_ANNOTATION,
    KUBE_DNS_EGRESS,
    NAMESPACE_NAME_LABEL,
    SPAWNER_RULES,
    restricted_container_security,
    restricted_pod_security,
    scanner_skips,
)
from gpu_runners import contract
from gpu_runners.gpu_pools import GpuPool, format_gpu_pools

#: The broker only calls APIs and serves small JSON documents; 100 concurrent runs are threads
#: waiting on watches, not CPU.
BROKER_RESOURCES: k8s.core.v1.ResourceRequirementsArgsDict = {
    "requests": {"cpu": "250m", "memory": "256Mi"},
    "limits": {"cpu": "1", "memory": "512Mi"},
}
CREDENTIAL_VOLUME = "github-credential"
#: GitHub's API, and the GKE control plane, listen on HTTPS.
HTTPS_PORT = 443
#: Where a Kubernetes API server may listen when the stack does not know its address.
API_SERVER_PORTS = (443, 6443)

#: Asking the API server whom a base runner pod's projected token belongs to (TokenReview).
#: Not `system:auth-delegator`, which adds SubjectAccessReviews the broker does not make.
TOKEN_REVIEW_RULES: list[k8s.rbac.v1.PolicyRuleArgsDict] = [
    {"api_groups": ["authentication.k8s.io"], "resources": ["tokenreviews"],
     "verbs": ["create"]},
]
#: Reading, by name, the one node the autoscaler added for a run's pod: its `Ready`
#: condition's lastTransitionTime splits the step summary's "node ready" from "driver ready"
#: (gpu_runners/node_timing.py). `get` only: no `list` or `watch`, so the broker learns
#: nothing of nodes it was not pointed at by its own pod's binding, and holds no stream of
#: every node's status (heartbeats, addresses, images) it does not need. Nodes are
#: cluster-scoped, so a Role in the runner namespace cannot grant it.
NODE_READ_RULES: list[k8s.rbac.v1.PolicyRuleArgsDict] = [
    {"api_groups": [""], "resources": ["nodes"], "verbs": ["get"]},
]
#: The broker's only cluster-wide rights, in its one ClusterRole.
BROKER_CLUSTER_RULES: list[k8s.rbac.v1.PolicyRuleArgsDict] = [
    *TOKEN_REVIEW_RULES, *NODE_READ_RULES,
]

#: The broker's rights in the runner namespace: the spawner rules, plus its run records
#: (ConfigMaps holding what a run needs to be recovered from a Spot preemption; no credential).
#: `list` because the recovery pass reads every record; no `watch`, no `patch`: a record is
#: replaced whole, with the resourceVersion it was read at.
BROKER_RULES: list[k8s.rbac.v1.PolicyRuleArgsDict] = [
    *SPAWNER_RULES,
    {"api_groups": [""], "resources": ["configmaps"],
     "verbs": ["create", "get", "list", "update", "delete"]},
]

#: Security-scanner findings that do not apply to the broker, each with its reason.
_SKIP_TOKEN = ("CKV_K8S_38", "the broker creates, watches and deletes GPU runner pods through "
               "this token; its only Role is in the runner namespace, its only cluster-wide "
               "rights are creating TokenReviews and getting a node by name")


def broker_url(namespace: str, service: str = contract.BROKER_NAME) -> str:
    """The broker's in-cluster URL: its Service's DNS name in `namespace`, plain HTTP.

    Known before anything is created, so the base runner's client can be told it while the
    broker, which needs the runner namespace first, is declared after the runner plane.
    """
    return f"http://{service}.{namespace}.svc:{contract.BROKER_PORT}"


@dataclass(frozen=True)
class RunnerBrokerArgs:
    """The broker's settings: where it runs, what it may do, and the policy it applies."""

    #: The broker's own namespace; nothing else runs there.
    namespace: str
    #: The broker image, digest-pinned.
    image: pulumi.Input[str]
    #: The GitHub credential the broker mints JIT runner configs with: a GitHub App's private
    #: key (PEM) when `github_app_id` is given, else a PAT with repo scope.
    github_credential: pulumi.Input[str]
    #: The runner namespace, as the runner plane's output, so the Role follows its namespace.
    runner_namespace: pulumi.Input[str]
    #: The runner image GPU runner pods run unless a job names an allowed image.
    runner_image: pulumi.Input[str]
    #: owner/name of the repository, and its numeric ids (resolve_repository_ids).
    repository: str
    repository_id: pulumi.Input[str]
    repository_owner_id: pulumi.Input[str]
    gpu_pools: Sequence[GpuPool]
    max_runtime_minutes: int
    #: Most GPUs one repository's runs may hold at once.
    gpu_cap_per_repository: int
    audience: str = contract.DEFAULT_BROKER_AUDIENCE
    oidc_issuer: str = contract.GITHUB_OIDC_ISSUER
    allowed_events: Sequence[str] = contract.DEFAULT_ALLOWED_EVENTS
    #: fnmatch patterns on the token's `ref` / `job_workflow_ref`; empty allows any.
    allowed_refs: Sequence[str] = ()
    allowed_workflow_refs: Sequence[str] = ()
    #: Image patterns a run may ask for besides `runner_image`; empty allows only it.
    allowed_images: Sequence[str] = ()
    #: Refuse an asked image named by tag instead of resolving the tag to its digest.
    require_image_digests: bool = False
    #: Upstream registry host -> mirror prefix the GPU pods pull job images through.
    registry_mirrors: Mapping[str, str] = field(default_factory=dict)
    reaper_interval_seconds: int = 300
    #: Times one run is recovered after Spot preemption of its GPU node; 0 turns recovery off.
    max_preemption_retries: int = contract.DEFAULT_MAX_PREEMPTION_RETRIES
    #: Where GitHub is (HTTPS only).
    egress_cidrs: Sequence[str] = ("0.0.0.0/0",)
    #: The Kubernetes API server's addresses (GKE: the control plane endpoint /32). Empty when
    #: the stack cannot know them (an existing cluster): then `egress_cidrs` on the API ports.
    api_server_cidrs: Sequence[pulumi.Input[str]] = ()
    #: Whether the runner namespace holds the image pull Secret GPU runner pods need.
    runner_image_pull_secret: bool = False
    #: dockerconfigjson for a private broker image, or None for a public one.
    image_pull_config: pulumi.Input[str] | None = None
    #: The GitHub App the broker authenticates as (client ID or App ID) and its installation;
    #: both or neither. Without them `github_credential` is a PAT.
    github_app_id: str | None = None
    github_app_installation_id: str | None = None

    def __post_init__(self) -> None:
        if (self.github_app_id is None) != (self.github_app_installation_id is None):
            raise ValueError("RunnerBrokerArgs: give github_app_id and "
                             "github_app_installation_id together, or neither")

    @property
    def credential_key(self) -> str:
        """The key of the broker's credential Secret: the App's private key, or the PAT."""
        return contract.APP_KEY_SECRET_KEY if self.github_app_id else contract.PAT_SECRET_KEY

    @property
    def credential_file(self) -> str:
        """Where the broker reads its credential, in its mount of that Secret."""
        return f"{contract.BROKER_PAT_MOUNT_DIR}/{self.credential_key}"


def broker_environment(args: RunnerBrokerArgs) -> list[EnvVarArgsDict]:
    """The broker's settings (gpu_runners.broker.settings reads them); no secret among them."""
    env: list[EnvVarArgsDict] = [
        {"name": contract.ENV_NAMESPACE, "value": args.runner_namespace},
        {"name": contract.ENV_IMAGE, "value": args.runner_image},
        {"name": contract.ENV_GPU_POOLS, "value": format_gpu_pools(args.gpu_pools)},
        {"name": contract.ENV_MAX_RUNTIME_MINUTES, "value": str(args.max_runtime_minutes)},
        {"name": contract.ENV_REPOSITORY, "value": args.repository},
        {"name": contract.ENV_REPOSITORY_ID, "value": args.repository_id},
        {"name": contract.ENV_REPOSITORY_OWNER_ID, "value": args.repository_owner_id},
        *_credential_environment(args),
        {"name": contract.ENV_OIDC_ISSUER, "value": args.oidc_issuer},
        {"name": contract.ENV_BROKER_AUDIENCE, "value": args.audience},
        {"name": contract.ENV_ALLOWED_EVENTS, "value": ",".join(args.allowed_events)},
        {"name": contract.ENV_ALLOWED_REFS, "value": json.dumps(list(args.allowed_refs))},
        {"name": contract.ENV_ALLOWED_WORKFLOW_REFS,
         "value": json.dumps(list(args.allowed_workflow_refs))},
        {"name": contract.ENV_ALLOWED_IMAGES, "value": json.dumps(list(args.allowed_images))},
        {"name": contract.ENV_REQUIRE_IMAGE_DIGESTS,
         "value": "true" if args.require_image_digests else "false"},
        {"name": contract.ENV_REGISTRY_MIRRORS,
         "value": json.dumps(dict(args.registry_mirrors), sort_keys=True)},
        {"name": contract.ENV_GPU_CAP_PER_REPOSITORY,
         "value": str(args.gpu_cap_per_repository)},
        {"name": contract.ENV_REAPER_INTERVAL_SECONDS,
         "value": str(args.reaper_interval_seconds)},
        {"name": contract.ENV_MAX_PREEMPTION_RETRIES,
         "value": str(args.max_preemption_retries)},
        {"name": contract.ENV_BROKER_PORT, "value": str(contract.BROKER_PORT)},
    ]
    if args.runner_image_pull_secret:
        env.append({"name": contract.ENV_IMAGE_PULL_SECRET,
                    "value": contract.IMAGE_PULL_SECRET_NAME})
    return env


def _credential_environment(args: RunnerBrokerArgs) -> list[EnvVarArgsDict]:
    """Where the broker finds its credential: the App's ids and key file, or the PAT file.

    The ids are not secret; the key and the PAT stay in the mounted file.
    """
    if args.github_app_id is None or args.github_app_installation_id is None:
        return [{"name": contract.ENV_PAT_FILE, "value": args.credential_file}]
    return [
        {"name": contract.ENV_GITHUB_APP_ID, "value": args.github_app_id},
        {"name": contract.ENV_GITHUB_APP_INSTALLATION_ID,
         "value": args.github_app_installation_id},
        {"name": contract.ENV_GITHUB_APP_PRIVATE_KEY_FILE, "value": args.credential_file},
    ]


def broker_pod_spec(args: RunnerBrokerArgs, account: pulumi.Input[str],
                    pull_secrets: list[k8s.core.v1.LocalObjectReferenceArgsDict]
                    ) -> PodSpecArgsDict:
    """The broker's pod: restricted, read-only, its own token and the credential file."""
    pod: PodSpecArgsDict = {
        "service_account_name": account,
        # The broker's own token: the only one that may create runner pods and Secrets.
        "automount_service_account_token": True,
        "node_selector": {contract.NODE_GPU_LABEL: "false"},
        "security_context": restricted_pod_security(contract.BROKER_UID),
        "volumes": [
            {"name": CREDENTIAL_VOLUME,
             "secret": {"secret_name": contract.BROKER_PAT_SECRET_NAME,
                        "default_mode": 0o440}},
            # The root filesystem is read-only; Python and the kubernetes client may still
            # want a temporary file.
            {"name": "tmp", "empty_dir": {"size_limit": "64Mi"}},
        ],
        "containers": [{
            "name": "broker",
            "image": args.image,
            "image_pull_policy": "IfNotPresent",
            "command": ["python", "-m", "gpu_runners.broker"],
            "ports": [{"name": "http", "container_port": contract.BROKER_PORT,
                       "protocol": "TCP"}],
            "env": broker_environment(args),
            "volume_mounts": [
                {"name": CREDENTIAL_VOLUME, "mount_path": contract.BROKER_PAT_MOUNT_DIR,
                 "read_only": True},
                {"name": "tmp", "mount_path": "/tmp"},
            ],
            "liveness_probe": {"http_get": {"path": "/healthz", "port": "http"},
                               "period_seconds": 10, "timeout_seconds": 3,
                               "failure_threshold": 3},
            "readiness_probe": {"http_get": {"path": "/readyz", "port": "http"},
                                "period_seconds": 5, "timeout_seconds": 3,
                                "failure_threshold": 2},
            "resources": BROKER_RESOURCES,
            "security_context": {**restricted_container_security(),
                                 "read_only_root_filesystem": True},
        }],
    }
    if pull_secrets:
        pod["image_pull_secrets"] = pull_secrets
    return pod


def broker_network_policy_spec(args: RunnerBrokerArgs
                               ) -> k8s.networking.v1.NetworkPolicySpecArgsDict:
    """Who may reach the broker (base runner pods only) and what it may reach."""
    api_server: k8s.networking.v1.NetworkPolicyEgressRuleArgsDict = (
        {"to": [{"ip_block": {"cidr": cidr}} for cidr in args.api_server_cidrs],
         "ports": [{"protocol": "TCP", "port": HTTPS_PORT}]}
        if args.api_server_cidrs else
        {"to": [{"ip_block": {"cidr": cidr}} for cidr in args.egress_cidrs],
         "ports": [{"protocol": "TCP", "port": port} for port in API_SERVER_PORTS]})
    return {
        # Every pod of the namespace: only the broker runs here.
        "pod_selector": {},
        "policy_types": ["Ingress", "Egress"],
        # Only base runner pods of the runner namespace, only on the broker's port.
        "ingress": [{
            "from_": [{"namespace_selector": {"match_labels": {
                NAMESPACE_NAME_LABEL: args.runner_namespace}},
                      "pod_selector": {"match_labels": BASE_RUNNER_POD_LABELS}}],
            "ports": [{"protocol": "TCP", "port": contract.BROKER_PORT}],
        }],
        "egress": [
            api_server,
            # GitHub's API (JIT configs, registrations, run status), HTTPS only.
            {"to": [{"ip_block": {"cidr": cidr}} for cidr in args.egress_cidrs],
             "ports": [{"protocol": "TCP", "port": HTTPS_PORT}]},
            KUBE_DNS_EGRESS,
        ],
    }


class RunnerBroker(pulumi.ComponentResource):
    """The runner broker: a Deployment and its Service in a namespace of its own.

    Creates: the namespace (Pod Security `restricted` enforced); the Secret holding the GitHub
    credential (the GitHub App's private key, or the PAT), mounted read-only as a file into the
    broker and nowhere else (and a GHCR pull
    Secret for a private image); the broker's ServiceAccount, whose token the broker uses; a
    Role with exactly the spawner rules in the runner namespace, bound to that account (no Role
    in the broker's namespace: nothing but the broker's mount reaches its Secrets); a
    ClusterRole granting only `create` on `tokenreviews` (how the broker checks the base runner
    pods' projected tokens) and `get` on `nodes` (the Ready time of a node added for a run's
    pod, for the step summary's cold start), bound to that account; the
    Deployment (one replica, restricted, read-only root filesystem, probes); a ClusterIP
    Service; a NetworkPolicy letting only base runner pods reach the broker's port, and the
    broker reach only the Kubernetes API, GitHub and kube-dns.

    Every object goes through the Kubernetes provider the caller passes in `opts.providers`.

    Outputs: `namespace`, `url` (in-cluster, `http://<svc>.<ns>.svc:<port>`), `audience`.
    """

    namespace: pulumi.Output[str]
    url: pulumi.Output[str]
    audience: pulumi.Output[str]

    def __init__(self, name: str, args: RunnerBrokerArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpu-runners:index:RunnerBroker", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        labels = {contract.LABEL_PART_OF: contract.PART_OF}
        pod_labels = {**labels, contract.LABEL_NAME: contract.BROKER_NAME,
                      contract.LABEL_COMPONENT: contract.BROKER_COMPONENT}

        namespace = k8s.core.v1.Namespace(
            f"{name}-namespace",
            metadata={"name": args.namespace, "labels": {
                **labels,
                contract.LABEL_COMPONENT: contract.BROKER_COMPONENT,
                contract.PSA_ENFORCE_LABEL: contract.PSA_LEVEL,
                "pod-security.kubernetes.io/enforce-version": "latest",
                "pod-security.kubernetes.io/warn": contract.PSA_LEVEL,
                "pod-security.kubernetes.io/audit": contract.PSA_LEVEL,
            }},
            opts=child,
        )
        ns = namespace.metadata.name

        def meta(object_name: str) -> k8s.meta.v1.ObjectMetaArgsDict:
            return {"name": object_name, "namespace": ns, "labels": pod_labels}

        # A rotated key or PAT updates this Secret in place and nothing else: the kubelet
        # refreshes the mounted file and the broker re-reads it, so runs in progress go on.
        # (Should it ever be replaced, its name is fixed, so delete first.)
        credential = k8s.core.v1.Secret(
            f"{name}-credential",
            metadata=meta(contract.BROKER_PAT_SECRET_NAME),
            type="Opaque",
            string_data={args.credential_key: args.github_credential},
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )
        needed: list[pulumi.Resource] = [credential]
        pull_secrets: list[k8s.core.v1.LocalObjectReferenceArgsDict] = []
        if args.image_pull_config is not None:
            needed.append(image_pull_secret(f"{name}-pull", meta(contract.IMAGE_PULL_SECRET_NAME),
                                            args.image_pull_config, self))
            pull_secrets = [{"name": contract.IMAGE_PULL_SECRET_NAME}]

        account = k8s.core.v1.ServiceAccount(
            f"{name}-sa",
            metadata=meta(contract.BROKER_NAME),
            # Mounted where it is used: the broker's pod says so itself.
            automount_service_account_token=False,
            opts=child,
        )
        role = k8s.rbac.v1.Role(
            f"{name}-spawner-role",
            metadata={**meta(contract.BROKER_NAME), "namespace": args.runner_namespace},
            rules=BROKER_RULES,
            opts=child,
        )
        binding = k8s.rbac.v1.RoleBinding(
            f"{name}-spawner-binding",
            metadata={**meta(contract.BROKER_NAME), "namespace": args.runner_namespace},
            role_ref={"api_group": "rbac.authorization.k8s.io", "kind": "Role",
                      "name": role.metadata.name},
            subjects=[{"kind": "ServiceAccount", "name": account.metadata.name,
                       "namespace": ns}],
            opts=child,
        )
        # The cluster-wide rights: reviewing the base runner pods' projected tokens, and
        # getting a node by name. Named after the broker's namespace, so two stacks sharing a
        # cluster do not collide; the name predates the node right and is kept, as renaming
        # would replace the ClusterRole and its binding.
        reviewer = k8s.rbac.v1.ClusterRole(
            f"{name}-token-review-role",
            metadata={"name": f"{args.namespace}-token-review", "labels": pod_labels},
            rules=BROKER_CLUSTER_RULES,
            opts=child,
        )
        reviewer_binding = k8s.rbac.v1.ClusterRoleBinding(
            f"{name}-token-review-binding",
            metadata={"name": f"{args.namespace}-token-review", "labels": pod_labels},
            role_ref={"api_group": "rbac.authorization.k8s.io", "kind": "ClusterRole",
                      "name": reviewer.metadata.name},
            subjects=[{"kind": "ServiceAccount", "name": account.metadata.name,
                       "namespace": ns}],
            opts=child,
        )
        needed += [role, binding, reviewer, reviewer_binding]

        k8s.networking.v1.NetworkPolicy(
            f"{name}-network-policy",
            metadata={"name": contract.BROKER_NAME, "namespace": ns, "labels": labels},
            spec=broker_network_policy_spec(args),
            opts=child,
        )
        k8s.apps.v1.Deployment(
            f"{name}-deployment",
            metadata={**meta(contract.BROKER_NAME),
                      "annotations": {
                          **scanner_skips(_SKIP_TOKEN),
                          # Destroy waits for the broker's pod to stop, and so for its last
                          # sweep of the base runners' registrations, before removing its
                          # rights and its credential.
                          DELETION_PROPAGATION_ANNOTATION: "foreground"}},
            spec={
                # One broker: spawn and delete are idempotent per run through state kept in the
                # cluster, but the check-then-create that keeps a second request for the same
                # run from making a second pod runs inside one process. Recreate, not a rolling
                # update, so an old and a new broker never run side by side either.
                "replicas": 1,
                "strategy": {"type": "Recreate"},
                "selector": {"match_labels": {contract.LABEL_NAME: contract.BROKER_NAME}},
                "template": {"metadata": {"labels": pod_labels},
                             "spec": broker_pod_spec(args, account.metadata.name,
                                                     pull_secrets)},
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                # Destroy removes the broker before its credential and its rights.
                depends_on=needed,
                custom_timeouts=pulumi.CustomTimeouts(create="10m", update="10m"),
            ),
        )
        service = k8s.core.v1.Service(
            f"{name}-service",
            metadata=meta(contract.BROKER_NAME),
            spec={
                "type": "ClusterIP",
                "selector": {contract.LABEL_NAME: contract.BROKER_NAME},
                "ports": [{"name": "http", "protocol": "TCP", "port": contract.BROKER_PORT,
                           "target_port": "http"}],
            },
            opts=child,
        )

        self.namespace = ns
        self.url = pulumi.Output.all(ns, service.metadata.name).apply(
            lambda parts: broker_url(*parts))
        self.audience = pulumi.Output.from_input(args.audience)
        self.register_outputs({"namespace": self.namespace, "url": self.url,
                               "audience": self.audience})
