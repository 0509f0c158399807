"""A fake OCI registry over real HTTP: the token endpoint and the manifest and blob endpoints.

It behaves as ghcr.io and Docker Hub do for a pull: a request without a token gets 401 with
`WWW-Authenticate: Bearer realm=...,service=...,scope=repository:<name>:pull`; the realm hands
out a token anonymously for public repositories and only with Basic credentials for private
ones; manifests are served by tag or digest, with `Docker-Content-Digest`, and a tag points to
an OCI index (linux/amd64 and linux/arm64) whose entries point to image manifests and configs.

`tamper` makes the registry serve other bytes under a digest (a compromised mirror),
`announce_wrong_digest` send a digest header that does not match the body, and
`redirect_blobs_to_storage` answer blob requests with a redirect to signed storage on another
host (as ghcr.io and Docker Hub do), which refuses any request carrying an Authorization header.
"""

from __future__ import annotations

import base64
import hashlib
import http.server
import json
import re
import secrets
import threading
import urllib.parse
from dataclasses import dataclass, field
from typing import Any

from tests.fakes.loopback_server import LoopbackServer

OCI_INDEX = "application/vnd.oci.image.index.v1+json"
OCI_MANIFEST = "application/vnd.oci.image.manifest.v1+json"
OCI_CONFIG = "application/vnd.oci.image.config.v1+json"
_MANIFEST_PATH = re.compile(r"^/v2/(?P<name>.+)/(?P<kind>manifests|blobs)/(?P<ref>[^/]+)$")


def _digest(body: bytes) -> str:
    return "sha256:" + hashlib.sha256(body).hexdigest()


@dataclass(frozen=True)
class RecordedRegistryRequest:
    """One request the fake answered."""

    method: str
    path: str
    authorization: str
    status: int


@dataclass
class _Repository:
    private: bool = False
    tags: dict[str, str] = field(default_factory=dict)
    manifests: dict[str, tuple[str, bytes]] = field(default_factory=dict)
    blobs: dict[str, bytes] = field(default_factory=dict)


class FakeOciRegistry(LoopbackServer):
    """A registry (and its token service) on 127.0.0.1.

    Args:
        username: The user private repositories accept (with `password`).
        password: Its password.
    """

    server_name = "fake-oci-registry"

    def __init__(self, *, username: str = "puller", password: str | None = None) -> None:
        super().__init__()
        self.username = username
        self.password = password or secrets.token_urlsafe(16)
        self.requests: list[RecordedRegistryRequest] = []
        self._repositories: dict[str, _Repository] = {}
        self._tokens: dict[str, str] = {}  # token -> repository it may pull
        self._tampered: dict[str, bytes] = {}
        self._wrong_digest_header = False
        self._blob_storage = False
        self._lock = threading.Lock()

    # --- the registry's content --------------------------------------------------------------

    def add_image(self, repository: str, tag: str, *, env: dict[str, str] | None = None,
                  user: str = "", private: bool = False) -> str:
        """Pushes a two-platform image under `tag`; returns the digest of its index."""
        repo = self._repositories.setdefault(repository, _Repository())
        repo.private = repo.private or private
        entries = []
        for architecture in ("amd64", "arm64"):
            config = json.dumps({
                "architecture": architecture, "os": "linux",
                "config": {"Env": [f"{k}={v}" for k, v in (env or {}).items()],
                           "User": user},
                "rootfs": {"type": "layers", "diff_ids": []},
            }).encode()
            repo.blobs[_digest(config)] = config
            manifest = json.dumps({
                "schemaVersion": 2, "mediaType": OCI_MANIFEST,
                "config": {"mediaType": OCI_CONFIG, "digest": _digest(config),
                           "size": len(config)},
                "layers": [],
            }).encode()
            repo.manifests[_digest(manifest)] = (OCI_MANIFEST, manifest)
            entries.append({"mediaType": OCI_MANIFEST, "digest": _digest(manifest),
                            "size": len(manifest),
                            "platform": {"os": "linux", "architecture": architecture}})
        index = json.dumps({"schemaVersion": 2, "mediaType": OCI_INDEX,
                            "manifests": entries}).encode()
        repo.manifests[_digest(index)] = (OCI_INDEX, index)
        repo.tags[tag] = _digest(index)
        return _digest(index)

    def tamper(self, digest: str) -> None:
        """Serves other bytes under `digest` from now on."""
        with self._lock:
            self._tampered[digest] = json.dumps({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
                                                 "config": {"digest": "sha256:" + "0" * 64},
                                                 "layers": ["evil"]}).encode()

    def redirect_blobs_to_storage(self) -> None:
        """Blob requests get a 307 to `http://localhost:<port>/storage/<digest>` (another host
        name than the registry's 127.0.0.1), served only without an Authorization header."""
        self._blob_storage = True

    def announce_wrong_digest(self) -> None:
        """Sends a `Docker-Content-Digest` header that does not match the manifest's bytes."""
        self._wrong_digest_header = True

    # --- serving -----------------------------------------------------------------------------

    @property
    def host(self) -> str:
        """host:port of the registry."""
        return self.url.removeprefix("http://")

    def credentials_json(self) -> str:
        """A dockerconfigjson for this registry, as the stack's pull Secret holds it."""
        auth = base64.b64encode(f"{self.username}:{self.password}".encode()).decode()
        return json.dumps({"auths": {self.host: {"auth": auth}}})

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        registry = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base's name
                """Quiet: tests read `requests`."""

            def do_GET(self) -> None:  # noqa: N802 - http.server's name
                status, headers, body = registry._answer(self.path, self.headers)
                with registry._lock:
                    registry.requests.append(RecordedRegistryRequest(
                        "GET", urllib.parse.urlsplit(self.path).path,
                        self.headers.get("Authorization", ""), status))
                self.send_response(status)
                for key, value in headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        return Handler

    def _answer(self, raw_path: str, headers: Any) -> tuple[int, dict[str, str], bytes]:
        parts = urllib.parse.urlsplit(raw_path)
        if parts.path == "/token":
            return self._token(urllib.parse.parse_qs(parts.query), headers)
        if parts.path.startswith("/storage/"):
            if headers.get("Authorization"):
                # What signed-URL storage answers to a second credential.
                return 400, {}, b"<Error>Only one auth mechanism allowed</Error>"
            digest = parts.path.removeprefix("/storage/")
            blob = next((r.blobs[digest] for r in self._repositories.values()
                         if digest in r.blobs), None)
            return (200, {}, blob) if blob is not None else (404, {}, b"")
        match = _MANIFEST_PATH.fullmatch(parts.path)
        if match is None:
            return 404, {}, b'{"errors":[{"code":"NAME_UNKNOWN"}]}'
        name, kind, ref = match["name"], match["kind"], match["ref"]
        authorization = headers.get("Authorization", "")
        token = authorization.removeprefix("Bearer ")
        with self._lock:
            allowed = self._tokens.get(token) == name
        if not allowed:
            challenge = (f'Bearer realm="{self.url}/token",service="fake-registry",'
                         f'scope="repository:{name}:pull"')
            return 401, {"WWW-Authenticate": challenge}, b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        repo = self._repositories.get(name)
        if repo is None:
            return 404, {}, b'{"errors":[{"code":"NAME_UNKNOWN"}]}'
        if kind == "blobs" and self._blob_storage and ref in repo.blobs:
            port = self.host.rsplit(":", 1)[1]
            return 307, {"Location": f"http://localhost:{port}/storage/{ref}"}, b""
        if kind == "blobs":
            blob = repo.blobs.get(ref)
            return (200, {"Content-Type": "application/octet-stream"}, blob) if blob else (
                404, {}, b'{"errors":[{"code":"BLOB_UNKNOWN"}]}')
        digest = repo.tags.get(ref, ref)
        found = repo.manifests.get(digest)
        if found is None:
            return 404, {}, b'{"errors":[{"code":"MANIFEST_UNKNOWN"}]}'
        media_type, body = found
        body = self._tampered.get(digest, body)
        announced = "sha256:" + "f" * 64 if self._wrong_digest_header else _digest(body)
        return 200, {"Content-Type": media_type, "Docker-Content-Digest": announced}, body

    def _token(self, query: dict[str, list[str]], headers: Any) -> tuple[int, dict[str, str],
                                                                          bytes]:
        scope = (query.get("scope") or [""])[0]
        name = scope.removeprefix("repository:").rsplit(":", 1)[0]
        repo = self._repositories.get(name)
        if repo is not None and repo.private:
            expected = "Basic " + base64.b64encode(
                f"{self.username}:{self.password}".encode()).decode()
            if headers.get("Authorization", "") != expected:
                return 401, {}, b'{"errors":[{"code":"UNAUTHORIZED"}]}'
        token = secrets.token_urlsafe(16)
        with self._lock:
            self._tokens[token] = name
        return 200, {"Content-Type": "application/json"}, json.dumps({"token": token}).encode()
