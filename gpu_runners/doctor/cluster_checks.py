"""Checks of the cluster's own state: nodes and labels, GPU drivers, quota, Deployments.

Pure functions over `cluster_facts`; each returns the CheckResult to print.
"""

from __future__ import annotations

from collections.abc import Sequence

from gpu_runners import contract
from gpu_runners.doctor.cluster_facts import DeploymentFact, NodeFact, QuotaFact
from gpu_runners.doctor.report import CheckResult, Status
from gpu_runners.gpu_pools import GpuPool

GPU_QUOTA_KEY = f"requests.{contract.GPU_RESOURCE}"


def check_cpu_nodes(nodes: Sequence[NodeFact]) -> CheckResult:
    """At least one Ready node labelled gpu=false: where the broker and base runner run."""
    check = "nodes: CPU pool"
    cpu = [node for node in nodes if node.labels.get(contract.NODE_GPU_LABEL) == "false"]
    ready = [node for node in cpu if node.ready]
    if ready:
        return CheckResult(check, Status.PASS,
                           f"{len(ready)} Ready node(s) labelled {contract.NODE_GPU_LABEL}=false")
    seen = f"{len(cpu)} labelled, none Ready" if cpu else "no node is labelled so"
    return CheckResult(
        check, Status.FAIL,
        f"no Ready node labelled {contract.NODE_GPU_LABEL}=false ({seen}): the broker and "
        "base runner select such nodes",
        fix=f"label the CPU pool's nodes {contract.NODE_GPU_LABEL}=false (the stack's CPU pool "
            f"does; on an existing cluster: kubectl label node <node> "
            f"{contract.NODE_GPU_LABEL}=false) and check that they are Ready",
    )


def check_gpu_node_labels(nodes: Sequence[NodeFact]) -> CheckResult:
    """Every GPU node (accelerator label or gpu=true) carries both labels and the GPU taint."""
    check = "nodes: GPU labels"
    gpu_nodes = [node for node in nodes if node.accelerator is not None
                 or node.labels.get(contract.NODE_GPU_LABEL) == "true"]
    if not gpu_nodes:
        return CheckResult(check, Status.PASS,
                           "no GPU node up (pools at zero); the smoke pods bring one up")
    wrong: list[str] = []
    for node in gpu_nodes:
        missing = []
        if node.labels.get(contract.NODE_GPU_LABEL) != "true":
            missing.append(f"{contract.NODE_GPU_LABEL}=true")
        if node.accelerator is None:
            missing.append(contract.GKE_ACCELERATOR_LABEL)
        if not any(key == contract.GPU_TAINT_KEY and effect == "NoSchedule"
                   for key, effect in node.taints):
            missing.append(f"taint {contract.GPU_TAINT_KEY}:NoSchedule")
        if missing:
            wrong.append(f"{node.name} lacks {', '.join(missing)}")
    if not wrong:
        return CheckResult(check, Status.PASS,
                           f"{len(gpu_nodes)} GPU node(s) labelled and tainted as expected")
    return CheckResult(
        check, Status.FAIL, "; ".join(wrong),
        fix=f"GPU pools need the node label {contract.NODE_GPU_LABEL}=true, GKE's "
            f"{contract.GKE_ACCELERATOR_LABEL} label and the {contract.GPU_TAINT_KEY} taint: "
            "declare them on the node pool (the stack's GPU pools do) and recreate its nodes",
    )


def check_gpu_driver(pool: GpuPool, nodes: Sequence[NodeFact], *, smoke_ran: bool) -> CheckResult:
    """A Ready node of the pool reports allocatable GPUs: the driver and device plugin work."""
    check = f"GPU driver: {pool.accelerator}"
    of_pool = [node for node in nodes if node.accelerator == pool.accelerator]
    working = [node for node in of_pool if node.ready and node.allocatable_gpus > 0]
    if working:
        node = working[0]
        return CheckResult(check, Status.PASS,
                           f"node {node.name} offers {node.allocatable_gpus} "
                           f"{contract.GPU_RESOURCE}")
    if not of_pool and not smoke_ran:
        return CheckResult(check, Status.SKIP,
                           "no node of this pool is up; run without --skip-smoke to bring one up")
    if not of_pool:
        return CheckResult(
            check, Status.FAIL, "no node of this pool came up for the smoke pod",
            fix="see the scale-up check of this pool: without a node the driver cannot be seen",
        )
    names = ", ".join(node.name for node in of_pool)
    return CheckResult(
        check, Status.FAIL,
        f"node(s) {names} offer no allocatable {contract.GPU_RESOURCE}: the NVIDIA driver or "
        "device plugin is not ready",
        fix="let GKE install the driver (node pool gpu_driver_installation_config, as the stack "
            "declares it) and check the nvidia-gpu-device-plugin pods in kube-system",
    )


def check_quota(quotas: Sequence[QuotaFact], pools: Sequence[GpuPool]) -> CheckResult:
    """The runner namespace's ResourceQuota admits the largest GPU pod and a smoke pod now."""
    check = "quota: runner namespace"
    gpu_quota = next((quota for quota in quotas if GPU_QUOTA_KEY in quota.hard), None)
    if gpu_quota is None:
        return CheckResult(
            check, Status.WARN,
            f"no ResourceQuota limits {GPU_QUOTA_KEY}: GPU use in the namespace is unbounded",
            fix="declare the runner plane's ResourceQuota (pulumi up of this stack creates it)",
        )
    hard = gpu_quota.hard[GPU_QUOTA_KEY]
    used = gpu_quota.used.get(GPU_QUOTA_KEY, 0)
    largest = max((pool.max_gpus_per_pod for pool in pools), default=1)
    if hard < largest:
        return CheckResult(
            check, Status.FAIL,
            f"{gpu_quota.name} allows {hard} GPU(s), less than the {largest} one pod of the "
            "largest pool may ask for",
            fix=f"raise the GPU quota (stack config gpuQuota) to at least {largest}",
        )
    pods_left = gpu_quota.hard.get("pods", 10**9) - gpu_quota.used.get("pods", 0)
    if hard - used < 1 or pods_left < 1:
        return CheckResult(
            check, Status.FAIL,
            f"{gpu_quota.name} is used up ({used}/{hard} GPUs, {pods_left} pod(s) left): a new "
            "GPU runner would be refused",
            fix="wait for running GPU jobs to end, or raise gpuQuota/podQuota in the stack config",
        )
    return CheckResult(check, Status.PASS,
                       f"{gpu_quota.name}: {used}/{hard} GPUs in use; the largest pod asks "
                       f"{largest}")


def check_deployment(fact: DeploymentFact | None, *, what: str, namespace: str,
                     name: str) -> CheckResult:
    """The Deployment exists and reports Available with at least one available replica."""
    check = f"{what}: available"
    describe = f"kubectl -n {namespace} describe deployment/{name}"
    if fact is None:
        return CheckResult(
            check, Status.FAIL, f"deployment {namespace}/{name} does not exist",
            fix="run pulumi up for this stack, or pass --namespace/--broker-namespace if the "
                "stack uses other namespaces",
        )
    if fact.available and fact.available_replicas >= 1:
        return CheckResult(check, Status.PASS,
                           f"{fact.available_replicas}/{fact.replicas} replica(s) available")
    return CheckResult(
        check, Status.FAIL,
        f"{fact.available_replicas}/{fact.replicas} replica(s) available ({fact.reason})",
        fix=f"{describe} and kubectl -n {namespace} logs deployment/{name} say why",
    )


def check_spot_pool(pool: GpuPool, pools: Sequence[GpuPool], nodes: Sequence[NodeFact],
                    max_preemption_retries: int) -> CheckResult:
    """The pool's live nodes are Spot VMs exactly when the stack says so; and what a
    preemption of the pool leads to (its on-demand fallback, recovery off)."""
    if not pool.name:
        return CheckResult(
            f"spot: {pool.accelerator}", Status.SKIP,
            f"the broker's {contract.ENV_GPU_POOLS} names no pool (written before pools were "
            "named): run pulumi up for this stack to compare the pools with their nodes")
    check = f"spot: {pool.name}"
    of_pool = [node for node in nodes if node.labels.get(contract.GKE_NODEPOOL_LABEL) == pool.name]
    spot_nodes = [node for node in of_pool if node.labels.get(contract.GKE_SPOT_LABEL) == "true"]
    configured = "Spot" if pool.spot else "on-demand"
    mismatched = ([node for node in of_pool if node not in spot_nodes] if pool.spot
                  else spot_nodes)
    if mismatched:
        names = ", ".join(node.name for node in mismatched)
        seen = (f"on-demand (no {contract.GKE_SPOT_LABEL}=true label)" if pool.spot
                else f"Spot VMs ({contract.GKE_SPOT_LABEL}=true)")
        return CheckResult(
            check, Status.FAIL,
            f"the stack declares pool {pool.name} {configured}, but node(s) {names} are {seen}",
            fix=f"the node pool was changed outside the stack: run pulumi up for this stack "
                f"(GKE recreates pool {pool.name} with spot: {str(pool.spot).lower()}), or set "
                f"gpuPools[].spot of {pool.name} to what you want and run pulumi up")
    if of_pool:
        nodes_seen = f"{len(of_pool)} node(s) up, all {configured}"
    else:
        nodes_seen = "no node up to compare"
    if not pool.spot:
        fallback_of = [p.name for p in pools if p.on_demand_fallback == pool.name]
        role = (f"; on-demand fallback of {', '.join(fallback_of)}" if fallback_of else "")
        return CheckResult(check, Status.PASS, f"on-demand ({nodes_seen}){role}")
    if max_preemption_retries == 0:
        recovery = ("preemption recovery is off (maxPreemptionRetries 0): a run whose node is "
                    "reclaimed fails")
    elif pool.on_demand_fallback is not None:
        recovery = (f"after a preemption the broker retries a run up to "
                    f"{max_preemption_retries} time(s) in on-demand pool "
                    f"{pool.on_demand_fallback}")
    else:
        recovery = (f"no onDemandFallback: after a preemption the broker retries a run up to "
                    f"{max_preemption_retries} time(s) in this Spot pool")
    return CheckResult(check, Status.PASS, f"Spot ({nodes_seen}); {recovery}")
