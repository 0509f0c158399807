"""`RepositorySettings`: the GitHub side of the runners: Actions secrets and variables, `main`'s
protection, fork pull requests, and optionally the example GPU training workflow."""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_github as github
import yaml

from components.fork_pr_workflows import DEFAULT_API_URL, ForkPrWorkflows, ForkPrWorkflowsArgs
from gpu_runners import contract

#: The ML-repository workflow this project ships, and where it is committed in that repository.
EXAMPLE_WORKFLOW = (
    Path(__file__).resolve().parents[1] / "examples" / "workflows" / "gpu-training.yaml")
EXAMPLE_WORKFLOW_TARGET = ".github/workflows/gpu-training.yaml"

# GitHub's naming rules for Actions secrets and variables (names are case-insensitive there).
_ACTIONS_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
ACTIONS_NAME_RULE = "letters, digits and '_', not starting with a digit or GITHUB_"


def is_actions_name(name: str) -> bool:
    """Whether GitHub accepts `name` for an Actions secret or variable."""
    return bool(_ACTIONS_NAME.match(name)) and not name.upper().startswith("GITHUB_")


@dataclass(frozen=True)
class SeedCompatibility:
    """What the seed guide's chapter-17 workflow reads from the repository's secrets."""

    cluster_name: pulumi.Input[str]
    #: Zone or region of the cluster; the guide calls the secret a zone.
    cluster_location: pulumi.Input[str]
    #: The cluster's exec-plugin kubeconfig (`gke-gcloud-auth-plugin`, no token).
    kubeconfig: pulumi.Input[str]
    #: Namespace the kubeconfig's context is pointed at: the runner namespace, where the
    #: guide's `kubectl apply` creates its GPU runner pod next to Secret github-runner-pat.
    namespace: str
    #: The CI service account's JSON credentials file (`CiIdentity.service_account_key`).
    service_account_key: pulumi.Input[str]


@dataclass(frozen=True)
class RepositorySettingsArgs:
    """One repository's settings; built from the stack config and other components' outputs."""

    owner: str
    #: Repository name without the owner.
    repository: str
    #: Whether the repository is private: decides how fork pull requests are kept away.
    private: bool
    #: Token that administers the repository, for the fork pull request setting (the provider
    #: has its own copy).
    github_token: pulumi.Input[str]
    github_api_url: str = DEFAULT_API_URL
    #: Actions secret name -> value; every value is stored as a Pulumi secret.
    actions_secrets: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    #: Actions variable name -> value, see `workflow_variables`.
    variables: Mapping[str, pulumi.Input[str]] = field(default_factory=dict)
    #: Protect main. GitHub refuses branch protection on a private repository of a free plan.
    branch_protection: bool = True
    required_approvals: int = 1
    #: Check names that must pass before merging into main; empty for none.
    required_status_checks: Sequence[str] = ()
    enforce_admins: bool = True
    commit_example_workflow: bool = False
    #: The seed guide's secrets, or None to create none of them.
    seed: SeedCompatibility | None = None


def workflow_variables(*, runner_namespace: pulumi.Input[str],
                       cluster_name: pulumi.Input[str] | None = None,
                       cluster_location: pulumi.Input[str] | None = None,
                       workload_identity_provider: pulumi.Input[str] | None = None,
                       ci_service_account: pulumi.Input[str] | None = None,
                       ) -> dict[str, pulumi.Input[str]]:
    """The Actions variables workflows read, under the contract's names.

    Only what is not secret: where the cluster is, how to log in to Google Cloud without a key,
    and where and how to reach the runners. A value that is None (no GKE cluster, no CI
    identity) leaves its variable out.

    Args:
        runner_namespace: Namespace of the base runner and the GPU runner pods.
        cluster_name: GKE cluster name.
        cluster_location: GKE cluster zone or region.
        workload_identity_provider: Full name of the workload identity provider.
        ci_service_account: Email of the CI service account.

    Returns:
        Variable name -> value, for `RepositorySettingsArgs.variables`.
    """
    candidates: dict[str, pulumi.Input[str] | None] = {
        contract.VAR_CLUSTER_NAME: cluster_name,
        contract.VAR_CLUSTER_LOCATION: cluster_location,
        contract.VAR_WORKLOAD_IDENTITY_PROVIDER: workload_identity_provider,
        contract.VAR_CI_SERVICE_ACCOUNT: ci_service_account,
        contract.VAR_RUNNER_NAMESPACE: runner_namespace,
        contract.VAR_BASE_RUNNER_LABEL: contract.BASE_RUNNER_LABEL,
    }
    return {name: value for name, value in candidates.items() if value is not None}


def kubeconfig_in_namespace(kubeconfig: str, namespace: str) -> str:
    """The kubeconfig with its current context pointed at `namespace`; nothing else changes.

    Raises:
        ValueError: when the kubeconfig names no current context or lacks that context.
    """
    document = yaml.safe_load(kubeconfig)
    current = document.get("current-context") if isinstance(document, dict) else None
    contexts = [entry for entry in (document or {}).get("contexts") or []
                if isinstance(entry, dict) and entry.get("name") == current]
    if not current or len(contexts) != 1:
        raise ValueError("SeedCompatibility.kubeconfig must name its current-context and hold "
                         f"exactly one context of that name (current-context: {current!r})")
    contexts[0].setdefault("context", {})["namespace"] = namespace
    return str(yaml.safe_dump(document, sort_keys=False))


#: The secrets the seed guide's workflow reads, in the order they are declared.
SEED_SECRET_NAMES = (
    contract.SEED_SECRET_CLUSTER_NAME,
    contract.SEED_SECRET_CLUSTER_ZONE,
    contract.SEED_SECRET_KUBECONFIG,
    contract.SEED_SECRET_SERVICE_ACCOUNT_KEY,
)


def _check_names(kind: str, names: Sequence[str], reserved: Sequence[str] = ()) -> None:
    """Reject names GitHub would refuse, or that would name one secret twice."""
    # GitHub stores names upper-cased, so two spellings of one name are one secret or variable.
    reserved_upper = {name.upper() for name in reserved}
    taken: dict[str, str] = {}
    for name in names:
        if not is_actions_name(name):
            raise ValueError(f"RepositorySettingsArgs.{kind}: {name!r} is not a valid Actions "
                             f"name: {ACTIONS_NAME_RULE}")
        if name.upper() in reserved_upper:
            raise ValueError(f"RepositorySettingsArgs.{kind}: {name!r} is one of the secrets "
                             f"seed compatibility creates ({', '.join(reserved)}); rename it "
                             "or turn seed compatibility off")
        if name.upper() in taken:
            raise ValueError(f"RepositorySettingsArgs.{kind}: {taken[name.upper()]!r} and "
                             f"{name!r} are the same name on GitHub (names are "
                             "case-insensitive)")
        taken[name.upper()] = name


class RepositorySettings(pulumi.ComponentResource):
    """The settings of the repository the runners serve, through an explicit GitHub provider.

    Creates: one Actions secret per `actions_secrets` entry (set through `value`, always a
    Pulumi secret); one Actions variable per `variables` entry; with seed compatibility, the
    four secrets the seed guide's workflow reads (GCP_K8S_CLUSTER_NAME, GCP_K8S_CLUSTER_ZONE,
    GCP_K8S_KUBECONFIG pointed at the runner namespace, GOOGLE_SERVICE_ACCOUNT_KEY); unless
    `branch_protection` is off (GitHub Free refuses it on a private repository), branch
    protection of `main` (a pull request with `required_approvals` approvals, the required
    checks, no force pushes, no deletion, admins included as configured); for a private
    repository, fork pull request workflows turned off (`ForkPrWorkflows`), and for a public
    one a warning, since nothing then stops a stranger's pull request from running code on the
    self-hosted runners; and, when asked, the example GPU training workflow committed as
    .github/workflows/gpu-training.yaml.

    The workflow is committed once, before `main` is protected: from then on the file belongs
    to the repository (its team replaces the training step), so a later `pulumi up` neither
    reverts their edits nor pushes past the protection. An existing file of that name is not
    overwritten; creation then fails and names it. Destroying the stack leaves it in place.

    Outputs: `secret_names` (names only), `variables` (name -> value; none is secret).
    """

    secret_names: pulumi.Output[list[str]]
    variables: pulumi.Output[dict[str, str]]

    def __init__(self, name: str, args: RepositorySettingsArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        _check_names("actions_secrets", list(args.actions_secrets),
                     reserved=SEED_SECRET_NAMES if args.seed is not None else ())
        _check_names("variables", list(args.variables))
        if not 0 <= args.required_approvals <= 6:
            raise ValueError(f"RepositorySettingsArgs.required_approvals = "
                             f"{args.required_approvals}: GitHub allows 0 to 6")
        workflow_text = self._read_example_workflow() if args.commit_example_workflow else None
        super().__init__("gpu-runners:index:RepositorySettings", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        secrets = dict(args.actions_secrets)
        if args.seed is not None:
            secrets.update(self._seed_secrets(args.seed))
        for secret_name, value in secrets.items():
            github.ActionsSecret(
                f"{name}-secret-{secret_name}",
                repository=args.repository,
                secret_name=secret_name,
                # Secret even when the caller passes a plain string: state and outputs must
                # never hold it in plaintext, whichever outputs the SDK version marks secret.
                value=pulumi.Output.secret(value),
                opts=child,
            )

        for variable_name, value in args.variables.items():
            github.ActionsVariable(
                f"{name}-variable-{variable_name}",
                repository=args.repository,
                variable_name=variable_name,
                value=value,
                opts=child,
            )

        protection_after: list[pulumi.Resource] = []
        if workflow_text is not None:
            protection_after.append(github.RepositoryFile(
                f"{name}-example-workflow",
                repository=args.repository,
                file=EXAMPLE_WORKFLOW_TARGET,
                content=workflow_text,
                commit_message="Add the GPU training workflow (gpu-runners stack)",
                # Fails, naming the file, rather than replace a workflow the team wrote.
                overwrite_on_create=False,
                opts=pulumi.ResourceOptions(
                    parent=self,
                    ignore_changes=["content"],
                    # Once committed, the workflow is the team's (they replace its training
                    # step): deleting the resource, on `pulumi destroy` or when the switch is
                    # turned off, must not commit the deletion of their workflow to main.
                    retain_on_delete=True,
                ),
            ))

        if args.branch_protection:
            self._protect_main(name, args, protection_after)

        full_name = f"{args.owner}/{args.repository}"
        if args.private:
            ForkPrWorkflows(
                f"{name}-fork-pr-workflows",
                ForkPrWorkflowsArgs(owner=args.owner, repository=args.repository,
                                    token=args.github_token, api_url=args.github_api_url,
                                    run_workflows_from_fork_pull_requests=False),
                opts=child,
            )
        else:
            pulumi.log.warn(
                f"{full_name} is public: anyone can open a pull request from a fork, and a "
                "workflow that pull request changes can run on the self-hosted runners, "
                "i.e. strangers' code in your cluster with its network access. Make the "
                "repository private (and set repositoryPrivate = true), or at least require "
                "approval for all outside contributors and keep GPU jobs off pull_request "
                "events from forks.",
                resource=self,
            )

        self.secret_names = pulumi.Output.from_input(sorted(secrets))
        self.variables = pulumi.Output.from_input(dict(args.variables)).apply(
            lambda resolved: {key: str(value) for key, value in resolved.items()})
        self.register_outputs({
            "secret_names": self.secret_names,
            "variables": self.variables,
        })

    def _protect_main(self, name: str, args: RepositorySettingsArgs,
                      after: Sequence[pulumi.Resource]) -> None:
        status_checks: list[github.BranchProtectionRequiredStatusCheckArgsDict] = []
        if args.required_status_checks:
            # strict: a check that passed against an outdated main says nothing about the merge.
            status_checks.append({"strict": True,
                                  "contexts": list(args.required_status_checks)})
        github.BranchProtection(
            f"{name}-main-protection",
            repository_id=args.repository,
            pattern=contract.PROTECTED_BRANCH,
            enforce_admins=args.enforce_admins,
            allows_force_pushes=False,
            allows_deletions=False,
            required_pull_request_reviews=[{
                "required_approving_review_count": args.required_approvals,
                # An approval covers the commits it saw, not the ones pushed after it.
                "dismiss_stale_reviews": True,
            }],
            required_status_checks=status_checks or None,
            opts=pulumi.ResourceOptions(parent=self, depends_on=list(after)),
        )

    @staticmethod
    def _read_example_workflow() -> str:
        try:
            return EXAMPLE_WORKFLOW.read_text(encoding="utf-8")
        except OSError as error:
            raise FileNotFoundError(
                f"RepositorySettingsArgs.commit_example_workflow is on, but the example workflow "
                f"cannot be read from {EXAMPLE_WORKFLOW.name} ({error.strerror}): restore "
                "examples/workflows/gpu-training.yaml or turn commitExampleWorkflow off"
            ) from error

    @staticmethod
    def _seed_secrets(seed: SeedCompatibility) -> dict[str, pulumi.Input[str]]:
        kubeconfig = pulumi.Output.from_input(seed.kubeconfig).apply(
            lambda text: kubeconfig_in_namespace(text, seed.namespace))
        return {
            contract.SEED_SECRET_CLUSTER_NAME: seed.cluster_name,
            contract.SEED_SECRET_CLUSTER_ZONE: seed.cluster_location,
            contract.SEED_SECRET_KUBECONFIG: kubeconfig,
            contract.SEED_SECRET_SERVICE_ACCOUNT_KEY: seed.service_account_key,
        }
