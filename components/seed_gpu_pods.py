"""`SeedGuideGpuPods`: the seed guide's GPU pod manifest, applied unchanged, gets a GPU node.

The guide's `kubernetes/runner-gpu.yaml` selects `gpu=true` nodes but neither tolerates the
`nvidia.com/gpu` taint GKE puts on every GPU node nor requests a GPU: as written, it can land on
no node, and on a GPU node it would see no GPU (the device plugin exposes GPUs only to
containers that request them). A MutatingAdmissionPolicy (Kubernetes' in-process, CEL-declared
mutation; GA in 1.36) completes such pods at creation, in the runner namespace only: it adds
the toleration and `nvidia.com/gpu: 1` to the first container. Pods that already ask for a GPU
(the broker's) or select no GPU node (the base runner) are left alone.
"""

from __future__ import annotations

from dataclasses import dataclass

import pulumi
import pulumi_kubernetes as k8s

from gpu_runners import contract

#: MutatingAdmissionPolicy is served as admissionregistration.k8s.io/v1 from this version on.
MIN_KUBERNETES_VERSION = "1.36"
POLICY_NAME = "seed-guide-gpu-pods"

_GPU = contract.GPU_RESOURCE
#: RFC 6901 escapes '/' in a JSON Pointer segment as '~1'.
_GPU_POINTER = _GPU.replace("~", "~0").replace("/", "~1")
_TOLERATION = (f'Object.spec.tolerations{{key: "{contract.GPU_TAINT_KEY}", '
               'operator: "Exists", effect: "NoSchedule"}')

#: Which pods are completed: CEL over the pod being created (`object`).
MATCH_CONDITIONS: tuple[tuple[str, str], ...] = (
    ("selects-gpu-nodes",
     f"has(object.spec.nodeSelector) && '{contract.NODE_GPU_LABEL}' in object.spec.nodeSelector"
     f" && object.spec.nodeSelector['{contract.NODE_GPU_LABEL}'] == 'true'"),
    ("asks-for-no-gpu",
     "!object.spec.containers.exists(c, has(c.resources) && ("
     f"(has(c.resources.limits) && '{_GPU}' in c.resources.limits) || "
     f"(has(c.resources.requests) && '{_GPU}' in c.resources.requests)))"),
)

#: JSON patches (CEL) that complete a matched pod; each adds to what the pod already has.
MUTATIONS: tuple[str, ...] = (
    # Appended to the pod's own tolerations, or the first one.
    "has(object.spec.tolerations) ? "
    f'[JSONPatch{{op: "add", path: "/spec/tolerations/-", value: {_TOLERATION}}}] : '
    f'[JSONPatch{{op: "add", path: "/spec/tolerations", value: [{_TOLERATION}]}}]',
    # One GPU for the first container (the guide's only one), wherever its resources stop.
    "!has(object.spec.containers[0].resources) ? "
    '[JSONPatch{op: "add", path: "/spec/containers/0/resources", '
    f'value: Object.spec.containers.resources{{limits: {{"{_GPU}": "1"}}}}}}] : '
    "!has(object.spec.containers[0].resources.limits) ? "
    '[JSONPatch{op: "add", path: "/spec/containers/0/resources/limits", '
    f'value: {{"{_GPU}": "1"}}}}] : '
    f'[JSONPatch{{op: "add", path: "/spec/containers/0/resources/limits/{_GPU_POINTER}", '
    'value: "1"}]',
)


@dataclass(frozen=True)
class SeedGuideGpuPodsArgs:
    """The namespace whose pods are completed: the runner namespace of seed compatibility."""

    namespace: pulumi.Input[str]


class SeedGuideGpuPods(pulumi.ComponentResource):
    """Completes the seed guide's GPU pods so that they are scheduled on a GPU node with a GPU.

    Creates a MutatingAdmissionPolicy (pod CREATE; the conditions and JSON patches above;
    failure policy Fail, so a pod the policy cannot complete is refused with the reason rather
    than left Pending) and its binding, which limits it to `namespace`. Needs Kubernetes
    1.36 or later (`MIN_KUBERNETES_VERSION`).

    Outputs: `policy_name`.
    """

    policy_name: pulumi.Output[str]

    def __init__(self, name: str, args: SeedGuideGpuPodsArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpu-runners:index:SeedGuideGpuPods", name, None, opts)
        metadata: k8s.meta.v1.ObjectMetaArgsDict = {
            "name": POLICY_NAME,
            "labels": {contract.LABEL_PART_OF: contract.PART_OF},
            "annotations": {contract.ANNOTATION_SEED_COMPATIBILITY: "true"},
        }
        policy = k8s.admissionregistration.v1.MutatingAdmissionPolicy(
            f"{name}-policy",
            metadata=metadata,
            spec={
                "failure_policy": "Fail",
                "match_constraints": {"resource_rules": [{
                    "api_groups": [""], "api_versions": ["v1"], "operations": ["CREATE"],
                    "resources": ["pods"],
                }]},
                "match_conditions": [{"name": condition, "expression": expression}
                                     for condition, expression in MATCH_CONDITIONS],
                "mutations": [{"patch_type": "JSONPatch", "json_patch": {"expression": patch}}
                              for patch in MUTATIONS],
                "reinvocation_policy": "Never",
            },
            opts=pulumi.ResourceOptions(parent=self),
        )
        k8s.admissionregistration.v1.MutatingAdmissionPolicyBinding(
            f"{name}-binding",
            metadata=metadata,
            spec={
                "policy_name": policy.metadata.name,
                # The runner namespace only: no other namespace's pods are ever changed.
                "match_resources": {"namespace_selector": {"match_labels": {
                    "kubernetes.io/metadata.name": args.namespace}}},
            },
            opts=pulumi.ResourceOptions(parent=self),
        )
        self.policy_name = policy.metadata.name
        self.register_outputs({"policy_name": self.policy_name})
