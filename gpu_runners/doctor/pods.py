"""Pure builders of the two kinds of pods the doctor runs, and their shared metadata.

Both run the runner image under the `restricted` Pod Security Standard, with the GPU runner
pods' ServiceAccount (no token mounted), a deadline so that even a doctor killed with SIGKILL
leaves nothing running for long, and labels that set them apart from the broker's own pods
(its reaper selects on LABEL_MANAGED_BY=gpu-runners; these pods are the doctor's).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from kubernetes.client import (
    V1Capabilities,
    V1Container,
    V1EnvVar,
    V1LocalObjectReference,
    V1ObjectMeta,
    V1Pod,
    V1PodSecurityContext,
    V1PodSpec,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1SecurityContext,
    V1Toleration,
)

from gpu_runners import contract, pod_spec
from gpu_runners.doctor import probe_script

#: app.kubernetes.io/name and managed-by of every doctor pod.
DOCTOR_APP = "gpu-runners-doctor"
#: Label carrying one doctor run's id, so that it deletes exactly its own pods.
LABEL_SESSION = "gpu-runners/doctor-session"
#: Where the runner image installs the Actions runner (docker/Dockerfile's WORKDIR).
RUNNER_LISTENER = "/home/runner/bin/Runner.Listener"
#: What nvidia-smi prints: one CSV line per GPU, parsed by `smoke.gpu_summary`.
NVIDIA_SMI_COMMAND = ("nvidia-smi", "--query-gpu=name,driver_version,memory.total",
                      "--format=csv,noheader")
#: The container PodProgress follows (it reads the runner container's status by this name).
CONTAINER = contract.GPU_RUNNER_CONTAINER


def doctor_labels(session: str, component: str) -> dict[str, str]:
    """Labels of a doctor pod of `session`; `component` is "probe" or "smoke"."""
    return {
        contract.LABEL_NAME: DOCTOR_APP,
        contract.LABEL_COMPONENT: component,
        contract.LABEL_PART_OF: contract.PART_OF,
        contract.LABEL_MANAGED_BY: DOCTOR_APP,
        LABEL_SESSION: session,
    }


def session_selector(session: str) -> str:
    """Label selector of every pod one doctor run created."""
    return f"{contract.LABEL_NAME}={DOCTOR_APP},{LABEL_SESSION}={session}"


def _restricted_container() -> V1SecurityContext:
    return V1SecurityContext(
        allow_privilege_escalation=False,
        capabilities=V1Capabilities(drop=["ALL"]),
        run_as_non_root=True,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )


def _restricted_pod() -> V1PodSecurityContext:
    return V1PodSecurityContext(
        run_as_non_root=True,
        run_as_user=contract.RUNNER_UID,
        run_as_group=contract.RUNNER_UID,
        fs_group=contract.RUNNER_UID,
        seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
    )


def _pull_secrets(name: str | None) -> list[V1LocalObjectReference] | None:
    return [V1LocalObjectReference(name=name)] if name else None


def build_probe_pod(*, name: str, namespace: str, session: str, image: str,
                    pull_secret: str | None, targets: Sequence[dict[str, object]],
                    deadline_seconds: int) -> V1Pod:
    """The probe pod: `probe_script` in the runner image, on a CPU node.

    Args:
        name: Pod name.
        namespace: The runner namespace (its NetworkPolicy is what is being probed).
        session: The doctor run's id.
        image: The runner image GPU pods run.
        pull_secret: The image pull Secret GPU pods use, if any.
        targets: [{"name", "host", "port", "tls"}]; host "" means the API server.
        deadline_seconds: activeDeadlineSeconds.
    """
    source = Path(probe_script.__file__).read_text(encoding="utf-8")
    settings = json.dumps({"targets": list(targets), "runner_listener": RUNNER_LISTENER})
    container = V1Container(
        name=CONTAINER,
        image=image,
        command=["python3", "-c", source],
        env=[V1EnvVar(name=probe_script.ENV_PROBE, value=settings)],
        resources=V1ResourceRequirements(
            requests={"cpu": "100m", "memory": "256Mi"},
            limits={"cpu": "500m", "memory": "256Mi"},
        ),
        security_context=_restricted_container(),
    )
    return V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=V1ObjectMeta(name=name, namespace=namespace,
                              labels=doctor_labels(session, "probe")),
        spec=V1PodSpec(
            containers=[container],
            restart_policy="Never",
            active_deadline_seconds=deadline_seconds,
            service_account_name=contract.GPU_RUNNER_SERVICE_ACCOUNT,
            automount_service_account_token=False,
            enable_service_links=False,
            node_selector={contract.NODE_GPU_LABEL: "false"},
            security_context=_restricted_pod(),
            image_pull_secrets=_pull_secrets(pull_secret),
        ),
    )


def build_smoke_pod(*, name: str, namespace: str, session: str, image: str,
                    pull_secret: str | None, accelerator: str,
                    deadline_seconds: int) -> V1Pod:
    """The GPU smoke pod of one pool: `nvidia-smi` in the runner image, no GitHub registration.

    It asks for one GPU of `accelerator`, tolerates the GPU taint, and finds the driver GKE
    mounts through the same PATH and LD_LIBRARY_PATH as GPU runner pods.
    """
    resources = {"cpu": "100m", "memory": "256Mi", contract.GPU_RESOURCE: "1"}
    container = V1Container(
        name=CONTAINER,
        image=image,
        command=list(NVIDIA_SMI_COMMAND),
        env=[
            V1EnvVar(name="PATH", value=pod_spec.PATH),
            V1EnvVar(name="LD_LIBRARY_PATH", value=pod_spec.LD_LIBRARY_PATH),
        ],
        resources=V1ResourceRequirements(limits=dict(resources), requests=dict(resources)),
        security_context=_restricted_container(),
    )
    return V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=V1ObjectMeta(
            name=name, namespace=namespace,
            labels={**doctor_labels(session, "smoke"), contract.LABEL_GPU_TYPE: accelerator},
        ),
        spec=V1PodSpec(
            containers=[container],
            restart_policy="Never",
            active_deadline_seconds=deadline_seconds,
            service_account_name=contract.GPU_RUNNER_SERVICE_ACCOUNT,
            automount_service_account_token=False,
            enable_service_links=False,
            node_selector={contract.NODE_GPU_LABEL: "true",
                           contract.GKE_ACCELERATOR_LABEL: accelerator},
            tolerations=[V1Toleration(key=contract.GPU_TAINT_KEY, operator="Exists",
                                      effect="NoSchedule")],
            security_context=_restricted_pod(),
            image_pull_secrets=_pull_secrets(pull_secret),
        ),
    )
