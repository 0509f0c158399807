"""`RunnerPlane`: the runner namespace and its single-use base runners, which hold no credential."""

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

from components.container_image import image_pull_secret
from gpu_runners import contract

#: Time a base runner pod gets after SIGTERM: the runner cancels its job, and a client call in
#: flight asks the broker to remove what it created. (The broker removes the registration.)
BASE_RUNNER_GRACE_SECONDS = 120
#: The base runner's projected token for the broker (never one for the API server).
BROKER_IDENTITY_VOLUME = "broker-identity"
#: Work directories on emptyDir: new and empty with every pod, so with every job; bounded.
WORK_VOLUMES: tuple[tuple[str, str, str], ...] = (
    ("work", "/home/runner/_work", "20Gi"),
    ("tmp", "/tmp", "2Gi"),  # noqa: S108 - an emptyDir of its own mounted at /tmp
)
#: Pulumi deletes the Deployment with foreground propagation: `destroy` waits until its pods
#: are gone, so the broker (removed after it) is still there to remove their registrations.
DELETION_PROPAGATION_ANNOTATION = "pulumi.com/deletionPropagationPolicy"

#: Security-scanner findings that do not apply to runner pods, each with its reason, as
#: checkov reads them from an object's annotations (docs/security.md explains each).
_SKIP_NO_PROBE = ("CKV_K8S_8", "the runner listener serves no endpoint; when it exits the "
                  "broker replaces the pod")
_SKIP_NO_READINESS = ("CKV_K8S_9", "no Service sends traffic to a runner")
_SKIP_UID = ("CKV_K8S_40", "uid 1000 is the runner image's user and the seed guide's; no host "
             "namespace is shared")
_SKIP_WRITABLE_ROOT = ("CKV_K8S_22", "the Actions runner writes its registration and "
                       "diagnostics into its install directory; each pod runs one job and is "
                       "replaced, so that layer is new for every job")


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
#: Labels of the base runner's pods: the only pods the broker accepts connections from, and
#: the only ones it gives a runner config.
BASE_RUNNER_POD_LABELS = {contract.LABEL_NAME: contract.BASE_RUNNER_APP,
                          contract.LABEL_COMPONENT: contract.BASE_RUNNER_COMPONENT}
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
    #: The runner PAT: only a seed-compatible stack keeps it in the runner namespace (the seed
    #: guide's GPU pod manifest reads Secret `github-runner-pat`); base runners get none.
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

    Creates: the namespace (Pod Security `restricted` enforced); a GHCR pull Secret for a
    private image; ServiceAccounts for the base runner and the GPU pods, neither bound to any
    Role and neither with an API-server token, since both run workflow code; NetworkPolicies
    denying all ingress, limiting egress, and letting base runner pods alone reach the broker's
    port; a ResourceQuota capping GPUs and pods. The broker (components/broker.py) alone
    creates, watches and deletes GPU runner pods here.

    `add_base_runners` then declares the base runner Deployment, once the broker exists: its
    single-use pods (label `base-runner`, CPU nodes) hold no GitHub credential, only a
    projected token for the broker, which gives each pod one JIT runner config and replaces
    the pod after its job. With seed compatibility the PAT Secret `github-runner-pat` stays
    for the seed guide's own manifests; nothing of this stack mounts it.

    Every object goes through the Kubernetes provider the caller passes in `opts.providers`.

    Outputs: `namespace`, `base_runner` (after `add_base_runners`).
    """

    namespace: pulumi.Output[str]
    base_runner: pulumi.Output[str]

    def __init__(self, name: str, args: RunnerPlaneArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpu-runners:index:RunnerPlane", name, None, opts)
        self._name = name
        self._args = args
        child = pulumi.ResourceOptions(parent=self)
        labels = {contract.LABEL_PART_OF: contract.PART_OF}
        self._labels = labels

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

        secrets_needed: list[pulumi.Resource] = []
        if seed:
            # Seed compatibility only: the seed guide's GPU pod manifest reads this Secret (its
            # name is fixed, so a changed token deletes the old Secret before creating the new).
            # No pod of this stack mounts it.
            k8s.core.v1.Secret(
                f"{name}-pat",
                metadata=meta(contract.PAT_SECRET_NAME),
                type="Opaque",
                string_data={contract.PAT_SECRET_KEY: args.runner_pat},
                opts=pulumi.ResourceOptions(parent=self, delete_before_replace=True),
            )
        pull_secrets: list[k8s.core.v1.LocalObjectReferenceArgsDict] = []
        if args.image_pull_config is not None:
            pull_secret = image_pull_secret(f"{name}-pull", meta(contract.IMAGE_PULL_SECRET_NAME),
                                            args.image_pull_config, self)
            secrets_needed.append(pull_secret)
            pull_secrets = [{"name": contract.IMAGE_PULL_SECRET_NAME}]

        base_sa = k8s.core.v1.ServiceAccount(
            f"{name}-base-runner-sa",
            metadata=meta(contract.BASE_RUNNER_SERVICE_ACCOUNT),
            # The base runner runs the code of every job that names `base-runner`: its account
            # is bound to nothing and no API-server token of it is mounted. The pod's projected
            # token is for the broker's base-runner audience only; jobs reach the broker with
            # their own OIDC token.
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

        self._namespace = namespace
        self._service_account = base_sa
        self._pull_secrets = pull_secrets
        self._secrets_needed = secrets_needed
        self.namespace = ns
        self.register_outputs({"namespace": self.namespace})

    def add_base_runners(self, broker: pulumi.Resource) -> k8s.apps.v1.Deployment:
        """Declares the base runner Deployment, depending on the broker.

        Pulumi deletes a resource before those it depends on: `destroy` removes the base
        runners (and waits for their pods, see DELETION_PROPAGATION_ANNOTATION) while the
        broker still runs, and the broker's last sweep removes their registrations. A
        registration a broker could not remove (it was gone first) is never connected again,
        and GitHub removes such a JIT registration by itself (within a day).

        Args:
            broker: The broker component (or its Deployment).

        Returns:
            The Deployment.
        """
        args, name = self._args, self._name
        ns = self._namespace.metadata.name
        # The entrypoint's broker mode and the job client's settings; the pod knows nothing of
        # the cluster's GPU pools, images or limits (the broker decides), and holds no
        # credential: only the token that proves the pod to the broker.
        client_env: list[EnvVarArgsDict] = [
            {"name": contract.ENV_RUNNER_MODE, "value": "broker"},
            {"name": contract.ENV_BROKER_URL, "value": args.broker_url},
            {"name": contract.ENV_BROKER_AUDIENCE, "value": args.broker_audience},
            {"name": contract.ENV_BROKER_TOKEN_FILE,
             "value": f"{contract.BASE_RUNNER_TOKEN_DIR}/{contract.BASE_RUNNER_TOKEN_FILE}"},
        ]
        token_volume: VolumeArgsDict = {
            "name": BROKER_IDENTITY_VOLUME,
            "projected": {"sources": [{"service_account_token": {
                # Not the API server's audience: the token is good for one broker call only.
                "audience": contract.base_runner_audience(args.broker_audience),
                "expiration_seconds": contract.BASE_RUNNER_TOKEN_SECONDS,
                "path": contract.BASE_RUNNER_TOKEN_FILE,
            }}]},
        }
        volumes: list[VolumeArgsDict] = [token_volume] + [
            {"name": volume, "empty_dir": {"size_limit": limit}}
            for volume, _, limit in WORK_VOLUMES]
        mounts: list[VolumeMountArgsDict] = [
            {"name": BROKER_IDENTITY_VOLUME, "mount_path": contract.BASE_RUNNER_TOKEN_DIR,
             "read_only": True}]
        mounts += [{"name": volume, "mount_path": path} for volume, path, _ in WORK_VOLUMES]
        pod: PodSpecArgsDict = {
            "termination_grace_period_seconds": BASE_RUNNER_GRACE_SECONDS,
            "service_account_name": self._service_account.metadata.name,
            "automount_service_account_token": False,
            "node_selector": {contract.NODE_GPU_LABEL: "false"},
            "security_context": restricted_pod_security(),
            "volumes": volumes,
            "containers": [{
                "name": contract.BASE_RUNNER_CONTAINER,
                "image": args.image,
                "image_pull_policy": "IfNotPresent",
                "env": client_env,
                "volume_mounts": mounts,
                "resources": {
                    "requests": {"cpu": args.base_runner_cpu, "memory": args.base_runner_memory},
                    "limits": {"cpu": args.base_runner_cpu, "memory": args.base_runner_memory},
                },
                "security_context": restricted_container_security(),
            }],
        }
        if self._pull_secrets:
            pod["image_pull_secrets"] = self._pull_secrets

        labels = self._labels
        base_labels = {**labels, **BASE_RUNNER_POD_LABELS}
        base_runner = k8s.apps.v1.Deployment(
            f"{name}-base-runner",
            metadata={"name": contract.BASE_RUNNER_APP, "namespace": ns, "labels": base_labels,
                      "annotations": {
                          **scanner_skips(_SKIP_NO_PROBE, _SKIP_NO_READINESS, _SKIP_UID,
                                          _SKIP_WRITABLE_ROOT),
                          DELETION_PROPAGATION_ANNOTATION: "foreground"}},
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
                # Destroy removes the base runners before the broker that removes their
                # registrations (and before the pull Secret their pods need).
                depends_on=[*self._secrets_needed, broker],
                custom_timeouts=pulumi.CustomTimeouts(create="10m", update="10m",
                                                      delete="10m"),
            ),
        )
        self.base_runner = base_runner.metadata.name
        self.register_outputs({"namespace": self.namespace, "base_runner": self.base_runner})
        return base_runner
