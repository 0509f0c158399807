"""A live installation as the doctor sees it, built from the fake Kubernetes and GitHub servers.

`Installation` seeds what `pulumi up` leaves behind (the broker and base runner Deployments,
the runner namespace's ResourceQuota, the repository's ids, a registered base runner, the
runner's releases) and plays the doctor's pods' containers: when the fake kubelet starts the
probe pod it prints `findings` and exits; a smoke pod prints `nvidia_smi` and exits with
`smoke_exit_code`. Tests change one of these to break one thing.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from gpu_runners import contract
from gpu_runners.doctor.pods import DOCTOR_APP
from gpu_runners.doctor.probe_script import MARKER
from gpu_runners.gpu_pools import GpuPool, format_gpu_pools
from tests.fakes.github_api import FakeGitHub
from tests.fakes.kube_api import FakeKubernetes, FakeNodePool

JSON = dict[str, Any]
IMAGE = "ghcr.io/acme/gpu-runner@sha256:" + "a" * 64
#: A Spot L4 pool without an on-demand fallback and an on-demand T4 pool, named as GKE names them.
POOLS = (GpuPool("nvidia-l4", 1, name="gpu-nvidia-l4", spot=True),
         GpuPool("nvidia-tesla-t4", 2, name="gpu-nvidia-tesla-t4"))
RUNNER_VERSION = "2.330.0"
NOW = datetime.now(UTC)
QUOTA_NAME = "gpu-runners"


def fake_node_pools(max_nodes: int = 2, pools: Sequence[GpuPool] = POOLS
                    ) -> list[FakeNodePool]:
    """One autoscaled GKE pool per entry of `pools`, at zero nodes, as the stack declares them:
    named as the pool, its nodes labelled Spot as GKE labels Spot VMs."""
    return [
        FakeNodePool(
            pool.name,
            {contract.NODE_GPU_LABEL: "true", contract.GKE_ACCELERATOR_LABEL: pool.accelerator,
             **({contract.GKE_SPOT_LABEL: "true"} if pool.spot else {})},
            gpus_per_node=pool.max_gpus_per_pod,
            max_nodes=max_nodes,
        )
        for pool in pools
    ]


def deployment(namespace: str, name: str, env: dict[str, str], *,
               available: bool = True) -> JSON:
    """A Deployment as the API server reports it once rolled out (or stuck)."""
    condition = (
        {"type": "Available", "status": "True", "reason": "MinimumReplicasAvailable",
         "message": "Deployment has minimum availability."}
        if available else
        {"type": "Available", "status": "False", "reason": "MinimumReplicasUnavailable",
         "message": "Deployment does not have minimum availability."}
    )
    return {
        "kind": "Deployment",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "replicas": 1,
            "selector": {"matchLabels": {contract.LABEL_NAME: name}},
            "template": {
                "metadata": {"labels": {contract.LABEL_NAME: name}},
                "spec": {"containers": [{
                    "name": "main", "image": IMAGE,
                    "env": [{"name": key, "value": value} for key, value in env.items()],
                }]},
            },
        },
        "status": {"replicas": 1, "availableReplicas": 1 if available else 0,
                   "conditions": [condition]},
    }


def healthy_findings(github_host: str) -> list[JSON]:
    """What the probe prints when every target answers and the runner reports its version."""
    return [
        {"target": "GitHub API", "host": github_host, "port": 443, "ok": True, "stage": "done",
         "detail": f"connected to {github_host}:443 (140.82.112.6), TLS verified"},
        {"target": "image registry", "host": "ghcr.io", "port": 443, "ok": True,
         "stage": "done", "detail": "connected to ghcr.io:443 (140.82.113.33), TLS verified"},
        {"target": "Kubernetes API server", "host": "34.118.224.1", "port": 443, "ok": True,
         "stage": "done", "detail": "connected to 34.118.224.1:443 (34.118.224.1)"},
        {"runner_version": RUNNER_VERSION},
    ]


@dataclass
class Installation:
    """The fakes of one installation, and how the doctor's containers behave in it."""

    kube: FakeKubernetes
    github: FakeGitHub
    findings: list[JSON] = field(default_factory=list)
    nvidia_smi: dict[str, str] = field(default_factory=dict)
    smoke_exit_code: int = 0
    #: Pods the fake kubelet started, by name, in order (containers played).
    started: list[str] = field(default_factory=list)

    def doctor_pods(self) -> list[str]:
        """Names of the doctor's pods still in the runner namespace."""
        return [pod["metadata"]["name"] for pod in self.kube.pods()
                if pod["metadata"].get("labels", {}).get(contract.LABEL_NAME) == DOCTOR_APP]

    def play_container(self, pod: JSON) -> None:
        """The fake kubelet started a pod: do what its container would, then exit."""
        labels = pod["metadata"].get("labels") or {}
        if labels.get(contract.LABEL_NAME) != DOCTOR_APP:
            return
        name, namespace = pod["metadata"]["name"], pod["metadata"]["namespace"]
        self.started.append(name)
        if labels.get(contract.LABEL_COMPONENT) == "probe":
            for finding in self.findings:
                self.kube.append_log(namespace, name, MARKER + json.dumps(finding))
            self.kube.finish_pod(name, namespace=namespace)
            return
        accelerator = labels[contract.LABEL_GPU_TYPE]
        self.kube.append_log(namespace, name, self.nvidia_smi.get(accelerator, ""))
        self.kube.finish_pod(name, exit_code=self.smoke_exit_code, namespace=namespace)


def broker_env(github: FakeGitHub, pools: Sequence[GpuPool] = POOLS) -> dict[str, str]:
    """The broker's settings as the stack sets them (components/broker.py)."""
    return {
        contract.ENV_NAMESPACE: contract.DEFAULT_NAMESPACE,
        contract.ENV_IMAGE: IMAGE,
        contract.ENV_GPU_POOLS: format_gpu_pools(pools),
        contract.ENV_MAX_PREEMPTION_RETRIES: str(contract.DEFAULT_MAX_PREEMPTION_RETRIES),
        contract.ENV_REPOSITORY: f"{github.owner}/{github.repo}",
        contract.ENV_REPOSITORY_ID: str(github.repository_id),
        contract.ENV_REPOSITORY_OWNER_ID: str(github.owner_id),
    }


def install(make_fake_kube: Callable[..., FakeKubernetes], github: FakeGitHub, *,
            broker_available: bool = True, pools: Sequence[GpuPool] = POOLS,
            broker_settings: Mapping[str, str] | None = None,
            **kube_options: Any) -> Installation:
    """Builds a healthy installation; `kube_options` override FakeKubernetes' arguments.

    `pools` are the stack's GPU pools (the broker's list and the cluster's node pools);
    `broker_settings` override or add variables of the broker's environment.
    """
    options: dict[str, Any] = {"gpu_quota": 4, "pod_quota": 20, "quota_name": QUOTA_NAME,
                               "node_pools": fake_node_pools(pools=pools)}
    options.update(kube_options)
    kube = make_fake_kube(**options)
    env = {**broker_env(github, pools), **(broker_settings or {})}
    kube.seed(
        deployment(contract.DEFAULT_BROKER_NAMESPACE, contract.BROKER_NAME, env,
                   available=broker_available),
        deployment(contract.DEFAULT_NAMESPACE, contract.BASE_RUNNER_APP,
                   {contract.ENV_RUNNER_LABELS: contract.BASE_RUNNER_LABEL}),
    )
    github.oauth_scopes = "repo, workflow"
    github.add_runner("base-runner-7d9f-x2k4p", ["self-hosted", "linux", "base-runner"])
    github.add_release("actions/runner", "v2.329.0", NOW - timedelta(days=40))
    github.add_release("actions/runner", f"v{RUNNER_VERSION}", NOW - timedelta(days=5))
    host = github.url.split("//", 1)[1].split(":", 1)[0]
    installation = Installation(
        kube, github, findings=healthy_findings(host),
        nvidia_smi={"nvidia-l4": "NVIDIA L4, 550.54.15, 23034 MiB",
                    "nvidia-tesla-t4": "Tesla T4, 550.54.15, 15360 MiB"},
    )
    kube.on_pod_running(installation.play_container)
    return installation
