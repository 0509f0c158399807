"""`python -m gpu_runners.doctor` against the fake cluster and GitHub, over real HTTP.

A healthy installation passes every check and exits 0; each broken part fails its own check
with a fix and exits 1. In every case the probe and smoke pods are gone afterwards.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from dataclasses import replace
from datetime import timedelta
from typing import Any

from gpu_runners import contract
from gpu_runners.gpu_pools import GpuPool
from tests.doctor.conftest import RunDoctor
from tests.doctor.installation import (
    NOW,
    POOLS,
    Installation,
    fake_node_pools,
    install,
)
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, FakeNode, PodScript

MakeFake = Callable[..., FakeKubernetes]
EVERY_CHECK = [
    "nodes: CPU pool", "broker: available", "base runner: available",
    "quota: runner namespace", "repository ids", "token: scopes", "token: actions write",
    "token: runner administration",
    "base runner: online on GitHub", "image: pullable", "network: GitHub API",
    "network: image registry", "network: Kubernetes API server", "runner version",
    "scale-up: nvidia-l4", "GPU smoke: nvidia-l4", "scale-up: nvidia-tesla-t4",
    "GPU smoke: nvidia-tesla-t4", "nodes: GPU labels", "GPU driver: nvidia-l4",
    "GPU driver: nvidia-tesla-t4", "spot: gpu-nvidia-l4", "spot: gpu-nvidia-tesla-t4",
]
COLD_START = ["created", "scale-up decision", "node ready", "driver ready", "scheduled",
              "image pulled", "running", "finished"]


def test_a_healthy_installation_passes_every_check_and_exits_0(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    run = run_doctor(installation)

    assert run.exit_code == 0, run.report
    assert run.report["ok"] is True
    assert [item["check"] for item in run.report["checks"]] == EVERY_CHECK
    assert {item["status"] for item in run.report["checks"]} == {"pass"}
    assert installation.doctor_pods() == []


def test_the_json_report_times_each_pools_cold_start_in_order(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    run = run_doctor(installation)

    cold = {item["pool"]: item for item in run.report["cold_starts"]}
    assert sorted(cold) == sorted(pool.accelerator for pool in POOLS)
    l4 = cold["nvidia-l4"]
    assert l4["outcome"] == "passed"
    assert l4["gpu"] == "NVIDIA L4, 550.54.15, 23034 MiB"
    assert [stage["stage"] for stage in l4["stages"]] == COLD_START
    seconds = [stage["seconds"] for stage in l4["stages"]]
    assert seconds == sorted(seconds)
    assert run.check("GPU smoke: nvidia-tesla-t4")["detail"] == (
        "nvidia-smi: Tesla T4, 550.54.15, 15360 MiB")
    assert run.check("scale-up: nvidia-l4")["detail"] == (
        "the autoscaler added a node for the smoke pod")
    assert run.check("nodes: GPU labels")["detail"] == (
        "2 GPU node(s) labelled and tainted as expected")


def test_the_smoke_and_probe_pods_are_restricted_gpu_pods_without_registration(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    run_doctor(installation)

    created = [request.body for request in installation.kube.requests
               if request.method == "POST" and request.path.endswith("/pods")]
    smoke = [pod for pod in created if "-smoke-" in pod["metadata"]["name"]]
    probe = [pod for pod in created if "-probe-" in pod["metadata"]["name"]]
    assert len(probe) == 1 and len(smoke) == len(POOLS)
    l4 = next(pod for pod in smoke if "nvidia-l4" in pod["metadata"]["name"])
    container = l4["spec"]["containers"][0]
    assert container["command"][0] == "nvidia-smi"
    assert container["resources"]["limits"][contract.GPU_RESOURCE] == "1"
    env = {item["name"]: item["value"] for item in container["env"]}
    assert "/usr/local/nvidia/bin" in env["PATH"].split(":")
    assert env["LD_LIBRARY_PATH"].startswith("/usr/local/nvidia/lib64")
    assert l4["spec"]["tolerations"] == [
        {"key": contract.GPU_TAINT_KEY, "operator": "Exists", "effect": "NoSchedule"}]
    assert l4["spec"]["nodeSelector"] == {contract.NODE_GPU_LABEL: "true",
                                          contract.GKE_ACCELERATOR_LABEL: "nvidia-l4"}
    for pod in created:
        assert pod["spec"]["automountServiceAccountToken"] is False
        assert pod["spec"]["activeDeadlineSeconds"] > 0
        names = {item["name"] for item in pod["spec"]["containers"][0].get("env", [])}
        assert not names & {contract.ENV_RUNNER_MODE, contract.ENV_JIT_CONFIG_FILE,
                            contract.ENV_RUNNER_JITCONFIG}
    # Nothing was registered on GitHub for them.
    assert not installation.github.requests_to("generate-jitconfig")
    assert installation.kube.validation_errors == []


def test_no_cpu_node_fails_the_cpu_check_with_its_fix(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    unlabelled = [FakeNode(f"gke-cpu-{index}", {"cloud.google.com/gke-nodepool": "default"})
                  for index in range(2)]
    installation = install(make_fake_kube, fake_github, nodes=unlabelled)

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 1
    cpu = run.check("nodes: CPU pool")
    assert cpu["status"] == "fail"
    assert "kubectl label node <node> gpu=false" in cpu["fix"]
    # The probe pod, which selects gpu=false like the broker, found no node either.
    assert run.check("network: GitHub API")["status"] == "fail"
    assert installation.doctor_pods() == []


def test_a_pool_that_cannot_scale_up_fails_its_scale_up_check(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    installation = install(make_fake_kube, fake_github, node_pools=fake_node_pools(max_nodes=0))

    run = run_doctor(installation)

    assert run.exit_code == 1
    scale = run.check("scale-up: nvidia-l4")
    assert scale["status"] == "fail"
    assert "max node group size reached" in scale["detail"]
    assert "max nodes" in scale["fix"]
    assert run.check("GPU smoke: nvidia-l4")["status"] == "skip"
    assert run.check("GPU driver: nvidia-l4")["status"] == "fail"
    assert installation.doctor_pods() == []


def test_a_pool_whose_new_nodes_lack_the_gpu_taint_fails_the_labels_check(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    pools = [replace(pool, taints=()) if "nvidia-l4" in pool.name else pool
             for pool in fake_node_pools()]
    installation = install(make_fake_kube, fake_github, node_pools=pools)

    run = run_doctor(installation)

    assert run.failed() == ["nodes: GPU labels"]
    labels = run.check("nodes: GPU labels")
    assert re.fullmatch(r"gke-fake-gpu-nvidia-l4-\w+ lacks taint nvidia.com/gpu:NoSchedule",
                        labels["detail"])
    assert "declare them on the node pool" in labels["fix"]
    assert installation.doctor_pods() == []


def test_an_image_that_cannot_be_pulled_fails_the_image_check(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    denied = ('rpc error: code = Unknown desc = failed to pull and unpack image: '
              'failed to authorize: 403 Forbidden')
    installation = install(make_fake_kube, fake_github,
                           scheduler=lambda pod: PodScript.image_pull_error(denied))

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 1
    image = run.check("image: pullable")
    assert image["status"] == "fail"
    assert "403 Forbidden" in image["detail"]
    assert "imagePrivate=true" in image["fix"]
    assert run.check("network: GitHub API")["status"] == "skip"
    assert installation.doctor_pods() == []


def test_a_network_target_the_probe_cannot_reach_fails_with_the_egress_fix(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    installation.findings[2] = {
        "target": "Kubernetes API server", "host": "34.118.224.1", "port": 443, "ok": False,
        "stage": "connect", "detail": "cannot connect to 34.118.224.1:443: timed out"}

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 1
    assert run.failed() == ["network: Kubernetes API server"]
    api = run.check("network: Kubernetes API server")
    assert api["detail"] == "cannot connect to 34.118.224.1:443: timed out"
    assert "egressCidrs" in api["fix"] and "Dataplane V2" in api["fix"]
    assert run.check("network: GitHub API")["status"] == "pass"
    assert installation.doctor_pods() == []


def test_a_repository_id_other_than_the_brokers_fails_the_ids_check(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    installation.github.repository_id = 987654  # deleted and re-created under the same name

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 1
    ids = run.check("repository ids")
    assert ids["status"] == "fail"
    assert "repository id is 987654, the broker expects 1296269" in ids["detail"]
    assert "pulumi up" in ids["fix"]
    assert installation.doctor_pods() == []


def test_a_token_without_the_repo_scope_and_runner_access_fails_both_checks(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    installation.github.oauth_scopes = "read:org"
    installation.github.inject(
        "GET", r"/actions/runners$", 403, times=5,
        headers={"X-Accepted-OAuth-Scopes": "repo", "X-OAuth-Scopes": "read:org"},
        body={"message": "Resource not accessible by personal access token"})

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 1
    assert run.check("token: scopes")["status"] == "fail"
    assert "without repo" in run.check("token: scopes")["detail"]
    access = run.check("token: runner administration")
    assert access["status"] == "fail"
    assert "403" in access["detail"]
    assert "Administration" in access["fix"]
    assert run.check("base runner: online on GitHub")["status"] == "skip"
    # Nor can the broker re-run a run after a Spot preemption with such a PAT.
    actions = run.check("token: actions write")
    assert actions["status"] == "fail"
    assert "cannot re-run a run after its Spot node was reclaimed" in actions["detail"]
    assert "maxPreemptionRetries 0" in actions["fix"]
    assert installation.github.token not in run.stderr + str(run.report)
    assert installation.doctor_pods() == []


def test_a_runner_more_than_30_days_behind_fails_the_version_check(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    installation.findings[-1] = {"runner_version": "2.328.0"}

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 1
    version = run.check("runner version")
    assert version["status"] == "fail"
    stopped = (NOW - timedelta(days=40) + timedelta(days=30)).strftime("%Y-%m-%d")
    assert "v2.329.0 was released on" in version["detail"]
    assert f"stopped sending jobs to this runner on {stopped}" in version["detail"]
    assert "RUNNER_VERSION" in version["fix"]
    assert installation.doctor_pods() == []


def test_a_broker_that_is_not_available_fails_its_check(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    installation = install(make_fake_kube, fake_github, broker_available=False)

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 1
    assert run.failed() == ["broker: available"]
    broker = run.check("broker: available")
    assert "0/1 replica(s) available (MinimumReplicasUnavailable" in broker["detail"]
    assert f"logs deployment/{contract.BROKER_NAME}" in broker["fix"]
    assert installation.doctor_pods() == []


def test_a_base_runner_offline_on_github_fails_its_check(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    installation.github.set_runner_status("base-runner-7d9f-x2k4p", "offline")

    run = run_doctor(installation, "--skip-smoke")

    assert run.failed() == ["base runner: online on GitHub"]
    assert "1 registered, none online" in run.check("base runner: online on GitHub")["detail"]


def test_a_smoke_pod_whose_nvidia_smi_fails_fails_the_gpu_check(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    installation.smoke_exit_code = 127
    installation.nvidia_smi = {pool.accelerator: "exec: nvidia-smi: not found" for pool in POOLS}

    run = run_doctor(installation)

    assert run.exit_code == 1
    gpu = run.check("GPU smoke: nvidia-l4")
    assert gpu["status"] == "fail"
    assert "exited with code 127" in gpu["detail"]
    assert "nvidia-smi: not found" in gpu["detail"]
    assert "/usr/local/nvidia" in gpu["fix"]
    assert installation.doctor_pods() == []


def test_skip_smoke_runs_no_gpu_pod(installation: Installation, run_doctor: RunDoctor) -> None:
    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 0
    assert run.check("GPU smoke")["status"] == "skip"
    assert run.check("GPU driver: nvidia-l4")["status"] == "skip"
    assert [name for name in installation.started if "-smoke-" in name] == []
    assert run.report["cold_starts"] == []


def test_smoke_pods_go_one_batch_at_a_time_when_the_quota_has_room_for_one(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    installation = install(make_fake_kube, fake_github, gpu_quota=2)
    installation.kube.seed({  # a training job holds one of the two GPUs
        "kind": "Pod",
        "metadata": {"name": "gpu-4711-1"},
        "spec": {"containers": [{"name": "runner", "image": "ghcr.io/acme/train:1",
                                 "resources": {"requests": {contract.GPU_RESOURCE: "1"}}}]},
        "status": {"phase": "Running"},
    })

    run = run_doctor(installation)

    assert run.exit_code == 0, run.failed()
    assert [cold["outcome"] for cold in run.report["cold_starts"]] == ["passed", "passed"]
    smoke_creates = [request.status for request in installation.kube.requests
                     if request.method == "POST" and "-smoke-" in str(request.body)]
    assert smoke_creates == [201, 201]
    assert installation.doctor_pods() == []
    assert installation.kube.pod("gpu-4711-1") is not None  # not the doctor's to delete


def test_a_scale_up_failing_on_gce_quota_fails_with_the_gcp_quota_fix(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    holder: list[FakeKubernetes] = []

    def quota_refused(pod: dict[str, Any]) -> PodScript:
        labels = pod["metadata"]["labels"]
        if labels.get(contract.LABEL_GPU_TYPE) != "nvidia-l4":
            return holder[0].default_script(pod)
        # The autoscaler asks for a node; GCE refuses it, and GKE says so on the pod.
        holder[0].seed({"kind": "Event", "type": "Warning", "reason": "FailedScaleUp",
                        "metadata": {"name": f"{pod['metadata']['name']}.quota"},
                        "involvedObject": {"kind": "Pod", "name": pod["metadata"]["name"],
                                           "uid": pod["metadata"]["uid"]},
                        "message": "Node scale up in zones us-central1-a associated with this "
                                   "pod failed: GCE quota exceeded. Pod is at risk of not "
                                   "being scheduled."})
        return PodScript.scale_up(scale_up_delay=60.0)

    installation = install(make_fake_kube, fake_github, scheduler=quota_refused)
    holder.append(installation.kube)

    run = run_doctor(installation)

    assert run.exit_code == 1
    scale = run.check("scale-up: nvidia-l4")
    assert scale["status"] == "fail"
    assert "GCE quota exceeded" in scale["detail"]
    assert "raise the GCP quota for nvidia-l4 GPUs" in scale["fix"]
    assert run.check("GPU smoke: nvidia-tesla-t4")["status"] == "pass"
    assert installation.doctor_pods() == []


# --- Spot pools ---------------------------------------------------------------------------------

SPOT_L4 = GpuPool("nvidia-l4", 1, name="l4-spot", spot=True, on_demand_fallback="l4")
ON_DEMAND_L4 = GpuPool("nvidia-l4", 1, name="l4")


def test_each_pool_reports_its_spot_status_as_its_nodes_confirm_it(
    installation: Installation, run_doctor: RunDoctor,
) -> None:
    run = run_doctor(installation)

    assert run.check("spot: gpu-nvidia-l4")["detail"] == (
        "Spot (1 node(s) up, all Spot); no onDemandFallback: after a preemption the broker "
        "retries a run up to 2 time(s) in this Spot pool")
    assert run.check("spot: gpu-nvidia-tesla-t4")["detail"] == "on-demand (1 node(s) up, all " \
        "on-demand)"
    actions = run.check("token: actions write")
    assert actions["status"] == "pass"
    assert "repo scope includes Actions write" in actions["detail"]


def test_a_pool_whose_nodes_are_not_what_the_stack_declares_fails_with_the_fix(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    # The cluster's pools were changed by hand: the L4 pool is on-demand, the T4 pool Spot.
    swapped = [replace(pool, spot=not pool.spot) for pool in POOLS]
    installation = install(make_fake_kube, fake_github,
                           node_pools=fake_node_pools(pools=swapped))

    run = run_doctor(installation)

    assert run.failed() == ["spot: gpu-nvidia-l4", "spot: gpu-nvidia-tesla-t4"]
    l4 = run.check("spot: gpu-nvidia-l4")
    assert re.fullmatch(r"the stack declares pool gpu-nvidia-l4 Spot, but node\(s\) "
                        r"gke-fake-gpu-nvidia-l4-\w+ are on-demand \(no "
                        r"cloud.google.com/gke-spot=true label\)", l4["detail"])
    assert "run pulumi up" in l4["fix"] and "spot: true" in l4["fix"]
    t4 = run.check("spot: gpu-nvidia-tesla-t4")
    assert "declares pool gpu-nvidia-tesla-t4 on-demand" in t4["detail"]
    assert "are Spot VMs (cloud.google.com/gke-spot=true)" in t4["detail"]
    assert installation.doctor_pods() == []


def test_a_spot_pool_names_its_on_demand_fallback_and_shares_one_smoke_pod_with_it(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    installation = install(make_fake_kube, fake_github, pools=[SPOT_L4, ON_DEMAND_L4],
                           broker_settings={contract.ENV_MAX_PREEMPTION_RETRIES: "3"})

    run = run_doctor(installation)

    assert run.exit_code == 0, run.failed()
    spot = run.check("spot: l4-spot")["detail"]
    assert spot.endswith("after a preemption the broker retries a run up to 3 time(s) in "
                         "on-demand pool l4")
    assert run.check("spot: l4")["detail"].endswith("; on-demand fallback of l4-spot")
    # One smoke pod for the accelerator the two pools share.
    smoke = [name for name in installation.started if "-smoke-" in name]
    assert len(smoke) == 1
    assert [cold["pool"] for cold in run.report["cold_starts"]] == ["nvidia-l4"]
    assert installation.doctor_pods() == []


def test_zero_preemption_retries_say_recovery_is_off(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    installation = install(make_fake_kube, fake_github, pools=[SPOT_L4, ON_DEMAND_L4],
                           broker_settings={contract.ENV_MAX_PREEMPTION_RETRIES: "0"})

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 0, run.failed()
    assert run.check("spot: l4-spot")["detail"] == (
        "Spot (no node up to compare); preemption recovery is off (maxPreemptionRetries 0): "
        "a run whose node is reclaimed fails")
    assert run.check("token: actions write")["status"] == "skip"


def test_a_broken_retry_setting_fails_the_broker_settings_check(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    installation = install(make_fake_kube, fake_github,
                           broker_settings={contract.ENV_MAX_PREEMPTION_RETRIES: "9"})

    run = run_doctor(installation, "--skip-smoke")

    assert run.failed() == ["broker: settings"]
    assert run.check("broker: settings")["detail"] == (
        f"{contract.ENV_MAX_PREEMPTION_RETRIES}: '9' is not an integer from 0 to 5")


def test_pools_the_broker_names_without_names_skip_the_spot_check(
    make_fake_kube: MakeFake, fake_github: FakeGitHub, run_doctor: RunDoctor,
) -> None:
    # A broker deployed before pools were named: the two-key form.
    installation = install(make_fake_kube, fake_github, broker_settings={
        contract.ENV_GPU_POOLS: '[{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}]'})

    run = run_doctor(installation, "--skip-smoke")

    assert run.exit_code == 0, run.failed()
    spot = run.check("spot: nvidia-l4")
    assert spot["status"] == "skip" and "run pulumi up" in spot["detail"]
