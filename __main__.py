"""One stack of GPU CI runners: read the config, compose the components, export what users need."""

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp
import pulumi_github as github
import pulumi_kubernetes as k8s

from components.broker import RunnerBroker, RunnerBrokerArgs, broker_url
from components.ci_identity import CiIdentity, CiIdentityArgs
from components.cluster import GkeCluster, GkeClusterArgs
from components.config import load_stack_config
from components.container_image import (
    BROKER_IMAGE,
    RUNNER_IMAGE,
    ContainerImage,
    ContainerImageArgs,
    runner_version,
)
from components.registry_mirror import RegistryMirror, RegistryMirrorArgs, mirror_prefix
from components.repository import (
    RepositorySettings,
    RepositorySettingsArgs,
    SeedCompatibility,
    workflow_variables,
)
from components.repository_ids import resolve_repository_ids
from components.runner_plane import RunnerPlane, RunnerPlaneArgs
from components.seed_gpu_pods import MIN_KUBERNETES_VERSION as SEED_MIN_KUBERNETES_VERSION
from components.seed_gpu_pods import SeedGuideGpuPods, SeedGuideGpuPodsArgs
from gpu_runners.gpu_pools import GpuPool
from gpu_runners.image_refs import mirrored_reference

config = load_stack_config()
ci_identity: CiIdentity | None = None
#: Addresses of the Kubernetes API server, when the stack knows them (it created the cluster).
api_server_cidrs: list[pulumi.Output[str]] = []

github_provider = github.Provider("github", owner=config.github_owner, token=config.github_token)
# Numeric ids, not names, identify the repository to Google Cloud and to the broker.
repository_ids = resolve_repository_ids(config.github_owner, config.github_repository,
                                        github_provider)

#: Upstream registry host -> the Artifact Registry mirror nodes pull it through (GKE mode with
#: imageStreaming); empty: images are pulled from their registries.
mirror_prefixes: dict[str, str] = {}

if config.gke:
    region = config.location.rsplit("-", 1)[0] if config.zonal else config.location
    gcp_provider = gcp.Provider("gcp", project=config.gcp_project, region=region)
    cluster = GkeCluster(
        "gke",
        GkeClusterArgs(
            project=config.gcp_project,
            location=config.location,
            cluster_name=config.cluster_name,
            release_channel=config.release_channel,
            deletion_protection=config.deletion_protection,
            cpu_machine_type=config.cpu_machine_type,
            cpu_min_nodes=config.cpu_min_nodes,
            cpu_max_nodes=config.cpu_max_nodes,
            node_disk_size_gb=config.node_disk_size_gb,
            gpu_pools=config.gpu_pools,
            gpu_driver_version=config.gpu_driver_version,
            maintenance=config.maintenance,
            # Seed compatibility's MutatingAdmissionPolicy is served from this version on.
            min_master_version=(SEED_MIN_KUBERNETES_VERSION if config.seed_compatibility
                                else ""),
            image_streaming=config.image_streaming,
        ),
        opts=pulumi.ResourceOptions(providers=[gcp_provider]),
    )
    if config.image_streaming:
        mirror = RegistryMirror(
            "mirror",
            RegistryMirrorArgs(
                project=config.gcp_project,
                region=region,
                name_prefix=config.cluster_name,
                upstreams=config.image_mirror_upstreams,
                credentials=config.image_mirror_credentials,
                reader=cluster.node_service_account,
            ),
            opts=pulumi.ResourceOptions(providers=[gcp_provider]),
        )
        mirror_prefixes = {host: mirror_prefix(region, config.gcp_project, config.cluster_name,
                                               host)
                           for host in config.image_mirror_upstreams}
        pulumi.export("imageMirrors", mirror.prefixes)
    kubernetes = cluster.provider
    api_server_cidrs = [cluster.cluster.endpoint.apply(lambda ip: f"{ip}/32")]
    ci_identity = CiIdentity(
        "ci",
        CiIdentityArgs(
            project=config.gcp_project,
            github_owner=config.github_owner,
            github_repository=config.github_repository,
            account_prefix=config.cluster_name,
            repository_id=repository_ids.repository_id,
            repository_owner_id=repository_ids.owner_id,
            pool_id=config.workload_identity_pool_id,
            project_roles=config.ci_service_account_roles,
            dvc_bucket=config.dvc_bucket,
            # A long-lived key exists only for the seed guide's workflow, which logs in with one.
            create_key=config.seed_compatibility,
        ),
        opts=pulumi.ResourceOptions(providers=[gcp_provider]),
    )
    pulumi.export("clusterName", cluster.cluster_name)
    pulumi.export("clusterLocation", cluster.location)
    pulumi.export("kubeconfig", cluster.kubeconfig)
else:
    # Existing-cluster mode: an explicit provider pinned to the named context, never whatever
    # context the operator's kubeconfig happens to have selected.
    kubernetes = k8s.Provider("existing-cluster", context=config.kubeconfig_context,
                              kubeconfig=config.kubeconfig_path or None)

docker_build_provider = docker_build.Provider("docker-build")
images = {
    role: ContainerImage(
        f"{role}-image",
        ContainerImageArgs(
            definition=definition,
            owner=config.github_owner,
            repository=config.github_repository,
            push_token=config.github_token,
            # The cluster pulls with a read:packages-only token, not with Pulumi's admin token.
            pull_token=config.image_pull_token,
            version=version,
            prebuilt_ref=prebuilt,
            private=config.image_private,
            build_on_preview=config.build_image_on_preview,
        ),
        opts=pulumi.ResourceOptions(
            providers=[docker_build_provider],
            # The runner image's component was a RunnerImage before the broker image shared it.
            aliases=[pulumi.Alias(type_="gpu-runners:index:RunnerImage")]
            if role == "runner" else None,
        ),
    )
    for role, definition, version, prebuilt in (
        ("runner", RUNNER_IMAGE, runner_version(), config.runner_image),
        ("broker", BROKER_IMAGE, "", config.broker_image),
    )
}

#: What the nodes pull: the pushed runner image, through the mirror of its registry if that
#: mirror can read it (a private image needs the mirror's upstream credentials).
runner_mirrors = mirror_prefixes
if mirror_prefixes and config.image_private and "ghcr.io" not in config.image_mirror_credentials:
    pulumi.log.warn("the runner image is private and imageMirrorCredentials has no ghcr.io "
                    "entry: nodes pull it from ghcr.io directly, without image streaming")
    runner_mirrors = {}
runner_image_ref = images["runner"].ref.apply(
    lambda ref: mirrored_reference(ref, runner_mirrors))

runner_plane = RunnerPlane(
    "runners",
    RunnerPlaneArgs(
        namespace=config.runner_namespace,
        repository=config.repository_full_name,
        image=runner_image_ref,
        runner_pat=config.runner_pat,
        broker_namespace=config.broker_namespace,
        broker_url=broker_url(config.broker_namespace),
        broker_audience=config.broker_audience,
        gpu_quota=config.effective_gpu_quota,
        pod_quota=config.pod_quota,
        base_runner_replicas=config.base_runner_replicas,
        base_runner_cpu=config.base_runner_cpu,
        base_runner_memory=config.base_runner_memory,
        egress_cidrs=config.egress_cidrs,
        image_pull_config=images["runner"].pull_secret_config,
        # The seed guide's workflow applies its GPU pod as the CI service account, with its own
        # pod manifest (no seccomp profile, capabilities kept), which `restricted` would refuse.
        seed_compatibility_user=(ci_identity.service_account_email
                                 if ci_identity is not None and config.seed_compatibility
                                 else None),
    ),
    opts=pulumi.ResourceOptions(providers=[kubernetes]),
)

broker = RunnerBroker(
    "broker",
    RunnerBrokerArgs(
        namespace=config.broker_namespace,
        image=images["broker"].ref,
        # The GitHub App when configured (short-lived installation tokens, the App's narrow
        # permissions), else the runner PAT.
        github_credential=(config.github_app.private_key if config.github_app is not None
                           else config.runner_pat),
        github_app_id=config.github_app.app_id if config.github_app is not None else None,
        github_app_installation_id=(config.github_app.installation_id
                                    if config.github_app is not None else None),
        runner_namespace=runner_plane.namespace,
        runner_image=runner_image_ref,
        repository=config.repository_full_name,
        repository_id=repository_ids.repository_id,
        repository_owner_id=repository_ids.owner_id,
        # Named as GKE names the node pools, so a retry after a Spot preemption can be pinned
        # to the pool's on-demand fallback by its cloud.google.com/gke-nodepool label.
        gpu_pools=[GpuPool(accelerator=pool.accelerator_type,
                           max_gpus_per_pod=pool.accelerator_count,
                           name=pool.name, spot=pool.spot,
                           on_demand_fallback=pool.on_demand_fallback)
                   for pool in config.gpu_pools],
        max_runtime_minutes=config.max_runtime_minutes,
        gpu_cap_per_repository=config.effective_gpu_cap_per_repository,
        audience=config.broker_audience,
        oidc_issuer=config.oidc_issuer,
        allowed_events=config.broker_allowed_events,
        allowed_refs=config.broker_allowed_refs,
        allowed_workflow_refs=config.broker_allowed_workflow_refs,
        allowed_images=config.allowed_images,
        require_image_digests=config.require_image_digests,
        registry_mirrors=mirror_prefixes,
        reaper_interval_seconds=config.reaper_interval_seconds,
        max_preemption_retries=config.max_preemption_retries,
        egress_cidrs=config.egress_cidrs,
        api_server_cidrs=api_server_cidrs,
        runner_image_pull_secret=config.image_private,
        image_pull_config=images["broker"].pull_secret_config,
    ),
    opts=pulumi.ResourceOptions(providers=[kubernetes]),
)
# After the broker, which gives the base runners their configs and removes their registrations
# (also on destroy: the base runners go first).
runner_plane.add_base_runners(broker)

seed: SeedCompatibility | None = None
if config.gke and ci_identity is not None:
    variables = workflow_variables(
        runner_namespace=runner_plane.namespace,
        cluster_name=cluster.cluster_name,
        cluster_location=cluster.location,
        workload_identity_provider=ci_identity.workload_identity_provider,
        ci_service_account=ci_identity.service_account_email,
    )
    if ci_identity.service_account_key is not None:
        seed = SeedCompatibility(
            cluster_name=cluster.cluster_name,
            cluster_location=cluster.location,
            kubeconfig=cluster.kubeconfig,
            namespace=config.runner_namespace,
            service_account_key=ci_identity.service_account_key,
        )
        # The guide's GPU pod manifest, applied unchanged, is completed so it gets a GPU node.
        SeedGuideGpuPods("seed-guide-gpu-pods",
                         SeedGuideGpuPodsArgs(namespace=runner_plane.namespace),
                         opts=pulumi.ResourceOptions(providers=[kubernetes]))
    pulumi.export("workloadIdentityProvider", ci_identity.workload_identity_provider)
    pulumi.export("ciServiceAccount", ci_identity.service_account_email)
else:
    variables = workflow_variables(runner_namespace=runner_plane.namespace)

repository = RepositorySettings(
    "repository",
    RepositorySettingsArgs(
        owner=config.github_owner,
        repository=config.github_repository,
        private=config.repository_private,
        github_token=config.github_token,
        actions_secrets=config.actions_secrets,
        variables=variables,
        branch_protection=config.branch_protection,
        required_approvals=config.required_approvals,
        required_status_checks=config.required_status_checks,
        enforce_admins=config.enforce_admins,
        commit_example_workflow=config.commit_example_workflow,
        seed=seed,
    ),
    opts=pulumi.ResourceOptions(providers=[github_provider]),
)

pulumi.export("runnerImage", images["runner"].ref)
pulumi.export("brokerImage", images["broker"].ref)
pulumi.export("runnerNamespace", runner_plane.namespace)
pulumi.export("brokerNamespace", broker.namespace)
pulumi.export("brokerUrl", broker.url)
pulumi.export("brokerAudience", broker.audience)
pulumi.export("repositorySecrets", repository.secret_names)
