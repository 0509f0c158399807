"""`RunnerImage`: the runner image built from docker/ and pushed to GHCR, pinned by digest."""

from __future__ import annotations

import base64
import hashlib
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pulumi
import pulumi_docker_build as docker_build

REPO_ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = REPO_ROOT / "docker" / "Dockerfile"
#: What goes into the image: a change to any of these files is a new content tag.
IMAGE_SOURCES = ("docker", "gpu_runners")
REGISTRY = "ghcr.io"


def runner_version(dockerfile: Path = DOCKERFILE) -> str:
    """The GitHub Actions runner version the Dockerfile pins (its RUNNER_VERSION default)."""
    match = re.search(r"^ARG RUNNER_VERSION=([0-9][0-9.]*)\s*$", dockerfile.read_text(),
                      re.MULTILINE)
    if match is None:
        raise ValueError(f"{dockerfile} does not pin ARG RUNNER_VERSION=<version>")
    return match.group(1)


def content_tag(root: Path = REPO_ROOT) -> str:
    """A tag that changes exactly when a file the image is built from changes."""
    digest = hashlib.sha256()
    for source in IMAGE_SOURCES:
        for path in sorted((root / source).rglob("*")):
            if path.is_file() and "__pycache__" not in path.parts:
                digest.update(str(path.relative_to(root)).encode())
                digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def image_repository(owner: str, repository: str) -> str:
    """ghcr.io/<owner>/<repository>/github-runner, lowercased as GHCR requires."""
    return f"{REGISTRY}/{owner}/{repository}/github-runner".lower()


def dockerconfigjson(username: str, token: str) -> str:
    """A kubernetes.io/dockerconfigjson document that lets a pod pull from GHCR."""
    auth = base64.b64encode(f"{username}:{token}".encode()).decode()
    return json.dumps({"auths": {REGISTRY: {"username": username, "auth": auth}}})


@dataclass(frozen=True)
class RunnerImageArgs:
    """Where the image goes and with which credentials."""

    owner: str
    repository: str
    #: Token that pushes to GHCR (a classic PAT with write:packages).
    push_token: pulumi.Input[str]
    #: Token the cluster pulls a private package with (read:packages); unused for public ones.
    pull_token: pulumi.Input[str]
    #: A prebuilt image pinned by digest; when set nothing is built.
    prebuilt_ref: str = ""
    private: bool = False
    build_on_preview: bool = False


class RunnerImage(pulumi.ComponentResource):
    """The self-hosted runner image from docker/, built for linux/amd64 and pushed to GHCR.

    Tags: the runner version and a content tag; the registry keeps a build cache next to the
    image. Nothing is built during `pulumi preview` unless asked (PR checks have no Docker).
    With a prebuilt reference, nothing is built at all.

    Outputs: `ref`, the digest-pinned reference every pod uses (a content change rolls the
    pods); `pull_secret_config`, a dockerconfigjson for a private package (secret), or None.
    """

    ref: pulumi.Output[str]
    pull_secret_config: pulumi.Output[str] | None

    def __init__(self, name: str, args: RunnerImageArgs,
                 opts: pulumi.ResourceOptions | None = None) -> None:
        super().__init__("gpu-runners:index:RunnerImage", name, None, opts)

        if args.prebuilt_ref:
            self.ref = pulumi.Output.from_input(args.prebuilt_ref)
        else:
            repository = image_repository(args.owner, args.repository)
            cache = f"{repository}:buildcache"
            image = docker_build.Image(
                f"{name}-image",
                context={"location": str(REPO_ROOT)},
                dockerfile={"location": str(DOCKERFILE)},
                platforms=[docker_build.Platform.LINUX_AMD64],
                tags=[f"{repository}:{runner_version()}", f"{repository}:{content_tag()}"],
                build_args={"GITHUB_REPOSITORY": f"{args.owner}/{args.repository}"},
                labels={
                    "org.opencontainers.image.source":
                        f"https://github.com/{args.owner}/{args.repository}",
                    "org.opencontainers.image.version": runner_version(),
                },
                push=True,
                registries=[{"address": REGISTRY, "username": args.owner,
                             "password": args.push_token}],
                cache_from=[{"registry": {"ref": cache}}],
                cache_to=[{"registry": {"ref": cache, "mode": docker_build.CacheMode.MAX,
                                        "image_manifest": True, "oci_media_types": True}}],
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
