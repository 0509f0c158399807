"""What the probe pod should try, and what its run says about the network and the image.

Pure: `probe_targets` from the GitHub API URL and the runner image, `judge_probe` from the
probe pod's run (its log lines carry `probe_script`'s findings).
"""

from __future__ import annotations

import json
import urllib.parse
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from gpu_runners import contract
from gpu_runners.doctor.pod_watch import FailureKind, PodRun
from gpu_runners.doctor.probe_script import MARKER
from gpu_runners.doctor.report import CheckResult, Status

API_SERVER_TARGET = "Kubernetes API server"
#: Docker Hub's references name no registry; their blobs come from this host.
DOCKER_HUB_REGISTRY = "registry-1.docker.io"


def registry_host(image: str) -> str:
    """The registry host an image reference pulls from (ghcr.io, us-docker.pkg.dev, ...)."""
    first, _, rest = image.partition("/")
    if rest and ("." in first or ":" in first or first == "localhost"):
        return first.split(":", 1)[0]
    return DOCKER_HUB_REGISTRY


def probe_targets(api_url: str, image: str) -> list[dict[str, object]]:
    """GitHub's API, the image's registry (both TLS-verified) and the API server."""
    github = urllib.parse.urlsplit(api_url)
    return [
        {"name": "GitHub API", "host": github.hostname or "",
         "port": github.port or (443 if github.scheme == "https" else 80),
         "tls": github.scheme == "https"},
        {"name": "image registry", "host": registry_host(image), "port": 443, "tls": True},
        # No host: the pod's KUBERNETES_SERVICE_HOST/PORT, i.e. the `kubernetes` Service.
        {"name": API_SERVER_TARGET, "host": "", "port": 0, "tls": False},
    ]


@dataclass(frozen=True)
class ProbeVerdict:
    """The probe's checks, and the runner version it read (None if it could not)."""

    results: tuple[CheckResult, ...]
    runner_version: str | None


def findings(log: Sequence[str]) -> list[dict[str, Any]]:
    """The probe's findings in its log (other lines, e.g. from an entrypoint, are skipped)."""
    found = []
    for line in log:
        if line.startswith(MARKER):
            try:
                value = json.loads(line[len(MARKER):])
            except ValueError:
                continue
            if isinstance(value, dict):
                found.append(value)
    return found


def _network_fix(target: str, stage: str, namespace: str) -> str:
    if stage == "dns":
        return (f"let pods of {namespace} reach kube-dns (the runner plane's NetworkPolicy "
                "allows UDP/TCP 53 to kube-system's kube-dns)")
    if target == API_SERVER_TARGET:
        return ("add the control plane's address to egressCidrs: under Dataplane V2 a "
                "NetworkPolicy matches the API server only by its IP (/32)")
    if stage == "tls":
        return "something on the path intercepts TLS: allow direct egress to this host"
    return f"allow egress from {namespace} to this host on TCP 443 (stack config egressCidrs)"


def judge_probe(run: PodRun, targets: Sequence[dict[str, object]], image: str,
                namespace: str) -> ProbeVerdict:
    """Turns the probe pod's run into the image check and one network check per target."""
    image_check = "image: pullable"
    network = [f"network: {target['name']}" for target in targets]
    if run.failure_kind == FailureKind.IMAGE:
        results = [CheckResult(
            image_check, Status.FAIL, run.failure,
            fix="make the package readable by the cluster: imagePrivate=true (a pull Secret) "
                "for a private GHCR package, or make the package public; then pulumi up",
        )]
        results += [CheckResult(name, Status.SKIP, "the probe pod did not run (image)")
                    for name in network]
        return ProbeVerdict(tuple(results), None)
    pulled = "image pulled" in run.stages or "running" in run.stages
    results = [CheckResult(image_check, Status.PASS, f"{image} pulled in the runner namespace")
               if pulled else CheckResult(
                   image_check, Status.SKIP,
                   f"the probe pod did not get to pull it: {run.failure or 'no reason given'}")]
    found = findings(run.log)
    by_target = {str(item.get("target")): item for item in found if "target" in item}
    for target, name in zip(targets, network, strict=True):
        item = by_target.get(str(target["name"]))
        if item is None:
            why = run.failure or "the probe printed nothing for it"
            fix = (f"your account needs create, watch and delete on pods in {namespace}"
                   if run.failure_kind == FailureKind.API else
                   "see the nodes and image checks: the probe pod runs the runner image on a "
                   f"{contract.NODE_GPU_LABEL}=false node and must run to its end")
            results.append(CheckResult(name, Status.FAIL, f"not probed: {why}", fix=fix))
        elif item.get("ok"):
            results.append(CheckResult(name, Status.PASS, str(item.get("detail", ""))))
        else:
            stage = str(item.get("stage", ""))
            results.append(CheckResult(name, Status.FAIL, str(item.get("detail", "")),
                                       fix=_network_fix(str(target["name"]), stage, namespace)))
    version = next((item for item in found if "runner_version" in item), None)
    runner_version = str(version["runner_version"]) if version and version.get(
        "runner_version") else None
    return ProbeVerdict(tuple(results), runner_version)
