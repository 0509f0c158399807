"""The doctor's rules, on facts built by hand: what passes, warns, fails, and the fix named."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from gpu_runners import contract
from gpu_runners.doctor.cluster_checks import (
    check_gpu_driver,
    check_gpu_node_labels,
    check_quota,
    check_spot_pool,
)
from gpu_runners.doctor.cluster_facts import NodeFact, QuotaFact
from gpu_runners.doctor.github_checks import check_actions_write
from gpu_runners.doctor.pod_watch import NODE_READY, FailureKind, PodRun
from gpu_runners.doctor.probe import probe_targets, registry_host
from gpu_runners.doctor.report import CheckResult, Examination, Status, render_table
from gpu_runners.doctor.runner_version import check_runner_version, parse_releases
from gpu_runners.doctor.smoke import judge_smoke
from gpu_runners.gpu_pools import GpuPool

NOW = datetime(2026, 12, 3, tzinfo=UTC)
L4 = GpuPool("nvidia-l4", 1)
GPU_QUOTA = f"requests.{contract.GPU_RESOURCE}"


def release(tag: str, days_ago: int, **flags: bool) -> dict[str, object]:
    published = (NOW - timedelta(days=days_ago)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return {"tag_name": tag, "published_at": published, **flags}


def gpu_node(name: str, *, gpus: int = 1, taint: bool = True, ready: bool = True,
             labels: dict[str, str] | None = None) -> NodeFact:
    return NodeFact(
        name=name,
        labels=labels if labels is not None else {
            contract.NODE_GPU_LABEL: "true", contract.GKE_ACCELERATOR_LABEL: "nvidia-l4"},
        ready=ready, allocatable_gpus=gpus,
        taints=((contract.GPU_TAINT_KEY, "NoSchedule"),) if taint else (),
    )


# --- runner version -----------------------------------------------------------------------------


def test_the_latest_runner_passes() -> None:
    result = check_runner_version("2.330.0", parse_releases([release("v2.330.0", 3)]), NOW)

    assert (result.status, result.detail) == (Status.PASS, "2.330.0 is the latest release")


def test_the_clock_starts_at_the_first_newer_release_not_the_latest() -> None:
    releases = parse_releases([release("v2.331.0", 2), release("v2.330.0", 26),
                               release("v2.329.0", 60)])

    result = check_runner_version("2.329.0", releases, NOW)

    assert result.status is Status.WARN
    assert "v2.330.0 was released on 2026-11-07" in result.detail
    assert "in 4 day(s)" in result.detail


def test_a_newer_release_within_the_grace_passes_with_its_due_date() -> None:
    result = check_runner_version("2.329.0", parse_releases([release("v2.330.0", 10)]), NOW)

    assert result.status is Status.PASS
    assert result.detail.endswith("update due by 2026-12-23")


def test_prereleases_and_drafts_do_not_start_the_clock() -> None:
    releases = parse_releases([release("v2.331.0", 40, prerelease=True),
                               release("v2.332.0", 40, draft=True), release("v2.330.0", 50)])

    assert check_runner_version("2.330.0", releases, NOW).status is Status.PASS


def test_an_unknown_image_version_is_skipped_not_failed() -> None:
    releases = parse_releases([release("v2.330.0", 50)])

    assert check_runner_version(None, releases, NOW).status is Status.SKIP
    assert check_runner_version("dev", releases, NOW).status is Status.SKIP


# --- cluster ------------------------------------------------------------------------------------


def test_a_gpu_node_without_the_gpu_taint_fails_naming_the_node() -> None:
    result = check_gpu_node_labels([gpu_node("gke-l4-a"), gpu_node("gke-l4-b", taint=False)])

    assert result.status is Status.FAIL
    assert result.detail == f"gke-l4-b lacks taint {contract.GPU_TAINT_KEY}:NoSchedule"


def test_a_node_with_an_accelerator_but_no_gpu_label_fails() -> None:
    node = gpu_node("gke-l4-a", labels={contract.GKE_ACCELERATOR_LABEL: "nvidia-l4"})

    result = check_gpu_node_labels([node])

    assert result.status is Status.FAIL
    assert f"lacks {contract.NODE_GPU_LABEL}=true" in result.detail


def test_a_ready_gpu_node_without_allocatable_gpus_fails_the_driver_check() -> None:
    result = check_gpu_driver(L4, [gpu_node("gke-l4-a", gpus=0)], smoke_ran=True)

    assert result.status is Status.FAIL
    assert "device plugin" in result.detail
    assert "nvidia-gpu-device-plugin" in result.fix


def test_quota_below_the_largest_pod_fails() -> None:
    quota = QuotaFact("gpu-runners", {GPU_QUOTA: 1, "pods": 10}, {GPU_QUOTA: 0, "pods": 1})

    result = check_quota([quota], [L4, GpuPool("nvidia-a100-80gb", 4)])

    assert result.status is Status.FAIL
    assert "gpuQuota" in result.fix and "at least 4" in result.fix


def test_quota_used_up_fails_and_no_quota_warns() -> None:
    used_up = QuotaFact("gpu-runners", {GPU_QUOTA: 2}, {GPU_QUOTA: 2})

    assert check_quota([used_up], [L4]).status is Status.FAIL
    assert check_quota([], [L4]).status is Status.WARN


# --- smoke --------------------------------------------------------------------------------------


def test_a_scale_up_refused_for_quota_points_at_the_gcp_quota() -> None:
    run = PodRun("smoke", failure="no nvidia-l4 GPU capacity and no scale-up coming: pod "
                                  "didn't trigger scale-up: 1 in backoff after failed scale-up",
                 failure_kind=FailureKind.CAPACITY)

    results, cold = judge_smoke("nvidia-l4", run)

    assert results[0].status is Status.FAIL
    assert "GCP quota" in results[0].fix and "NVIDIA_L4_GPUS" in results[0].fix
    assert cold.outcome == run.failure


def test_a_node_that_never_offers_its_gpu_fails_the_smoke_with_the_driver_fix() -> None:
    run = PodRun("smoke", stages={"created": 0.0, NODE_READY: 80.0},
                 failure="not finished within 900s (last stage: created)",
                 failure_kind=FailureKind.TIMEOUT)

    results, _ = judge_smoke("nvidia-l4", run)

    gpu = results[1]
    assert gpu.status is Status.FAIL
    assert gpu.detail.startswith("a node came up but never offered a GPU")
    assert "driver" in gpu.fix


# --- probe targets and report -------------------------------------------------------------------


@pytest.mark.parametrize(("image", "host"), [
    ("ghcr.io/acme/runner@sha256:abc", "ghcr.io"),
    ("us-docker.pkg.dev/p/r/runner:1", "us-docker.pkg.dev"),
    ("localhost:5000/runner", "localhost"),
    ("ubuntu:24.04", "registry-1.docker.io"),
    ("library/ubuntu", "registry-1.docker.io"),
])
def test_the_registry_host_of_an_image_reference(image: str, host: str) -> None:
    assert registry_host(image) == host


def test_probe_targets_follow_a_ghes_api_url() -> None:
    targets = probe_targets("https://github.example.com/api/v3", "ghcr.io/acme/runner")

    assert targets[0]["host"] == "github.example.com"
    assert targets[0]["port"] == 443
    assert targets[2]["host"] == ""  # the pod's own KUBERNETES_SERVICE_HOST


def test_a_failure_without_its_fix_cannot_be_reported() -> None:
    with pytest.raises(ValueError, match="needs its fix"):
        CheckResult("x", Status.FAIL, "broken")


def test_the_table_lists_each_fix_and_the_exit_code_follows_failures() -> None:
    failing = Examination((
        CheckResult("nodes: CPU pool", Status.PASS, "3 Ready node(s)"),
        CheckResult("runner version", Status.FAIL, "too old", fix="rebuild the image"),
    ))
    warned = Examination((CheckResult("quota", Status.WARN, "none", fix="declare one"),))

    table = render_table(failing)

    assert "FAIL    runner version   too old" in table
    assert "  runner version: rebuild the image" in table
    assert table.endswith("1 check(s) failed.\n")
    assert (failing.exit_code, warned.exit_code) == (1, 0)


# --- Spot pools and the right to re-run a run ------------------------------------------------


def test_the_broker_s_app_or_a_fine_grained_token_is_told_to_hold_actions_write() -> None:
    app = check_actions_write("repo", "env GITHUB_TOKEN", {contract.ENV_GITHUB_APP_ID: "Iv23li1"},
                              2)
    assert app.status is Status.SKIP
    assert "GitHub App Iv23li1" in app.detail and "Actions: Read and write" in app.detail
    fine = check_actions_write(None, "env GITHUB_TOKEN", {}, 2)
    assert fine.status is Status.SKIP and "Actions: Read and write" in fine.detail
    assert check_actions_write("repo", "env GITHUB_TOKEN", {}, 2).status is Status.PASS
    off = check_actions_write("read:org", "env GITHUB_TOKEN", {}, 0)
    assert off.status is Status.SKIP and "maxPreemptionRetries 0" in off.detail


def test_a_spot_pool_with_one_on_demand_node_fails_naming_it() -> None:
    pool = GpuPool("nvidia-l4", 1, name="l4-spot", spot=True)
    spot = {contract.GKE_NODEPOOL_LABEL: "l4-spot", contract.GKE_SPOT_LABEL: "true"}
    nodes = [gpu_node("n1", labels=spot),
             gpu_node("n2", labels={contract.GKE_NODEPOOL_LABEL: "l4-spot"}),
             gpu_node("other", labels={contract.GKE_NODEPOOL_LABEL: "t4"})]

    result = check_spot_pool(pool, [pool], nodes, 2)

    assert result.status is Status.FAIL
    assert "node(s) n2 are on-demand" in result.detail
    assert check_spot_pool(pool, [pool], nodes[:1], 2).status is Status.PASS
