"""`GkeCluster`: the GKE cluster, its CPU pool, its GPU pools and a Kubernetes provider for it."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta

import pulumi
import pulumi_gcp as gcp
import pulumi_kubernetes as k8s

from components.config import GpuPool, MaintenanceWindow
from gpu_runners import contract

#: Node label naming the pool's accelerator, set by this project (GKE adds its own
#: cloud.google.com/gke-accelerator, which users cannot set).
NODE_ACCELERATOR_LABEL = "gpu-runners/accelerator"
NODE_OAUTH_SCOPES = ["https://www.googleapis.com/auth/cloud-platform"]
#: APIs the cluster's resources call, enabled first: on a new project the node service
#: account (iam) and its project role (cloudresourcemanager) would otherwise race them.
REQUIRED_APIS = ("container.googleapis.com", "iam.googleapis.com",
                 "cloudresourcemanager.googleapis.com")
#: gke-gcloud-auth-plugin's switch from gcloud's active account to application-default
#: credentials (kubernetes/cloud-provider-gcp, cmd/gke-gcloud-auth-plugin).
ADC_FLAG = "--use_application_default_credentials"
#: The Container File System API serves image streaming; GKE streams nothing without it.
STREAMING_API = "containerfilesystem.googleapis.com"
#: What a custom node service account needs in the project holding the images to stream them.
STREAMING_ROLE = "roles/serviceusage.serviceUsageConsumer"


@dataclass(frozen=True)
class GkeClusterArgs:
    """What the cluster needs; built from the stack config by `__main__.py`."""

    project: str
    location: str
    cluster_name: str
    release_channel: str
    deletion_protection: bool
    cpu_machine_type: str
    cpu_min_nodes: int
    cpu_max_nodes: int
    node_disk_size_gb: int
    gpu_pools: Sequence[GpuPool]
    gpu_driver_version: str
    #: When GKE may upgrade the control plane and drain nodes for node upgrades.
    maintenance: MaintenanceWindow
    #: Lowest Kubernetes version of the control plane (e.g. "1.36"); empty for the channel's
    #: default.
    min_master_version: str = ""
    #: GKE image streaming on every pool: images in Artifact Registry (the mirror) start
    #: before they are fully pulled.
    image_streaming: bool = False


def gke_kubeconfig(context: str, endpoint: str, ca_certificate: str) -> str:
    """A kubeconfig for one GKE cluster that authenticates with `gke-gcloud-auth-plugin`.

    It holds no token: whoever uses it (Pulumi, an operator, a workflow) authenticates with
    their own application-default credentials at call time, so nothing that expires or grants
    access lands in state. The plugin is told to use them: by default it asks gcloud for the
    active account's token instead, which `gcloud auth application-default login` (all the GCP
    provider needs) does not set, and which a workflow's google-github-actions/auth login
    does not set either (it exports GOOGLE_APPLICATION_CREDENTIALS).
    """
    return "\n".join([
        "apiVersion: v1",
        "kind: Config",
        "clusters:",
        f"- name: {context}",
        "  cluster:",
        f"    server: https://{endpoint}",
        f"    certificate-authority-data: {ca_certificate}",
        "contexts:",
        f"- name: {context}",
        "  context:",
        f"    cluster: {context}",
        f"    user: {context}",
        f"current-context: {context}",
        "users:",
        f"- name: {context}",
        "  user:",
        "    exec:",
        "      apiVersion: client.authentication.k8s.io/v1beta1",
        "      command: gke-gcloud-auth-plugin",
        "      args:",
        f"      - {ADC_FLAG}",
        "      installHint: Install gke-gcloud-auth-plugin (gcloud components install "
        "gke-gcloud-auth-plugin)",
        "      provideClusterInfo: true",
        "",
    ])


#: A Monday long past: the recurring window's first occurrence; only its time of day, its
#: length and the recurrence matter.
_WINDOW_ANCHOR = datetime(2024, 1, 1, tzinfo=UTC)


def maintenance_policy(window: MaintenanceWindow) -> gcp.container.ClusterMaintenancePolicyArgsDict:
    """The cluster's recurring maintenance window: `window`'s hours on its days, in UTC.

    Without one GKE upgrades nodes whenever it likes, and a node upgrade drains the node: a
    GPU runner pod is evicted in the middle of its training job.
    """
    start = _WINDOW_ANCHOR + timedelta(minutes=window.start_minute)
    end = start + timedelta(hours=window.hours)
    return {"recurring_window": {
        "start_time": start.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "end_time": end.strftime("%Y-%m-%dT%H:%M:%SZ"),
        "recurrence": "FREQ=WEEKLY;BYDAY=" + ",".join(window.days),
    }}


class GkeCluster(pulumi.ComponentResource):
    """A GKE cluster for CI runners: a CPU pool for the base runner, GPU pools from zero.

    Creates the container, iam and cloudresourcemanager APIs first, a least-privilege node
    service account, the cluster (default pool removed, release channel, workload identity,
    Dataplane V2 so NetworkPolicies are enforced), a CPU pool labelled gpu=false, one GPU pool
    per config entry (labelled gpu=true, tainted nvidia.com/gpu, GKE-managed NVIDIA drivers,
    autoscaled from its minimum, 0 by default), a recurring maintenance window outside which GKE
    neither upgrades nor drains nodes (a drain evicts a running GPU job), image streaming on
    every pool when asked (with the Container File System API and the nodes' service usage
    role it needs), and a Kubernetes provider for the cluster.

    Outputs: `cluster_name`, `location`, `kubeconfig` (secret, exec-plugin form),
    `node_service_account`; the `provider` attribute is the Kubernetes provider the runner
    plane uses.
    """

    cluster_name: pulumi.Output[str]
    location: pulumi.Output[str]
    kubeconfig: pulumi.Output[str]
    node_service_account: pulumi.Output[str]

    def __init__(self, name: str, args: GkeClusterArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpu-runners:index:GkeCluster", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        apis = {
            service: gcp.projects.Service(
                f"{name}-{service.split('.')[0]}-api",
                project=args.project,
                service=service,
                # Other workloads in the project may use these APIs: destroying this stack must
                # not switch them off under them.
                disable_on_destroy=False,
                opts=child,
            )
            for service in (*REQUIRED_APIS, *((STREAMING_API,) if args.image_streaming else ()))
        }

        # Nodes get their own service account with only what nodes need (logs, metrics,
        # pulling GKE's images), not the default compute account's project-wide Editor.
        node_sa = gcp.serviceaccount.Account(
            f"{name}-nodes",
            project=args.project,
            account_id=f"{args.cluster_name[:24].rstrip('-')}-nodes",
            display_name=f"GKE nodes of {args.cluster_name}",
            opts=pulumi.ResourceOptions(parent=self, depends_on=[apis["iam.googleapis.com"]]),
        )
        node_sa_role = gcp.projects.IAMMember(
            f"{name}-nodes-role",
            project=args.project,
            role="roles/container.defaultNodeServiceAccount",
            member=node_sa.email.apply(lambda email: f"serviceAccount:{email}"),
            opts=pulumi.ResourceOptions(
                parent=self, depends_on=[apis["cloudresourcemanager.googleapis.com"]]),
        )

        streaming_needs: list[pulumi.Resource] = []
        if args.image_streaming:
            streaming_needs = [apis[STREAMING_API], gcp.projects.IAMMember(
                f"{name}-nodes-streaming",
                project=args.project,
                role=STREAMING_ROLE,
                member=node_sa.email.apply(lambda email: f"serviceAccount:{email}"),
                opts=pulumi.ResourceOptions(
                    parent=self, depends_on=[apis["cloudresourcemanager.googleapis.com"]]),
            )]
        self._streaming_needs = streaming_needs

        node_base: gcp.container.NodePoolNodeConfigArgsDict = {
            "service_account": node_sa.email,
            "oauth_scopes": NODE_OAUTH_SCOPES,
            "disk_size_gb": args.node_disk_size_gb,
            "image_type": "COS_CONTAINERD",
            "workload_metadata_config": {"mode": "GKE_METADATA"},
            "shielded_instance_config": {
                "enable_secure_boot": True,
                "enable_integrity_monitoring": True,
            },
        }
        if args.image_streaming:
            # Streams only images served by Artifact Registry (registry_mirror); others are
            # pulled whole as before. COS_CONTAINERD, above, is what streaming runs on.
            node_base["gcfs_config"] = {"enabled": True}

        self.cluster = gcp.container.Cluster(
            f"{name}-cluster",
            project=args.project,
            name=args.cluster_name,
            location=args.location,
            # The default pool cannot be given our labels and taints; it is created with one
            # node (an API requirement) and removed once the cluster exists.
            remove_default_node_pool=True,
            initial_node_count=1,
            node_config={"service_account": node_sa.email, "oauth_scopes": NODE_OAUTH_SCOPES},
            deletion_protection=args.deletion_protection,
            release_channel={"channel": args.release_channel},
            workload_identity_config={"workload_pool": f"{args.project}.svc.id.goog"},
            datapath_provider="ADVANCED_DATAPATH",
            networking_mode="VPC_NATIVE",
            ip_allocation_policy={},
            enable_shielded_nodes=True,
            maintenance_policy=maintenance_policy(args.maintenance),
            min_master_version=args.min_master_version or None,
            resource_labels={"managed-by": "pulumi", "app": contract.PART_OF},
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[apis["container.googleapis.com"], node_sa_role],
                # These describe only the transient default pool.
                ignore_changes=["nodeConfig", "initialNodeCount"],
            ),
        )

        self.cpu_pool = gcp.container.NodePool(
            f"{name}-cpu",
            project=args.project,
            cluster=self.cluster.id,
            name="cpu",
            location=args.location,
            initial_node_count=args.cpu_min_nodes or 1,
            autoscaling={"min_node_count": args.cpu_min_nodes,
                         "max_node_count": args.cpu_max_nodes},
            management={"auto_repair": True, "auto_upgrade": True},
            node_config={
                **node_base,
                "machine_type": args.cpu_machine_type,
                "labels": {contract.NODE_GPU_LABEL: "false"},
            },
            # Streaming nodes need its API and their role before they pull.
            opts=pulumi.ResourceOptions(parent=self, ignore_changes=["initialNodeCount"],
                                        depends_on=self._streaming_needs),
        )

        self.gpu_pools = [self._gpu_pool(name, args, pool, node_base) for pool in args.gpu_pools]

        self.cluster_name = self.cluster.name
        self.location = self.cluster.location
        context = pulumi.Output.concat("gke_", args.project, "_", args.location, "_",
                                       self.cluster.name)
        self.kubeconfig = pulumi.Output.secret(
            pulumi.Output.all(context, self.cluster.endpoint,
                              self.cluster.master_auth.cluster_ca_certificate)
            .apply(lambda parts: gke_kubeconfig(parts[0], parts[1], parts[2] or ""))
        )
        self.node_service_account = node_sa.email

        self.provider = k8s.Provider(
            f"{name}-k8s",
            kubeconfig=self.kubeconfig,
            # If the cluster is gone (deleted by hand), destroy can still drop its objects.
            delete_unreachable=True,
            # Workloads need somewhere to run: nothing is applied before the CPU pool exists.
            opts=pulumi.ResourceOptions(parent=self, depends_on=[self.cpu_pool]),
        )

        self.register_outputs({
            "cluster_name": self.cluster_name,
            "location": self.location,
            "kubeconfig": self.kubeconfig,
            "node_service_account": self.node_service_account,
        })

    def _gpu_pool(self, name: str, args: GkeClusterArgs, pool: GpuPool,
                  node_base: gcp.container.NodePoolNodeConfigArgsDict) -> gcp.container.NodePool:
        labels = {
            contract.NODE_GPU_LABEL: "true",
            NODE_ACCELERATOR_LABEL: pool.accelerator_type,
        }
        if pool.warm:
            labels[contract.NODE_WARM_POOL_LABEL] = "true"
        return gcp.container.NodePool(
            f"{name}-gpu-{pool.name}",
            project=args.project,
            cluster=self.cluster.id,
            name=pool.name,
            location=args.location,
            node_locations=list(pool.zones) or None,
            initial_node_count=pool.min_nodes,
            # Totals, not per-zone counts: the GPU budget is the same whatever the zones.
            autoscaling={
                "total_min_node_count": pool.min_nodes,
                "total_max_node_count": pool.max_nodes,
                # ANY lets the autoscaler take capacity wherever it exists, which is what Spot
                # and scarce GPUs need; on-demand pools spread evenly.
                "location_policy": "ANY" if pool.spot else "BALANCED",
            },
            management={"auto_repair": True, "auto_upgrade": True},
            node_config={
                **node_base,
                "machine_type": pool.machine_type,
                "spot": pool.spot,
                "labels": labels,
                # GKE adds this taint itself only when a non-GPU pool already exists, which
                # races with removing the default pool; declaring it makes it certain.
                "taints": [{"key": contract.GPU_TAINT_KEY, "value": contract.GPU_TAINT_VALUE,
                            "effect": "NO_SCHEDULE"}],
                "guest_accelerators": [{
                    "type": pool.accelerator_type,
                    "count": pool.accelerator_count,
                    "gpu_driver_installation_config": {
                        "gpu_driver_version": args.gpu_driver_version,
                    },
                }],
            },
            opts=pulumi.ResourceOptions(
                parent=self,
                depends_on=[self.cpu_pool, *self._streaming_needs],
                # The autoscaler owns the node count; a changed initial count would otherwise
                # replace the pool.
                ignore_changes=["initialNodeCount"],
            ),
        )
