"""Names shared by the Pulumi program (components/), the runner image (docker/) and this module.

Each name is defined once, here. The components import them, and the runner image and the
runtime read the environment variables named here, so a rename cannot split the base runner
from the pods it spawns. This module imports nothing, so the runner image and the Pulumi
program can both use it.
"""

# --- Kubernetes objects the runner plane declares and the runtime uses -------------------------

#: Namespace the runner plane creates when the stack does not name another.
DEFAULT_NAMESPACE = "github-runners"
#: Secret holding the runner PAT, and its key: the seed guide's names, so its manifests work.
#: Only a seed-compatible stack keeps it in the runner namespace; no pod of the stack mounts it.
PAT_SECRET_NAME = "github-runner-pat"
PAT_SECRET_KEY = "token"
#: Where the seed guide's runner pods mount the PAT Secret (registration mode's default file).
PAT_MOUNT_DIR = "/var/run/secrets/github-runner"
#: ServiceAccount of the base runner pods: bound to nothing; its only token is the projected
#: one for the broker (BASE_RUNNER_TOKEN_*), which the broker checks through TokenReview.
BASE_RUNNER_SERVICE_ACCOUNT = "base-runner"
#: ServiceAccount of the per-run GPU pods: no RoleBinding, no mounted token.
GPU_RUNNER_SERVICE_ACCOUNT = "gpu-runner"
#: Runner label the base runner registers with; ML workflows target [self-hosted, base-runner].
BASE_RUNNER_LABEL = "base-runner"
#: Prefix of every per-run GPU runner name and label: gpu-<run_id>-<run_attempt>.
GPU_RUNNER_PREFIX = "gpu-"
#: Image pull Secret for a private GHCR package (kubernetes.io/dockerconfigjson).
IMAGE_PULL_SECRET_NAME = "ghcr-pull"
#: Container user: the seed's runner pods run as uid 1000, and the image creates that user.
RUNNER_UID = 1000

# --- Node labels and taints the cluster declares and pods select on -----------------------------

NODE_GPU_LABEL = "gpu"  # "true" on GPU pools, "false" on the CPU pool (the seed's labels)
GKE_ACCELERATOR_LABEL = "cloud.google.com/gke-accelerator"
#: GKE's node label naming the node pool a node belongs to (its `name`, as the stack declares
#: it); a retry after a Spot preemption pins its pod to the fallback pool with it.
GKE_NODEPOOL_LABEL = "cloud.google.com/gke-nodepool"
#: GKE's node label, "true" on Spot VMs (absent on on-demand nodes).
GKE_SPOT_LABEL = "cloud.google.com/gke-spot"
GPU_RESOURCE = "nvidia.com/gpu"
GPU_TAINT_KEY = "nvidia.com/gpu"
GPU_TAINT_VALUE = "present"
#: Node label ("true") on a GPU pool the operator keeps warm (minNodes > 0). The policy pack
#: exempts such a pool from the scale-to-zero rule and reports it as advisory instead.
NODE_WARM_POOL_LABEL = "gpu-runners/warm-pool"

# --- Pod Security Admission: the level the runner namespace enforces --------------------------

#: Namespace label that makes the API server reject pods below a Pod Security level.
PSA_ENFORCE_LABEL = "pod-security.kubernetes.io/enforce"
#: The level the runner namespace enforces (and the policy pack requires).
PSA_LEVEL = "restricted"

# --- Seed compatibility (the guide's repository secrets) -----------------------------------------

#: Actions secret holding a service-account JSON key, read by the seed guide's workflow. A
#: `gcp.serviceaccount.Key` is allowed only in a stack that declares this secret.
SEED_SECRET_SERVICE_ACCOUNT_KEY = "GOOGLE_SERVICE_ACCOUNT_KEY"
#: The guide's other repository secrets: the cluster's name and location (its
#: get-gke-credentials step) and a kubeconfig whose current context is the runner namespace (its
#: `kubectl apply` of the GPU runner pod, which expects Secret PAT_SECRET_NAME there).
SEED_SECRET_CLUSTER_NAME = "GCP_K8S_CLUSTER_NAME"
SEED_SECRET_CLUSTER_ZONE = "GCP_K8S_CLUSTER_ZONE"
SEED_SECRET_KUBECONFIG = "GCP_K8S_KUBECONFIG"

# --- Labels and annotations on the objects gpu_runners creates ----------------------------------

LABEL_NAME = "app.kubernetes.io/name"
LABEL_COMPONENT = "app.kubernetes.io/component"
LABEL_MANAGED_BY = "app.kubernetes.io/managed-by"
LABEL_PART_OF = "app.kubernetes.io/part-of"
LABEL_RUN_ID = "gpu-runners/run-id"
LABEL_RUN_ATTEMPT = "gpu-runners/run-attempt"
LABEL_GPU_TYPE = "gpu-runners/gpu-type"
ANNOTATION_RUN_URL = "gpu-runners/run-url"
ANNOTATION_REPOSITORY = "gpu-runners/repository"
ANNOTATION_RUNNER_NAME = "gpu-runners/runner-name"
#: On the runner namespace of a seed-compatible stack: it enforces Pod Security `baseline`
#: (warning and auditing `restricted`) because the seed guide's GPU pod manifest meets no more.
#: The policy pack accepts `baseline` only with this annotation.
ANNOTATION_SEED_COMPATIBILITY = "gpu-runners/seed-compatibility"
PSA_SEED_COMPATIBLE_LEVEL = "baseline"
#: Value of LABEL_MANAGED_BY on every object gpu_runners creates; delete and reap select on it.
MANAGED_BY = "gpu-runners"
PART_OF = "gpu-runners"
GPU_RUNNER_APP = "gpu-runner"
BASE_RUNNER_APP = "base-runner"

# --- Environment of the base runner (set by the runner plane, read by gpu_runners) --------------

ENV_NAMESPACE = "GPU_RUNNERS_NAMESPACE"
ENV_IMAGE = "GPU_RUNNERS_IMAGE"
#: JSON list of the cluster's GPU pools: [{"accelerator": "nvidia-l4", "maxGpusPerPod": 1}, ...]
#: with, from the stack, each pool's "name", "spot" and "onDemandFallback" (gpu_runners.gpu_pools).
ENV_GPU_POOLS = "GPU_RUNNERS_GPU_POOLS"
ENV_IMAGE_PULL_SECRET = "GPU_RUNNERS_IMAGE_PULL_SECRET"
ENV_MAX_RUNTIME_MINUTES = "GPU_RUNNERS_MAX_RUNTIME_MINUTES"

# --- The runner broker (gpu_runners/broker): the only holder of the GitHub credential and of
# --- the Kubernetes rights over GPU runner pods ------------------------------------------------

#: Namespace of the broker when the stack does not name another; nothing but the broker runs in it.
DEFAULT_BROKER_NAMESPACE = "gpu-runners-broker"
#: The broker's Deployment, Service and ServiceAccount share this name.
BROKER_NAME = "gpu-runners-broker"
#: Value of LABEL_COMPONENT on the broker's namespace and pods; the policy pack finds the broker's
#: namespace by it.
BROKER_COMPONENT = "broker"
#: Port of the broker's Service and container (plain HTTP inside the cluster; only runner pods
#: may reach it, by NetworkPolicy).
BROKER_PORT = 8080
#: Secret holding the GitHub credential in the broker's namespace (key PAT_SECRET_KEY), and
#: where the broker mounts it.
BROKER_PAT_SECRET_NAME = "github-credential"
BROKER_PAT_MOUNT_DIR = "/var/run/secrets/github-credential"
#: The broker image's user (numeric, so that the kubelet can verify runAsNonRoot). Above
#: 10000, outside the range of host users; the broker writes nothing of its image.
BROKER_UID = 10001
#: Audience the jobs' OIDC tokens are requested for unless the stack names another. Never
#: GitHub's default (https://github.com/<owner>) nor one the workload identity provider accepts.
DEFAULT_BROKER_AUDIENCE = "gpu-runners-broker"
#: GitHub's OIDC issuer for github.com; GHEC/GHES issuers come from the stack config.
GITHUB_OIDC_ISSUER = "https://token.actions.githubusercontent.com"
#: Events whose runs may ask for a GPU runner unless the stack narrows the list. Never
#: pull_request_target or workflow_run: they run with the base repository's rights on behalf of
#: code the repository did not review.
DEFAULT_ALLOWED_EVENTS = ("push", "pull_request", "workflow_dispatch", "schedule", "merge_group")
FORBIDDEN_EVENTS = ("pull_request_target", "workflow_run")
#: Base runner pods prove themselves to the broker with a projected ServiceAccount token for the
#: broker's audience plus this suffix: a token neither the Kubernetes API server accepts nor the
#: broker's job API (which takes GitHub OIDC tokens only).
BASE_RUNNER_AUDIENCE_SUFFIX = "/base-runner"
#: The token's lifetime: the least the API server allows (the kubelet refreshes it at 80 %).
BASE_RUNNER_TOKEN_SECONDS = 600
#: Where a base runner pod mounts that token (a projected volume), and the file in it.
BASE_RUNNER_TOKEN_DIR = "/var/run/secrets/gpu-runners-broker"
BASE_RUNNER_TOKEN_FILE = "token"
#: Labels of a base runner's JIT registration (JIT adds none itself): workflows target
#: [self-hosted, base-runner].
BASE_RUNNER_RUNNER_LABELS = ("self-hosted", BASE_RUNNER_LABEL)
#: Value of LABEL_COMPONENT on the broker's run records (ConfigMaps in the runner namespace,
#: with LABEL_NAME GPU_RUNNER_APP and the run's labels): what a run needs to be recovered.
RUN_RECORD_COMPONENT = "run-record"
#: Value of LABEL_COMPONENT on base runner pods (with LABEL_NAME BASE_RUNNER_APP).
BASE_RUNNER_COMPONENT = "runner"
#: Name of the runner container in a base runner pod.
BASE_RUNNER_CONTAINER = "runner"


def base_runner_audience(broker_audience: str) -> str:
    """The audience of the base runners' projected tokens, given the broker's OIDC audience."""
    return broker_audience + BASE_RUNNER_AUDIENCE_SUFFIX


#: Label on every object the broker creates: the numeric id of the repository whose run asked.
LABEL_REPOSITORY_ID = "gpu-runners/repository-id"

# Environment of the broker (set by the broker component, read by gpu_runners.broker.settings).
# It also reads ENV_NAMESPACE, ENV_IMAGE, ENV_GPU_POOLS, ENV_IMAGE_PULL_SECRET,
# ENV_MAX_RUNTIME_MINUTES, ENV_REPOSITORY, ENV_PAT_FILE, ENV_API_URL and ENV_SERVER_URL.
ENV_REPOSITORY_ID = "GPU_RUNNERS_REPOSITORY_ID"
ENV_REPOSITORY_OWNER_ID = "GPU_RUNNERS_REPOSITORY_OWNER_ID"
ENV_OIDC_ISSUER = "GPU_RUNNERS_OIDC_ISSUER"
#: Comma-separated event names.
ENV_ALLOWED_EVENTS = "GPU_RUNNERS_ALLOWED_EVENTS"
#: JSON lists of fnmatch patterns; an empty list allows any value.
ENV_ALLOWED_REFS = "GPU_RUNNERS_ALLOWED_REFS"
ENV_ALLOWED_WORKFLOW_REFS = "GPU_RUNNERS_ALLOWED_WORKFLOW_REFS"
#: JSON list of image patterns a run may ask for besides ENV_IMAGE (empty: only ENV_IMAGE).
ENV_ALLOWED_IMAGES = "GPU_RUNNERS_ALLOWED_IMAGES"
#: "true": an asked image must name a digest; else its tag is resolved to one at spawn.
ENV_REQUIRE_IMAGE_DIGESTS = "GPU_RUNNERS_REQUIRE_IMAGE_DIGESTS"
#: JSON object: upstream registry host -> mirror prefix job images are pulled through.
ENV_REGISTRY_MIRRORS = "GPU_RUNNERS_REGISTRY_MIRRORS"
#: Most GPUs one repository's runners may hold at once.
ENV_GPU_CAP_PER_REPOSITORY = "GPU_RUNNERS_GPU_CAP_PER_REPOSITORY"
ENV_REAPER_INTERVAL_SECONDS = "GPU_RUNNERS_REAPER_INTERVAL_SECONDS"
#: Times the broker recovers one run after Spot preemption of its GPU node (stack config
#: maxPreemptionRetries); 0 turns recovery off. From 0 to MAX_PREEMPTION_RETRIES_LIMIT,
#: DEFAULT_MAX_PREEMPTION_RETRIES when unset.
ENV_MAX_PREEMPTION_RETRIES = "GPU_RUNNERS_MAX_PREEMPTION_RETRIES"
DEFAULT_MAX_PREEMPTION_RETRIES = 2
MAX_PREEMPTION_RETRIES_LIMIT = 5
ENV_BROKER_PORT = "GPU_RUNNERS_BROKER_PORT"
#: The broker's GitHub App, when the stack configures one instead of the PAT: the App's client
#: ID or numeric App ID (the JWT's `iss`), the installation on the repository or organisation,
#: and the mounted file holding the App's private key (PEM), key APP_KEY_SECRET_KEY of
#: BROKER_PAT_SECRET_NAME.
ENV_GITHUB_APP_ID = "GITHUB_APP_ID"
ENV_GITHUB_APP_INSTALLATION_ID = "GITHUB_APP_INSTALLATION_ID"
ENV_GITHUB_APP_PRIVATE_KEY_FILE = "GITHUB_APP_PRIVATE_KEY_FILE"
APP_KEY_SECRET_KEY = "github-app.pem"

# Environment of the base runner's client (`python3 -m gpu_runners spawn|delete|list`).
#: The broker's in-cluster URL, e.g. http://gpu-runners-broker.gpu-runners-broker.svc:8080.
ENV_BROKER_URL = "GPU_RUNNERS_BROKER_URL"
#: Both the client (requests its OIDC token for it) and the broker (accepts only it) read it.
ENV_BROKER_AUDIENCE = "GPU_RUNNERS_BROKER_AUDIENCE"
#: Set by the runner for steps of a job with `permissions: id-token: write`.
ENV_ID_TOKEN_REQUEST_URL = "ACTIONS_ID_TOKEN_REQUEST_URL"
ENV_ID_TOKEN_REQUEST_TOKEN = "ACTIONS_ID_TOKEN_REQUEST_TOKEN"
#: The Actions runner reads its JIT config from this variable when no --jitconfig is given,
#: so the config never appears in a process's arguments.
ENV_RUNNER_JITCONFIG = "ACTIONS_RUNNER_INPUT_JITCONFIG"

# --- Environment of the runner image's entrypoint (docker/entrypoint.sh) ------------------------

ENV_RUNNER_MODE = "RUNNER_MODE"  # "broker" (base runner), "jit" (GPU pods), "registration" (seed)
ENV_PAT_FILE = "GITHUB_PAT_FILE"
ENV_PAT_SEED = "GITHUB_RUNNER_PAT"  # the seed guide's env variable, still accepted
ENV_RUNNER_LABELS = "GITHUB_RUNNER_LABEL"  # the seed guide's name; comma-separated labels
ENV_RUNNER_EPHEMERAL = "RUNNER_EPHEMERAL"
ENV_JIT_CONFIG_FILE = "RUNNER_JITCONFIG_FILE"
#: Broker mode: the projected token file the entrypoint shows the broker.
ENV_BROKER_TOKEN_FILE = "GPU_RUNNERS_BROKER_TOKEN_FILE"
#: Retries of the entrypoint's GitHub API requests: the first pause in seconds (doubled per try;
#: tests make it small), and the most seconds one request may spend pausing, Retry-After included.
ENV_API_RETRY_BASE_SECONDS = "RUNNER_API_RETRY_BASE_SECONDS"
ENV_API_MAX_WAIT_SECONDS = "RUNNER_API_MAX_WAIT_SECONDS"
#: Where a GPU pod mounts its JIT config Secret; the file is JIT_MOUNT_DIR/JIT_SECRET_KEY.
JIT_MOUNT_DIR = "/var/run/secrets/github-runner-jit"
JIT_SECRET_KEY = "jitconfig"
#: Standard GitHub Actions variables, also read outside Actions (the broker).
ENV_REPOSITORY = "GITHUB_REPOSITORY"  # owner/name
ENV_ORGANIZATION = "GITHUB_ORG"  # organisation runner scope instead of a repository
ENV_API_URL = "GITHUB_API_URL"
ENV_SERVER_URL = "GITHUB_SERVER_URL"

# --- GitHub Actions variables the repository settings declare for workflows ---------------------

VAR_CLUSTER_NAME = "GPU_RUNNERS_CLUSTER_NAME"
VAR_CLUSTER_LOCATION = "GPU_RUNNERS_CLUSTER_LOCATION"
VAR_RUNNER_NAMESPACE = "GPU_RUNNERS_NAMESPACE"
VAR_BASE_RUNNER_LABEL = "GPU_RUNNERS_BASE_LABEL"
VAR_WORKLOAD_IDENTITY_PROVIDER = "GCP_WORKLOAD_IDENTITY_PROVIDER"
VAR_CI_SERVICE_ACCOUNT = "GCP_CI_SERVICE_ACCOUNT"
#: Set by the ML repository's maintainers, not by the stack: the image the example workflow's
#: train job runs in (spawn --image); unset, it runs in the runner image.
VAR_TRAINING_IMAGE = "GPU_TRAINING_IMAGE"
#: The branch the stack protects in that repository (pull requests, checks, no force pushes);
#: the policy pack requires its protection.
PROTECTED_BRANCH = "main"

# --- Names gpu_runners gives the objects of one run, and the Actions variables it reads ----------

#: The per-run Secret holding the JIT runner config is named <runner name> + this suffix.
JIT_SECRET_SUFFIX = "-jit"
#: Name of the runner container in a GPU pod (what `kubectl logs -c` and the policy pack see).
GPU_RUNNER_CONTAINER = "runner"
#: Standard GitHub Actions variables identifying the run a GPU runner belongs to.
ENV_RUN_ID = "GITHUB_RUN_ID"
ENV_RUN_ATTEMPT = "GITHUB_RUN_ATTEMPT"
#: Token env fallback after ENV_PAT_FILE and ENV_PAT_SEED (the workflow's own GITHUB_TOKEN cannot
#: manage runners, so it is only used when a workflow puts a PAT there).
ENV_GITHUB_TOKEN = "GITHUB_TOKEN"
#: Files a step writes its outputs and its Markdown summary to.
ENV_GITHUB_OUTPUT = "GITHUB_OUTPUT"
ENV_STEP_SUMMARY = "GITHUB_STEP_SUMMARY"

# --- Settings of this project's own repository, read by its preview workflow --------------------
# (.github/workflows/preview.yaml; set by hand, documented in the README. Distinct from the
# VAR_* above, which the stack declares in the repository the runners serve.)

#: Actions variable: the Pulumi state backend URL, e.g. gs://<bucket>.
INFRA_VAR_PULUMI_BACKEND_URL = "PULUMI_BACKEND_URL"
#: Actions secret: the passphrase that decrypts the stacks' secret config.
INFRA_SECRET_PULUMI_CONFIG_PASSPHRASE = "PULUMI_CONFIG_PASSPHRASE"
#: Actions variable: workload identity provider that trusts this repository's OIDC tokens.
INFRA_VAR_PREVIEW_WORKLOAD_IDENTITY_PROVIDER = "GCP_PREVIEW_WORKLOAD_IDENTITY_PROVIDER"
#: Actions variable: the read-only service account `pulumi preview` impersonates.
INFRA_VAR_PREVIEW_SERVICE_ACCOUNT = "GCP_PREVIEW_SERVICE_ACCOUNT"
