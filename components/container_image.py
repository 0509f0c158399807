"""`ContainerImage`: an image of this project built from docker/, pushed to GHCR, pinned by digest.

Two images share this one implementation: the runner image (docker/Dockerfile; the base runner
and the GPU runners run it) and the broker image (docker/broker.Dockerfile). Each has its own
name, Dockerfile and sources, so a change to one rebuilds only that one.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import pulumi
import pulumi_docker_build as docker_build
import pulumi_kubernetes as k8s

REPO_ROOT = Path(__file__).resolve().parent.parent
REGISTRY = "ghcr.io"


@dataclass(frozen=True)
class ImageDefinition:
    """What one image is built from, and what it is called on the registry."""

    #: Last part of the GHCR name: ghcr.io/<owner>/<repository>/<name>.
    name: str
    dockerfile: Path
    #: Files and folders (relative to the repository root) the image is built from: a change to
    #: any of them is a new content tag. The Dockerfile's .dockerignore lets in no more.
    sources: tuple[str, ...]
    #: Build arguments the Dockerfile reads besides GITHUB_REPOSITORY.
    build_args: dict[str, str] = field(default_factory=dict)


def runner_version(dockerfile: Path | None = None) -> str:
    """The GitHub Actions runner version the runner Dockerfile pins (its RUNNER_VERSION default)."""
    dockerfile = dockerfile or RUNNER_IMAGE.dockerfile
    match = re.search(r"^ARG RUNNER_VERSION=([0-9][0-9.]*)\s*$", dockerfile.read_text(),
                      re.MULTILINE)
    if match is None:
        raise ValueError(f"{dockerfile} does not pin ARG RUNNER_VERSION=<version>")
    return match.group(1)


RUNNER_IMAGE = ImageDefinition(
    name="github-runner",
    dockerfile=REPO_ROOT / "docker" / "Dockerfile",
    sources=("docker/Dockerfile", "docker/Dockerfile.dockerignore", "docker/entrypoint.sh",
             "docker/runtime-requirements.txt", "gpu_runners"),
)
BROKER_IMAGE = ImageDefinition(
    name="gpu-runners-broker",
    dockerfile=REPO_ROOT / "docker" / "broker.Dockerfile",
    sources=("docker/broker.Dockerfile", "docker/broker.Dockerfile.dockerignore",
             "docker/broker-requirements.txt", "gpu_runners"),
)


def content_tag(sources: Sequence[str], root: Path = REPO_ROOT) -> str:
    """A tag that changes exactly when a file under `sources` (relative to `root`) changes."""
    digest = hashlib.sha256()
    for source in sources:
        path = root / source
        files = [path] if path.is_file() else sorted(path.rglob("*"))
        for file in files:
            if file.is_file() and "__pycache__" not in file.parts:
                digest.update(str(file.relative_to(root)).encode())
                digest.update(file.read_bytes())
    return digest.hexdigest()[:12]


def image_repository(owner: str, repository: str, name: str) -> str:
    """ghcr.io/<owner>/<repository>/<name>, lowercased as GHCR requires."""
    return f"{REGISTRY}/{owner}/{repository}/{name}".lower()


def dockerconfigjson(username: str, token: str) -> str:
    """A kubernetes.io/dockerconfigjson document that lets a pod pull from GHCR."""
    auth = base64.b64encode(f"{username}:{token}".encode()).decode()
    return json.dumps({"auths": {REGISTRY: {"username": username, "auth": auth}}})


def image_pull_secret(resource_name: str, metadata: k8s.meta.v1.ObjectMetaArgsDict,
                      config: pulumi.Input[str], parent: pulumi.Resource) -> k8s.core.v1.Secret:
    """The kubernetes.io/dockerconfigjson Secret a namespace's pods pull a private image with.

    Its name is fixed (pods name it), so a changed token deletes the old Secret first.
    """
    return k8s.core.v1.Secret(
        resource_name,
        metadata=metadata,
        type="kubernetes.io/dockerconfigjson",
        string_data={".dockerconfigjson": config},
        opts=pulumi.ResourceOptions(parent=parent, delete_before_replace=True),
    )


@dataclass(frozen=True)
class ContainerImageArgs:
    """Which image, where it goes and with which credentials."""

    definition: ImageDefinition
    owner: str
    repository: str
    #: Token that pushes to GHCR (a classic PAT with write:packages).
    push_token: pulumi.Input[str]
    #: Token the cluster pulls a private package with (read:packages); unused for public ones.
    pull_token: pulumi.Input[str]
    #: A readable tag besides the content tag (the runner version), or "" for none.
    version: str = ""
    #: A prebuilt image pinned by digest; when set nothing is built.
    prebuilt_ref: str = ""
    private: bool = False
    build_on_preview: bool = False


class ContainerImage(pulumi.ComponentResource):
    """One of this project's images, built for linux/amd64 and pushed to GHCR.

    Tags: the content tag (and the version, when given). No build cache is imported from or
    exported to the registry: a cache tag is mutable, and whoever can push to the package could
    plant layers the next build would reuse unverified. Nothing is built during `pulumi preview`
    unless asked (PR checks have no Docker). With a prebuilt reference, nothing is built at all.

    Outputs: `ref`, the digest-pinned reference the pods use (a content change rolls them);
    `pull_secret_config`, a dockerconfigjson for a private package (secret), or None.
    """

    ref: pulumi.Output[str]
    pull_secret_config: pulumi.Output[str] | None

    def __init__(self, name: str, args: ContainerImageArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpu-runners:index:ContainerImage", name, None, opts)
        definition = args.definition

        if args.prebuilt_ref:
            self.ref = pulumi.Output.from_input(args.prebuilt_ref)
        else:
            repository = image_repository(args.owner, args.repository, definition.name)
            tags = [f"{repository}:{tag}" for tag in (args.version,
                                                       content_tag(definition.sources)) if tag]
            labels = {"org.opencontainers.image.source":
                      f"https://github.com/{args.owner}/{args.repository}"}
            if args.version:
                labels["org.opencontainers.image.version"] = args.version
            image = docker_build.Image(
                f"{name}-image",
                context={"location": str(REPO_ROOT)},
                dockerfile={"location": str(definition.dockerfile)},
                platforms=[docker_build.Platform.LINUX_AMD64],
                tags=tags,
                build_args={"GITHUB_REPOSITORY": f"{args.owner}/{args.repository}",
                            **definition.build_args},
                labels=labels,
                push=True,
                registries=[{"address": REGISTRY, "username": args.owner,
                             "password": args.push_token}],
                build_on_preview=args.build_on_preview,
                opts=pulumi.ResourceOptions(
                    parent=self,
                    # Older digests stay pullable for pods still running them.
                    retain_on_delete=True,
                ),
            )
            self.ref = image.ref

        self.pull_secret_config = (
            pulumi.Output.secret(pulumi.Output.from_input(args.pull_token).apply(
                lambda token: dockerconfigjson(args.owner, token)))
            if args.private else None
        )
        self.register_outputs({"ref": self.ref, "pull_secret_config": self.pull_secret_config})
