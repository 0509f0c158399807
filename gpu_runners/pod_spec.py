"""Pure builders of the two objects a GPU run needs: the runner Pod and its JIT config Secret.

Nothing here talks to a server, so every property of the Pod (the GPU request, the node
selection, the restricted security context, the absence of any GitHub token) can be checked
on the returned objects alone. `spawn` sends them unchanged.
"""

from __future__ import annotations

from kubernetes.client import (
    V1Affinity,
    V1Container,
    V1EmptyDirVolumeSource,
    V1EnvVar,
    V1KeyToPath,
    V1LocalObjectReference,
    V1NodeAffinity,
    V1NodeSelector,
    V1NodeSelectorRequirement,
    V1NodeSelectorTerm,
    V1ObjectMeta,
    V1OwnerReference,
    V1Pod,
    V1PodSecurityContext,
    V1PodSpec,
    V1ResourceRequirements,
    V1SeccompProfile,
    V1Secret,
    V1SecretVolumeSource,
    V1Toleration,
    V1Volume,
    V1VolumeMount,
)

from gpu_runners import contract, runner_injection
from gpu_runners.pod_options import RunnerPodOptions
from gpu_runners.run_identity import RunIdentity
from gpu_runners.runner_injection import DEFAULT_IMAGE_PATH, NVIDIA_BIN_DIRS, NVIDIA_LIB_DIRS

#: Value of the gpu-type label when the pod may land on any GPU pool.
ANY_GPU_TYPE = "any"
JIT_VOLUME = "jit-config"
SHM_VOLUME = "dshm"
SHM_MOUNT_PATH = "/dev/shm"
# Read for the owner and the fsGroup: the runner runs as uid/gid RUNNER_UID, and the kubelet
# gives Secret files the pod's fsGroup, so group-read is what lets it read its config.
JIT_FILE_MODE = 0o440
COMPONENT = "runner"

# GKE installs the NVIDIA driver on the node and mounts it into every container that requests
# nvidia.com/gpu at /usr/local/nvidia (bin/ with nvidia-smi, lib64/ with libcuda); nothing puts
# it on the search paths. The CUDA base images expect exactly these variables (their own
# Dockerfiles set them), so they are set here for the runner image; an injected runner's job
# image gets them appended to its own (runner_injection.job_environment).
LD_LIBRARY_PATH = ":".join(NVIDIA_LIB_DIRS)
#: The runner image's own virtualenv (docker/Dockerfile puts it first on PATH); a pod's env
#: replaces the image's PATH rather than extending it, so it is named again here.
RUNNER_IMAGE_VENV_BIN = "/opt/gpu-runners/venv/bin"
CUDA_TOOLKIT_BIN = "/usr/local/cuda/bin"
PATH = f"{RUNNER_IMAGE_VENV_BIN}:{NVIDIA_BIN_DIRS[0]}:{CUDA_TOOLKIT_BIN}:{DEFAULT_IMAGE_PATH}"


def object_labels(identity: RunIdentity, gpu_type: str | None) -> dict[str, str]:
    """The labels of every object of one run: app.kubernetes.io/* plus run id and attempt
    (and the repository id when the identity has one)."""
    return {
        contract.LABEL_NAME: contract.GPU_RUNNER_APP,
        contract.LABEL_COMPONENT: COMPONENT,
        contract.LABEL_PART_OF: contract.PART_OF,
        **identity.selector_labels(),
        contract.LABEL_GPU_TYPE: gpu_type or ANY_GPU_TYPE,
    }


def object_annotations(identity: RunIdentity) -> dict[str, str]:
    """Annotations linking an object back to its run, repository and runner registration."""
    return {
        contract.ANNOTATION_RUN_URL: identity.run_url,
        contract.ANNOTATION_REPOSITORY: identity.repository,
        contract.ANNOTATION_RUNNER_NAME: identity.runner_name,
    }


def jit_config_path() -> str:
    """Path of the JIT config file inside the GPU pod (what RUNNER_JITCONFIG_FILE names)."""
    return f"{contract.JIT_MOUNT_DIR}/{contract.JIT_SECRET_KEY}"


def build_gpu_pod(
    identity: RunIdentity, options: RunnerPodOptions, gpu_type: str | None
) -> V1Pod:
    """Builds the GPU runner Pod of one run attempt.

    The pod runs the runner image in JIT mode with the config read from the run's Secret (which
    `spawn` creates after the pod, owned by it); it holds no GitHub token and no
    ServiceAccount token. It reserves its GPUs through the `nvidia.com/gpu` resource, tolerates
    the GPU taint, is kept off CPU nodes by `gpu=true`, is killed after the max runtime,
    finds the NVIDIA driver GKE mounts (PATH, LD_LIBRARY_PATH), and meets the `restricted` Pod
    Security Standard. When `options.image` is not the runner image, the job runs in that
    image with the runner injected by an init container (see `runner_injection`).

    Args:
        identity: The run attempt; names the pod and labels it.
        options: Image, sizes, deadline, labels and the node pool, if pinned to one.
        gpu_type: GKE accelerator to pin the pod to, or None for any GPU pool.

    Returns:
        The Pod, ready to be created in `options.namespace`.
    """
    node_selector = {contract.NODE_GPU_LABEL: "true"}
    if gpu_type:
        node_selector[contract.GKE_ACCELERATOR_LABEL] = gpu_type
    if options.node_pool:
        # A retry after a Spot preemption: the pool's on-demand fallback, by GKE's pool label.
        node_selector[contract.GKE_NODEPOOL_LABEL] = options.node_pool
    affinity = None
    if options.avoid_node_pools and not options.node_pool:
        # Kept for retries after a Spot preemption: a first attempt takes Spot capacity. A
        # required term, because the cluster autoscaler ignores preferred ones when it picks
        # the pool to grow.
        affinity = V1Affinity(node_affinity=V1NodeAffinity(
            required_during_scheduling_ignored_during_execution=V1NodeSelector(
                node_selector_terms=[V1NodeSelectorTerm(match_expressions=[
                    V1NodeSelectorRequirement(key=contract.GKE_NODEPOOL_LABEL,
                                              operator="NotIn",
                                              values=list(options.avoid_node_pools)),
                ])])))
    gpus = str(options.gpu_count)
    resources = {"cpu": options.cpu, "memory": options.memory, contract.GPU_RESOURCE: gpus}
    # Requests equal to limits: the pod is Guaranteed, so neither CPU nor memory is taken
    # back from a training job by a noisy neighbour, and the GPU request must equal its
    # limit anyway.
    requirements = V1ResourceRequirements(limits=dict(resources), requests=dict(resources))
    shm_mount = V1VolumeMount(name=SHM_VOLUME, mount_path=SHM_MOUNT_PATH)
    init_containers: list[V1Container] | None = None
    extra_volumes: list[V1Volume] = []
    if options.injects_runner:
        assert options.runner_image is not None  # what injects_runner means
        init_containers = [runner_injection.init_container(
            options.runner_image, cpu=options.cpu, memory=options.memory, jit_volume=JIT_VOLUME)]
        extra_volumes = runner_injection.volumes()
        container = V1Container(
            name=contract.GPU_RUNNER_CONTAINER,
            image=options.image,
            # Replaces the image's ENTRYPOINT and CMD: the job image's own entrypoint may
            # need root or start a server; the runner runs the job's steps instead.
            command=list(runner_injection.LISTENER_COMMAND),
            args=[],
            working_dir=runner_injection.INJECTED_RUNNER_DIR,
            env=runner_injection.job_environment(options.image_env, identity.secret_name),
            resources=requirements,
            volume_mounts=[*runner_injection.job_mounts(), shm_mount],
            security_context=runner_injection.restricted_context(),
        )
    else:
        container = V1Container(
            name=contract.GPU_RUNNER_CONTAINER,
            image=options.image,
            env=[
                V1EnvVar(name=contract.ENV_RUNNER_MODE, value="jit"),
                V1EnvVar(name=contract.ENV_JIT_CONFIG_FILE, value=jit_config_path()),
                V1EnvVar(name="PATH", value=PATH),
                V1EnvVar(name="LD_LIBRARY_PATH", value=LD_LIBRARY_PATH),
            ],
            resources=requirements,
            volume_mounts=[
                V1VolumeMount(name=JIT_VOLUME, mount_path=contract.JIT_MOUNT_DIR,
                              read_only=True),
                shm_mount,
            ],
            security_context=runner_injection.restricted_context(),
        )
    spec = V1PodSpec(
        init_containers=init_containers,
        containers=[container],
        restart_policy="Never",
        active_deadline_seconds=options.max_runtime_seconds,
        service_account_name=contract.GPU_RUNNER_SERVICE_ACCOUNT,
        automount_service_account_token=False,
        # Service-link env variables would tell job code where every Service of the namespace
        # is; the runner needs none of them.
        enable_service_links=False,
        node_selector=node_selector,
        affinity=affinity,
        tolerations=[
            V1Toleration(key=contract.GPU_TAINT_KEY, operator="Exists", effect="NoSchedule"),
        ],
        security_context=V1PodSecurityContext(
            run_as_non_root=True,
            run_as_user=contract.RUNNER_UID,
            run_as_group=contract.RUNNER_UID,
            fs_group=contract.RUNNER_UID,
            seccomp_profile=V1SeccompProfile(type="RuntimeDefault"),
        ),
        volumes=[
            V1Volume(
                name=JIT_VOLUME,
                # Not optional: the kubelet holds the container until spawn has created the
                # Secret, which it can only do once the pod exists (the pod owns it).
                secret=V1SecretVolumeSource(
                    secret_name=identity.secret_name,
                    items=[V1KeyToPath(key=contract.JIT_SECRET_KEY, path=contract.JIT_SECRET_KEY)],
                    default_mode=JIT_FILE_MODE,
                    optional=False,
                ),
            ),
            V1Volume(
                name=SHM_VOLUME,
                empty_dir=V1EmptyDirVolumeSource(medium="Memory", size_limit=options.shm_size),
            ),
            *extra_volumes,
        ],
        image_pull_secrets=(
            [V1LocalObjectReference(name=options.image_pull_secret)]
            if options.image_pull_secret
            else None
        ),
    )
    return V1Pod(
        api_version="v1",
        kind="Pod",
        metadata=V1ObjectMeta(
            name=identity.pod_name,
            namespace=options.namespace,
            labels={**options.extra_labels, **object_labels(identity, gpu_type)},
            annotations=object_annotations(identity),
        ),
        spec=spec,
    )


def build_jit_secret(
    identity: RunIdentity, *, namespace: str, owner: V1Pod, jit_config: str
) -> V1Secret:
    """Builds the Secret holding one run's single-use JIT runner config, owned by its Pod.

    Owned by the Pod (an ownerReference with the Pod's uid), the Secret is garbage-collected
    with it, whoever deletes the Pod. Immutable, because a JIT config is never updated:
    a new one means a new registration.

    Args:
        identity: The run attempt; names and labels the Secret.
        namespace: Namespace of the Pod.
        owner: The created Pod, as returned by the API server (it must carry its uid).
        jit_config: `encoded_jit_config` from GitHub's generate-jitconfig.

    Returns:
        The Secret, ready to be created.

    Raises:
        ValueError: The owner has no uid, i.e. it was not returned by the API server.
    """
    metadata = owner.metadata
    if metadata is None or not metadata.uid or not metadata.name:
        raise ValueError("the owner Pod has no name or uid; pass the Pod the API server returned")
    labels = dict(metadata.labels or {})
    labels.update(identity.selector_labels())
    return V1Secret(
        api_version="v1",
        kind="Secret",
        type="Opaque",
        immutable=True,
        metadata=V1ObjectMeta(
            name=identity.secret_name,
            namespace=namespace,
            labels=labels,
            annotations=object_annotations(identity),
            owner_references=[
                V1OwnerReference(api_version="v1", kind="Pod", name=metadata.name, uid=metadata.uid)
            ],
        ),
        string_data={contract.JIT_SECRET_KEY: jit_config},
    )
