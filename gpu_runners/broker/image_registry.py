"""Resolving a job's image to a digest through its registry's API (OCI distribution spec).

A pod always runs a digest: a tag could be moved between the policy check and the pull, and
the node would run whatever it names then. The broker asks the registry for the manifest
(`GET /v2/<name>/manifests/<tag or digest>`, accepting OCI indexes and Docker manifest lists),
checks the digest it gets against the bytes it got (and against the digest asked for, if
any), and reads the image's config for its environment (PATH, LD_LIBRARY_PATH: the injected
runner extends them) and its USER.

Authentication is the registries' own: an anonymous bearer token from the realm a 401's
`WWW-Authenticate` names (ghcr.io, Docker Hub, nvcr.io all work so), with the pull Secret's
credentials for private images. Plain HTTP only for loopback registries, as Docker allows.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

from gpu_runners.errors import GpuRunnersError
from gpu_runners.image_refs import DOCKER_HUB, DOCKER_HUB_API_HOST, ImageReference

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
DOCKER_LIST = "application/vnd.docker.distribution.manifest.list.v2+json"
DOCKER_MANIFEST = "application/vnd.docker.distribution.manifest.v2+json"
MANIFEST_TYPES = (OCI_INDEX, OCI_MANIFEST, DOCKER_LIST, DOCKER_MANIFEST)
INDEX_TYPES = frozenset({OCI_INDEX, DOCKER_LIST})
#: GPU nodes are amd64; a multi-platform image's config is read for that platform.
PLATFORM = ("linux", "amd64")
#: Larger bodies are not manifests or configs one should parse (the spec suggests 4 MiB).
MAX_BODY_BYTES = 4 * 1024 * 1024
TIMEOUT_SECONDS = 10.0
_LOOPBACK = re.compile(r"^(localhost|127\.\d+\.\d+\.\d+|\[::1\])(:\d+)?$")
_CHALLENGE_PARAM = re.compile(r'(\w+)="([^"]*)"')


class ImageResolutionError(GpuRunnersError):
    """The image cannot be resolved to a digest the policy accepts (the message says why)."""


@dataclass(frozen=True)
class ResolvedImage:
    """An image pinned to its digest, with what its config declares.

    Attributes:
        reference: `<registry>/<repository>@sha256:...`, what the pod runs.
        digest: The manifest (or index) digest.
        env: The config's environment (`Env`), as a mapping.
        user: The config's `User` ("" when it sets none, i.e. root).
    """

    reference: str
    digest: str
    env: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))
    user: str = ""

    @property
    def runs_as_root(self) -> bool:
        """Whether the image expects to run as root (no USER, or USER root/0)."""
        name = self.user.split(":", 1)[0]
        return name in ("", "root", "0")


@dataclass(frozen=True)
class RegistryCredentials:
    """Username/password per registry host, from a dockerconfigjson (a pull Secret)."""

    by_host: Mapping[str, tuple[str, str]] = field(default_factory=lambda: MappingProxyType({}))

    @classmethod
    def from_dockerconfigjson(cls, text: str) -> RegistryCredentials:
        """Reads `{"auths": {host: {"auth": base64(user:pass)} | {"username", "password"}}}`."""
        auths = json.loads(text).get("auths") or {}
        found: dict[str, tuple[str, str]] = {}
        for key, entry in auths.items():
            host = urllib.parse.urlsplit(key).netloc or key.split("/", 1)[0]
            if host in ("index.docker.io", DOCKER_HUB_API_HOST):
                host = DOCKER_HUB
            if entry.get("auth"):
                user, _, password = base64.b64decode(entry["auth"]).decode().partition(":")
            else:
                user, password = entry.get("username", ""), entry.get("password", "")
            if user or password:
                found[host] = (user, password)
        return cls(MappingProxyType(found))


class _SameHostAuthorization(urllib.request.HTTPRedirectHandler):
    """Follows redirects, dropping the Authorization header when the host changes: registries
    redirect blob downloads to signed storage URLs, which refuse a second credential."""

    def redirect_request(self, req: urllib.request.Request, fp: Any, code: int, msg: str,
                         headers: Any, newurl: str) -> urllib.request.Request | None:
        new = super().redirect_request(req, fp, code, msg, headers, newurl)
        if new is not None and urllib.parse.urlsplit(newurl).netloc != (
                urllib.parse.urlsplit(req.full_url).netloc):
            new.remove_header("Authorization")
        return new


class RegistryClient:
    """Reads manifests and configs from OCI registries.

    Args:
        credentials: Credentials per registry host (a private image's pull Secret).
        endpoints: Base URL per registry host where its API is reached instead of
            `https://<host>` (a mirror; the tests' fake registry).
        timeout: Seconds per request.
    """

    def __init__(self, credentials: RegistryCredentials | None = None, *,
                 endpoints: Mapping[str, str] | None = None,
                 timeout: float = TIMEOUT_SECONDS) -> None:
        self.credentials = credentials or RegistryCredentials()
        self.endpoints = dict(endpoints or {})
        self.timeout = timeout
        self._opener = urllib.request.build_opener(_SameHostAuthorization())

    def resolve(self, image: ImageReference) -> ResolvedImage:
        """Pins `image` to the digest its registry serves and reads its config.

        Raises:
            ImageResolutionError: The registry does not have it (a tag that does not
                resolve), refuses us, cannot be reached, or serves bytes whose digest is not
                the one asked for or announced.
        """
        session = _Session(self, image)
        body, media_type, announced = session.get(f"manifests/{image.reference}",
                                                  MANIFEST_TYPES)
        digest = "sha256:" + hashlib.sha256(body).hexdigest()
        if image.digest is not None and digest != image.digest:
            raise ImageResolutionError(
                f"{image}: the registry served a manifest whose digest is {digest}, not the "
                f"{image.digest} asked for; refusing it")
        if announced and announced != digest:
            raise ImageResolutionError(
                f"{image}: the registry announced digest {announced} for a manifest whose "
                f"digest is {digest}; refusing it")
        manifest = _json(body, image, "manifest")
        if (manifest.get("mediaType") or media_type) in INDEX_TYPES:
            manifest = self._platform_manifest(session, image, manifest)
        config_digest = (manifest.get("config") or {}).get("digest")
        if not isinstance(config_digest, str):
            raise ImageResolutionError(f"{image}: its manifest names no config")
        config_body, _, _ = session.get(f"blobs/{config_digest}", ("*/*",))
        if "sha256:" + hashlib.sha256(config_body).hexdigest() != config_digest:
            raise ImageResolutionError(f"{image}: its config blob does not match its digest")
        config = _json(config_body, image, "config").get("config") or {}
        env = dict(item.split("=", 1) for item in config.get("Env") or [] if "=" in item)
        return ResolvedImage(image.pinned(digest), digest, MappingProxyType(env),
                             str(config.get("User") or ""))

    def _platform_manifest(self, session: _Session, image: ImageReference,
                           index: dict[str, Any]) -> dict[str, Any]:
        for entry in index.get("manifests") or []:
            platform = entry.get("platform") or {}
            if (platform.get("os"), platform.get("architecture")) == PLATFORM:
                body, _, _ = session.get(f"manifests/{entry['digest']}", MANIFEST_TYPES)
                if "sha256:" + hashlib.sha256(body).hexdigest() != entry["digest"]:
                    raise ImageResolutionError(
                        f"{image}: its {'/'.join(PLATFORM)} manifest does not match its digest")
                return _json(body, image, "manifest")
        raise ImageResolutionError(f"{image}: no {'/'.join(PLATFORM)} image in its index; the "
                                   "GPU nodes are linux/amd64")

    def base_url(self, registry: str) -> str:
        """Where `registry`'s API answers."""
        if registry in self.endpoints:
            return self.endpoints[registry].rstrip("/")
        host = DOCKER_HUB_API_HOST if registry == DOCKER_HUB else registry
        scheme = "http" if _LOOPBACK.fullmatch(host) else "https"
        return f"{scheme}://{host}"


class PullSecretRegistry:
    """A RegistryClient with the credentials of the stack's pull Secret, read at each
    resolve (the Secret may be rotated while the broker runs).

    Args:
        read_config: Returns the pull Secret's `.dockerconfigjson`, or None without one.
        endpoints: As RegistryClient's.
    """

    def __init__(self, read_config: Callable[[], str | None], *,
                 endpoints: Mapping[str, str] | None = None) -> None:
        self.read_config = read_config
        self.endpoints = dict(endpoints or {})

    def resolve(self, image: ImageReference) -> ResolvedImage:
        """RegistryClient.resolve with the pull Secret's current credentials."""
        config = self.read_config()
        try:
            credentials = (RegistryCredentials.from_dockerconfigjson(config) if config
                           else RegistryCredentials())
        except (ValueError, AttributeError, UnicodeDecodeError):
            raise ImageResolutionError(
                "the stack's image pull Secret holds no valid .dockerconfigjson") from None
        return RegistryClient(credentials, endpoints=self.endpoints).resolve(image)


class _Session:
    """Requests for one image, with the bearer token its registry hands out reused."""

    def __init__(self, client: RegistryClient, image: ImageReference) -> None:
        self.client = client
        self.image = image
        self.base = f"{client.base_url(image.registry)}/v2/{image.repository}"
        self.authorization: str | None = None

    def get(self, path: str, accept: tuple[str, ...]) -> tuple[bytes, str, str]:
        """GETs `path`; returns the body, its media type and the announced digest."""
        for attempt in range(2):
            request = urllib.request.Request(  # noqa: S310 - base_url gives http(s) only
                f"{self.base}/{path}", headers={"Accept": ", ".join(accept)})
            if self.authorization:
                request.add_header("Authorization", self.authorization)
            try:
                with self.client._opener.open(request, timeout=self.client.timeout) as answer:
                    body = answer.read(MAX_BODY_BYTES + 1)
                    if len(body) > MAX_BODY_BYTES:
                        raise ImageResolutionError(f"{self.image}: {path} is over 4 MiB")
                    return (body, answer.headers.get("Content-Type", "").split(";")[0],
                            answer.headers.get("Docker-Content-Digest", ""))
            except urllib.error.HTTPError as e:
                if e.code == 401 and attempt == 0:
                    self.authorization = self._authorize(e.headers.get("WWW-Authenticate", ""))
                    continue
                raise self._refusal(e.code, path) from None
            except (urllib.error.URLError, OSError) as e:
                raise ImageResolutionError(
                    f"{self.image}: cannot reach registry {self.image.registry} ({e})") from None
        raise ImageResolutionError(f"{self.image}: registry {self.image.registry} refused the "
                                   "credentials it asked for")

    def _refusal(self, status: int, path: str) -> ImageResolutionError:
        kind = "manifest" if path.startswith("manifests/") else "blob"
        if status == 404:
            return ImageResolutionError(
                f"{self.image}: registry {self.image.registry} has no {kind} "
                f"{path.split('/', 1)[1]} (a tag that does not resolve, or a wrong name)")
        if status in (401, 403):
            return ImageResolutionError(
                f"{self.image}: registry {self.image.registry} refused access ({status}): "
                f"{self._access_hint()}")
        return ImageResolutionError(
            f"{self.image}: registry {self.image.registry} answered {status} for its {kind}")

    def _access_hint(self) -> str:
        if self.image.registry in self.client.credentials.by_host:
            return "the pull Secret's credentials may not read it"
        return ("it may be private: the stack's image pull Secret needs credentials for "
                f"{self.image.registry}")

    def _authorize(self, challenge: str) -> str:
        scheme, _, params_text = challenge.partition(" ")
        credentials = self.client.credentials.by_host.get(self.image.registry)
        basic = ("Basic " + base64.b64encode(":".join(credentials).encode()).decode()
                 if credentials else None)
        if scheme.lower() == "basic" and basic:
            return basic
        if scheme.lower() != "bearer":
            raise ImageResolutionError(
                f"{self.image}: registry {self.image.registry} asks for {scheme or 'an unknown'}"
                " authentication; the broker speaks Bearer (and Basic with a pull Secret)")
        params = dict(_CHALLENGE_PARAM.findall(params_text))
        realm = params.get("realm", "")
        realm_parts = urllib.parse.urlsplit(realm)
        # The realm may be another host (auth.docker.io); credentials go there only over TLS.
        if not (realm_parts.scheme == "https" or (
                realm_parts.scheme == "http" and _LOOPBACK.fullmatch(realm_parts.netloc))):
            raise ImageResolutionError(f"{self.image}: the registry's token realm {realm!r} is "
                                       "not an https URL")
        query = {"scope": params.get("scope") or f"repository:{self.image.repository}:pull"}
        if params.get("service"):
            query["service"] = params["service"]
        request = urllib.request.Request(  # noqa: S310 - the realm's scheme is checked above
            f"{realm}?{urllib.parse.urlencode(query)}")
        if basic:
            request.add_header("Authorization", basic)
        try:
            with self.client._opener.open(request, timeout=self.client.timeout) as answer:
                token_reply = json.loads(answer.read(MAX_BODY_BYTES))
        except urllib.error.HTTPError as e:
            hint = f": {self._access_hint()}" if e.code in (401, 403) else ""
            raise ImageResolutionError(
                f"{self.image}: registry {self.image.registry} refused access ({e.code} from "
                f"its token service){hint}") from None
        except (urllib.error.URLError, OSError, ValueError) as e:
            raise ImageResolutionError(
                f"{self.image}: no token from {self.image.registry}'s token service ({e})"
            ) from None
        token = token_reply.get("token") or token_reply.get("access_token")
        if not isinstance(token, str) or not token:
            raise ImageResolutionError(f"{self.image}: the token service of "
                                       f"{self.image.registry} gave no token")
        return f"Bearer {token}"


def _json(body: bytes, image: ImageReference, what: str) -> dict[str, Any]:
    try:
        data = json.loads(body)
    except ValueError:
        raise ImageResolutionError(f"{image}: its {what} is not JSON") from None
    if not isinstance(data, dict):
        raise ImageResolutionError(f"{image}: its {what} is not a JSON object")
    return data
