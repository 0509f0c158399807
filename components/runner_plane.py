"""`RunnerPlane`: the runner namespace, its credentials and RBAC, the base runner, the reaper."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s
from pulumi_kubernetes.core.v1 import (
    ContainerArgsDict,
    EnvVarArgsDict,
    PodSecurityContextArgsDict,
    PodSpecArgsDict,
    SecurityContextArgsDict,
    VolumeArgsDict,
    VolumeMountArgsDict,
)

from gpu_runners import contract
from gpu_runners.gpu_pools import GpuPool, format_gpu_pools

#: Time a base runner pod gets after SIGTERM: the runner deregisters from GitHub (a fresh
#: remove-token and `config.sh remove`), and a spawn in flight removes what it created.
BASE_RUNNER_GRACE_SECONDS = 120
PAT_VOLUME = "github-runner-pat"

#: Security-scanner findings that do not apply to runner pods, each with its reason, as
#: checkov reads them from an object's annotations (docs/security.md explains each).
_SKIP_NO_PROBE = ("CKV_K8S_8", "the runner listener serves no endpoint; when it exits the "
                  "container exits and is restarted")
_SKIP_NO_READINESS = ("CKV_K8S_9", "no Service sends traffic to a runner")
_SKIP_TOKEN = ("CKV_K8S_38", "it manages GPU runner pods through this token, whose Role is "
               "limited to the runner namespace")
_SKIP_UID = ("CKV_K8S_40", "uid 1000 is the runner image's user and the seed guide's; no host "
             "namespace is shared")
_SKIP_WRITABLE_ROOT = ("CKV_K8S_22", "the Actions runner writes its registration and "
                       "diagnostics into its install directory")


def scanner_skips(*skips: tuple[str, str]) -> dict[str, str]:
    """checkov's `checkov.io/skip<N>: <check>=<reason>` annotations for the given checks."""
    return {f"checkov.io/skip{i}": f"{check}={reason}"
            for i, (check, reason) in enumerate(skips, start=1)}


#: The namespace Role of the base runner: exactly what spawning, watching, deleting and reaping
#: per-run GPU runner pods needs, nothing cluster-wide.
SPAWNER_RULES: list[k8s.rbac.v1.PolicyRuleArgsDict] = [
    {"api_groups": [""], "resources": ["pods"],
     "verbs": ["create", "get", "list", "watch", "delete"]},
    {"api_groups": [""], "resources": ["pods/log"], "verbs": ["get"]},
    {"api_groups": [""], "resources": ["secrets"], "verbs": ["create", "get", "delete"]},
    {"api_groups": [""], "resources": ["events"], "verbs": ["get", "list", "watch"]},
]


@dataclass(frozen=True)
class RunnerPlaneArgs:
    """The runner plane's settings; built from the stack config by `__main__.py`."""

    namespace: str
    repository: str  # owner/name
    image: pulumi.Input[str]  # digest-pinned
    runner_pat: pulumi.Input[str]
    gpu_pools: Sequence[GpuPool]
    gpu_quota: int
    pod_quota: int
    base_runner_replicas: int = 1
    base_runner_cpu: str = "1"
    base_runner_memory: str = "4Gi"
    egress_cidrs: Sequence[str] = ("0.0.0.0/0",)
    reaper_schedule: str = "*/5 * * * *"
    max_runtime_minutes: int = 360
    #: dockerconfigjson for a private image, or None for a public one.
    image_pull_config: pulumi.Input[str] | None = None
    #: Seed compatibility: the Google identity (a service account email) the seed guide's
    #: workflow runs `kubectl apply` as. It is bound to the spawner Role, and the namespace
    #: enforces `baseline` (warning and auditing `restricted`), because the guide's own pod
    #: manifest sets no seccomp profile and drops no capabilities. None keeps `restricted`.
    seed_compatibility_user: pulumi.Input[str] | None = None


def restricted_pod_security() -> PodSecurityContextArgsDict:
    """Pod-level settings the `restricted` Pod Security Standard requires, as uid 1000."""
    return {
        "run_as_non_root": True,
        "run_as_user": contract.RUNNER_UID,
        "run_as_group": contract.RUNNER_UID,
        "fs_group": contract.RUNNER_UID,
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
    `github-runner-pat` (and a GHCR pull Secret for a private image); a ServiceAccount, Role and
    RoleBinding for the base runner with only what spawning GPU runner pods needs; a
    ServiceAccount with no permissions and no token for the GPU pods; the base runner
    Deployment (label `base-runner`, CPU nodes, PAT mounted as a file); a NetworkPolicy denying
    ingress and limiting egress; a ResourceQuota capping GPUs and pods; the reaper CronJob.

    Every object goes through the Kubernetes provider the caller passes in `opts.providers`.

    Outputs: `namespace`, `base_runner`, `reaper`.
    """

    namespace: pulumi.Output[str]
    base_runner: pulumi.Output[str]
    reaper: pulumi.Output[str]

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
            # Its token is mounted only where it is used: the base runner and reaper pods.
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
        role = k8s.rbac.v1.Role(
            f"{name}-spawner-role",
            metadata=meta("gpu-runner-spawner"),
            rules=SPAWNER_RULES,
            opts=child,
        )
        binding = k8s.rbac.v1.RoleBinding(
            f"{name}-spawner-binding",
            metadata=meta("gpu-runner-spawner"),
            role_ref={"api_group": "rbac.authorization.k8s.io", "kind": "Role",
                      "name": role.metadata.name},
            subjects=[{"kind": "ServiceAccount", "name": base_sa.metadata.name,
                       "namespace": ns}],
            opts=child,
        )
        if args.seed_compatibility_user is not None:
            k8s.rbac.v1.RoleBinding(
                f"{name}-seed-binding",
                metadata=meta("seed-guide-workflow"),
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
                    {"to": [{"namespace_selector": {"match_labels": {
                        "kubernetes.io/metadata.name": "kube-system"}},
                             "pod_selector": {"match_labels": {"k8s-app": "kube-dns"}}}],
                     "ports": [{"protocol": "UDP", "port": 53}, {"protocol": "TCP", "port": 53}]},
                ],
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

        runtime_env: list[EnvVarArgsDict] = [
            {"name": contract.ENV_REPOSITORY, "value": args.repository},
            {"name": contract.ENV_NAMESPACE, "value": ns},
            {"name": contract.ENV_IMAGE, "value": args.image},
            {"name": contract.ENV_PAT_FILE,
             "value": f"{contract.PAT_MOUNT_DIR}/{contract.PAT_SECRET_KEY}"},
            {"name": contract.ENV_GPU_POOLS, "value": format_gpu_pools(args.gpu_pools)},
            {"name": contract.ENV_MAX_RUNTIME_MINUTES, "value": str(args.max_runtime_minutes)},
        ]
        if pull_secrets:
            runtime_env.append({"name": contract.ENV_IMAGE_PULL_SECRET,
                                "value": contract.IMAGE_PULL_SECRET_NAME})
        pat_volume: VolumeArgsDict = {
            "name": PAT_VOLUME,
            # Readable by the runner's group only; the PAT never becomes an env variable.
            "secret": {"secret_name": contract.PAT_SECRET_NAME, "default_mode": 0o440},
        }
        pat_mount: VolumeMountArgsDict = {"name": PAT_VOLUME, "mount_path": contract.PAT_MOUNT_DIR,
                                          "read_only": True}

        def runtime_pod(container: ContainerArgsDict, *, restart_policy: str = "Always",
                        termination_grace_period_seconds: int = 30,
                        extra_volumes: Sequence[VolumeArgsDict] = ()) -> PodSpecArgsDict:
            pod: PodSpecArgsDict = {
                "restart_policy": restart_policy,
                "termination_grace_period_seconds": termination_grace_period_seconds,
                "service_account_name": base_sa.metadata.name,
                "automount_service_account_token": True,
                "node_selector": {contract.NODE_GPU_LABEL: "false"},
                "security_context": restricted_pod_security(),
                "volumes": [pat_volume, *extra_volumes],
                "containers": [container],
            }
            if pull_secrets:
                pod["image_pull_secrets"] = pull_secrets
            return pod

        base_labels = {**labels, contract.LABEL_NAME: contract.BASE_RUNNER_APP,
                       contract.LABEL_COMPONENT: "runner"}
        base_runner = k8s.apps.v1.Deployment(
            f"{name}-base-runner",
            metadata={**meta(contract.BASE_RUNNER_APP), "labels": base_labels,
                      "annotations": scanner_skips(_SKIP_NO_PROBE, _SKIP_NO_READINESS,
                                                   _SKIP_TOKEN, _SKIP_UID, _SKIP_WRITABLE_ROOT)},
            spec={
                "replicas": args.base_runner_replicas,
                "selector": {"match_labels": {contract.LABEL_NAME: contract.BASE_RUNNER_APP}},
                # A new pod registers before an old one leaves, so jobs always find a runner.
                "strategy": {"type": "RollingUpdate",
                             "rolling_update": {"max_unavailable": 0, "max_surge": 1}},
                "template": {
                    "metadata": {"labels": base_labels},
                    "spec": runtime_pod(
                        {
                            "name": "runner",
                            "image": args.image,
                            "image_pull_policy": "IfNotPresent",
                            "env": [
                                {"name": contract.ENV_RUNNER_MODE, "value": "registration"},
                                {"name": contract.ENV_RUNNER_LABELS,
                                 "value": contract.BASE_RUNNER_LABEL},
                                *runtime_env,
                            ],
                            "volume_mounts": [pat_mount],
                            "resources": {
                                "requests": {"cpu": args.base_runner_cpu,
                                             "memory": args.base_runner_memory},
                                "limits": {"cpu": args.base_runner_cpu,
                                           "memory": args.base_runner_memory},
                            },
                            "security_context": restricted_container_security(),
                        },
                        termination_grace_period_seconds=BASE_RUNNER_GRACE_SECONDS,
                    ),
                },
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                # Destroy removes the base runner before what it needs to deregister from
                # GitHub (the PAT) and to clean up (its RBAC).
                depends_on=[*secrets_needed, binding],
                custom_timeouts=pulumi.CustomTimeouts(create="10m", update="10m"),
            ),
        )

        reaper_labels = {**labels, contract.LABEL_NAME: "gpu-runner-reaper",
                         contract.LABEL_COMPONENT: "reaper"}
        reaper = k8s.batch.v1.CronJob(
            f"{name}-reaper",
            metadata={**meta("gpu-runner-reaper"), "labels": reaper_labels,
                      "annotations": scanner_skips(_SKIP_TOKEN, _SKIP_UID)},
            spec={
                "schedule": args.reaper_schedule,
                # One reaper at a time: two would race to delete the same leftovers.
                "concurrency_policy": "Forbid",
                "starting_deadline_seconds": 300,
                "successful_jobs_history_limit": 1,
                "failed_jobs_history_limit": 3,
                "job_template": {"spec": {
                    "backoff_limit": 1,
                    "active_deadline_seconds": 600,
                    "ttl_seconds_after_finished": 3600,
                    "template": {
                        "metadata": {"labels": reaper_labels},
                        "spec": runtime_pod(
                            {
                                "name": "reaper",
                                "image": args.image,
                                "image_pull_policy": "IfNotPresent",
                                "command": ["python3", "-m", "gpu_runners", "reap"],
                                "env": [*runtime_env,
                                        {"name": "PYTHONDONTWRITEBYTECODE", "value": "1"}],
                                "volume_mounts": [pat_mount,
                                                  {"name": "tmp", "mount_path": "/tmp"}],
                                "resources": {
                                    "requests": {"cpu": "100m", "memory": "128Mi"},
                                    "limits": {"cpu": "500m", "memory": "256Mi"},
                                },
                                # The reaper only calls APIs: nothing of the image is written.
                                "security_context": {**restricted_container_security(),
                                                     "read_only_root_filesystem": True},
                            },
                            restart_policy="Never",
                            extra_volumes=[{"name": "tmp", "empty_dir": {"size_limit": "64Mi"}}],
                        ),
                    },
                }},
            },
            opts=pulumi.ResourceOptions(parent=self, depends_on=[*secrets_needed, binding]),
        )

        self.namespace = ns
        self.base_runner = base_runner.metadata.name
        self.reaper = reaper.metadata.name
        self.register_outputs({"namespace": self.namespace, "base_runner": self.base_runner,
                               "reaper": self.reaper})
