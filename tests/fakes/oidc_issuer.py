"""A fake GitHub Actions OIDC issuer and Actions token endpoint, served over real HTTP.

`FakeOidcIssuer` listens on 127.0.0.1 (an ephemeral port) in a daemon thread and serves what
token.actions.githubusercontent.com and a job's token endpoint serve:

- `GET /.well-known/openid-configuration`: the discovery document (`issuer`, `jwks_uri`, ...);
- `GET /.well-known/jwks`: the public half of its RSA signing keys (`kid`, `alg` RS256);
- `GET /_actions/token?api-version=2.0&audience=<aud>` with `Authorization: Bearer <request
  token>`: `{"value": <JWT>}`, what `core.getIDToken(aud)` asks `ACTIONS_ID_TOKEN_REQUEST_URL`
  for. Without `audience` the token carries GitHub's default, `https://github.com/<owner>`.

`mint` signs tokens shaped like GitHub's: every custom claim a JSON string (ids and counters
too), `exp - iat` = 300 s, `nbf` before `iat`, a fresh UUID `jti` (see GitHub's "OpenID Connect
reference"). It also forges what an attacker would send: a claim removed, another header, a key
the issuer never published, `alg: none`, HS256 keyed with the public key.

Tests drive outages with `fail_next` and `down`, rotate keys with `rotate_key`, serve another
issuer in discovery with `discovery_issuer`, and count fetches (`discovery_fetches`,
`jwks_fetches`).
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import http.server
import json
import secrets
import threading
import time
import urllib.parse
import uuid
from dataclasses import dataclass
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

from gpu_runners.contract import DEFAULT_BROKER_AUDIENCE
from tests.fakes.github_api import RecordedRequest
from tests.fakes.loopback_server import LoopbackServer

DISCOVERY_PATH = "/.well-known/openid-configuration"
JWKS_PATH = "/.well-known/jwks"
#: Answers a redirect to JWKS_PATH (see `FakeOidcIssuer.jwks_uri`).
MOVED_JWKS_PATH = "/.well-known/jwks-moved"
TOKEN_PATH = "/_actions/token"
#: The runner's token URL already carries this query; `core.getIDToken` appends `&audience=`.
TOKEN_API_VERSION = "2.0"
#: Observed lifetime of GitHub's tokens (`exp - iat`), and how far `nbf` precedes `iat`.
TOKEN_LIFETIME_SECONDS = 300
NOT_BEFORE_SKEW_SECONDS = 300
#: Header and claim values that remove the item from a minted token.
ABSENT = None


@dataclass(frozen=True)
class SigningKey:
    """One RSA key of the issuer: its key id and private key."""

    kid: str
    private_key: rsa.RSAPrivateKey

    @property
    def public_pem(self) -> bytes:
        """The public key as PEM (SubjectPublicKeyInfo), the bytes an HS256 forgery uses."""
        return self.private_key.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    def jwk(self) -> dict[str, Any]:
        """The public JWK as the JWKS serves it."""
        key: dict[str, Any] = RSAAlgorithm.to_jwk(self.private_key.public_key(), as_dict=True)
        return {**key, "kid": self.kid, "alg": "RS256", "use": "sig"}


def new_signing_key(kid: str | None = None) -> SigningKey:
    """Generates a 2048-bit RSA key (what GitHub publishes), with a random kid unless given."""
    private_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return SigningKey(kid or secrets.token_hex(16).upper(), private_key)


def _b64url(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


def _unsigned_parts(header: dict[str, Any], claims: dict[str, Any]) -> str:
    return (
        _b64url(json.dumps(header, separators=(",", ":")).encode())
        + "."
        + _b64url(json.dumps(claims, separators=(",", ":")).encode())
    )


class FakeOidcIssuer(LoopbackServer):
    """A fake GitHub Actions OIDC issuer for one repository's jobs.

    Args:
        owner: Repository owner (`repository_owner`, and the default audience's path).
        repo: Repository name.
        repository_id: Numeric id of the repository, as GitHub's string claim.
        repository_owner_id: Numeric id of the owner, as GitHub's string claim.
        audience: Audience of tokens `mint` makes when the caller names none.
    """

    server_name = "fake-oidc-issuer"

    def __init__(
        self,
        *,
        owner: str = "acme",
        repo: str = "models",
        repository_id: str = "74",
        repository_owner_id: str = "65",
        audience: str = DEFAULT_BROKER_AUDIENCE,
    ) -> None:
        super().__init__()
        self.owner = owner
        self.repo = repo
        self.audience = audience
        #: Claims of "the job" every minted token starts from (besides iss, aud, times, jti);
        #: tests change them to act as another run, event or ref.
        self.job_claims: dict[str, str] = {
            "sub": f"repo:{owner}/{repo}:ref:refs/heads/main",
            "ref": "refs/heads/main",
            "ref_type": "branch",
            "ref_protected": "true",
            "sha": "0123456789abcdef0123456789abcdef01234567",
            "repository": f"{owner}/{repo}",
            "repository_id": repository_id,
            "repository_owner": owner,
            "repository_owner_id": repository_owner_id,
            "repository_visibility": "private",
            "run_id": "123",
            "run_number": "7",
            "run_attempt": "1",
            "actor": "octocat",
            "actor_id": "12",
            "workflow": "train",
            "workflow_ref": f"{owner}/{repo}/.github/workflows/train.yml@refs/heads/main",
            "workflow_sha": "0123456789abcdef0123456789abcdef01234567",
            "job_workflow_ref": f"{owner}/{repo}/.github/workflows/train.yml@refs/heads/main",
            "job_workflow_sha": "0123456789abcdef0123456789abcdef01234567",
            "event_name": "push",
            "head_ref": "",
            "base_ref": "",
            "runner_environment": "self-hosted",
        }
        #: The bearer token the job's token endpoint accepts (ACTIONS_ID_TOKEN_REQUEST_TOKEN).
        self.request_token = secrets.token_urlsafe(32)
        #: `issuer` the discovery document names; None names this fake's own URL.
        self.discovery_issuer: str | None = None
        #: `jwks_uri` the discovery document names; None names this fake's JWKS. Naming
        #: `url + MOVED_JWKS_PATH` serves a redirect to the JWKS instead.
        self.jwks_uri: str | None = None
        #: While True every route answers 503, as an issuer in an outage.
        self.down = False
        self.requests: list[RecordedRequest] = []
        #: Audiences asked of the token endpoint, in order (None: no `audience` parameter).
        self.token_audiences: list[str | None] = []
        self._signing = new_signing_key()
        self._published: list[SigningKey] = [self._signing]
        self._failures: list[int] = []
        self._discovery_fetches = 0
        self._jwks_fetches = 0
        self._lock = threading.Lock()

    # --- addresses -------------------------------------------------------------------------

    @property
    def issuer(self) -> str:
        """The `iss` of minted tokens: the issuer URL."""
        return self.url

    @property
    def request_url(self) -> str:
        """The job's token URL (ACTIONS_ID_TOKEN_REQUEST_URL); it already has a query string."""
        return f"{self.url}{TOKEN_PATH}?api-version={TOKEN_API_VERSION}"

    # --- keys and tokens -------------------------------------------------------------------

    @property
    def signing_key(self) -> SigningKey:
        """The key `mint` signs with."""
        with self._lock:
            return self._signing

    @property
    def published_kids(self) -> list[str]:
        """Key ids the JWKS serves, newest first."""
        with self._lock:
            return [key.kid for key in self._published]

    def rotate_key(self, *, keep_old: bool = True) -> str:
        """Signs with a new key from now on and publishes it; returns its kid.

        Args:
            keep_old: Keep serving the previous keys (as an issuer does while tokens signed
                with them are still alive); False publishes only the new key.
        """
        key = new_signing_key()
        with self._lock:
            self._signing = key
            self._published = [key, *self._published] if keep_old else [key]
        return key.kid

    def mint(
        self,
        *,
        header: dict[str, Any] | None = None,
        signing_key: SigningKey | None = None,
        algorithm: str = "RS256",
        **claims: Any,
    ) -> str:
        """Returns a token for the job, signed like GitHub's unless told otherwise.

        Args:
            header: Header entries to set; a value of None removes the entry (e.g. `kid`).
            signing_key: Sign with this key instead of the issuer's current one (its kid goes
                into the header unless `header` sets one).
            algorithm: `RS256` (GitHub's); `none` for an unsigned token; `HS256` for an HMAC
                keyed with the signing key's public PEM, the algorithm-confusion forgery.
            **claims: Claims to set over the defaults (`job_claims`, `iss`, `aud`, `iat`,
                `nbf`, `exp`, `jti`); a value of None removes the claim.

        Raises:
            ValueError: `algorithm` is none of the three.
        """
        now = int(time.time())
        key = signing_key or self.signing_key
        payload: dict[str, Any] = {
            "jti": str(uuid.uuid4()),
            "iss": self.issuer,
            "aud": self.audience,
            **self.job_claims,
            "nbf": now - NOT_BEFORE_SKEW_SECONDS,
            "iat": now,
            "exp": now + TOKEN_LIFETIME_SECONDS,
        }
        payload.update(claims)
        payload = {name: value for name, value in payload.items() if value is not ABSENT}
        headers: dict[str, Any] = {"typ": "JWT", "alg": algorithm, "kid": key.kid}
        headers.update(header or {})
        headers = {name: value for name, value in headers.items() if value is not ABSENT}
        if algorithm == "RS256":
            return jwt.encode(payload, key.private_key, algorithm="RS256", headers=headers)
        if algorithm == "none":
            return _unsigned_parts(headers, payload) + "."
        if algorithm == "HS256":
            # PyJWT refuses a PEM key as an HMAC secret, which is the point of the attack; an
            # attacker signs by hand.
            signing_input = _unsigned_parts(headers, payload)
            mac = hmac.new(key.public_pem, signing_input.encode(), hashlib.sha256).digest()
            return signing_input + "." + _b64url(mac)
        raise ValueError(f"mint: algorithm must be RS256, none or HS256, got {algorithm!r}")

    # --- faults and counters ---------------------------------------------------------------

    def fail_next(self, status: int, *, times: int = 1) -> None:
        """Answers the next `times` requests (any route) with `status` and no useful body."""
        if not 400 <= status <= 599:
            raise ValueError(f"fail_next: status must be an HTTP error (400-599), got {status}")
        if times < 1:
            raise ValueError(f"fail_next: times must be at least 1, got {times}")
        with self._lock:
            self._failures.extend([status] * times)

    @property
    def discovery_fetches(self) -> int:
        """How many discovery documents were served (faults not counted)."""
        with self._lock:
            return self._discovery_fetches

    @property
    def jwks_fetches(self) -> int:
        """How many JWKS documents were served (faults not counted)."""
        with self._lock:
            return self._jwks_fetches

    # --- request handling ------------------------------------------------------------------

    def _handler_class(self) -> type[http.server.BaseHTTPRequestHandler]:
        fake = self

        class Handler(http.server.BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"
            server_version = "FakeOidcIssuer"

            def do_GET(self) -> None:
                split = urllib.parse.urlsplit(self.path)
                request = RecordedRequest(
                    method="GET",
                    path=split.path,
                    query=urllib.parse.parse_qs(split.query, keep_blank_values=True),
                    headers={key.lower(): value for key, value in self.headers.items()},
                    body=None,
                )
                status, body = fake._answer(request)
                payload = json.dumps(body).encode()
                self.send_response(status)
                if status == 302:
                    self.send_header("Location", fake.url + JWKS_PATH)
                self.send_header("Content-Type", "application/json; charset=utf-8")
                self.send_header("Content-Length", str(len(payload)))
                self.end_headers()
                self.wfile.write(payload)

            def log_message(self, format: str, *args: Any) -> None:
                pass  # keep test output clean; `requests` is the log

        return Handler

    def _answer(self, request: RecordedRequest) -> tuple[int, Any]:
        with self._lock:
            self.requests.append(request)
            if self._failures:
                return self._failures.pop(0), {"message": "injected failure"}
            if self.down:
                return 503, {"message": "Service Unavailable"}
        if request.path == DISCOVERY_PATH:
            return 200, self._discovery()
        if request.path == JWKS_PATH:
            with self._lock:
                self._jwks_fetches += 1
                return 200, {"keys": [key.jwk() for key in self._published]}
        if request.path == MOVED_JWKS_PATH:
            return 302, {"message": "Found"}
        if request.path == TOKEN_PATH:
            return self._token(request)
        return 404, {"message": "Not Found"}

    def _discovery(self) -> dict[str, Any]:
        with self._lock:
            self._discovery_fetches += 1
        # The fields of token.actions.githubusercontent.com's discovery document.
        return {
            "issuer": self.discovery_issuer or self.issuer,
            "jwks_uri": self.jwks_uri or self.url + JWKS_PATH,
            "subject_types_supported": ["public", "pairwise"],
            "response_types_supported": ["id_token"],
            "claims_supported": ["sub", "aud", "exp", "iat", "iss", "jti", "nbf", "ref"],
            "id_token_signing_alg_values_supported": ["RS256"],
            "scopes_supported": ["openid"],
        }

    def _token(self, request: RecordedRequest) -> tuple[int, Any]:
        scheme, _, credential = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(
            credential.strip().encode(), self.request_token.encode()
        ):
            return 401, {"message": "Unauthorized"}
        if request.query.get("api-version") != [TOKEN_API_VERSION]:
            # The runner's URL carries api-version; a client that replaced the query lost it.
            return 400, {"message": "api-version query parameter is required"}
        audiences = request.query.get("audience")
        audience = audiences[-1] if audiences else None
        with self._lock:
            self.token_audiences.append(audience)
        return 200, {"value": self.mint(aud=audience or f"https://github.com/{self.owner}")}
