"""The stack's configuration: read once from `pulumi.Config`, checked whole, then frozen.

Every key is declared in `Pulumi.yaml` with its type, default and description; the Pulumi CLI
fills in the defaults, so this module holds no second copy of them. It checks what the CLI
cannot: syntax (project ids, zones, DNS names, GitHub names), ranges, cross-key rules
(machine type against accelerator, min <= max) and placeholders left in a stack file. All
problems are collected and raised as one `StackConfigError` before any resource is declared.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any, TypeVar

import pulumi
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey
from pulumi.runtime.config import is_config_secret

from components.ci_identity import FORBIDDEN_ROLES
from components.registry_mirror import UPSTREAM_URIS, UpstreamCredentials
from components.repository import ACTIONS_NAME_RULE, SEED_SECRET_NAMES, is_actions_name
from gpu_runners import contract

#: Marker used in the stack files for values each user must set before `pulumi up`.
PLACEHOLDER = "CHANGE_ME"

_T = TypeVar("_T")


class ClusterMode(StrEnum):
    """Where the runner plane goes: a GKE cluster this stack creates, or an existing cluster."""

    GKE = "gke"
    EXISTING = "existing"


@dataclass(frozen=True)
class AcceleratorFamily:
    """The GCE machine series an NVIDIA accelerator attaches to, and the counts it allows."""

    machine_prefixes: tuple[str, ...]
    #: Allowed accelerator counts; for the accelerator-optimised series the machine type fixes
    #: the count, so it is looked up in `fixed_counts` instead.
    counts: frozenset[int] = frozenset()
    fixed_counts: Mapping[str, int] | None = None


# GCE GPU machine types (cloud.google.com/compute/docs/gpus): T4/V100/P4/P100 attach to N1 in
# counts of 1, 2, 4 (8 for V100); the newer GPUs come with accelerator-optimised machine types
# whose name fixes the GPU count.
ACCELERATORS: Mapping[str, AcceleratorFamily] = {
    "nvidia-tesla-t4": AcceleratorFamily(("n1-",), frozenset({1, 2, 4})),
    "nvidia-tesla-p4": AcceleratorFamily(("n1-",), frozenset({1, 2, 4})),
    "nvidia-tesla-p100": AcceleratorFamily(("n1-",), frozenset({1, 2, 4})),
    "nvidia-tesla-v100": AcceleratorFamily(("n1-",), frozenset({1, 2, 4, 8})),
    "nvidia-l4": AcceleratorFamily(
        ("g2-",),
        fixed_counts={
            "g2-standard-4": 1, "g2-standard-8": 1, "g2-standard-12": 1, "g2-standard-16": 1,
            "g2-standard-32": 1, "g2-standard-24": 2, "g2-standard-48": 4, "g2-standard-96": 8,
        },
    ),
    "nvidia-tesla-a100": AcceleratorFamily(
        ("a2-",),
        fixed_counts={
            "a2-highgpu-1g": 1, "a2-highgpu-2g": 2, "a2-highgpu-4g": 4, "a2-highgpu-8g": 8,
            "a2-megagpu-16g": 16,
        },
    ),
    "nvidia-a100-80gb": AcceleratorFamily(
        ("a2-",),
        fixed_counts={
            "a2-ultragpu-1g": 1, "a2-ultragpu-2g": 2, "a2-ultragpu-4g": 4, "a2-ultragpu-8g": 8,
        },
    ),
    "nvidia-h100-80gb": AcceleratorFamily(
        ("a3-",),
        fixed_counts={
            "a3-highgpu-1g": 1, "a3-highgpu-2g": 2, "a3-highgpu-4g": 4, "a3-highgpu-8g": 8,
        },
    ),
    "nvidia-h100-mega-80gb": AcceleratorFamily(("a3-",), fixed_counts={"a3-megagpu-8g": 8}),
}

GPU_DRIVER_VERSIONS = ("DEFAULT", "LATEST", "INSTALLATION_DISABLED")
RELEASE_CHANNELS = ("RAPID", "REGULAR", "STABLE", "EXTENDED")

_PROJECT_ID = re.compile(r"^[a-z][a-z0-9-]{4,28}[a-z0-9]$")
_REGION = re.compile(r"^[a-z]+-[a-z]+[0-9]+$")
_SECRET_VERSION = re.compile(r"^projects/[a-z0-9-]+/secrets/[A-Za-z0-9_-]+/versions/"
                             r"(latest|[0-9]+)$")
_ZONE = re.compile(r"^[a-z]+-[a-z]+[0-9]+-[a-z]$")
# GKE cluster and node pool names: DNS-1123 labels of at most 40 characters.
_GKE_NAME = re.compile(r"^[a-z]([-a-z0-9]{0,38}[a-z0-9])?$")
_DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?$")
_GITHUB_OWNER = re.compile(r"^[A-Za-z0-9](?:[A-Za-z0-9]|-(?=[A-Za-z0-9])){0,38}$")
_GITHUB_REPOSITORY = re.compile(r"^[A-Za-z0-9._-]{1,100}$")
_QUANTITY = re.compile(r"^[0-9]+(\.[0-9]+)?(m|Ki|Mi|Gi|Ti|k|M|G|T)?$")
_IAM_ROLE = re.compile(r"^(roles|projects/[^/]+/roles|organizations/[0-9]+/roles)/[A-Za-z0-9_.]+$")
_CIDR = re.compile(r"^([0-9]{1,3}\.){3}[0-9]{1,3}/([0-9]|[12][0-9]|3[0-2])$")
_WIF_POOL_ID = re.compile(r"^[a-z0-9-]{4,32}$")
_DIGEST_PINNED = re.compile(r"^[^@\s]+@sha256:[0-9a-f]{64}$")
# An OIDC issuer is compared with the token's `iss` character for character: an https URL
# without a trailing slash, as GitHub writes its issuers.
_ISSUER = re.compile(r"^https://[A-Za-z0-9.-]+(:[0-9]{1,5})?(/[A-Za-z0-9._~%-]+)*$")
_EVENT_NAME = re.compile(r"^[a-z][a-z_]*$")
#: Audiences the broker must never accept, because a token requested for them is also good
#: elsewhere: GitHub's default (https://github.com/<owner>, what a token requested without an
#: audience carries), the audiences Google's workload identity federation accepts by default
#: (CiIdentity's provider sets no allowed audiences, so it accepts
#: https://iam.googleapis.com/<provider resource name>, also written //iam.googleapis.com/...),
#: and the cloud logins' defaults (AWS STS, Azure AD), which a repository may also use.
_FOREIGN_AUDIENCES = ("https://github.com", "http://github.com", "iam.googleapis.com",
                      "sts.googleapis.com", "sts.amazonaws.com", "api://azureadtokenexchange")
#: A GitHub App's client ID (Iv1.<hex> for older Apps, Iv23li... for newer) or numeric App ID.
_GITHUB_APP_ID = re.compile(r"^([1-9][0-9]{0,18}|Iv[0-9A-Za-z.]{4,40})$")
_INSTALLATION_ID = re.compile(r"^[1-9][0-9]{0,18}$")
#: The keys of the GitHub App the broker authenticates as: all of them, or none.
GITHUB_APP_KEYS = ("githubAppId", "githubAppInstallationId", "githubAppPrivateKey")
#: Namespaces Kubernetes itself uses: the broker's Secret must not sit among their objects.
_SYSTEM_NAMESPACES = frozenset({"default", "kube-system", "kube-public", "kube-node-lease"})


class StackConfigError(pulumi.RunError):
    """The stack's configuration is invalid; the message lists every problem, one per line."""

    def __init__(self, problems: list[str]) -> None:
        self.problems = problems
        lines = "\n".join(f"  - {p}" for p in problems)
        super().__init__(
            f"the stack configuration has {len(problems)} problem(s); nothing was created:\n"
            f"{lines}"
        )


@dataclass(frozen=True)
class GpuPool:
    """One GPU node pool: an entry of the `gpuPools` config list."""

    name: str
    machine_type: str
    accelerator_type: str
    accelerator_count: int
    min_nodes: int
    max_nodes: int
    spot: bool
    zones: tuple[str, ...]
    #: `name` of the on-demand pool where retries run after a Spot preemption of this pool,
    #: or None: retries stay in this pool.
    on_demand_fallback: str | None = None

    @property
    def warm(self) -> bool:
        """Whether the operator asked for GPU nodes kept running between jobs."""
        return self.min_nodes > 0

    @property
    def max_gpus(self) -> int:
        """The most GPUs this pool can hold at once."""
        return self.max_nodes * self.accelerator_count


@dataclass(frozen=True)
class GitHubAppConfig:
    """The GitHub App the broker authenticates as, from the githubApp* keys."""

    #: Client ID or numeric App ID: the App JWT's `iss`.
    app_id: str
    installation_id: str
    #: PEM of one of the App's private keys, a Pulumi secret.
    private_key: pulumi.Output[str]


@dataclass(frozen=True)
class MaintenanceWindow:
    """When GKE may upgrade the cluster and its nodes: the same hours on some days, in UTC."""

    days: tuple[str, ...]
    #: Minutes after midnight UTC; the end may be past midnight (end < start).
    start_minute: int
    end_minute: int

    @property
    def hours(self) -> float:
        """The window's length in hours."""
        return ((self.end_minute - self.start_minute) % (24 * 60)) / 60


@dataclass(frozen=True)
class StackConfig:
    """Every setting of one stack, validated. Secrets stay `pulumi.Output` secrets."""

    stack_name: str
    cluster_mode: ClusterMode
    # GKE mode
    gcp_project: str
    location: str
    cluster_name: str
    release_channel: str
    deletion_protection: bool
    cpu_machine_type: str
    cpu_min_nodes: int
    cpu_max_nodes: int
    node_disk_size_gb: int
    gpu_pools: tuple[GpuPool, ...]
    gpu_driver_version: str
    maintenance: MaintenanceWindow
    # existing-cluster mode
    kubeconfig_context: str
    kubeconfig_path: str
    # GitHub
    github_owner: str
    github_repository: str
    github_token: pulumi.Output[str]
    runner_pat: pulumi.Output[str]
    #: The read:packages PAT the cluster pulls private images with ("" for public images).
    image_pull_token: pulumi.Output[str]
    #: The broker's GitHub App, or None: the broker then uses runner_pat.
    github_app: GitHubAppConfig | None
    # images
    runner_image: str
    broker_image: str
    build_image_on_preview: bool
    image_private: bool
    # runner plane
    runner_namespace: str
    base_runner_replicas: int
    base_runner_cpu: str
    base_runner_memory: str
    gpu_quota: int
    pod_quota: int
    egress_cidrs: tuple[str, ...]
    max_runtime_minutes: int
    # runner broker
    broker_namespace: str
    broker_audience: str
    oidc_issuer: str
    broker_allowed_events: tuple[str, ...]
    broker_allowed_refs: tuple[str, ...]
    broker_allowed_workflow_refs: tuple[str, ...]
    allowed_images: tuple[str, ...]
    require_image_digests: bool
    # image streaming (GKE mode): Artifact Registry mirrors the nodes pull through
    image_streaming: bool
    image_mirror_upstreams: tuple[str, ...]
    image_mirror_credentials: Mapping[str, UpstreamCredentials]
    gpu_cap_per_repository: int
    reaper_interval_seconds: int
    #: Times the broker recovers one run after Spot preemption of its GPU node; 0: never.
    max_preemption_retries: int
    # repository settings
    repository_private: bool
    seed_compatibility: bool
    branch_protection: bool
    required_approvals: int
    required_status_checks: tuple[str, ...]
    enforce_admins: bool
    commit_example_workflow: bool
    actions_secrets: Mapping[str, pulumi.Output[str]]
    # CI identity
    workload_identity_pool_id: str
    ci_service_account_roles: tuple[str, ...]
    dvc_bucket: str

    @property
    def gke(self) -> bool:
        """Whether this stack creates its GKE cluster (as opposed to using an existing one)."""
        return self.cluster_mode is ClusterMode.GKE

    @property
    def zonal(self) -> bool:
        """Whether `location` is a zone (a zonal cluster) rather than a region."""
        return bool(_ZONE.match(self.location))

    @property
    def repository_full_name(self) -> str:
        """`owner/name` of the GitHub repository the runners serve."""
        return f"{self.github_owner}/{self.github_repository}"

    @property
    def effective_gpu_quota(self) -> int:
        """The namespace's GPU cap: `gpuQuota`, or every GPU pool at its maximum when 0."""
        return self.gpu_quota or sum(pool.max_gpus for pool in self.gpu_pools)

    @property
    def effective_gpu_cap_per_repository(self) -> int:
        """Most GPUs one repository's runs hold at once: `gpuCapPerRepository`, or the quota."""
        return self.gpu_cap_per_repository or self.effective_gpu_quota


class _Reader:
    """Reads raw config values and records every problem instead of stopping at the first."""

    def __init__(self, config: pulumi.Config) -> None:
        self.config = config
        self.problems: list[str] = []
        #: Keys left at the CHANGE_ME placeholder: already reported, so not "not set" too.
        self.placeholders: set[str] = set()

    def problem(self, key: str, value: object, allowed: str) -> None:
        # Secret config values never reach an error message.
        shown = "<secret>" if is_config_secret(self.config.full_key(key.split(".")[0])) else value
        self.problems.append(f"{key} = {shown!r}: {allowed}")

    def raw(self, key: str) -> str | None:
        value = self.config.get(key)
        if value is not None and PLACEHOLDER in value:
            self.placeholders.add(key)
            self.problems.append(
                f"{key} = {PLACEHOLDER!r} is a placeholder: set it with "
                f"`pulumi config set {key} <value>`"
            )
            return None
        return value

    def string(self, key: str, pattern: re.Pattern[str] | None = None, allowed: str = "",
               *, required: bool = True) -> str:
        value = self.raw(key)
        if value is None or value == "":
            if required and value is None and key not in self.placeholders:
                self.problems.append(f"{key} is not set: {allowed or 'a value is required'}")
            elif required and value == "":
                self.problems.append(f"{key} is empty: {allowed or 'a value is required'}")
            return ""
        if pattern is not None and not pattern.match(value):
            self.problem(key, value, allowed)
        return value

    def choice(self, key: str, choices: tuple[str, ...]) -> str:
        return self.string(key, re.compile("^(" + "|".join(map(re.escape, choices)) + ")$"),
                           "one of " + ", ".join(choices))

    def integer(self, key: str, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.raw(key)
        if value is None:
            if key not in self.placeholders:
                self.problems.append(f"{key} is not set: an integer >= {minimum} is required")
            return minimum
        try:
            number = int(value)
        except ValueError:
            self.problem(key, value, "an integer is required")
            return minimum
        if number < minimum or (maximum is not None and number > maximum):
            bounds = f">= {minimum}" + (f" and <= {maximum}" if maximum is not None else "")
            self.problem(key, number, f"must be {bounds}")
        return number

    def boolean(self, key: str) -> bool:
        value = self.raw(key)
        if value in ("true", "false"):
            return value == "true"
        self.problem(key, value, "true or false")
        return False

    def json_value(self, key: str, kind: type[_T], default: _T, description: str) -> _T:
        value = self.raw(key)
        if value is None:
            return default
        try:
            parsed = json.loads(value)
        except json.JSONDecodeError:
            self.problem(key, value, description)
            return default
        if not isinstance(parsed, kind):
            self.problem(key, parsed, description)
            return default
        return parsed

    def string_list(self, key: str, check: Callable[[str], str | None]) -> tuple[str, ...]:
        items = self.json_value(key, list, [], "a list of strings")
        result = []
        for index, item in enumerate(items):
            reason = "a string" if not isinstance(item, str) else check(item)
            if reason:
                self.problem(f"{key}[{index}]", item, reason)
            else:
                result.append(item)
        return tuple(result)

    def secret(self, key: str, purpose: str, *, required: bool = True) -> pulumi.Output[str]:
        value = self.config.get_secret(key)
        if value is None and required:
            self.problems.append(
                f"{key} is not set: {purpose}; set it with `pulumi config set --secret {key}`"
            )
        return value if value is not None else pulumi.Output.secret("")


def _check_gpu_pool(reader: _Reader, index: int, entry: Any, zonal_location: str) -> GpuPool | None:
    key = f"gpuPools[{index}]"
    if not isinstance(entry, dict):
        reader.problem(key, entry, "an object with name, machineType, acceleratorType, ...")
        return None
    known = {"name", "machineType", "acceleratorType", "acceleratorCount", "minNodes",
             "maxNodes", "spot", "zones", "onDemandFallback"}
    for unknown in sorted(set(entry) - known):
        reader.problem(f"{key}.{unknown}", entry[unknown],
                       "unknown field; allowed: " + ", ".join(sorted(known)))

    name = entry.get("name")
    if not isinstance(name, str) or not _GKE_NAME.match(name):
        reader.problem(f"{key}.name", name,
                       "a node pool name: lowercase letters, digits and '-', at most 40 characters")
    machine_type = entry.get("machineType")
    accelerator = entry.get("acceleratorType")
    family = ACCELERATORS.get(accelerator) if isinstance(accelerator, str) else None
    if family is None:
        reader.problem(f"{key}.acceleratorType", accelerator,
                       "one of " + ", ".join(sorted(ACCELERATORS)))
    count = entry.get("acceleratorCount")
    if not isinstance(machine_type, str) or not machine_type:
        reader.problem(f"{key}.machineType", machine_type, "a GCE machine type, e.g. g2-standard-8")
    elif family is not None:
        if not machine_type.startswith(family.machine_prefixes):
            reader.problem(
                f"{key}.machineType", machine_type,
                f"{accelerator} attaches to {'/'.join(family.machine_prefixes)}* machine types",
            )
        elif family.fixed_counts is not None:
            fixed = family.fixed_counts.get(machine_type)
            if fixed is None:
                reader.problem(f"{key}.machineType", machine_type,
                               f"{accelerator} machine types are "
                               + ", ".join(sorted(family.fixed_counts)))
            elif count is None:
                count = fixed
            elif count != fixed:
                reader.problem(f"{key}.acceleratorCount", count,
                               f"{machine_type} comes with exactly {fixed} x {accelerator}")
    if family is not None and family.fixed_counts is None:
        if count is None:
            count = 1
        if count not in family.counts:
            reader.problem(f"{key}.acceleratorCount", count,
                           f"{accelerator} allows " + ", ".join(map(str, sorted(family.counts))))
    if not isinstance(count, int) or isinstance(count, bool):
        count = 1

    min_nodes = entry.get("minNodes", 0)
    max_nodes = entry.get("maxNodes")
    if not isinstance(min_nodes, int) or isinstance(min_nodes, bool) or min_nodes < 0:
        reader.problem(f"{key}.minNodes", min_nodes, "an integer >= 0 (0 scales to zero)")
        min_nodes = 0
    if not isinstance(max_nodes, int) or isinstance(max_nodes, bool) or max_nodes < 1:
        reader.problem(f"{key}.maxNodes", max_nodes, "an integer >= 1")
        max_nodes = max(min_nodes, 1)
    elif min_nodes > max_nodes:
        reader.problem(f"{key}.minNodes", min_nodes, f"must be <= maxNodes ({max_nodes})")
    spot = entry.get("spot", True)
    if not isinstance(spot, bool):
        reader.problem(f"{key}.spot", spot, "true (Spot VMs) or false (on-demand)")
        spot = True
    zones = entry.get("zones", [])
    if not isinstance(zones, list):
        reader.problem(f"{key}.zones", zones, "a list of zones")
        zones = []
    for zone_index, zone in enumerate(zones):
        if not isinstance(zone, str) or not _ZONE.match(zone):
            reader.problem(f"{key}.zones[{zone_index}]", zone, "a zone such as us-central1-a")
        elif zonal_location and zone != zonal_location:
            reader.problem(f"{key}.zones[{zone_index}]", zone,
                           f"a zonal cluster's pools live in its zone ({zonal_location})")
    fallback = entry.get("onDemandFallback")
    if fallback is not None and (not isinstance(fallback, str) or not _GKE_NAME.match(fallback)):
        reader.problem(f"{key}.onDemandFallback", fallback,
                       "the name of another entry of gpuPools (an on-demand pool)")
        fallback = None
    return GpuPool(
        name=name if isinstance(name, str) else "",
        machine_type=machine_type if isinstance(machine_type, str) else "",
        accelerator_type=accelerator if isinstance(accelerator, str) else "",
        accelerator_count=count,
        min_nodes=min_nodes,
        max_nodes=max_nodes,
        spot=spot,
        zones=tuple(z for z in zones if isinstance(z, str)),
        on_demand_fallback=fallback,
    )


def _check_fallbacks(reader: _Reader, pools: list[GpuPool | None]) -> None:
    """Each onDemandFallback names an on-demand pool that takes any pod of its Spot pool."""
    by_name = {pool.name: pool for pool in pools if pool is not None}
    for index, pool in enumerate(pools):
        if pool is None or pool.on_demand_fallback is None:
            continue
        key = f"gpuPools[{index}].onDemandFallback"
        target = by_name.get(pool.on_demand_fallback)
        if not pool.spot:
            reader.problem(key, pool.on_demand_fallback,
                           "only a pool with spot: true has a fallback (an on-demand pool is "
                           "not preempted)")
        elif pool.on_demand_fallback == pool.name:
            reader.problem(key, pool.on_demand_fallback,
                           "another pool than this one: retries after a preemption go to an "
                           "on-demand pool")
        elif target is None:
            reader.problem(key, pool.on_demand_fallback,
                           "the name of another entry of gpuPools; pools: "
                           + ", ".join(sorted(by_name)))
        elif target.spot:
            reader.problem(key, pool.on_demand_fallback,
                           f"pool {target.name} has spot: true; the fallback must be an "
                           "on-demand pool (spot: false)")
        elif target.accelerator_type != pool.accelerator_type:
            reader.problem(key, pool.on_demand_fallback,
                           f"pool {target.name} has {target.accelerator_type}, this pool "
                           f"{pool.accelerator_type}: the fallback must have the same "
                           "acceleratorType")
        elif target.accelerator_count < pool.accelerator_count:
            reader.problem(key, pool.on_demand_fallback,
                           f"pool {target.name} has {target.accelerator_count} GPU(s) per node, "
                           f"fewer than this pool's {pool.accelerator_count}: a pod that fits "
                           "here must fit there")


def _check_gpu_pools(reader: _Reader, location: str) -> tuple[GpuPool, ...]:
    entries = reader.json_value("gpuPools", list, [], "a list of GPU pool objects")
    if not entries:
        reader.problems.append(
            "gpuPools is not set: at least one GPU pool is required, e.g. "
            '[{"name": "l4", "machineType": "g2-standard-8", "acceleratorType": "nvidia-l4", '
            '"maxNodes": 2}]'
        )
        return ()
    zonal_location = location if _ZONE.match(location) else ""
    pools = [_check_gpu_pool(reader, i, entry, zonal_location) for i, entry in enumerate(entries)]
    names = [p.name for p in pools if p is not None]
    for duplicate in sorted({n for n in names if names.count(n) > 1}):
        reader.problem("gpuPools", duplicate, "pool names must be unique")
    _check_fallbacks(reader, pools)
    return tuple(p for p in pools if p is not None)


def _check_actions_secrets(reader: _Reader) -> Mapping[str, pulumi.Output[str]]:
    # A map set with `pulumi config set --secret --path 'actionsSecrets.NAME' value`. The names
    # are needed now (one resource per secret); each value is wrapped as a secret at once.
    values = reader.json_value("actionsSecrets", dict, {}, "a map of secret name to value")
    if values and not is_config_secret(reader.config.full_key("actionsSecrets")):
        reader.problems.append(
            "actionsSecrets is stored in plaintext: set its values with "
            "`pulumi config set --secret --path 'actionsSecrets.NAME' VALUE`"
        )
        return {}
    secrets: dict[str, pulumi.Output[str]] = {}
    # GitHub stores names upper-cased: two spellings of one name would be one secret.
    spellings: dict[str, str] = {}
    for name, value in values.items():
        if name.upper() in spellings:
            reader.problem(f"actionsSecrets.{name}", "<secret>",
                           f"the same secret as actionsSecrets.{spellings[name.upper()]} "
                           "(GitHub's secret names are case-insensitive)")
            continue
        spellings[name.upper()] = name
        if not is_actions_name(name):
            reader.problem(f"actionsSecrets.{name}", "<secret>",
                           f"secret names are {ACTIONS_NAME_RULE}")
        elif not isinstance(value, str) or not value:
            reader.problem(f"actionsSecrets.{name}", "<secret>", "a non-empty string")
        else:
            secrets[name] = pulumi.Output.secret(value)
    return secrets


def _check_github_app(reader: _Reader) -> GitHubAppConfig | None:
    # All three keys or none: a half-set App would leave the broker without a credential.
    app_id = reader.string("githubAppId", _GITHUB_APP_ID,
                           "the App's client ID (Iv23li...) or numeric App ID, both shown on "
                           "the App's settings page", required=False)
    installation_id = reader.string("githubAppInstallationId", _INSTALLATION_ID,
                                    "the installation's number, the end of its settings URL "
                                    "(.../settings/installations/NUMBER)", required=False)
    key_name = "githubAppPrivateKey"
    private_key = reader.raw(key_name) or ""
    given = {"githubAppId": app_id, "githubAppInstallationId": installation_id,
             key_name: private_key}
    if not any(given.values()):
        return None
    for key in GITHUB_APP_KEYS:
        if not given[key] and key not in reader.placeholders:
            others = ", ".join(k for k in GITHUB_APP_KEYS if k != key)
            how = (f"`pulumi config set --secret {key} < key.pem`" if key == key_name
                   else f"`pulumi config set {key} <value>`")
            reader.problems.append(
                f"{key} is not set: a GitHub App needs it together with {others}; set it with "
                f"{how}, or unset the others to use runnerPat")
    if private_key:
        if not is_config_secret(reader.config.full_key(key_name)):
            reader.problems.append(
                f"{key_name} is stored in plaintext: set it again with "
                f"`pulumi config set --secret {key_name} < key.pem` (and rotate the key: it "
                "is in the stack file's history)")
        problem = _rsa_private_key_problem(private_key)
        if problem is not None:
            reader.problems.append(f"{key_name} = '<secret>': {problem}")
    return GitHubAppConfig(app_id, installation_id, pulumi.Output.secret(private_key))


def _optional_secret(reader: _Reader, key: str, purpose: str, *,
                     required: bool) -> pulumi.Output[str]:
    # Needed only in some setups, so declared in Pulumi.yaml with a default and not
    # `secret: true` (the CLI refuses a secret key with a default): a value stored in plaintext
    # is refused here instead.
    value = reader.raw(key) or ""
    if not value:
        if required and key not in reader.placeholders:
            reader.problems.append(
                f"{key} is not set: {purpose}; set it with `pulumi config set --secret {key}`")
        return pulumi.Output.secret("")
    if not is_config_secret(reader.config.full_key(key)):
        reader.problems.append(
            f"{key} is stored in plaintext: set it again with `pulumi config set --secret {key}` "
            "(and revoke it: it is in the stack file's history)")
    return pulumi.Output.secret(value)


def _rsa_private_key_problem(pem: str) -> str | None:
    """Why `pem` is not an RSA private key in PEM form, or None; never quotes the key."""
    try:
        key = serialization.load_pem_private_key(pem.encode(), password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        return ("not an unencrypted PEM private key (-----BEGIN RSA PRIVATE KEY-----...): set "
                "the .pem file GitHub generated, from a file so its line breaks are kept: "
                "`pulumi config set --secret githubAppPrivateKey < key.pem`")
    if not isinstance(key, RSAPrivateKey):
        return "not an RSA key: GitHub Apps sign with RS256; use the key GitHub generated"
    return None


WEEKDAYS = ("MO", "TU", "WE", "TH", "FR", "SA", "SU")
_WINDOW = re.compile(r"^([01][0-9]|2[0-3]):([0-5][0-9])-([01][0-9]|2[0-3]):([0-5][0-9])$")


def _check_maintenance(reader: _Reader) -> MaintenanceWindow:
    days = reader.string_list("maintenanceDays", lambda day: None if day in WEEKDAYS else
                              "a day of the week: " + " ".join(WEEKDAYS))
    window = reader.string("maintenanceWindowUtc", _WINDOW,
                           "HH:MM-HH:MM in UTC, e.g. 02:00-08:00")
    match = _WINDOW.match(window)
    numbers = [int(part) for part in match.groups()] if match else [2, 0, 8, 0]
    maintenance = MaintenanceWindow(days=tuple(dict.fromkeys(days)),
                                    start_minute=numbers[0] * 60 + numbers[1],
                                    end_minute=numbers[2] * 60 + numbers[3])
    if match and maintenance.hours < 4:
        # GKE counts only contiguous windows of four hours or more.
        reader.problem("maintenanceWindowUtc", window, "at least 4 hours long")
    # Any 32 days hold each weekday at least 4 times; GKE refuses less than 48 hours in 32 days.
    elif match and days and 4 * len(maintenance.days) * maintenance.hours < 48:
        reader.problem("maintenanceDays", list(days),
                       f"with {maintenance.hours:g}-hour windows, at least "
                       f"{-(-48 // (4 * maintenance.hours)):g} days: GKE needs 48 hours of "
                       "maintenance in any 32 days")
    if not days and not any(p.startswith("maintenanceDays") for p in reader.problems):
        reader.problems.append("maintenanceDays is empty: GKE needs maintenance days, e.g. "
                               '["SA", "SU"]')
    return maintenance


def _check_role(role: str) -> str | None:
    if role in FORBIDDEN_ROLES:
        return ("not a basic role: any branch of the repository can impersonate the CI service "
                "account, so it would hand the project to every pull request author; grant "
                "predefined roles such as roles/container.clusterViewer")
    return None if _IAM_ROLE.match(role) else "an IAM role such as roles/storage.objectViewer"


def _check_cidr(cidr: str) -> str | None:
    return None if _CIDR.match(cidr) else "an IPv4 CIDR such as 0.0.0.0/0"


def _check_status_check(name: str) -> str | None:
    return None if name.strip() else "a non-empty check name"


def _check_event(event: str) -> str | None:
    if event in contract.FORBIDDEN_EVENTS:
        return ("never allowed: pull_request_target and workflow_run run with the repository's "
                "rights on behalf of code it did not review")
    return None if _EVENT_NAME.match(event) else "a GitHub Actions event name such as push"


def _check_pattern(pattern: str) -> str | None:
    if not pattern or any(c.isspace() for c in pattern):
        return "a non-empty fnmatch pattern without spaces, e.g. refs/heads/main"
    return None


def _check_image_pattern(pattern: str) -> str | None:
    # The registry host is spelled out, so a pattern cannot widen to every registry ("*").
    host = pattern.split("/", 1)[0]
    if (any(c.isspace() for c in pattern) or "/" not in pattern or not host
            or any(c in host for c in "*?[") or "." not in host and ":" not in host):
        return ("an image pattern naming its registry, e.g. ghcr.io/acme/cuda-*@sha256:* "
                "(no wildcard in the registry host)")
    return None


def _check_audience(reader: _Reader, key: str) -> str:
    audience = reader.string(key, re.compile(r"^\S{1,255}$"),
                             "an audience string without spaces, e.g. gpu-runners-broker")
    lowered = audience.lower()
    foreign = next((f for f in _FOREIGN_AUDIENCES if f in lowered), None)
    if foreign is not None:
        reader.problem(key, audience,
                       f"a token for this audience ({foreign}) is also accepted elsewhere "
                       "(GitHub's default audience, the workload identity provider, a cloud "
                       "login): choose one unique to the broker, e.g. "
                       f"{contract.DEFAULT_BROKER_AUDIENCE}")
    return audience


def _check_mirror_upstream(host: str) -> str | None:
    if host not in UPSTREAM_URIS:
        return "one of " + ", ".join(sorted(UPSTREAM_URIS))
    return None


def _check_mirror_credentials(reader: _Reader, upstreams: tuple[str, ...]
                              ) -> dict[str, UpstreamCredentials]:
    key = "imageMirrorCredentials"
    entries = reader.json_value(key, dict, {}, "an object: upstream host -> {username, "
                                "passwordSecretVersion}")
    found: dict[str, UpstreamCredentials] = {}
    for host, entry in entries.items():
        where = f"{key}.{host}"
        if host not in upstreams:
            reader.problem(where, "<credentials>", "an upstream of imageMirrorUpstreams ("
                           + ", ".join(upstreams) + ")")
            continue
        username = entry.get("username") if isinstance(entry, dict) else None
        version = entry.get("passwordSecretVersion") if isinstance(entry, dict) else None
        if not isinstance(username, str) or not username.strip():
            reader.problem(f"{where}.username", username, "the upstream user name")
        elif not isinstance(version, str) or not _SECRET_VERSION.fullmatch(version):
            # Not echoed: a password pasted here by mistake must not reach the output.
            reader.problem(f"{where}.passwordSecretVersion", "<hidden>",
                           "a Secret Manager version, projects/<project>/secrets/<secret>/"
                           "versions/<version> (the password is never in the stack config)")
        else:
            found[host] = UpstreamCredentials(username, version)
    return found


def _check_prebuilt_image(reader: _Reader, key: str) -> str:
    image = reader.string(key, required=False)
    if image and not _DIGEST_PINNED.match(image):
        reader.problem(key, image,
                       "a prebuilt image pinned by digest: <name>@sha256:<64 hex digits>")
    return image


def load_stack_config(config: pulumi.Config | None = None) -> StackConfig:
    """Read and validate the stack's configuration.

    Args:
        config: The project's config; defaults to `pulumi.Config()` of the running program.

    Returns:
        The validated, frozen configuration.

    Raises:
        StackConfigError: listing every problem found, each naming the key, the value and what
            is allowed. Raised before any resource is declared.
    """
    reader = _Reader(config or pulumi.Config())
    mode_value = reader.choice("clusterMode", tuple(m.value for m in ClusterMode))
    known_modes = {m.value for m in ClusterMode}
    mode = ClusterMode(mode_value) if mode_value in known_modes else ClusterMode.GKE
    gke = mode is ClusterMode.GKE

    gcp_project = reader.string("gcpProject", _PROJECT_ID,
                                "a GCP project id: 6-30 lowercase letters, digits and '-'",
                                required=gke)
    location = reader.string("location", re.compile(f"{_REGION.pattern}|{_ZONE.pattern}"),
                             "a GCP region (us-central1) or zone (us-central1-a)", required=gke)
    cluster_name = reader.string("clusterName", _GKE_NAME,
                                 "a DNS-1123 name: lowercase letters, digits and '-', starting "
                                 "with a letter, at most 40 characters")
    release_channel = reader.choice("releaseChannel", RELEASE_CHANNELS)
    deletion_protection = reader.boolean("deletionProtection")
    cpu_machine_type = reader.string("cpuMachineType", re.compile(r"^[a-z0-9]+-[a-z0-9-]+$"),
                                     "a GCE machine type such as e2-standard-4")
    cpu_min = reader.integer("cpuMinNodes", minimum=0)
    cpu_max = reader.integer("cpuMaxNodes", minimum=1)
    if cpu_min > cpu_max:
        reader.problem("cpuMinNodes", cpu_min, f"must be <= cpuMaxNodes ({cpu_max})")
    disk = reader.integer("nodeDiskSizeGb", minimum=10, maximum=65536)
    gpu_pools = _check_gpu_pools(reader, location) if gke else ()
    driver = reader.choice("gpuDriverVersion", GPU_DRIVER_VERSIONS)

    kubeconfig_context = reader.string("kubeconfigContext", required=not gke,
                                       allowed="the kubeconfig context of the existing cluster")
    kubeconfig_path = reader.string("kubeconfigPath", required=False)

    owner = reader.string("githubOwner", _GITHUB_OWNER,
                          "a GitHub user or organisation: letters, digits, single '-', "
                          "at most 39 characters")
    repository = reader.string("githubRepository", _GITHUB_REPOSITORY,
                               "a repository name (not owner/name): letters, digits, '.', '_', '-'")
    if "/" in (reader.config.get("githubRepository") or ""):
        reader.problems.append("githubRepository: give the name only; the owner is githubOwner")
    github_token = reader.secret("githubToken", "a classic PAT with repo, read:org and "
                                 "write:packages scopes, used by Pulumi to manage the repository "
                                 "and push the runner image")
    github_app = _check_github_app(reader)
    image_private = reader.boolean("imagePrivate")
    seed_compatibility = reader.boolean("seedCompatibility")
    # With a GitHub App the broker needs no PAT; the seed guide's manifests still read one.
    runner_pat = _optional_secret(
        reader, "runnerPat",
        "the PAT the broker mints runners' JIT configs with when no GitHub App is configured "
        "(repo scope), and that seed compatibility keeps for the guide",
        required=github_app is None or seed_compatibility)
    # GHCR takes PATs, not installation tokens; a token with read:packages alone, so that the
    # pull Secret in the runner namespace reaches no repository.
    image_pull_token = _optional_secret(
        reader, "imagePullToken",
        "a classic PAT with only the read:packages scope, which the cluster pulls the private "
        "runner and broker images with (or make the packages public and set imagePrivate "
        "false)",
        required=image_private)

    runner_image = _check_prebuilt_image(reader, "runnerImage")
    broker_image = _check_prebuilt_image(reader, "brokerImage")
    namespace = reader.string("runnerNamespace", _DNS_LABEL,
                              "a namespace name: lowercase letters, digits and '-'")
    broker_namespace = reader.string("brokerNamespace", _DNS_LABEL,
                                     "a namespace name: lowercase letters, digits and '-'")
    if broker_namespace and broker_namespace == namespace:
        reader.problem("brokerNamespace", broker_namespace,
                       "must differ from runnerNamespace: the broker's credential lives in a "
                       "namespace where no job runs")
    elif broker_namespace in _SYSTEM_NAMESPACES:
        reader.problem("brokerNamespace", broker_namespace,
                       "a namespace of its own, not one of " + ", ".join(sorted(
                           _SYSTEM_NAMESPACES)))
    allowed_events = reader.string_list("brokerAllowedEvents", _check_event)
    if not allowed_events and not any(p.startswith("brokerAllowedEvents")
                                      for p in reader.problems):
        reader.problems.append("brokerAllowedEvents is empty: at least one event, e.g. "
                               + ", ".join(contract.DEFAULT_ALLOWED_EVENTS))
    max_runtime = reader.integer("maxRuntimeMinutes", minimum=5, maximum=7 * 24 * 60)

    required_checks = reader.string_list("requiredStatusChecks", _check_status_check)
    pool_id = reader.string("workloadIdentityPoolId", _WIF_POOL_ID,
                            "4-32 lowercase letters, digits and '-'", required=gke)
    if pool_id.startswith("gcp-"):
        reader.problem("workloadIdentityPoolId", pool_id, "the prefix gcp- is reserved by Google")

    upstreams = reader.string_list("imageMirrorUpstreams", _check_mirror_upstream)
    stack_config = StackConfig(
        stack_name=pulumi.get_stack(),
        cluster_mode=mode,
        gcp_project=gcp_project,
        location=location,
        cluster_name=cluster_name,
        release_channel=release_channel,
        deletion_protection=deletion_protection,
        cpu_machine_type=cpu_machine_type,
        cpu_min_nodes=cpu_min,
        cpu_max_nodes=cpu_max,
        node_disk_size_gb=disk,
        gpu_pools=gpu_pools,
        gpu_driver_version=driver,
        maintenance=_check_maintenance(reader),
        kubeconfig_context=kubeconfig_context,
        kubeconfig_path=kubeconfig_path,
        github_owner=owner,
        github_repository=repository,
        github_token=github_token,
        runner_pat=runner_pat,
        image_pull_token=image_pull_token,
        github_app=github_app,
        runner_image=runner_image,
        broker_image=broker_image,
        build_image_on_preview=reader.boolean("buildImageOnPreview"),
        image_private=image_private,
        runner_namespace=namespace,
        base_runner_replicas=reader.integer("baseRunnerReplicas", minimum=1, maximum=20),
        base_runner_cpu=reader.string("baseRunnerCpu", _QUANTITY,
                                      "a CPU quantity such as 1 or 500m"),
        base_runner_memory=reader.string("baseRunnerMemory", _QUANTITY,
                                         "a memory quantity such as 4Gi"),
        gpu_quota=reader.integer("gpuQuota", minimum=0),
        pod_quota=reader.integer("podQuota", minimum=2),
        egress_cidrs=reader.string_list("egressCidrs", _check_cidr),
        max_runtime_minutes=max_runtime,
        broker_namespace=broker_namespace,
        broker_audience=_check_audience(reader, "brokerAudience"),
        oidc_issuer=reader.string("oidcIssuer", _ISSUER,
                                  "the issuer of the Actions OIDC tokens: an https URL without a "
                                  f"trailing slash, e.g. {contract.GITHUB_OIDC_ISSUER}"),
        broker_allowed_events=allowed_events,
        broker_allowed_refs=reader.string_list("brokerAllowedRefs", _check_pattern),
        broker_allowed_workflow_refs=reader.string_list("brokerAllowedWorkflowRefs",
                                                        _check_pattern),
        allowed_images=reader.string_list("allowedImages", _check_image_pattern),
        require_image_digests=reader.boolean("requireImageDigests"),
        # Existing-cluster mode pulls directly: the mirror and streaming are GKE's.
        image_streaming=reader.boolean("imageStreaming") and gke,
        image_mirror_upstreams=upstreams,
        image_mirror_credentials=_check_mirror_credentials(reader, upstreams),
        gpu_cap_per_repository=reader.integer("gpuCapPerRepository", minimum=0),
        reaper_interval_seconds=reader.integer("reaperIntervalSeconds", minimum=30,
                                               maximum=3600),
        max_preemption_retries=reader.integer("maxPreemptionRetries", minimum=0,
                                              maximum=contract.MAX_PREEMPTION_RETRIES_LIMIT),
        repository_private=reader.boolean("repositoryPrivate"),
        seed_compatibility=seed_compatibility,
        branch_protection=reader.boolean("branchProtection"),
        required_approvals=reader.integer("requiredApprovals", minimum=0, maximum=6),
        required_status_checks=required_checks,
        enforce_admins=reader.boolean("enforceAdmins"),
        commit_example_workflow=reader.boolean("commitExampleWorkflow"),
        actions_secrets=_check_actions_secrets(reader),
        workload_identity_pool_id=pool_id,
        ci_service_account_roles=reader.string_list("ciServiceAccountRoles", _check_role),
        dvc_bucket=reader.string("dvcBucket", re.compile(r"^[a-z0-9][a-z0-9._-]{1,220}[a-z0-9]$"),
                                 "a Cloud Storage bucket name", required=False),
    )
    if stack_config.gke and stack_config.gpu_pools and stack_config.gpu_quota:
        largest = max(pool.accelerator_count for pool in stack_config.gpu_pools)
        if stack_config.gpu_quota < largest:
            reader.problem("gpuQuota", stack_config.gpu_quota,
                           f"must be 0 (no cap beyond the pools) or >= {largest}, the GPUs of the "
                           "largest node, or no GPU pod could ever start")
    if stack_config.gpu_cap_per_repository > stack_config.effective_gpu_quota > 0:
        reader.problem("gpuCapPerRepository", stack_config.gpu_cap_per_repository,
                       f"must be 0 (the namespace's GPU quota) or <= the quota "
                       f"({stack_config.effective_gpu_quota}): the quota caps every repository")
    if not gke and stack_config.gpu_quota == 0:
        reader.problem("gpuQuota", 0, "in existing mode, the most GPUs the runner namespace may "
                       "request at once (no GPU pools are declared to derive it from)")
    if stack_config.seed_compatibility:
        seed_names = {name.upper() for name in SEED_SECRET_NAMES}
        for name in sorted(stack_config.actions_secrets):
            if name.upper() in seed_names:
                reader.problem(f"actionsSecrets.{name}", "<secret>",
                               "seed compatibility creates this secret itself ("
                               + ", ".join(SEED_SECRET_NAMES) + "): rename it")
    if not gke and stack_config.seed_compatibility:
        reader.problems.append("seedCompatibility: the seed guide's secrets describe a GKE "
                               "cluster; it needs clusterMode = gke")
    if reader.problems:
        raise StackConfigError(reader.problems)
    return stack_config
