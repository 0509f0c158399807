"""What each pool's smoke pod says: could the pool scale up, did the GPU answer, and where
the cold start went. Pure: reads `PodRun`s."""

from __future__ import annotations

from collections.abc import Sequence

from gpu_runners.doctor.pod_watch import (
    DRIVER_READY,
    NODE_READY,
    SCALE_UP_DECISION,
    SCHEDULED,
    FailureKind,
    PodRun,
)
from gpu_runners.doctor.report import CheckResult, ColdStart, Status

#: Words in an autoscaler or scheduler message that point at a quota, GCP's or the namespace's.
_QUOTA_WORDS = ("quota", "QUOTA_EXCEEDED")
#: What a failed scale-up leaves on the pod: GKE's autoscaler backs the node group off.
_BACKOFF_WORDS = ("backoff after failed scale-up",)


def gpu_summary(log: Sequence[str]) -> str:
    """nvidia-smi's CSV lines (name, driver, memory), joined; "" if it printed none."""
    lines = [line.strip() for line in log if line.count(",") >= 2 and line.strip()]
    return "; ".join(lines)


def judge_smoke(accelerator: str, run: PodRun) -> tuple[list[CheckResult], ColdStart]:
    """The scale-up and GPU checks of one pool, and its cold-start timeline."""
    scale_check = f"scale-up: {accelerator}"
    gpu_check = f"GPU smoke: {accelerator}"
    results: list[CheckResult] = []
    if run.failure_kind == FailureKind.CAPACITY:
        quota = any(word.lower() in run.failure.lower() for word in _QUOTA_WORDS)
        backoff = any(word in run.failure for word in _BACKOFF_WORDS)
        if quota or backoff:
            fix = (f"raise the GCP quota for {accelerator} GPUs in the cluster's region "
                   "(IAM & Admin > Quotas, e.g. NVIDIA_L4_GPUS / PREEMPTIBLE_NVIDIA_L4_GPUS); "
                   "the cluster autoscaler's visibility logs name the quota")
        else:
            fix = (f"check the {accelerator} pool: autoscaling enabled, max nodes above its "
                   "current size, and the zone offering the accelerator")
        results.append(CheckResult(scale_check, Status.FAIL, run.failure, fix=fix))
    elif SCALE_UP_DECISION in run.stages:
        results.append(CheckResult(scale_check, Status.PASS,
                                   "the autoscaler added a node for the smoke pod"))
    elif SCHEDULED in run.stages:
        results.append(CheckResult(scale_check, Status.PASS,
                                   f"a node was up already ({run.node}); no scale-up needed"))
    else:
        results.append(CheckResult(scale_check, Status.SKIP,
                                   f"the smoke pod was not scheduled: {run.failure}"))
    gpu = gpu_summary(run.log)
    if run.succeeded and gpu:
        results.append(CheckResult(gpu_check, Status.PASS, f"nvidia-smi: {gpu}"))
    elif run.succeeded:
        results.append(CheckResult(
            gpu_check, Status.FAIL, "nvidia-smi exited 0 but listed no GPU",
            fix="check the pool's driver installation (the stack's gpuDriverVersion)"))
    elif run.failure_kind == FailureKind.TIMEOUT and NODE_READY in run.stages \
            and DRIVER_READY not in run.stages:
        results.append(CheckResult(
            gpu_check, Status.FAIL,
            f"a node came up but never offered a GPU: {run.failure}",
            fix="the NVIDIA driver did not install: check the node pool's driver installation "
                "and the nvidia-gpu-device-plugin and driver-installer pods in kube-system"))
    elif run.failure_kind == FailureKind.FAILED:
        # nvidia-smi says why it failed on its first line ("couldn't communicate with the
        # NVIDIA driver", "not found").
        first = next((line for line in run.log if line.strip()), "no output")
        results.append(CheckResult(
            gpu_check, Status.FAIL, f"{run.failure}; output: {first}",
            fix="nvidia-smi not found or failing: GPU pods need PATH and LD_LIBRARY_PATH to "
                "include /usr/local/nvidia (bin, lib64) and the pool's driver installed"))
    elif run.failure_kind == FailureKind.CAPACITY:
        results.append(CheckResult(gpu_check, Status.SKIP, "no node to run on (see scale-up)"))
    elif run.failure_kind == FailureKind.IMAGE:
        results.append(CheckResult(
            gpu_check, Status.FAIL, run.failure,
            fix="make the runner image readable from the GPU nodes (see image: pullable)"))
    elif run.failure_kind == FailureKind.API:
        results.append(CheckResult(
            gpu_check, Status.FAIL, run.failure,
            fix="your account needs create, get, list, watch and delete on pods, and list and "
                "watch on events, in the runner namespace, and list on nodes"))
    else:
        results.append(CheckResult(
            gpu_check, Status.FAIL, run.failure or "the smoke pod did not run",
            fix="rerun with a longer --timeout; kubectl describe of the smoke pod during the "
                "run shows where it waits"))
    outcome = "passed" if run.succeeded and gpu else (run.failure or "no GPU listed")
    return results, ColdStart(accelerator, run.ordered_stages(), outcome, gpu)
