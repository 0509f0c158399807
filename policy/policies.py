"""The security invariants of the GPU runner stack, as Pulumi policies.

Each policy is a plain function over what the Pulumi engine sends a policy pack: the resource's
type token, its inputs under their wire (camelCase) names, its URN and its resource options.
`POLICIES` wraps them for `PolicyPack` (built in `__main__.py`, because constructing a
`PolicyPack` starts the analyzer's gRPC server and never returns); tests call the functions, or
`policy.validate(...)`, directly.

What the engine sends is narrower than the program: numbers arrive as floats, values a preview
cannot know yet raise `UnknownValueError` when read (the pack then reports that the policy could
not run during preview, and it runs again at `pulumi up`), and secret values arrive as plain
values with nothing marking them secret (see `validate_actions_secret_from_secret`).
"""

from __future__ import annotations

import re
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

from pulumi_policy import (
    EnforcementLevel,
    PolicyConfigSchema,
    PolicyResource,
    ReportViolation,
    ResourceValidationArgs,
    ResourceValidationPolicy,
    StackValidationArgs,
    StackValidationPolicy,
)
from pulumi_policy.proxy import UnknownValueError

from gpu_runners import contract

# Type tokens of the resources the policies look at (pulumi-gcp 10, pulumi-kubernetes 4,
# pulumi-github 6).
GKE_CLUSTER = "gcp:container/cluster:Cluster"
GKE_NODE_POOL = "gcp:container/nodePool:NodePool"
SERVICE_ACCOUNT_KEY = "gcp:serviceaccount/key:Key"
K8S_NAMESPACE = "kubernetes:core/v1:Namespace"
ROLE = "kubernetes:rbac.authorization.k8s.io/v1:Role"
ROLE_BINDING = "kubernetes:rbac.authorization.k8s.io/v1:RoleBinding"
CLUSTER_ROLE_BINDING = "kubernetes:rbac.authorization.k8s.io/v1:ClusterRoleBinding"
ACTIONS_SECRET = "github:index/actionsSecret:ActionsSecret"
BRANCH_PROTECTION = "github:index/branchProtection:BranchProtection"

#: Where each workload kind keeps its pod spec, as a path of wire property names.
POD_SPEC_PATHS: Mapping[str, tuple[str, ...]] = {
    "kubernetes:core/v1:Pod": ("spec",),
    "kubernetes:apps/v1:Deployment": ("spec", "template", "spec"),
    "kubernetes:apps/v1:StatefulSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:DaemonSet": ("spec", "template", "spec"),
    "kubernetes:apps/v1:ReplicaSet": ("spec", "template", "spec"),
    "kubernetes:batch/v1:Job": ("spec", "template", "spec"),
    "kubernetes:batch/v1:CronJob": ("spec", "jobTemplate", "spec", "template", "spec"),
}
CONTAINER_LISTS = ("initContainers", "containers", "ephemeralContainers")

#: Policy config key of `production-deletion-protection`, and its default.
PRODUCTION_STACKS_KEY = "productionStacks"
DEFAULT_PRODUCTION_STACKS = ("prod", "production")

_DIGEST_PINNED = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
# The restricted Pod Security Standard: the only capability a container may add, and the
# seccomp profiles it accepts.
_ADDABLE_CAPABILITIES = frozenset({"NET_BIND_SERVICE"})
_RESTRICTED_SECCOMP = frozenset({"RuntimeDefault", "Localhost"})
#: ServiceAccounts of the pods that run workflow code: the base runner runs every job that
#: names `base-runner`, a GPU runner its run's training job. Neither may hold any right.
WORKFLOW_SERVICE_ACCOUNTS = frozenset({contract.BASE_RUNNER_SERVICE_ACCOUNT,
                                       contract.GPU_RUNNER_SERVICE_ACCOUNT})
#: Groups that take in every ServiceAccount (of the cluster, or with the prefix, of a
#: namespace), and so the workflow pods' accounts too.
_EVERY_ACCOUNT_GROUPS = frozenset({"system:serviceaccounts", "system:authenticated",
                                   "system:unauthenticated"})
_NAMESPACE_ACCOUNTS_GROUP = "system:serviceaccounts:"


# --- reading wire-format properties ------------------------------------------------------------


def _mapping(value: Any) -> Mapping[str, Any]:
    # The analyzer wraps dicts and lists in read-only proxies that are Mapping/Sequence but not
    # dict/list, so the checks test the abstract types.
    return value if isinstance(value, Mapping) else {}


def _sequence(value: Any) -> Sequence[Any]:
    return value if isinstance(value, Sequence) and not isinstance(value, str) else ()


def _path(props: Mapping[str, Any], *keys: str) -> Any:
    value: Any = props
    for key in keys:
        value = _mapping(value).get(key)
    return value


def _count(value: Any) -> int | None:
    # Numbers cross the gRPC boundary as floats (0.0); booleans are not counts.
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return int(value)


def _known(props: Mapping[str, Any], key: str) -> Any:
    """`props[key]`, or None when absent or not known until `pulumi up`."""
    # A secret computed from another resource (a service-account key) is unknown at preview;
    # reading it would abort the whole policy, and only one check needs the value itself.
    if key not in list(props):  # iterating keys reads no value, so raises nothing
        return None
    try:
        return props[key]
    except UnknownValueError:
        return None


def _is_set(props: Mapping[str, Any], key: str) -> bool:
    """Whether `key` has a value, known or still to be computed."""
    if key not in list(props):
        return False
    try:
        return props[key] is not None
    except UnknownValueError:
        return True


def _kind(resource_type: str) -> str:
    return resource_type.rsplit(":", 1)[-1]


def _describe(resource_type: str, name: str) -> str:
    return f"{_kind(resource_type)} '{name}'"


def stack_of(urn: str) -> str:
    """The stack name in a resource URN.

    Args:
        urn: A URN of the form `urn:pulumi:<stack>::<project>::<type>::<name>`.

    Returns:
        The `<stack>` part.
    """
    return urn.split("::", 1)[0].removeprefix("urn:pulumi:")


# --- GKE -----------------------------------------------------------------------------------------


def _is_gpu_pool(props: Mapping[str, Any]) -> bool:
    return bool(_sequence(_path(props, "nodeConfig", "guestAccelerators")))


def _is_warm_pool(props: Mapping[str, Any]) -> bool:
    labels = _mapping(_path(props, "nodeConfig", "labels"))
    return labels.get(contract.NODE_WARM_POOL_LABEL) == "true"


def _minimum_nodes(props: Mapping[str, Any]) -> tuple[int, str]:
    """The fewest GPU nodes a pool keeps running, and the setting that says so."""
    autoscaling = props.get("autoscaling")
    if isinstance(autoscaling, Mapping):
        # Totals and per-zone limits cannot be mixed; an unset minimum is 0.
        keys, prefix, suffix = ("totalMinNodeCount", "minNodeCount"), "autoscaling.", ""
        source: Mapping[str, Any] = autoscaling
    else:
        # Without autoscaling the pool stays at its fixed size.
        keys, prefix, suffix = ("nodeCount", "initialNodeCount"), "", " without autoscaling"
        source = props
    for key in keys:
        minimum = _count(source.get(key))
        if minimum is not None and minimum > 0:
            return minimum, f"{prefix}{key} = {minimum}{suffix}"
    return 0, ""


def validate_gpu_pool_scales_to_zero(args: ResourceValidationArgs,
                                     report_violation: ReportViolation) -> None:
    """A GPU node pool autoscales down to 0 nodes, unless it is labelled as a warm pool.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    if args.resource_type != GKE_NODE_POOL or not _is_gpu_pool(args.props):
        return
    if _is_warm_pool(args.props):
        return  # deliberate: reported by the advisory gpu-node-pool-warm policy
    minimum, source = _minimum_nodes(args.props)
    if minimum > 0:
        report_violation(
            f"GPU node pool '{args.name}' keeps {minimum} GPU node(s) running when no job needs "
            f"them ({source}): autoscale it with autoscaling.totalMinNodeCount = 0, "
            f"or, if warm nodes are intended, label the pool "
            f"{contract.NODE_WARM_POOL_LABEL}=\"true\" (config gpuPools[].minNodes > 0).",
            None,
        )


def validate_gpu_pool_warm(args: ResourceValidationArgs,
                           report_violation: ReportViolation) -> None:
    """Report GPU node pools deliberately kept warm, so their idle cost stays visible.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    if args.resource_type != GKE_NODE_POOL or not _is_gpu_pool(args.props):
        return
    if not _is_warm_pool(args.props):
        return
    minimum, source = _minimum_nodes(args.props)
    if minimum > 0:
        report_violation(
            f"GPU node pool '{args.name}' is a warm pool ({source}): {minimum} GPU "
            f"node(s) are billed while idle. Set gpuPools[].minNodes to 0 to scale to zero.",
            None,
        )


def validate_gke_workload_identity(args: ResourceValidationArgs,
                                   report_violation: ReportViolation) -> None:
    """A GKE cluster has workload identity on (`workloadIdentityConfig.workloadPool`).

    Without it, pods reach the node's service account through the metadata server.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    if args.resource_type != GKE_CLUSTER:
        return
    pool = _path(args.props, "workloadIdentityConfig", "workloadPool")
    if not isinstance(pool, str) or not pool.endswith(".svc.id.goog"):
        report_violation(
            f"GKE cluster '{args.name}' does not enable workload identity "
            f"(workloadIdentityConfig.workloadPool = {pool!r}): set it to "
            f"'<project>.svc.id.goog', so pods cannot use the node's service account.",
            None,
        )


def validate_gke_network_policy(args: ResourceValidationArgs,
                                report_violation: ReportViolation) -> None:
    """A GKE cluster enforces NetworkPolicy objects (Dataplane V2 or Calico).

    The runner namespace's NetworkPolicy is what keeps other pods from reaching runner pods;
    GKE silently ignores NetworkPolicies without an enforcing dataplane.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    if args.resource_type != GKE_CLUSTER:
        return
    datapath = args.props.get("datapathProvider")
    calico = _path(args.props, "networkPolicy", "enabled") is True
    if datapath != "ADVANCED_DATAPATH" and not calico:
        report_violation(
            f"GKE cluster '{args.name}' does not enforce NetworkPolicies (datapathProvider = "
            f"{datapath!r}, networkPolicy.enabled not true): set datapathProvider to "
            f"'ADVANCED_DATAPATH' (Dataplane V2), or the runner namespace's NetworkPolicy is "
            f"ignored.",
            None,
        )


def production_stacks(config: Mapping[str, Any]) -> tuple[str, ...] | str:
    """The stacks marked production in the policy's config.

    Args:
        config: The policy's config (`productionStacks`: a list of stack names).

    Returns:
        The stack names, or an error message naming the key when the value is malformed.
    """
    value = config.get(PRODUCTION_STACKS_KEY, DEFAULT_PRODUCTION_STACKS)
    names = _sequence(value)
    if (not isinstance(value, Sequence) or isinstance(value, str)
            or not all(isinstance(name, str) and name for name in names)):
        return (f"policy config {PRODUCTION_STACKS_KEY} = {value!r} is invalid: a list of "
                f"stack names is allowed, e.g. {list(DEFAULT_PRODUCTION_STACKS)}")
    return tuple(names)


def validate_production_deletion_protection(args: ResourceValidationArgs,
                                            report_violation: ReportViolation) -> None:
    """In a stack marked production, the GKE cluster has `deletionProtection: true`.

    Args:
        args: The resource being checked; its URN carries the stack name.
        report_violation: Called with one message per problem found.
    """
    if args.resource_type != GKE_CLUSTER:
        return
    stacks = production_stacks(args.get_config())
    if isinstance(stacks, str):
        report_violation(stacks, None)
        return
    stack = stack_of(args.urn)
    if stack in stacks and args.props.get("deletionProtection") is not True:
        report_violation(
            f"GKE cluster '{args.name}' in production stack '{stack}' has deletionProtection = "
            f"{args.props.get('deletionProtection')!r}: set config deletionProtection to true "
            f"({PRODUCTION_STACKS_KEY} = {list(stacks)}).",
            None,
        )


# --- Kubernetes ----------------------------------------------------------------------------------


def validate_namespace_restricted(args: ResourceValidationArgs,
                                  report_violation: ReportViolation) -> None:
    """Every namespace the stack declares enforces the `restricted` Pod Security level.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    if args.resource_type != K8S_NAMESPACE:
        return
    labels = _mapping(_path(args.props, "metadata", "labels"))
    level = labels.get(contract.PSA_ENFORCE_LABEL)
    annotations = _mapping(_path(args.props, "metadata", "annotations"))
    # A seed-compatible stack runs the seed guide's own GPU pod manifest, which meets only
    # `baseline`; it must say so, and still warn and audit against `restricted`.
    seed_compatible = (annotations.get(contract.ANNOTATION_SEED_COMPATIBILITY) == "true"
                       and level == contract.PSA_SEED_COMPATIBLE_LEVEL
                       and labels.get("pod-security.kubernetes.io/warn") == contract.PSA_LEVEL)
    if level != contract.PSA_LEVEL and not seed_compatible:
        namespace = _path(args.props, "metadata", "name") or args.name
        report_violation(
            f"Namespace '{namespace}' does not enforce the {contract.PSA_LEVEL} Pod Security "
            f"level (label {contract.PSA_ENFORCE_LABEL} = {level!r}): set it to "
            f"'{contract.PSA_LEVEL}' so the API server rejects privileged or root pods.",
            None,
        )


def _containers(pod_spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for list_key in CONTAINER_LISTS:
        for container in _sequence(pod_spec.get(list_key)):
            container = _mapping(container)
            yield f"{list_key} '{container.get('name')}'", container


def _pod_spec(args: ResourceValidationArgs) -> Mapping[str, Any] | None:
    path = POD_SPEC_PATHS.get(args.resource_type)
    return None if path is None else _mapping(_path(args.props, *path))


def validate_no_privileged_or_root_containers(args: ResourceValidationArgs,
                                              report_violation: ReportViolation) -> None:
    """No container is privileged, may escalate privileges, or may run as root.

    Checks every container and initContainer of Pods and of pod templates (Deployment,
    CronJob, Job, StatefulSet, DaemonSet, ReplicaSet): `privileged` not true,
    `allowPrivilegeEscalation: false`, `runAsNonRoot: true` and `runAsUser` not 0 (container
    level, or inherited from the pod's securityContext), and no host namespaces.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    pod_spec = _pod_spec(args)
    if pod_spec is None:
        return
    resource = _describe(args.resource_type, args.name)
    pod_context = _mapping(pod_spec.get("securityContext"))
    for host_field in ("hostNetwork", "hostPID", "hostIPC"):
        if pod_spec.get(host_field) is True:
            report_violation(f"{resource} shares the node's namespaces ({host_field}: true).",
                             None)
    for where, container in _containers(pod_spec):
        context = _mapping(container.get("securityContext"))
        if context.get("privileged") is True:
            report_violation(f"{resource}: {where} is privileged "
                             f"(securityContext.privileged: true).", None)
        if context.get("allowPrivilegeEscalation") is not False:
            report_violation(f"{resource}: {where} may escalate privileges: set "
                             f"securityContext.allowPrivilegeEscalation: false.", None)
        non_root = context.get("runAsNonRoot", pod_context.get("runAsNonRoot"))
        if non_root is not True:
            report_violation(f"{resource}: {where} may run as root: set runAsNonRoot: true "
                             f"(container or pod securityContext).", None)
        user = _count(context.get("runAsUser", pod_context.get("runAsUser")))
        if user == 0:
            report_violation(f"{resource}: {where} runs as root (runAsUser: 0); use uid "
                             f"{contract.RUNNER_UID}.", None)


def validate_restricted_pod_security(args: ResourceValidationArgs,
                                     report_violation: ReportViolation) -> None:
    """Pod templates meet the rest of the `restricted` Pod Security Standard.

    The runner namespace would reject such pods at admission, which `pulumi up` only notices
    when a Deployment times out; this reports it at preview: every container drops ALL
    capabilities and adds none but NET_BIND_SERVICE, a RuntimeDefault or Localhost seccomp
    profile applies (container or pod level), and no volume is a hostPath.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    pod_spec = _pod_spec(args)
    if pod_spec is None:
        return
    resource = _describe(args.resource_type, args.name)
    pod_seccomp = _path(pod_spec, "securityContext", "seccompProfile", "type")
    for volume in _sequence(pod_spec.get("volumes")):
        volume = _mapping(volume)
        if "hostPath" in volume:
            report_violation(f"{resource}: volume '{volume.get('name')}' is a hostPath; use "
                             f"an emptyDir, Secret or persistent volume.", None)
    for where, container in _containers(pod_spec):
        context = _mapping(container.get("securityContext"))
        capabilities = _mapping(context.get("capabilities"))
        if "ALL" not in _sequence(capabilities.get("drop")):
            report_violation(f"{resource}: {where} does not drop all capabilities: set "
                             f"securityContext.capabilities.drop: [ALL].", None)
        added = sorted(set(_sequence(capabilities.get("add"))) - _ADDABLE_CAPABILITIES)
        if added:
            report_violation(f"{resource}: {where} adds capabilities {added}; only "
                             f"NET_BIND_SERVICE is allowed.", None)
        seccomp = _path(context, "seccompProfile", "type") or pod_seccomp
        if seccomp not in _RESTRICTED_SECCOMP:
            report_violation(f"{resource}: {where} has seccomp profile {seccomp!r}: set "
                             f"seccompProfile.type: RuntimeDefault (container or pod "
                             f"securityContext).", None)


def validate_images_pinned_by_digest(args: ResourceValidationArgs,
                                     report_violation: ReportViolation) -> None:
    """Every container image is pinned by digest (`<name>@sha256:<64 hex digits>`).

    A tag can be moved to other content after review; a digest cannot.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    pod_spec = _pod_spec(args)
    if pod_spec is None:
        return
    resource = _describe(args.resource_type, args.name)
    for where, container in _containers(pod_spec):
        image = container.get("image")
        if not isinstance(image, str) or not _DIGEST_PINNED.match(image):
            report_violation(f"{resource}: {where} image {image!r} is not pinned by digest: "
                             f"use <name>@sha256:<64 hex digits>.", None)


def validate_no_rights_for_workflow_pods(args: ResourceValidationArgs,
                                        report_violation: ReportViolation) -> None:
    """No RoleBinding or ClusterRoleBinding grants anything to a pod that runs workflow code.

    Job code runs in the base runner and in GPU runner pods; a right given to their
    ServiceAccounts (or to a group that takes them in) is a right every workflow has. Only the
    broker, which runs no workflow code, may act on runner pods and their Secrets.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    if args.resource_type not in (ROLE_BINDING, CLUSTER_ROLE_BINDING):
        return
    binding = _describe(args.resource_type, args.name)
    for subject in _sequence(args.props.get("subjects")):
        subject = _mapping(subject)
        kind, name = subject.get("kind"), subject.get("name")
        if kind == "ServiceAccount" and name in WORKFLOW_SERVICE_ACCOUNTS:
            report_violation(f"{binding} grants rights to ServiceAccount '{name}', whose pods run "
                             f"workflow code: only the broker may act on runner pods.", None)
        elif kind == "Group" and isinstance(name, str) and (
                name in _EVERY_ACCOUNT_GROUPS or name.startswith(_NAMESPACE_ACCOUNTS_GROUP)):
            report_violation(f"{binding} grants rights to group '{name}', which takes in the "
                             f"ServiceAccounts of pods that run workflow code; bind named "
                             f"accounts instead.", None)


def validate_workflow_pods_mount_no_token(args: ResourceValidationArgs,
                                         report_violation: ReportViolation) -> None:
    """Pods that run workflow code mount no ServiceAccount token.

    A pod of the base runner's or a GPU runner's account sets
    `automountServiceAccountToken: false`: job code then has no credential for the Kubernetes
    API at all, whatever RBAC says.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    pod_spec = _pod_spec(args)
    if pod_spec is None:
        return
    account = pod_spec.get("serviceAccountName")
    if account in WORKFLOW_SERVICE_ACCOUNTS and pod_spec.get(
            "automountServiceAccountToken") is not False:
        report_violation(f"{_describe(args.resource_type, args.name)} runs workflow code as "
                         f"'{account}' and may mount its token: set "
                         f"automountServiceAccountToken: false in the pod spec.", None)


def broker_namespaces(resources: Sequence[PolicyResource]) -> set[str]:
    """Names of the namespaces the stack declares for the broker (labelled as its component).

    Args:
        resources: Every resource of the stack.

    Returns:
        The namespace names; empty when the stack declares no broker.
    """
    names = set()
    for r in resources:
        if r.resource_type == K8S_NAMESPACE:
            labels = _mapping(_path(r.props, "metadata", "labels"))
            if labels.get(contract.LABEL_COMPONENT) == contract.BROKER_COMPONENT:
                names.add(_path(r.props, "metadata", "name"))
    return names


def validate_broker_namespace_grants_nothing(args: StackValidationArgs,
                                             report_violation: ReportViolation) -> None:
    """No Role or RoleBinding lives in the broker's namespace.

    The namespace holds the GitHub credential; the broker reads it from its mounted file, so no
    one (the broker included) needs a right there, and any Role would be a way to its Secrets.

    Args:
        args: Every resource of the stack.
        report_violation: Called with one message per problem found.
    """
    namespaces = broker_namespaces(args.resources)
    for r in args.resources:
        if r.resource_type in (ROLE, ROLE_BINDING) and _path(
                r.props, "metadata", "namespace") in namespaces:
            report_violation(f"{_describe(r.resource_type, r.name)} is in the broker's namespace "
                             f"'{_path(r.props, 'metadata', 'namespace')}', which holds the GitHub "
                             f"credential: grant nothing there.", r.urn)


# --- GitHub --------------------------------------------------------------------------------------


def validate_actions_secret_from_secret(args: ResourceValidationArgs,
                                        report_violation: ReportViolation) -> None:
    """An Actions secret is set through `value` (or `valueEncrypted`) and stored as a secret.

    What a policy can observe: the engine sends secret inputs marked, but the Python policy
    SDK removes the marks before validation (pulumi-policy 1.21 `Analyze` deserialises with
    `proxy_secrets=False`; pulumi/pulumi-policy#241), so whether the program passed a Pulumi
    secret cannot be seen. This checks what can: the deprecated `plaintextValue` and
    `encryptedValue` are unset; exactly one of `value` and `valueEncrypted` is set and not
    empty; and the property used is listed in the resource's `additionalSecretOutputs`, so the
    engine stores it encrypted in state and masks it in output. pulumi-github's SDK lists it
    for every ActionsSecret; a resource registered another way must list it itself.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    if args.resource_type != ACTIONS_SECRET:
        return
    secret = f"Actions secret '{args.props.get('secretName') or args.name}'"
    for deprecated in ("plaintextValue", "encryptedValue"):
        if _is_set(args.props, deprecated):
            report_violation(f"{secret} sets the deprecated {deprecated}: set value from a "
                             f"Pulumi secret (config get_secret / Output.secret) instead.", None)
    used = [key for key in ("value", "valueEncrypted") if _is_set(args.props, key)]
    if len(used) != 1:
        report_violation(f"{secret} must set exactly one of value and valueEncrypted "
                         f"(set: {used or 'none'}).", None)
        return
    if _known(args.props, used[0]) == "":
        report_violation(f"{secret} has an empty {used[0]}: set it from a non-empty Pulumi "
                         f"secret.", None)
    if used[0] not in args.opts.additional_secret_outputs:
        report_violation(f"{secret} is not stored as a secret: {used[0]} is missing from "
                         f"additionalSecretOutputs, so state would hold it in plaintext.", None)


def validate_main_branch_protection(args: ResourceValidationArgs,
                                    report_violation: ReportViolation) -> None:
    """Branch protection of `main` forbids force pushes and deletion.

    Args:
        args: The resource being checked.
        report_violation: Called with one message per problem found.
    """
    branch = contract.PROTECTED_BRANCH
    if args.resource_type != BRANCH_PROTECTION or args.props.get("pattern") != branch:
        return
    for flag in ("allowsForcePushes", "allowsDeletions"):
        if args.props.get(flag) is not False:
            report_violation(f"Branch protection '{args.name}' of '{branch}' has {flag} = "
                             f"{args.props.get(flag)!r}: set it to false.", None)


def validate_main_branch_protection_declared(args: StackValidationArgs,
                                             report_violation: ReportViolation) -> None:
    """A stack that manages the GitHub repository declares branch protection for `main`.

    Args:
        args: Every resource of the stack.
        report_violation: Called with one message per problem found.
    """
    github = [r for r in args.resources if r.resource_type.startswith("github:")]
    if not github:
        return
    if not any(r.resource_type == BRANCH_PROTECTION
               and r.props.get("pattern") == contract.PROTECTED_BRANCH for r in github):
        names = ", ".join(sorted(_describe(r.resource_type, r.name) for r in github))
        report_violation(f"The stack manages the GitHub repository ({names}) but declares no "
                         f"BranchProtection with pattern '{contract.PROTECTED_BRANCH}'.", None)


def _declares_seed_secret(resources: Sequence[PolicyResource]) -> bool:
    return any(r.resource_type == ACTIONS_SECRET
               and r.props.get("secretName") == contract.SEED_SECRET_SERVICE_ACCOUNT_KEY
               for r in resources)


def validate_service_account_key_only_for_seed(args: StackValidationArgs,
                                               report_violation: ReportViolation) -> None:
    """A service-account key exists only when seed compatibility needs it.

    Seed compatibility is on exactly when the stack declares the Actions secret the seed
    guide's workflow reads (GOOGLE_SERVICE_ACCOUNT_KEY); otherwise CI authenticates keyless,
    through workload identity federation, and a long-lived key is a credential to leak.

    Args:
        args: Every resource of the stack.
        report_violation: Called with one message per problem found.
    """
    keys = [r for r in args.resources if r.resource_type == SERVICE_ACCOUNT_KEY]
    if not keys or _declares_seed_secret(args.resources):
        return
    for key in keys:
        report_violation(
            f"Service account key '{key.name}' is declared but seed compatibility is off (no "
            f"Actions secret {contract.SEED_SECRET_SERVICE_ACCOUNT_KEY}): CI authenticates "
            f"through workload identity federation; remove the key or set seedCompatibility.",
            key.urn,
        )


# --- the pack's policies -------------------------------------------------------------------------

POLICIES: list[ResourceValidationPolicy | StackValidationPolicy] = [
    ResourceValidationPolicy(
        name="gpu-node-pool-scales-to-zero",
        description="GPU node pools autoscale down to 0 nodes unless labelled as warm pools.",
        validate=validate_gpu_pool_scales_to_zero,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="gpu-node-pool-warm",
        description="GPU node pools kept warm (minimum above 0) are billed while idle.",
        validate=validate_gpu_pool_warm,
        enforcement_level=EnforcementLevel.ADVISORY,
    ),
    ResourceValidationPolicy(
        name="gke-workload-identity",
        description="GKE clusters enable workload identity.",
        validate=validate_gke_workload_identity,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="gke-network-policy-enforced",
        description="GKE clusters enforce NetworkPolicy objects (Dataplane V2 or Calico).",
        validate=validate_gke_network_policy,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="production-deletion-protection",
        description="GKE clusters of production stacks have deletion protection on.",
        validate=validate_production_deletion_protection,
        enforcement_level=EnforcementLevel.MANDATORY,
        config_schema=PolicyConfigSchema(
            properties={
                PRODUCTION_STACKS_KEY: {
                    "type": "array",
                    "items": {"type": "string"},
                    "default": list(DEFAULT_PRODUCTION_STACKS),
                    "description": "Names of the stacks marked production.",
                },
            },
        ),
    ),
    ResourceValidationPolicy(
        name="namespace-enforces-restricted",
        description="Namespaces enforce the restricted Pod Security level.",
        validate=validate_namespace_restricted,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="no-privileged-or-root-containers",
        description="Containers are not privileged, cannot escalate privileges, never run as "
                    "root, and pods share no host namespaces.",
        validate=validate_no_privileged_or_root_containers,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="restricted-pod-security",
        description="Pod templates drop all capabilities, use a RuntimeDefault seccomp profile "
                    "and mount no hostPath.",
        validate=validate_restricted_pod_security,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="images-pinned-by-digest",
        description="Container images are pinned by sha256 digest.",
        validate=validate_images_pinned_by_digest,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="no-rights-for-workflow-pods",
        description="No RoleBinding or ClusterRoleBinding grants anything to the ServiceAccounts "
                    "of pods that run workflow code (base runner, GPU runners).",
        validate=validate_no_rights_for_workflow_pods,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="workflow-pods-mount-no-token",
        description="Pods that run workflow code mount no ServiceAccount token.",
        validate=validate_workflow_pods_mount_no_token,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    StackValidationPolicy(
        name="broker-namespace-grants-nothing",
        description="No Role or RoleBinding lives in the broker's namespace, which holds the "
                    "GitHub credential.",
        validate=validate_broker_namespace_grants_nothing,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="actions-secret-from-secret",
        description="GitHub Actions secrets are set through value and stored as secrets.",
        validate=validate_actions_secret_from_secret,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    ResourceValidationPolicy(
        name="main-branch-protection",
        description="Branch protection of main forbids force pushes and deletion.",
        validate=validate_main_branch_protection,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    StackValidationPolicy(
        name="main-branch-protection-declared",
        description="A stack managing the GitHub repository protects its main branch.",
        validate=validate_main_branch_protection_declared,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
    StackValidationPolicy(
        name="service-account-key-only-for-seed",
        description="Service account keys exist only with seed compatibility on.",
        validate=validate_service_account_key_only_for_seed,
        enforcement_level=EnforcementLevel.MANDATORY,
    ),
]
