"""`CiIdentity`: keyless GitHub Actions -> Google Cloud login for one repository's workflows."""

from __future__ import annotations

import base64
import re
from collections.abc import Sequence
from dataclasses import dataclass

import pulumi
import pulumi_gcp as gcp

#: Issuer of the OIDC tokens GitHub Actions mints for a job with `id-token: write`.
GITHUB_OIDC_ISSUER = "https://token.actions.githubusercontent.com"
#: APIs workload identity federation needs: the pool (iam), the token exchange (sts) and the
#: impersonation of the service account (iamcredentials); and the project's IAM policy
#: (cloudresourcemanager) for the account's roles. Every resource here waits for them: on a
#: new project an IAM call before its API is on fails.
REQUIRED_APIS = ("iam.googleapis.com", "iamcredentials.googleapis.com", "sts.googleapis.com",
                 "cloudresourcemanager.googleapis.com")
#: What the CI service account may do in the DVC bucket. objectUser reads, writes, lists and
#: deletes objects (dvc pull, dvc push, dvc gc); objectAdmin would also let a workflow change
#: object ACLs and IAM, e.g. make a dataset public, which no pipeline step needs.
DVC_BUCKET_ROLE = "roles/storage.objectUser"
#: Basic roles grant (nearly) everything in the project, to change (owner, editor) or to read
#: (viewer). Any branch of the repository can impersonate the CI service account, so one of
#: these would hand the project to every pull request author. components/config.py refuses
#: them by config key before anything is declared; the check here guards direct use.
FORBIDDEN_ROLES = frozenset({"roles/owner", "roles/editor", "roles/viewer"})

_ACCOUNT_PREFIX = re.compile(r"^[a-z][a-z0-9-]*$")
_ACCOUNT_SUFFIX = "-github-ci"


@dataclass(frozen=True)
class CiIdentityArgs:
    """Which repository may log in, and what its workflows may do once logged in."""

    project: str
    #: GitHub user or organisation, spelled as GitHub does: its OIDC tokens carry the
    #: repository in its original case, and the condition below compares case-sensitively.
    github_owner: str
    #: Repository name without the owner, spelled as GitHub does.
    github_repository: str
    #: Start of the service account id, unique per stack in the project (the cluster name).
    account_prefix: str
    #: GitHub's numeric id of the repository and of its owner, as decimal strings (the OIDC
    #: claims repository_id, repository_owner_id). Ids, not names, decide who may log in: a
    #: deleted repository's name, or a renamed owner's, can be taken by someone else.
    repository_id: pulumi.Input[str]
    repository_owner_id: pulumi.Input[str]
    pool_id: str = "github-actions"
    provider_id: str = "github"
    #: Project roles of the CI service account, e.g. roles/container.clusterViewer.
    project_roles: Sequence[str] = ()
    #: Bucket the workflows read and write objects in (a DVC remote); empty for none.
    dvc_bucket: str = ""
    #: Also create a JSON key for the account (seed compatibility only).
    create_key: bool = False


def account_id_for(prefix: str) -> str:
    """The CI service account id for a stack: `<prefix>-github-ci`, within GCP's 30 characters.

    Args:
        prefix: Start of the id, unique per stack in the project (e.g. the cluster name).

    Raises:
        ValueError: when the prefix does not start with a lowercase letter or holds anything but
            lowercase letters, digits and '-'.
    """
    if not _ACCOUNT_PREFIX.match(prefix):
        raise ValueError(f"CiIdentityArgs.account_prefix = {prefix!r}: lowercase letters, digits "
                         "and '-', starting with a letter (a service account id)")
    return f"{prefix[:30 - len(_ACCOUNT_SUFFIX)].rstrip('-')}{_ACCOUNT_SUFFIX}"


def _numeric_id(name: str, value: str) -> str:
    # The ids are pasted into a CEL condition and a principal: only digits may get there.
    if not value.isdigit():
        raise ValueError(f"CiIdentityArgs.{name} = {value!r}: GitHub's numeric id, as decimal "
                         "digits")
    return value


def repository_condition(repository_id: str, owner_id: str) -> str:
    """The provider's attribute condition: only tokens of that repository of that owner.

    Args:
        repository_id: GitHub's numeric repository id (claim `repository_id`).
        owner_id: GitHub's numeric id of the repository's owner (claim `repository_owner_id`).

    Raises:
        ValueError: when an id is not decimal digits.
    """
    return (f'assertion.repository_id == "{_numeric_id("repository_id", repository_id)}" && '
            f'assertion.repository_owner_id == "{_numeric_id("repository_owner_id", owner_id)}"')


def decode_service_account_key(private_key: str) -> str:
    """The JSON credentials file held (base64-encoded) in a `serviceaccount.Key`'s private_key.

    The seed guide's workflow passes its secret to google-github-actions/auth `credentials_json`
    and to `docker login -u _json_key`, which both expect the JSON document itself.
    """
    return base64.b64decode(private_key, validate=True).decode("utf-8")


class CiIdentity(pulumi.ComponentResource):
    """Lets one GitHub repository's workflows act as a CI service account, without a key.

    Creates: the iam, iamcredentials, sts and cloudresourcemanager APIs, before everything else
    (left on at destroy: other workloads may use them); a workload identity pool and its GitHub
    OIDC provider, whose attribute condition accepts only tokens whose repository_id and
    repository_owner_id claims are the configured repository's numeric ids; the CI service
    account with exactly the configured project roles, plus roles/storage.objectUser on the DVC
    bucket when one is set (a bucket binding, not a project-wide one); the binding that lets the
    repository's tokens impersonate the account (roles/iam.workloadIdentityUser for
    principalSet://iam.googleapis.com/<pool>/attribute.repository_id/<repository id>); and a
    JSON key only when `create_key` asks for one (seed compatibility).

    A destroyed pool is soft-deleted for 30 days and its id cannot be reused meanwhile: to
    recreate the stack within that time, undelete the pool
    (`gcloud iam workload-identity-pools undelete <id> --location=global`) and import it, or
    choose another pool id.

    Outputs: `workload_identity_provider` (the provider's full name, for
    google-github-actions/auth), `service_account_email`, `service_account_key` (the JSON
    credentials file, secret; None without `create_key`).
    """

    workload_identity_provider: pulumi.Output[str]
    service_account_email: pulumi.Output[str]
    service_account_key: pulumi.Output[str] | None

    def __init__(self, name: str, args: CiIdentityArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        roles = list(dict.fromkeys(args.project_roles))  # a duplicate would be a duplicate URN
        forbidden = sorted(FORBIDDEN_ROLES.intersection(roles))
        if forbidden:
            raise ValueError(
                f"CiIdentityArgs.project_roles has {', '.join(forbidden)}: basic roles would let "
                "every branch of the repository control the project; grant predefined roles "
                "such as roles/container.clusterViewer or roles/storage.objectViewer")
        for field_name in ("repository_id", "repository_owner_id"):
            value = getattr(args, field_name)
            if isinstance(value, str):  # known now: refused before anything is declared
                _numeric_id(field_name, value)
        account_id = account_id_for(args.account_prefix)
        super().__init__("gpu-runners:index:CiIdentity", name, None, opts)
        child = pulumi.ResourceOptions(parent=self)

        apis = [
            gcp.projects.Service(
                f"{name}-{service.split('.')[0]}-api",
                project=args.project,
                service=service,
                # Other workloads in the project may federate identities too: destroying this
                # stack must not switch the APIs off under them.
                disable_on_destroy=False,
                opts=child,
            )
            for service in REQUIRED_APIS
        ]

        after_apis = pulumi.ResourceOptions(parent=self, depends_on=apis)
        pool = gcp.iam.WorkloadIdentityPool(
            f"{name}-pool",
            project=args.project,
            workload_identity_pool_id=args.pool_id,
            display_name="GitHub Actions",
            description=f"GitHub Actions OIDC tokens of {args.github_owner}/"
                        f"{args.github_repository}",
            opts=after_apis,
        )
        provider = gcp.iam.WorkloadIdentityPoolProvider(
            f"{name}-github",
            project=args.project,
            workload_identity_pool_id=pool.workload_identity_pool_id,
            workload_identity_pool_provider_id=args.provider_id,
            display_name="GitHub",
            attribute_mapping={
                "google.subject": "assertion.sub",
                "attribute.repository": "assertion.repository",
                "attribute.repository_owner": "assertion.repository_owner",
                "attribute.repository_id": "assertion.repository_id",
                "attribute.repository_owner_id": "assertion.repository_owner_id",
                "attribute.ref": "assertion.ref",
            },
            # Without a condition any GitHub repository's token would be accepted by the pool
            # (and GCP refuses a GitHub provider without one). By ids: a repository deleted
            # and re-created under the same name, by anyone, must not inherit the access.
            attribute_condition=pulumi.Output.all(
                pulumi.Output.from_input(args.repository_id),
                pulumi.Output.from_input(args.repository_owner_id),
            ).apply(lambda ids: repository_condition(ids[0], ids[1])),
            oidc={"issuer_uri": GITHUB_OIDC_ISSUER},
            opts=after_apis,
        )

        account = gcp.serviceaccount.Account(
            f"{name}-account",
            project=args.project,
            account_id=account_id,
            display_name=f"GitHub Actions of {args.github_owner}/{args.github_repository}",
            description="Impersonated by the repository's workflows through workload identity "
                        "federation",
            opts=after_apis,
        )
        for role in roles:
            gcp.projects.IAMMember(
                f"{name}-{role.replace('/', '-')}",
                project=args.project,
                role=role,
                member=account.member,
                opts=after_apis,
            )
        if args.dvc_bucket:
            gcp.storage.BucketIAMMember(
                f"{name}-dvc-bucket",
                bucket=args.dvc_bucket,
                role=DVC_BUCKET_ROLE,
                member=account.member,
                opts=after_apis,
            )

        repository_principals = pulumi.Output.all(
            pool.name, pulumi.Output.from_input(args.repository_id),
        ).apply(lambda parts: f"principalSet://iam.googleapis.com/{parts[0]}/attribute."
                              f"repository_id/{_numeric_id('repository_id', parts[1])}")
        gcp.serviceaccount.IAMMember(
            f"{name}-workload-identity-user",
            service_account_id=account.name,
            role="roles/iam.workloadIdentityUser",
            member=repository_principals,
            opts=after_apis,
        )

        self.service_account_key = None
        if args.create_key:
            key = gcp.serviceaccount.Key(
                f"{name}-key",
                service_account_id=account.name,
                opts=after_apis,
            )
            self.service_account_key = pulumi.Output.secret(
                key.private_key.apply(decode_service_account_key))

        self.workload_identity_provider = provider.name
        self.service_account_email = account.email
        self.register_outputs({
            "workload_identity_provider": self.workload_identity_provider,
            "service_account_email": self.service_account_email,
            "service_account_key": self.service_account_key,
        })
