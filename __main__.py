"""One stack of GPU CI runners: read the config, compose the components, export what users need."""

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp
import pulumi_github as github
import pulumi_kubernetes as k8s

from components.ci_identity import CiIdentity, CiIdentityArgs
from components.cluster import GkeCluster, GkeClusterArgs
from components.config import load_stack_config
from components.repository import (
    RepositorySettings,
    RepositorySettingsArgs,
    SeedCompatibility,
    workflow_variables,
)
from components.runner_image import RunnerImage, RunnerImageArgs
from components.runner_plane import RunnerPlane, RunnerPlaneArgs
from gpu_runners.gpu_pools import GpuPool

config = load_stack_config()
ci_identity: CiIdentity | None = None

if config.gke:
    gcp_provider = gcp.Provider("gcp", project=config.gcp_project,
                                region=config.location.rsplit("-", 1)[0] if config.zonal
                                else config.location)
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
        ),
        opts=pulumi.ResourceOptions(providers=[gcp_provider]),
    )
    kubernetes = cluster.provider
    ci_identity = CiIdentity(
        "ci",
        CiIdentityArgs(
            project=config.gcp_project,
            github_owner=config.github_owner,
            github_repository=config.github_repository,
            account_prefix=config.cluster_name,
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

image = RunnerImage(
    "runner-image",
    RunnerImageArgs(
        owner=config.github_owner,
        repository=config.github_repository,
        push_token=config.github_token,
        # The cluster pulls with the PAT it already holds, not with Pulumi's admin token.
        pull_token=config.runner_pat,
        prebuilt_ref=config.runner_image,
        private=config.image_private,
        build_on_preview=config.build_image_on_preview,
    ),
    opts=pulumi.ResourceOptions(providers=[docker_build.Provider("docker-build")]),
)

runner_plane = RunnerPlane(
    "runners",
    RunnerPlaneArgs(
        namespace=config.runner_namespace,
        repository=config.repository_full_name,
        image=image.ref,
        runner_pat=config.runner_pat,
        gpu_pools=[GpuPool(accelerator=pool.accelerator_type,
                           max_gpus_per_pod=pool.accelerator_count)
                   for pool in config.gpu_pools],
        gpu_quota=config.effective_gpu_quota,
        pod_quota=config.pod_quota,
        base_runner_replicas=config.base_runner_replicas,
        base_runner_cpu=config.base_runner_cpu,
        base_runner_memory=config.base_runner_memory,
        egress_cidrs=config.egress_cidrs,
        reaper_schedule=config.reaper_schedule,
        max_runtime_minutes=config.max_runtime_minutes,
        image_pull_config=image.pull_secret_config,
        # The seed guide's workflow applies its GPU pod as the CI service account, with its own
        # pod manifest (no seccomp profile, capabilities kept), which `restricted` would refuse.
        seed_compatibility_user=(ci_identity.service_account_email
                                 if ci_identity is not None and config.seed_compatibility
                                 else None),
    ),
    opts=pulumi.ResourceOptions(providers=[kubernetes]),
)

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
    opts=pulumi.ResourceOptions(providers=[
        github.Provider("github", owner=config.github_owner, token=config.github_token),
    ]),
)

pulumi.export("runnerImage", image.ref)
pulumi.export("runnerNamespace", runner_plane.namespace)
pulumi.export("repositorySecrets", repository.secret_names)
