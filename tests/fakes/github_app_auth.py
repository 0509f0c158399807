"""GitHub App authentication for the fake GitHub: App JWTs in, installation tokens out.

`AppAuthority` holds the Apps a test registers (id, client ID, public keys) and their
installations (granted permissions, repositories), and checks an App JWT the way GitHub's
"Generating a JSON Web Token (JWT) for a GitHub App" describes it: RS256, signed by one of the
App's keys, `iss` the App's client ID or App ID, `iat` not in the future (60 s of drift
allowed), `exp` at most 10 minutes after `iat` and not passed. It mints installation tokens
("Create an installation access token for an app": narrowed by `repository_ids` and
`permissions`, never beyond the installation's grant, 422 otherwise) with a lifetime the test
sets, and says which token may call which route. The fake GitHub serves it; the state lives
under the fake's lock.
"""

from __future__ import annotations

import secrets
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa

#: GitHub's permission levels, weakest first.
LEVELS = ("read", "write")
#: Drift GitHub tolerates on `iat`, and the longest App JWT it accepts.
IAT_LEEWAY_SECONDS = 60
MAX_JWT_LIFETIME_SECONDS = 600
#: "Installation tokens expire one hour from the time you create them."
DEFAULT_TOKEN_LIFETIME_SECONDS = 3600.0


@dataclass
class FakeApp:
    """A registered GitHub App: its ids and the public halves of its private keys."""

    app_id: int
    client_id: str
    public_keys: list[bytes]


@dataclass
class FakeInstallation:
    """An installation of an App: what it was granted, and on which repositories."""

    installation_id: int
    app_id: int
    permissions: dict[str, str]
    #: Repository ids the installation covers; None: every repository of the account.
    repository_ids: frozenset[int] | None
    suspended: bool = False


@dataclass
class IssuedToken:
    """An installation token the fake minted."""

    value: str
    installation_id: int
    permissions: dict[str, str]
    repository_ids: frozenset[int] | None
    expires_at: float  # seconds since the epoch, whole seconds as in `expires_at`
    revoked: bool = False


@dataclass
class Refusal:
    """An answer other than success: HTTP status and GitHub's message."""

    status: int
    message: str


@dataclass
class AppAuthority:
    """The Apps, installations and installation tokens of one fake GitHub."""

    apps: dict[int, FakeApp] = field(default_factory=dict)
    installations: dict[int, FakeInstallation] = field(default_factory=dict)
    tokens: dict[str, IssuedToken] = field(default_factory=dict)
    token_lifetime: float = DEFAULT_TOKEN_LIFETIME_SECONDS
    #: Every App JWT presented to the token endpoint, decoded, accepted or not (for tests).
    presented_claims: list[dict[str, Any]] = field(default_factory=list)

    def app_for_issuer(self, issuer: object) -> FakeApp | None:
        """The App whose client ID or App ID (as a string or number) is `issuer`."""
        for app in self.apps.values():
            if issuer in (app.client_id, app.app_id, str(app.app_id)):
                return app
        return None

    def mint(self, authorization: str, installation_id: int, body: Any, now: float,
             known_repository_ids: frozenset[int]) -> IssuedToken | Refusal:
        """Answers `POST /app/installations/{installation_id}/access_tokens`."""
        scheme, _, credential = authorization.partition(" ")
        if scheme.lower() != "bearer" or not credential:
            return Refusal(401, "A JSON web token could not be decoded")
        claims = self._verified_claims(credential.strip(), now)
        if isinstance(claims, Refusal):
            return claims
        app = self.app_for_issuer(claims["iss"])
        installation = self.installations.get(installation_id)
        if app is None or installation is None or installation.app_id != app.app_id:
            return Refusal(404, "Not Found")
        if installation.suspended:
            return Refusal(403, "This installation has been suspended")
        if body is not None and not isinstance(body, dict):
            return Refusal(422, "Invalid request.\n\nThe body must be a JSON object.")
        return self._narrowed(installation, body or {}, now, known_repository_ids)

    def _verified_claims(self, token: str, now: float) -> dict[str, Any] | Refusal:
        try:
            unverified = jwt.decode(token, options={"verify_signature": False})
        except jwt.PyJWTError:
            return Refusal(401, "A JSON web token could not be decoded")
        self.presented_claims.append(unverified)
        app = self.app_for_issuer(unverified.get("iss"))
        if app is None:
            return Refusal(401, "'Issuer' claim ('iss') must be the client ID or App ID of an "
                                "existing GitHub App")
        claims = None
        for key in app.public_keys:
            try:
                # Time claims are checked below against the fake's clock, not the host's.
                claims = jwt.decode(token, key, algorithms=["RS256"], options={
                    "verify_exp": False, "verify_iat": False, "verify_nbf": False,
                    "require": ["iat", "exp", "iss"]})
                break
            except jwt.PyJWTError:
                continue
        if claims is None:
            return Refusal(401, "A JSON web token could not be decoded")
        issued, expires = claims["iat"], claims["exp"]
        if not isinstance(issued, int) or issued > now + IAT_LEEWAY_SECONDS:
            return Refusal(401, "'Issued at' claim ('iat') must be an Integer representing "
                                "the time that the assertion was issued")
        if not isinstance(expires, int) or expires <= now:
            return Refusal(401, "'Expiration time' claim ('exp') must be a numeric value "
                                "representing the future time at which the assertion expires")
        if expires - issued > MAX_JWT_LIFETIME_SECONDS:
            return Refusal(401, "'Expiration time' claim ('exp') is too far in the future")
        return claims

    def _narrowed(self, installation: FakeInstallation, body: dict[str, Any], now: float,
                  known_repository_ids: frozenset[int]) -> IssuedToken | Refusal:
        asked_permissions = body.get("permissions", installation.permissions)
        if not isinstance(asked_permissions, dict) or not all(
                level in LEVELS for level in asked_permissions.values()):
            return Refusal(422, "Invalid request.\n\n\"permissions\" must map names to read "
                                "or write.")
        for name, level in asked_permissions.items():
            granted = installation.permissions.get(name)
            if granted is None or LEVELS.index(level) > LEVELS.index(granted):
                return Refusal(422, "The permissions requested are not granted to this "
                                    "installation.")
        asked_ids = body.get("repository_ids")
        repository_ids = installation.repository_ids
        if asked_ids is not None:
            if not isinstance(asked_ids, list) or not all(
                    isinstance(i, int) and not isinstance(i, bool) for i in asked_ids):
                return Refusal(422, "Invalid request.\n\n\"repository_ids\" must be a list "
                                    "of integers.")
            reachable = repository_ids if repository_ids is not None else known_repository_ids
            if not set(asked_ids) <= reachable:
                return Refusal(422, "There is at least one repository that does not exist or "
                                    "is not accessible to the parent installation.")
            repository_ids = frozenset(asked_ids)
        token = IssuedToken(
            value="ghs_" + secrets.token_hex(18),
            installation_id=installation.installation_id,
            permissions=dict(asked_permissions),
            repository_ids=repository_ids,
            expires_at=float(int(now + self.token_lifetime)),
        )
        self.tokens[token.value] = token
        return token

    def live_token(self, value: str, now: float) -> IssuedToken | None:
        """The installation token `value`, unless unknown, expired or revoked."""
        token = self.tokens.get(value)
        if token is None or token.revoked or now >= token.expires_at:
            return None
        return token


def token_answer(token: IssuedToken) -> dict[str, Any]:
    """The 201 body GitHub answers for a minted installation token."""
    return {
        "token": token.value,
        "expires_at": datetime.fromtimestamp(token.expires_at, UTC).strftime(
            "%Y-%m-%dT%H:%M:%SZ"),
        "permissions": dict(token.permissions),
        "repository_selection": "all" if token.repository_ids is None else "selected",
    }


def required_permission(method: str, path: str) -> tuple[str, str] | None:
    """The App permission (name, level) a route needs, as GitHub's permission tables say.

    Repository runner routes need Administration, organisation runner routes the
    organisation's Self-hosted runners permission, workflow runs Actions; reads need read,
    everything else write. None: the route needs no permission beyond metadata.
    """
    level = "read" if method == "GET" else "write"
    if path.startswith("/orgs/") and "/actions/runner" in path:
        return ("organization_self_hosted_runners", level)
    if path.startswith("/repos/") and "/actions/runners" in path:
        return ("administration", level)
    if path.startswith("/repos/") and "/actions/runs" in path:
        return ("actions", level)
    return None


def allows(token: IssuedToken, permission: tuple[str, str] | None,
           repository_id: int | None) -> bool:
    """Whether `token` may call a route needing `permission` on `repository_id`."""
    if repository_id is not None and token.repository_ids is not None and (
            repository_id not in token.repository_ids):
        return False
    if permission is None:
        return True
    granted = token.permissions.get(permission[0])
    return granted is not None and LEVELS.index(granted) >= LEVELS.index(permission[1])



@dataclass(frozen=True)
class AppKeyPair:
    """An App private key as GitHub hands it out (PEM), and its public half for the fake."""

    private_pem: bytes
    public_pem: bytes

    def __repr__(self) -> str:
        return "AppKeyPair(<private key>)"


def new_app_key() -> AppKeyPair:
    """A fresh 2048-bit RSA key pair, the kind GitHub generates for an App."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    private_pem = key.private_bytes(serialization.Encoding.PEM,
                                    serialization.PrivateFormat.TraditionalOpenSSL,
                                    serialization.NoEncryption())
    public_pem = key.public_key().public_bytes(serialization.Encoding.PEM,
                                               serialization.PublicFormat.SubjectPublicKeyInfo)
    return AppKeyPair(private_pem, public_pem)
