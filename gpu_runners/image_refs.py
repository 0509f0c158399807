"""Container image references, normalized the way the container runtimes read them.

`pytorch/pytorch:2.4.0-cuda12.4-cudnn9-runtime` is `docker.io/pytorch/pytorch:...`, and
`python:3.12-slim` is `docker.io/library/python:3.12-slim`: the stack's `allowedImages`
patterns are matched against this full form, so that a short name cannot slip past a pattern
written for another registry.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

from gpu_runners.errors import UsageError

DOCKER_HUB = "docker.io"
#: Where Docker Hub's registry API answers (docker.io itself is only a name).
DOCKER_HUB_API_HOST = "registry-1.docker.io"
_DIGEST = re.compile(r"^sha256:[0-9a-f]{64}$")
_TAG = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}$")
_PATH_COMPONENT = re.compile(r"^[a-z0-9]+(?:(?:[._]|__|-+)[a-z0-9]+)*$")
_HOST = re.compile(r"^[A-Za-z0-9.-]+(?::[0-9]+)?$|^\[[0-9a-fA-F:]+\](?::[0-9]+)?$")


@dataclass(frozen=True)
class ImageReference:
    """A parsed image reference.

    Attributes:
        registry: Registry host (with port), e.g. ghcr.io, docker.io, nvcr.io.
        repository: Repository path, e.g. pytorch/pytorch, library/python.
        tag: The tag, or None.
        digest: `sha256:<hex>`, or None.
    """

    registry: str
    repository: str
    tag: str | None = None
    digest: str | None = None

    @property
    def name(self) -> str:
        """registry/repository, without tag or digest."""
        return f"{self.registry}/{self.repository}"

    @property
    def reference(self) -> str:
        """What the registry's manifest endpoint is asked for: the digest, else the tag."""
        return self.digest or self.tag or "latest"

    def pinned(self, digest: str) -> str:
        """The reference of this image at `digest`: what a pod runs."""
        return f"{self.name}@{digest}"

    def __str__(self) -> str:
        text = self.name
        if self.tag:
            text += f":{self.tag}"
        if self.digest:
            text += f"@{self.digest}"
        return text


def _is_host(component: str) -> bool:
    # Docker's rule: the first component names a registry when it has a dot or a port, or is
    # localhost; otherwise the image is on Docker Hub.
    return "." in component or ":" in component or component == "localhost"


def parse_image_reference(text: str, what: str = "image") -> ImageReference:
    """Parses and normalizes an image reference.

    Args:
        text: e.g. `ghcr.io/acme/train:1`, `pytorch/pytorch@sha256:...`, `python:3.12-slim`.
        what: The option or field named in errors.

    Raises:
        UsageError: Not a valid reference; the message says which part.
    """
    rest = text.strip()
    if not rest or any(c.isspace() for c in rest):
        raise UsageError(f"{what}: {text!r} is not an image reference")
    digest: str | None = None
    if "@" in rest:
        rest, digest = rest.split("@", 1)
        if not _DIGEST.fullmatch(digest):
            raise UsageError(f"{what}: {text!r} has digest {digest!r}; a digest is sha256:<64 "
                             "lowercase hex digits>")
    tag: str | None = None
    last_slash = rest.rfind("/")
    if ":" in rest[last_slash + 1:]:
        rest, tag = rest.rsplit(":", 1)
        if not _TAG.fullmatch(tag):
            raise UsageError(f"{what}: {text!r} has tag {tag!r}, which is not a valid tag")
    components = rest.split("/")
    if len(components) > 1 and _is_host(components[0]):
        registry, path = components[0], components[1:]
        if not _HOST.fullmatch(registry):
            raise UsageError(f"{what}: {text!r} names registry {registry!r}, not a host")
    else:
        registry, path = DOCKER_HUB, components
        if len(path) == 1:
            path = ["library", *path]
    if registry == "index.docker.io":
        registry = DOCKER_HUB
    for component in path:
        if not _PATH_COMPONENT.fullmatch(component):
            raise UsageError(f"{what}: {text!r} has repository part {component!r}; lowercase "
                             "letters, digits and separators (. _ -) only")
    return ImageReference(registry, "/".join(path), tag, digest)


def normalize_pattern(pattern: str) -> str:
    """An `allowedImages` pattern in the same full form as references (Docker Hub named)."""
    first, slash, _ = pattern.partition("/")
    if pattern[:1] in ("*", "?", "["):
        return pattern  # any registry
    if not slash:
        return f"{DOCKER_HUB}/library/{pattern}"
    if _is_host(first):
        return pattern
    return f"{DOCKER_HUB}/{pattern}"


def mirrored_reference(reference: str, prefixes: Mapping[str, str]) -> str:
    """`reference` (registry/path[:tag][@digest], normalized) pulled through the mirror of its
    registry, or unchanged when its registry has none.

    A mirror (an Artifact Registry remote repository) serves the upstream's manifests byte for
    byte, so the digest a reference pins stays valid through it.

    Args:
        reference: e.g. ghcr.io/acme/train@sha256:..., docker.io/library/python@sha256:...
        prefixes: Upstream host -> mirror prefix (<region>-docker.pkg.dev/<project>/<repo>).
    """
    host, _, path = reference.partition("/")
    prefix = prefixes.get(host)
    return f"{prefix}/{path}" if prefix and path else reference
