"""The GKE cluster and its node pools, as the dev and prod stacks declare them."""

from __future__ import annotations

from datetime import datetime

import pytest
import yaml

from gpu_runners import contract
from tests.harness.mock_stack import ProgramRun, RegisteredResource, run_program

CLUSTER = "gcp:container/cluster:Cluster"
NODE_POOL = "gcp:container/nodePool:NodePool"


@pytest.fixture(scope="module")
def dev() -> ProgramRun:
    return run_program("dev")


@pytest.fixture(scope="module")
def prod() -> ProgramRun:
    return run_program("prod")


def gpu_pools(run: ProgramRun) -> list[RegisteredResource]:
    return [p for p in run.of_type(NODE_POOL)
            if p.inputs["nodeConfig"]["labels"][contract.NODE_GPU_LABEL] == "true"]


def cpu_pool(run: ProgramRun) -> RegisteredResource:
    (pool,) = [p for p in run.of_type(NODE_POOL)
               if p.inputs["nodeConfig"]["labels"][contract.NODE_GPU_LABEL] == "false"]
    return pool


def test_dev_cluster_drops_default_pool_and_enables_workload_identity(dev: ProgramRun) -> None:
    cluster = dev.one(CLUSTER).inputs
    assert cluster["removeDefaultNodePool"] is True
    assert cluster["workloadIdentityConfig"] == {"workloadPool": "acme-ml-ci.svc.id.goog"}
    assert cluster["deletionProtection"] is False
    assert cluster["location"] == "us-central1-a"
    assert cluster["name"] == "gpu-runners-dev"


def test_cluster_enforces_network_policies_and_follows_a_release_channel(dev: ProgramRun) -> None:
    cluster = dev.one(CLUSTER).inputs
    assert cluster["datapathProvider"] == "ADVANCED_DATAPATH"
    assert cluster["releaseChannel"] == {"channel": "REGULAR"}


def test_prod_cluster_is_deletion_protected_and_regional(prod: ProgramRun) -> None:
    cluster = prod.one(CLUSTER).inputs
    assert cluster["deletionProtection"] is True
    assert cluster["location"] == "us-central1"
    assert cluster["releaseChannel"] == {"channel": "STABLE"}


def test_nodes_run_as_a_dedicated_least_privilege_service_account(dev: ProgramRun) -> None:
    account = dev.one("gcp:serviceaccount/account:Account", "gke-nodes")
    email = f"{account.inputs['accountId']}@acme-ml-ci.iam.gserviceaccount.com"
    roles = [m.inputs for m in dev.of_type("gcp:projects/iAMMember:IAMMember")
             if m.inputs["member"] == f"serviceAccount:{email}"]
    # Image streaming (on by default) adds what GKE requires of a custom node account.
    assert sorted(r["role"] for r in roles) == ["roles/container.defaultNodeServiceAccount",
                                                "roles/serviceusage.serviceUsageConsumer"]
    for pool in dev.of_type(NODE_POOL):
        assert pool.inputs["nodeConfig"]["serviceAccount"] == email
        assert pool.inputs["nodeConfig"]["workloadMetadataConfig"] == {"mode": "GKE_METADATA"}


def test_cpu_pool_is_labelled_for_the_base_runner(dev: ProgramRun) -> None:
    pool = cpu_pool(dev).inputs
    assert pool["nodeConfig"]["labels"] == {"gpu": "false"}
    assert pool["nodeConfig"]["machineType"] == "e2-standard-4"
    assert pool["autoscaling"] == {"minNodeCount": 1, "maxNodeCount": 1}
    assert "guestAccelerators" not in pool["nodeConfig"]
    assert "taints" not in pool["nodeConfig"]


def test_dev_gpu_pool_is_spot_l4_scaling_from_zero_to_one(dev: ProgramRun) -> None:
    (pool,) = gpu_pools(dev)
    node = pool.inputs["nodeConfig"]
    assert node["labels"] == {"gpu": "true", "gpu-runners/accelerator": "nvidia-l4"}
    assert node["spot"] is True
    assert node["machineType"] == "g2-standard-8"
    assert node["guestAccelerators"] == [{
        "type": "nvidia-l4", "count": 1,
        "gpuDriverInstallationConfig": {"gpuDriverVersion": "DEFAULT"},
    }]
    assert node["taints"] == [{"key": "nvidia.com/gpu", "value": "present",
                               "effect": "NO_SCHEDULE"}]
    assert pool.inputs["autoscaling"] == {"totalMinNodeCount": 0, "totalMaxNodeCount": 1,
                                          "locationPolicy": "ANY"}
    assert pool.inputs["initialNodeCount"] == 0


def test_prod_gpu_pool_is_on_demand_two_l4_per_node_over_three_zones(prod: ProgramRun) -> None:
    (pool,) = gpu_pools(prod)
    node = pool.inputs["nodeConfig"]
    assert node["spot"] is False
    assert node["guestAccelerators"][0]["count"] == 2
    assert pool.inputs["autoscaling"] == {"totalMinNodeCount": 0, "totalMaxNodeCount": 4,
                                          "locationPolicy": "BALANCED"}
    assert pool.inputs["nodeLocations"] == ["us-central1-a", "us-central1-b", "us-central1-c"]


def test_several_gpu_pools_each_get_their_accelerator(dev: ProgramRun) -> None:
    run = run_program("dev", {"gpuPools": [
        {"name": "t4", "machineType": "n1-standard-8", "acceleratorType": "nvidia-tesla-t4",
         "acceleratorCount": 2, "maxNodes": 2},
        {"name": "a100", "machineType": "a2-highgpu-1g", "acceleratorType": "nvidia-tesla-a100",
         "maxNodes": 1, "minNodes": 1, "spot": False},
    ]})
    pools = {p.inputs["name"]: p.inputs for p in gpu_pools(run)}
    assert pools["t4"]["nodeConfig"]["guestAccelerators"][0]["type"] == "nvidia-tesla-t4"
    assert pools["t4"]["nodeConfig"]["guestAccelerators"][0]["count"] == 2
    assert pools["a100"]["nodeConfig"]["guestAccelerators"][0]["count"] == 1
    # A pool kept warm on purpose says so, for the policy pack's advisory rule.
    assert pools["a100"]["nodeConfig"]["labels"]["gpu-runners/warm-pool"] == "true"
    assert "gpu-runners/warm-pool" not in pools["t4"]["nodeConfig"]["labels"]


def test_gpu_pools_are_created_after_the_cpu_pool(dev: ProgramRun) -> None:
    # Registration order is dependency order under mocks: GKE adds its own GPU taint only when
    # a non-GPU pool already exists, so the CPU pool must come first.
    names = [r.name for r in dev.of_type(NODE_POOL)]
    assert names == ["gke-cpu", "gke-gpu-l4-spot"]


def test_pools_are_children_of_the_cluster_component(dev: ProgramRun) -> None:
    for pool in dev.of_type(NODE_POOL):
        assert "gpu-runners:index:GkeCluster$gcp:container/nodePool:NodePool" in pool.urn


def test_every_gcp_resource_uses_the_explicit_provider(dev: ProgramRun) -> None:
    for resource in dev.resources:
        if resource.custom and resource.typ.startswith("gcp:"):
            assert "pulumi:providers:gcp::gcp::" in resource.provider, resource.name
    gcp_provider = dev.one("pulumi:providers:gcp")
    assert gcp_provider.inputs["project"] == "acme-ml-ci"
    assert gcp_provider.inputs["region"] == "us-central1"


def test_kubeconfig_is_a_secret_exec_plugin_config_without_token(dev: ProgramRun) -> None:
    assert "kubeconfig" in dev.secret_outputs
    kubeconfig = yaml.safe_load(dev.outputs["kubeconfig"])
    (user,) = kubeconfig["users"]
    assert user["user"]["exec"]["command"] == "gke-gcloud-auth-plugin"
    assert "token" not in user["user"]
    # Application-default credentials, as Pulumi and google-github-actions/auth set them, not
    # gcloud's active account, which neither sets.
    assert user["user"]["exec"]["args"] == ["--use_application_default_credentials"]
    (cluster,) = kubeconfig["clusters"]
    assert cluster["cluster"]["server"] == "https://203.0.113.10"
    assert cluster["cluster"]["certificate-authority-data"]
    assert kubeconfig["current-context"] == "gke_acme-ml-ci_us-central1-a_gpu-runners-dev"


def test_kubernetes_provider_uses_the_cluster_kubeconfig_as_a_secret(dev: ProgramRun) -> None:
    provider = dev.one("pulumi:providers:kubernetes")
    assert provider.is_secret("kubeconfig")
    assert "gke-gcloud-auth-plugin" in provider.inputs["kubeconfig"]


def test_gke_upgrades_and_drains_nodes_only_in_the_weekend_window_by_default(
        dev: ProgramRun) -> None:
    # A node upgrade drains the node: without a window a GPU job is evicted mid-training.
    window = dev.one(CLUSTER).inputs["maintenancePolicy"]["recurringWindow"]
    assert window == {"startTime": "2024-01-01T02:00:00Z", "endTime": "2024-01-01T08:00:00Z",
                      "recurrence": "FREQ=WEEKLY;BYDAY=SA,SU"}
    # The pools keep auto-upgrade on (security patches), inside that window.
    assert all(p.inputs["management"]["autoUpgrade"] is True for p in gpu_pools(dev))


def test_a_window_past_midnight_ends_the_next_day() -> None:
    run = run_program("dev", {"maintenanceDays": ["FR", "SA", "SU"],
                              "maintenanceWindowUtc": "22:00-04:00"})
    window = run.one(CLUSTER).inputs["maintenancePolicy"]["recurringWindow"]
    assert (window["startTime"], window["endTime"]) == ("2024-01-01T22:00:00Z",
                                                        "2024-01-02T04:00:00Z")
    assert window["recurrence"] == "FREQ=WEEKLY;BYDAY=FR,SA,SU"


def test_gke_would_accept_every_stacks_window() -> None:
    # GKE refuses less than 48 hours of maintenance in any 32 days (each weekday occurs at
    # least 4 times), counting only windows of 4 hours or more.
    for run in (run_program("dev"), run_program("prod")):
        window = run.one(CLUSTER).inputs["maintenancePolicy"]["recurringWindow"]
        start = datetime.fromisoformat(window["startTime"])
        hours = (datetime.fromisoformat(window["endTime"]) - start).total_seconds() / 3600
        days = window["recurrence"].split("BYDAY=")[1].split(",")
        assert hours >= 4
        assert 4 * len(days) * hours >= 48
