"""`RegistryMirror`: Artifact Registry remote repositories that GKE nodes pull (and stream) from.

GKE streams images (image streaming, `gcfs_config`) only from Artifact Registry: a pod whose
image is on ghcr.io waits for the whole multi-gigabyte pull on every new node. A remote
repository mirrors an upstream registry on first pull and serves the same manifests, so the
same digests, from `<region>-docker.pkg.dev/<project>/<repository>/<path>`; nodes read it with
their own service account, and stream it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

import pulumi
import pulumi_gcp as gcp

from gpu_runners import contract

#: The upstreams a mirror can have; Docker Hub is Artifact Registry's predefined upstream.
UPSTREAM_URIS: Mapping[str, str] = {
    "ghcr.io": "https://ghcr.io",
    "nvcr.io": "https://nvcr.io",
    "docker.io": "DOCKER_HUB",
}
READER_ROLE = "roles/artifactregistry.reader"
SECRET_ACCESSOR_ROLE = "roles/secretmanager.secretAccessor"  # noqa: S105 - a role name
ARTIFACT_REGISTRY_API = "artifactregistry.googleapis.com"
SECRET_MANAGER_API = "secretmanager.googleapis.com"  # noqa: S105 - an API name
_SECRET_VERSION = re.compile(r"^projects/([^/]+)/secrets/([^/]+)/versions/[^/]+$")


@dataclass(frozen=True)
class UpstreamCredentials:
    """Credentials for a private upstream: a user name and a Secret Manager secret version
    (`projects/<p>/secrets/<s>/versions/<v>`) holding the password or token."""

    username: str
    password_secret_version: str


@dataclass(frozen=True)
class RegistryMirrorArgs:
    """What the mirror needs.

    Attributes:
        project: GCP project of the repositories.
        region: Their region (the cluster's): pulls stay in the region.
        name_prefix: Prefix of the repository ids (the cluster name).
        upstreams: Registry hosts to mirror (keys of UPSTREAM_URIS).
        credentials: Credentials per private upstream host.
        reader: Service account email of the nodes that pull.
    """

    project: str
    region: str
    name_prefix: str
    upstreams: Sequence[str]
    reader: pulumi.Input[str]
    credentials: Mapping[str, UpstreamCredentials] = field(default_factory=dict)


def repository_id(prefix: str, host: str) -> str:
    """The repository id of `host`'s mirror, e.g. gpu-runners-ghcr-io."""
    return f"{prefix}-{host.replace('.', '-')}"[:63].rstrip("-")


def mirror_prefix(region: str, project: str, prefix: str, host: str) -> str:
    """Where `host`'s images are pulled from through the mirror."""
    return f"{region}-docker.pkg.dev/{project}/{repository_id(prefix, host)}"


class RegistryMirror(pulumi.ComponentResource):
    """Artifact Registry remote repositories mirroring ghcr.io (and Docker Hub, nvcr.io).

    Creates the Artifact Registry API (and Secret Manager's, for private upstreams), one Docker
    remote repository per upstream (private upstreams with username and Secret Manager
    password, the Artifact Registry service agent allowed to read that secret), and the nodes'
    service account as reader of each. Streaming itself (its API, the nodes' role, the pools'
    gcfs_config) is GkeCluster's.

    Outputs: `prefixes`, upstream host -> `<region>-docker.pkg.dev/<project>/<repository>`.
    """

    prefixes: pulumi.Output[dict[str, str]]

    def __init__(self, name: str, args: RegistryMirrorArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpu-runners:index:RegistryMirror", name, None, opts)
        # Other workloads may use these APIs: destroying the stack keeps them on.
        api = gcp.projects.Service(
            f"{name}-api", project=args.project, service=ARTIFACT_REGISTRY_API,
            disable_on_destroy=False, opts=pulumi.ResourceOptions(parent=self))
        secrets_api = gcp.projects.Service(
            f"{name}-secretmanager-api", project=args.project, service=SECRET_MANAGER_API,
            disable_on_destroy=False, opts=pulumi.ResourceOptions(parent=self),
        ) if args.credentials else None
        reader_member = pulumi.Output.from_input(args.reader).apply(
            lambda email: f"serviceAccount:{email}")
        prefixes: dict[str, str] = {}
        for host in args.upstreams:
            role = host.replace(".", "-")
            credentials = args.credentials.get(host)
            needed: list[pulumi.Resource] = [api]
            if credentials is not None:
                assert secrets_api is not None  # created whenever there are credentials
                needed.append(self._secret_access(f"{name}-{role}", args.project, credentials,
                                                  secrets_api))
            repository = gcp.artifactregistry.Repository(
                f"{name}-{role}",
                project=args.project,
                location=args.region,
                repository_id=repository_id(args.name_prefix, host),
                format="DOCKER",
                mode="REMOTE_REPOSITORY",
                description=f"Pull-through mirror of {host} for GKE image streaming",
                remote_repository_config=_remote_config(host, credentials),
                labels={"managed-by": "pulumi", "app": contract.PART_OF},
                opts=pulumi.ResourceOptions(parent=self, depends_on=needed),
            )
            gcp.artifactregistry.RepositoryIamMember(
                f"{name}-{role}-nodes",
                project=args.project,
                location=args.region,
                repository=repository.name,
                role=READER_ROLE,
                member=reader_member,
                opts=pulumi.ResourceOptions(parent=self),
            )
            prefixes[host] = mirror_prefix(args.region, args.project, args.name_prefix, host)
        self.prefixes = pulumi.Output.from_input(prefixes)
        self.register_outputs({"prefixes": self.prefixes})

    def _secret_access(self, name: str, project: str, credentials: UpstreamCredentials,
                       secrets_api: pulumi.Resource) -> pulumi.Resource:
        match = _SECRET_VERSION.fullmatch(credentials.password_secret_version)
        assert match is not None  # config.py validated the form
        # The parent's gcp provider: the program disables default providers.
        number = gcp.organizations.get_project_output(
            project_id=project, opts=pulumi.InvokeOutputOptions(parent=self)).number
        service_agent = number.apply(
            lambda n: f"serviceAccount:service-{n}@gcp-sa-artifactregistry.iam.gserviceaccount.com")
        # Artifact Registry reads the password as its own service agent when it pulls.
        return gcp.secretmanager.SecretIamMember(
            f"{name}-secret-access",
            project=match[1],
            secret_id=match[2],
            role=SECRET_ACCESSOR_ROLE,
            member=service_agent,
            opts=pulumi.ResourceOptions(parent=self, depends_on=[secrets_api]),
        )


def _remote_config(host: str, credentials: UpstreamCredentials | None
                   ) -> gcp.artifactregistry.RepositoryRemoteRepositoryConfigArgsDict:
    uri = UPSTREAM_URIS[host]
    config: gcp.artifactregistry.RepositoryRemoteRepositoryConfigArgsDict = {
        "description": f"{host}",
        "docker_repository": ({"public_repository": uri} if uri == "DOCKER_HUB"
                              else {"custom_repository": {"uri": uri}}),
    }
    if credentials is not None:
        config["upstream_credentials"] = {"username_password_credentials": {
            "username": credentials.username,
            "password_secret_version": credentials.password_secret_version,
        }}
    return config
