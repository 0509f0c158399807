"""One stack of GPU CI runners: read the config, compose the components, export what users need."""

import pulumi
import pulumi_docker_build as docker_build
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s

from components.cluster import GkeCluster, GkeClusterArgs
from components.config import load_stack_config
from components.runner_image import RunnerImage, RunnerImageArgs
from components.runner_plane import GpuPoolSummary, RunnerPlane, RunnerPlaneArgs

config = load_stack_config()

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
        gpu_pools=[GpuPoolSummary(accelerator=pool.accelerator_type,
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
    ),
    opts=pulumi.ResourceOptions(providers=[kubernetes]),
)

pulumi.export("runnerImage", image.ref)
pulumi.export("runnerNamespace", runner_plane.namespace)
