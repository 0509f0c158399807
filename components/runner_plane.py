"""`RunnerPlane`: the runner namespace, the base runner's registration PAT, the base runner."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s
from pulumi_kubernetes.core.v1 import (
    EnvVarArgsDict,
    PodSecurityContextArgsDict,
    PodSpecArgsDict,
    SecurityContextArgsDict,
    VolumeArgsDict,
    VolumeMountArgsDict,
)

from gpu_runners import contract

#: Time a base runner pod gets after SIGTERM: the runner deregisters from GitHub (a fresh
#: remove-token and `config.sh remove`), and a client call in flight asks the broker to remove
#: what it created.
BASE_RUNNER_GRACE_SECONDS = 120
PAT_VOLUME = "github-runner-pat"

#: Security-scanner findings that do not apply to runner pods, each with its reason, as
#: checkov reads them from an object's annotations (docs/security.md explains each).
_SKIP_NO_PROBE = ("CKV_K8S_8", "the runner listener serves no endpoint; when it exits the "
                  "container exits and is restarted")
_SKIP_NO_READINESS = ("CKV_K8S_9", "no Service sends traffic to a runner")
_SKIP_UID = ("CKV_K8S_40", "uid 1000 is the runner image's user and the seed guide's; no host "
             "namespace is shared")
_SKIP_WRITABLE_ROOT = ("CKV_K8S_22", "the Actions runner writes its registration and "
                       "diagnostics into its install directory")


def scanner_skips(*skips: tuple[str, str]) -> dict[str, str]:
    """checkov's `checkov.io/skip<N>: <check>=<reason>` annotations for the given checks."""
    return {f"checkov.io/skip{i}": f"{check}={reason}"
            for i, (check, reason) in enumerate(skips, start=1)}


#: The rights over GPU runner pods and their Secrets, in the runner namespace only: exactly what
#: spawning, watching, deleting and reaping per-run GPU runner pods needs, nothing cluster-wide.
#: The broker's Role holds them (components/broker.py); with seed compatibility, also the seed
#: guide's workflow's. No pod that runs workflow code is bound to them.
SPAWNER_RULES: list[k8s.rbac.v1.PolicyRuleArgsDict] = [
    {"api_groups": [""], "resources": ["pods"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"api_groups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"api_groups": [""], "resources": ["secrets"], "verbs": ["create", "get", "delete"]},
    {"api_groups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]},
]


#: The label Kubernetes sets on every namespace to its name: what a NetworkPolicy selects on.
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"
#: Labels of the base runner's pods: the only pods the broker accepts connections from.
BASE_RUNNER_POD_LABELS = {contract.LABEL_NAME: contract.BASE_RUNNER_APP,
                          contract.LABEL_COMPONENT: "runner"}
#: Egress to kube-dns, which name resolution needs whatever else a NetworkPolicy allows.
KUBE_DNS_EGRESS: k8s.networking.v1.NetworkPolicyEgressRuleArgsDict = {
    "to": [{"namespace_selector": {"match_labels": {NAMESPACE_NAME_LABEL: "kube-system"}},
            "pod_selector": {"match_labels": {"k8s-app": "kube-dns"}}}],
    "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}],
}


@dataclass(frozen=True)
class RunnerPlaneArgs:
    """The runner plane's settings; built from the stack config by `__main__.py`."""

    namespace: str
    repository: str  # owner/name
    image: pulumi.Input[str]  # digest-pinned
    #: The base runner's own registration PAT (until it registers as a JIT runner).
    runner_pat: pulumi.Input[str]
    #: Where the broker runs, and how jobs reach and authenticate to it (the client's env).
    broker_namespace: str
    broker_url: str
    broker_audience: str
    gpu_quota: int
    pod_quota: int
    base_runner_replicas: int = 1
    base_runner_cpu: str = "1"
    base_runner_memory: str = "4Gi"
    egress_cidrs: Sequence[str] = ("0.0.0.0/0",)
    #: dockerconfigjson for a private image, or None for a public one.
    image_pull_config: pulumi.Input[str] | None = None
    #: Seed compatibility: the Google identity (a service account email) the seed guide's
    #: workflow runs `kubectl apply` as. It gets a spawner Role in the runner namespace, and the
    #: namespace enforces `baseline` (warning and auditing `restricted`), because the guide's
    #: own pod manifest sets no seccomp profile and drops no capabilities. None keeps
    #: `restricted` and declares no Role at all.
    seed_compatibility_user: pulumi.Input[str] | None = None


def restricted_pod_security(uid: int = contract.RUNNER_UID) -> PodSecurityContextArgsDict:
    """Pod-level settings the `restricted` Pod Security Standard requires, as `uid`."""
    return {
        "run_as_non_root": True,
        "run_as_user": uid,
        "run_as_group": uid,
        "fs_group": uid,
        "seccomp_profile": {"type": "RuntimeDefault"},
    }


def restricted_container_security() -> SecurityContextArgsDict:
    """Container-level settings the `restricted` Pod Security Standard requires."""
    return {
        "allow_privilege_escalation": False,
        "privileged": False,
        "run_as_non_root": True,
        "capabilities": {"drop": ["ALL"]},
        "seccomp_profile": {"type": "RuntimeDefault"},
    }


class RunnerPlane(pulumi.ComponentResource):
    """Everything in the cluster that runs GitHub Actions jobs, in one namespace.

    Creates: the namespace (Pod Security `restricted` enforced); the PAT Secret
    `github-runner-pat` the base runner registers with (and a GHCR pull Secret for a private
    image); ServiceAccounts for the base runner and the GPU pods, neither bound to any Role and
    neither with a mounted token, since both run workflow code; the base runner Deployment
    (label `base-runner`, CPU nodes, PAT mounted as a file, the broker client's settings);
    NetworkPolicies denying all ingress, limiting egress, and letting base runner pods alone
    reach the broker's port; a ResourceQuota capping GPUs and pods. The broker
    (components/broker.py) alone creates, watches and deletes GPU runner pods here.

    Every object goes through the Kubernetes provider the caller passes in `opts.providers`.

    Outputs: `namespace`, `base_runner`.
    """

    namespace: pulumi.Output[str]
    base_runner: pulumi.Output[str]

    def __init__(self, name: str, args: RunnerPlaneArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpu-runners:index:RunnerPlane", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)
        labels = {contract.LABEL_PART_OF: contract.PART_OF}

        seed = args.seed_compatibility_user is not None
        namespace = k8s.core.v1.Namespace(
            f"{name}-namespace",
            metadata={
                "name": args.namespace,
                "annotations": {contract.ANNOTATION_SEED_COMPATIBILITY: "true"} if seed else {},
                "labels": {
                    **labels,
                    contract.PSA_ENFORCE_LABEL: (contract.PSA_SEED_COMPATIBLE_LEVEL if seed
                                                 else contract.PSA_LEVEL),
                    "pod-security.kubernetes.io/enforce-version": "latest",
                    "pod-security.kubernetes.io/warn": contract.PSA_LEVEL,
                    "pod-security.kubernetes.io/audit": contract.PSA_LEVEL,
                },
            },
            opts=child,
        )
        ns = namespace.metadata.name

        def meta(object_name: str, **extra: str) -> k8s.meta.v1.ObjectMetaArgsDict:
            return {"name": object_name, "namespace": ns, "labels": {**labels, **extra}}

        # The Secret's name is fixed (the seed guide's manifests and the runtime read it), so a
        # changed token must delete the old Secret before creating its replacement.
        pat_secret = k8s.core.v1.Secret(
            f"{name}-pat",
            metadata=meta(contract.PAT_SECRET_NAME),
            type="Opaque",
            string_data={contract.PAT_SECRET_KEY: args.runner_pat},
            opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
        )
        secrets_needed: list[pulumi.Resource] = [pat_secret]
        pull_secrets: list[k8s.core.v1.LocalObjectReferenceArgsDict] = []
        if args.image_pull_config is not None:
            pull_secret = k8s.core.v1.Secret(
                f"{name}-pull",
                metadata=meta(contract.IMAGE_PULL_SECRET_NAME),
                type="kubernetes.io/dockerconfigjson",
                string_data={".dockerconfigjson": args.image_pull_config},
                opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
            )
            secrets_needed.append(pull_secret)
            pull_secrets = [{"name": contract.IMAGE_PULL_SECRET_NAME}]

        base_sa = k8s.core.v1.ServiceAccount(
            f"{name}-base-runner-sa",
            metadata=meta(contract.BASE_RUNNER_SERVICE_ACCOUNT),
            # The base runner runs the code of every job that names `base-runner`: its account
            # is bound to nothing and its token is mounted nowhere. Jobs reach the broker with
            # their own OIDC token instead.
            automount_service_account_token=False,
            opts=child,
        )
        # GPU runner pods run users' training code: they get an identity with no RoleBinding
        # and no token, so that code cannot talk to the Kubernetes API at all.
        k8s.core.v1.ServiceAccount(
            f"{name}-gpu-runner-sa",
            metadata=meta(contract.GPU_RUNNER_SERVICE_ACCOUNT),
            automount_service_account_token=False,
            opts=child,
        )
        if args.seed_compatibility_user is not None:
            # The seed guide's documented relaxation: its workflow applies its own GPU pod
            # manifest with `kubectl` as the CI service account, so that identity (a Google
            # user, never a pod's account) gets the spawner rights in this namespace.
            seed_meta: k8s.meta.v1.ObjectMetaArgsDict = {
                **meta("gpu-runner-spawner"),
                "annotations": {
                    contract.ANNOTATION_SEED_COMPATIBILITY: "true",
                    "kubernetes.io/description": "seed compatibility: the seed guide's workflow "
                                                 "creates its GPU runner pods with kubectl",
                },
            }
            role = k8s.rbac.v1.Role(
                f"{name}-spawner-role",
                metadata=seed_meta,
                rules=SPAWNER_RULES,
                opts=child,
            )
            k8s.rbac.v1.RoleBinding(
                f"{name}-seed-binding",
                metadata={**seed_meta, "name": "seed-guide-workflow"},
                role_ref={"api_group": "rbac.authorization.k8s.io", "kind": "Role",
                          "name": role.metadata.name},
                subjects=[{"kind": "User", "name": args.seed_compatibility_user,
                           "api_group": "rbac.authorization.k8s.io"}],
                opts=child,
            )

        k8s.networking.v1.NetworkPolicy(
            f"{name}-network-policy",
            metadata=meta("runner-pods"),
            spec={
                "pod_selector": {},
                "policy_types": ["Ingress", "Egress"],
                # No rule: nothing may connect to a runner pod.
                "ingress": [],
                "egress": [
                    {"to": [{"ip_block": {"cidr": cidr}} for cidr in args.egress_cidrs]},
                    # Name resolution goes to kube-dns, inside the cluster, whatever the CIDRs.
                    KUBE_DNS_EGRESS,
                ],
            },
            opts=child,
        )
        # Policies add up: base runner pods, and only they, may also reach the broker's port,
        # whatever egressCidrs say (the broker accepts nothing else either).
        k8s.networking.v1.NetworkPolicy(
            f"{name}-broker-egress",
            metadata=meta("base-runner-to-broker"),
            spec={
                "pod_selector": {"match_labels": BASE_RUNNER_POD_LABELS},
                "policy_types": ["Egress"],
                "egress": [{
                    "to": [{"namespace_selector": {"match_labels": {
                        NAMESPACE_NAME_LABEL: args.broker_namespace}},
                            "pod_selector": {"match_labels": {
                                contract.LABEL_NAME: contract.BROKER_NAME}}}],
                    "ports": [{"protocol": "TCP", "port": contract.BROKER_PORT}],
                }],
            },
            opts=child,
        )

        k8s.core.v1.ResourceQuota(
            f"{name}-quota",
            metadata=meta("gpu-runners"),
            spec={"hard": {
                f"requests.{contract.GPU_RESOURCE}": str(args.gpu_quota),
                "pods": str(args.pod_quota),
            }},
            opts=child,
        )

        # What the entrypoint registers with (its own PAT) and what the broker client reads; the
        # pod knows nothing of the cluster's GPU pools, images or limits: the broker decides.
        client_env: list[EnvVarArgsDict] = [
            {"name": contract.ENV_RUNNER_MODE, "value": "registration"},
            {"name": contract.ENV_RUNNER_LABELS, "value": contract.BASE_RUNNER_LABEL},
            {"name": contract.ENV_REPOSITORY, "value": args.repository},
            {"name": contract.ENV_PAT_FILE,
             "value": f"{contract.PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}"},
            {"name": contract.ENV_BROKER_URL, "value": args.broker_url},
            {"name": contract.ENV_BROKER_AUDIENCE, "value": args.broker_audience},
        ]
        pat_volume: VolumeArgsDict = {
            "name": PAT_VOLUME,
            # Readable by the runner's group only; the PAT never becomes an env variable.
            "secret": {"secret_name": contract.PAT_SECRET_NAME, "default_mode": 0o440},
        }
        pat_mount: VolumeMountArgsDict = {"name": PAT_VOLUME, "mount_path": contract.PAT_MOUNT_DIR,
                                          "read_only": True}
        pod: PodSpecArgsDict = {
            "termination_grace_period_seconds": BASE_RUNNER_GRACE_SECONDS,
            "service_account_name": base_sa.metadata.name,
            "automount_service_account_token": False,
            "node_selector": {contract.NODE_GPU_LABEL: "false"},
            "security_context": restricted_pod_security(),
            "volumes": [pat_volume],
            "containers": [{
                "name": "runner",
                "image": args.image,
                "image_pull_policy": "IfNotPresent",
                "env": client_env,
                "volume_mounts": [pat_mount],
                "resources": {
                    "requests": {"cpu": args.base_runner_cpu, "memory": args.base_runner_memory},
                    "limits": {"cpu": args.base_runner_cpu, "memory": args.base_runner_memory},
                },
                "security_context": restricted_container_security(),
            }],
        }
        if pull_secrets:
            pod["image_pull_secrets"] = pull_secrets

        base_labels = {**labels, **BASE_RUNNER_POD_LABELS}
        base_runner = k8s.apps.v1.Deployment(
            f"{name}-base-runner",
            metadata={**meta(contract.BASE_RUNNER_APP), "labels": base_labels,
                      "annotations": scanner_skips(_SKIP_NO_PROBE, _SKIP_NO_READINESS,
                                                   _SKIP_UID, _SKIP_WRITABLE_ROOT)},
            spec={
                "replicas": args.base_runner_replicas,
                "selector": {"match_labels": {contract.LABEL_NAME: contract.BASE_RUNNER_APP}},
                # A new pod registers before an old one leaves, so jobs always find a runner.
                "strategy": {"type": "RollingUpdate",
                             "rolling_update": {"max_unavailable": 0, "max_surge": 1}},
                "template": {"metadata": {"labels": base_labels}, "spec": pod},
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                # Destroy removes the base runner before the PAT it deregisters from GitHub with.
                depends_on=secrets_needed,
                custom_timeouts=pulumi.CustomTimeouts(create="10m", update="10m"),
            ),
        )

        self.namespace = ns
        self.base_runner = base_runner.metadata.name
        self.register_outputs({"namespace": self.namespace, "base_runner": self.base_runner})
