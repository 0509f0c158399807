"""Seed compatibility: the guide's GPU pod manifest, applied unchanged, is scheduled with a GPU.

The guide's pod (tests/seed_guide/runner-gpu.yaml, its `envsubst` applied) goes through what
the API server and the scheduler would do with it in a seed-compatibility stack: the
MutatingAdmissionPolicy the stack declares, its CEL evaluated by a CEL engine (cel-python) and
its JSON patches applied, then the scheduler's node selection and taint rules (the fake API
server's own) against the GPU nodes the stack's pools create, with the labels and taints GKE
puts on them.
"""

from __future__ import annotations

import copy
from typing import Any

import celpy
import pytest
import yaml
from celpy import celtypes
from celpy.adapter import json_to_cel

from components.seed_gpu_pods import MIN_KUBERNETES_VERSION, POLICY_NAME
from gpu_runners import contract
from tests.fakes.kube_api import _selector_matches, _untolerated
from tests.harness.kubernetes_schema import strict_errors
from tests.harness.mock_stack import REPO_ROOT, ProgramRun, run_program

GUIDE_POD = REPO_ROOT / "tests" / "seed_guide" / "runner-gpu.yaml"
POLICY = "kubernetes:admissionregistration.k8s.io/v1:MutatingAdmissionPolicy"
BINDING = "kubernetes:admissionregistration.k8s.io/v1:MutatingAdmissionPolicyBinding"
NODE_POOL = "gcp:container/nodePool:NodePool"
#: GKE's own taint on GPU nodes and the effect names the Kubernetes API uses.
GKE_GPU_TAINT = {"key": "nvidia.com/gpu", "value": "present", "effect": "NoSchedule"}
EFFECTS = {"NO_SCHEDULE": "NoSchedule", "NO_EXECUTE": "NoExecute",
           "PREFER_NO_SCHEDULE": "PreferNoSchedule"}


class _Message(celtypes.MessageType):
    """Stands in for the typed objects Kubernetes' CEL builds (JSONPatch, Object.spec...)."""


@pytest.fixture(scope="module")
def seed() -> ProgramRun:
    return run_program("dev", {"seedCompatibility": True})


def guide_pod(run_id: str = "7421365098") -> dict[str, Any]:
    """The guide's manifest after its workflow's `envsubst` (GITHUB_RUN_ID only)."""
    pod = yaml.safe_load(GUIDE_POD.read_text().replace("${GITHUB_RUN_ID}", run_id))
    assert isinstance(pod, dict)
    return pod


def gpu_nodes(run: ProgramRun) -> list[dict[str, Any]]:
    """One node per GPU pool, as GKE creates it: the pool's labels and taints, GKE's own."""
    nodes = []
    for pool in run.of_type(NODE_POOL):
        config = pool.inputs["nodeConfig"]
        if config["labels"].get(contract.NODE_GPU_LABEL) != "true":
            continue
        (accelerator,) = config["guestAccelerators"]
        taints = [{"key": t["key"], "value": t["value"], "effect": EFFECTS[t["effect"]]}
                  for t in config.get("taints", [])]
        if GKE_GPU_TAINT not in taints:
            taints.append(GKE_GPU_TAINT)
        nodes.append({
            "labels": {**config["labels"],
                       "cloud.google.com/gke-nodepool": pool.inputs["name"],
                       "cloud.google.com/gke-accelerator": accelerator["type"]},
            "taints": taints,
            "gpus": int(accelerator["count"]),
        })
    assert nodes
    return nodes


def cel(expression: str, pod: dict[str, Any]) -> Any:
    """Evaluate one of the policy's CEL expressions with `object` bound to the pod."""
    environment = celpy.Environment()
    program = environment.program(environment.compile(expression))
    return program.evaluate({
        "object": json_to_cel(pod),
        "JSONPatch": _Message,
        "Object.spec.tolerations": _Message,
        "Object.spec.containers.resources": _Message,
    })


def plain(value: Any) -> Any:
    """A CEL result as plain JSON values."""
    if isinstance(value, dict):
        return {str(key): plain(item) for key, item in value.items()}
    if isinstance(value, list):
        return [plain(item) for item in value]
    if isinstance(value, celtypes.BoolType):
        return bool(value)
    if isinstance(value, celtypes.IntType):
        return int(value)
    return str(value) if isinstance(value, str) else value


def apply_json_patch(document: dict[str, Any], patch: dict[str, Any]) -> None:
    """RFC 6902 `add`, the only operation the policy uses."""
    assert patch["op"] == "add", patch
    *parents, last = [part.replace("~1", "/").replace("~0", "~")
                      for part in patch["path"].split("/")[1:]]
    target: Any = document
    for part in parents:
        target = target[int(part)] if isinstance(target, list) else target[part]
    if isinstance(target, list):
        target.insert(len(target) if last == "-" else int(last), patch["value"])
    else:
        target[last] = patch["value"]


def admit(run: ProgramRun, pod: dict[str, Any], namespace: str) -> dict[str, Any]:
    """The pod as the API server stores it after the stack's MutatingAdmissionPolicy."""
    policy = run.one(POLICY).manifest()
    (binding,) = [b.manifest() for b in run.of_type(BINDING)
                  if b.manifest()["spec"]["policyName"] == policy["metadata"]["name"]]
    selector = binding["spec"]["matchResources"]["namespaceSelector"]["matchLabels"]
    if selector != {"kubernetes.io/metadata.name": namespace}:
        return pod
    spec = policy["spec"]
    (rule,) = spec["matchConstraints"]["resourceRules"]
    assert (rule["resources"], rule["operations"]) == (["pods"], ["CREATE"])
    if not all(cel(c["expression"], pod) for c in spec["matchConditions"]):
        return pod
    admitted = copy.deepcopy(pod)
    for mutation in spec["mutations"]:
        assert mutation["patchType"] == "JSONPatch"
        for patch in plain(cel(mutation["jsonPatch"]["expression"], admitted)):
            apply_json_patch(admitted, patch)
    return admitted


def schedulable_nodes(pod: dict[str, Any], nodes: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The nodes the scheduler could bind the pod to: selector, taints, and GPUs."""
    requested = sum(int(c.get("resources", {}).get("limits", {}).get(contract.GPU_RESOURCE, 0))
                    for c in pod["spec"]["containers"])
    return [node for node in nodes
            if _selector_matches(pod, node["labels"])
            and _untolerated(pod, node["taints"]) is None and requested <= node["gpus"]]


def test_the_guides_pod_as_written_fits_no_gpu_node(seed: ProgramRun) -> None:
    # The problem being solved: GKE taints every GPU node, and the guide tolerates nothing.
    assert schedulable_nodes(guide_pod(), gpu_nodes(seed)) == []


def test_admitted_in_the_runner_namespace_it_lands_on_a_gpu_node_with_one_gpu(
        seed: ProgramRun) -> None:
    admitted = admit(seed, guide_pod(), contract.DEFAULT_NAMESPACE)
    assert schedulable_nodes(admitted, gpu_nodes(seed))
    (container,) = admitted["spec"]["containers"]
    assert container["resources"]["limits"] == {"cpu": "1", "memory": "4Gi",
                                                contract.GPU_RESOURCE: "1"}
    # Everything the guide wrote is still there, unchanged.
    original = guide_pod()
    assert admitted["spec"]["nodeSelector"] == original["spec"]["nodeSelector"]
    assert container["env"] == original["spec"]["containers"][0]["env"]
    assert admitted["metadata"] == original["metadata"]


def test_a_pod_with_tolerations_of_its_own_keeps_them(seed: ProgramRun) -> None:
    pod = guide_pod()
    own = {"key": "example.com/spot", "operator": "Exists", "effect": "NoSchedule"}
    pod["spec"]["tolerations"] = [own]
    del pod["spec"]["containers"][0]["resources"]
    admitted = admit(seed, pod, contract.DEFAULT_NAMESPACE)
    assert admitted["spec"]["tolerations"][0] == own
    assert len(admitted["spec"]["tolerations"]) == 2
    assert admitted["spec"]["containers"][0]["resources"] == {
        "limits": {contract.GPU_RESOURCE: "1"}}
    assert schedulable_nodes(admitted, gpu_nodes(seed))


def test_pods_that_ask_for_a_gpu_or_no_gpu_node_and_other_namespaces_are_left_alone(
        seed: ProgramRun) -> None:
    asks = guide_pod()
    asks["spec"]["containers"][0]["resources"]["limits"][contract.GPU_RESOURCE] = "2"
    cpu_pod = guide_pod()
    cpu_pod["spec"]["nodeSelector"] = {contract.NODE_GPU_LABEL: "false"}
    for pod in (asks, cpu_pod):
        assert admit(seed, pod, contract.DEFAULT_NAMESPACE) == pod
    assert admit(seed, guide_pod(), "default") == guide_pod()


def test_the_policy_exists_only_in_seed_compatibility_on_a_cluster_that_serves_it(
        seed: ProgramRun) -> None:
    assert seed.one(POLICY).manifest()["metadata"]["name"] == POLICY_NAME
    assert seed.one("gcp:container/cluster:Cluster").inputs["minMasterVersion"] == (
        MIN_KUBERNETES_VERSION)
    plain_stack = run_program("dev")
    assert plain_stack.of_type(POLICY) == [] and plain_stack.of_type(BINDING) == []
    assert "minMasterVersion" not in plain_stack.one("gcp:container/cluster:Cluster").inputs


def test_the_policy_objects_pass_the_strict_schema_of_the_version_that_serves_them(
        seed: ProgramRun) -> None:
    for typ in (POLICY, BINDING):
        assert strict_errors(seed.one(typ).manifest(), MIN_KUBERNETES_VERSION) == [], typ
