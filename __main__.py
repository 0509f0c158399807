"""One stack of GPU CI runners: read the config, compose the components, export what users need."""

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s

from components.cluster import GkeCluster, GkeClusterArgs
from components.config import load_stack_config

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
