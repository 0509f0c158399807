"""Verifying the jobs' GitHub Actions OIDC tokens: who is asking, for which run.

A job proves its run with the OIDC token GitHub mints for it (`permissions: id-token: write`),
requested for the broker's own audience. `OidcVerifier.verify` accepts a token only if:

1. it is small, its header says RS256 and names a `kid` (checked before any key lookup, so
   `alg: none`, HS256 keyed with the public key, and junk never reach a key or the issuer);
2. PyJWT verifies its signature with that key of the issuer's published set, and its `iss`,
   `aud` (exactly the broker's, no second audience), `exp`, `nbf` and `iat` within the
   policy's leeway, and the presence of every claim the broker relies on;
3. its lifetime is short (see MAX_TOKEN_LIFETIME_SECONDS) and its run claims are well formed
   (ids are GitHub's decimal strings);
4. the stack's policy allows it, claim by claim (`_POLICY_RULES`): the repository and its owner
   by numeric id (a re-created repository with the same name has another id), the event, and
   optionally the ref and the job's workflow. `sub` is never used: its format varies by
   repository, over time, and with the owner's customisation;
5. its `jti` was not accepted before (each token is accepted once, until it expires).

Keys come from the issuer's discovery document (`<issuer>/.well-known/openid-configuration`
-> `jwks_uri`), fetched with urllib and parsed with `jwt.PyJWKSet`, cached, and refetched when a
token names an unknown `kid` at most once per cooldown: PyJWKClient refetches on every unknown
`kid`, so a flood of made-up `kid`s would hammer the issuer. Anything uncertain fails closed.

Errors map to the API's codes (`gpu_runners.broker_api`) through their `code` attribute:
`TokenRejectedError` 401 (the token proves nothing), `TokenForbiddenError` 403 (a genuine token the
policy refuses), `VerificationUnavailableError` 503 (the issuer's keys or the replay store are not
available; retry later). Their `reason` is one line, safe to show the caller: it never holds
the token.
"""

from __future__ import annotations

import fnmatch
import heapq
import json
import re
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, ClassVar

import jwt

from gpu_runners import broker_api
from gpu_runners.contract import FORBIDDEN_EVENTS

#: The only signing algorithm accepted: GitHub signs with RS256, and naming one asymmetric
#: algorithm rules out algorithm confusion (`none`, HS256 keyed with the public key).
ALGORITHM = "RS256"
#: Largest token read. GitHub's are about 1-2 KiB even with custom repository properties.
MAX_TOKEN_BYTES = 8 * 1024
MAX_KID_LENGTH = 256
#: Clock skew allowed on exp/nbf/iat. The issue caps it at 60 s: GitHub's tokens live ~300 s.
MAX_LEEWAY_SECONDS = 60
#: Longest `exp - iat` accepted. GitHub does not document its tokens' lifetime; they have been
#: observed at 300 s since 2022. An hour leaves room for GitHub to lengthen it several-fold
#: without an outage here, while a token valid for longer is not one GitHub minted for a job
#: step; it also bounds how long each accepted `jti` is remembered.
MAX_TOKEN_LIFETIME_SECONDS = 3600
#: Most tokens remembered at once for replay detection (see `_ReplayGuard`).
MAX_REMEMBERED_TOKENS = 100_000
#: Extra seconds a `jti` is remembered past `exp + leeway`, so that the store never forgets a
#: token the decoder (reading the system clock a moment later) would still accept.
REPLAY_MARGIN_SECONDS = 5
#: Largest discovery or JWKS document read (GitHub's JWKS is a few KiB).
MAX_DOCUMENT_BYTES = 1024 * 1024
#: Hosts on which the issuer and JWKS may be plain http (tests' local issuer only).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: GitHub's default audience is the owner's URL; any GitHub-aware service accepts it.
GITHUB_DEFAULT_AUDIENCE_PREFIX = "https://github.com/"
#: Claims the broker relies on; PyJWT refuses a token lacking one (or carrying null).
REQUIRED_CLAIMS = (
    "exp",
    "iat",
    "nbf",
    "iss",
    "aud",
    "jti",
    "repository_id",
    "repository_owner_id",
    "run_id",
    "run_attempt",
    "event_name",
)
_DECIMAL_ID = re.compile(r"[1-9][0-9]{0,18}")  # ASCII digits, no sign or leading zero


class TokenRejectedError(Exception):
    """The token does not prove a run: missing, malformed, forged, expired or replayed.

    Attributes:
        reason: One line saying why, safe to show the caller; never contains the token.
        code: The API error code (`broker_api.ERROR_STATUS` gives the HTTP status).
    """

    code: ClassVar[str] = broker_api.UNAUTHORIZED

    def __init__(self, reason: str) -> None:
        super().__init__(reason)
        self.reason = reason


class TokenForbiddenError(TokenRejectedError):
    """A genuine token of the issuer whose claims the stack's policy does not allow."""

    code: ClassVar[str] = broker_api.FORBIDDEN


class VerificationUnavailableError(TokenRejectedError):
    """The token cannot be checked now (issuer keys unavailable, replay store full); retry.

    A subclass of TokenRejectedError so that code catching only that still refuses the request.
    """

    code: ClassVar[str] = broker_api.UNAVAILABLE


def _is_loopback_http(parts: urllib.parse.SplitResult) -> bool:
    return parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS


def _is_trusted_url(url: str) -> bool:
    parts = urllib.parse.urlsplit(url)
    return bool(parts.hostname) and (parts.scheme == "https" or _is_loopback_http(parts))


def _decimal_id(name: str, value: object) -> int:
    """Parses one of GitHub's numeric string claims strictly (positive decimal, ASCII)."""
    if not isinstance(value, str) or _DECIMAL_ID.fullmatch(value) is None:
        raise TokenRejectedError(f"token claim {name} must be a positive decimal string")
    return int(value)


@dataclass(frozen=True)
class OidcPolicy:
    """Which tokens the broker accepts: the issuer, its audience, and the stack's repository.

    Attributes:
        issuer: The `iss` of accepted tokens, e.g. https://token.actions.githubusercontent.com
            (an enterprise's custom issuer or GHES's from config); https only.
        audience: The only `aud` accepted; unique to the broker.
        repository_id: Numeric id of the stack's repository, as GitHub's string claim ("74").
        repository_owner_id: Numeric id of its owner ("65").
        allowed_events: `event_name`s whose runs may use the broker.
        allowed_refs: fnmatch patterns on `ref` (e.g. "refs/heads/*"; `*` also matches `/`);
            empty allows any ref.
        allowed_workflow_refs: fnmatch patterns on `job_workflow_ref`; empty allows any.
        leeway_seconds: Clock skew allowed on exp/nbf/iat, 0 to 60.

    Raises:
        ValueError: A field is invalid; the message names it and what is allowed.
    """

    issuer: str
    audience: str
    repository_id: str
    repository_owner_id: str
    allowed_events: frozenset[str]
    allowed_refs: tuple[str, ...] = ()
    allowed_workflow_refs: tuple[str, ...] = ()
    leeway_seconds: int = MAX_LEEWAY_SECONDS

    def __post_init__(self) -> None:
        # Accept any iterable of names from the caller, store immutable collections.
        object.__setattr__(self, "allowed_events", frozenset(self.allowed_events))
        object.__setattr__(self, "allowed_refs", tuple(self.allowed_refs))
        object.__setattr__(self, "allowed_workflow_refs", tuple(self.allowed_workflow_refs))
        self._check_issuer()
        self._check_audience()
        for name in ("repository_id", "repository_owner_id"):
            value = getattr(self, name)
            if not isinstance(value, str) or _DECIMAL_ID.fullmatch(value) is None:
                raise ValueError(
                    f"OidcPolicy.{name} must be GitHub's numeric id as a decimal string "
                    f"(e.g. '74'), got {value!r}"
                )
        self._check_events()
        for name in ("allowed_refs", "allowed_workflow_refs"):
            patterns = getattr(self, name)
            if not all(isinstance(pattern, str) and pattern for pattern in patterns):
                raise ValueError(f"OidcPolicy.{name} must hold non-empty fnmatch patterns")
        leeway = self.leeway_seconds
        if isinstance(leeway, bool) or not isinstance(leeway, int):
            raise ValueError(f"OidcPolicy.leeway_seconds must be an integer, got {leeway!r}")
        if not 0 <= leeway <= MAX_LEEWAY_SECONDS:
            raise ValueError(
                f"OidcPolicy.leeway_seconds must be 0 to {MAX_LEEWAY_SECONDS}, got {leeway}"
            )

    def _check_issuer(self) -> None:
        parts = urllib.parse.urlsplit(self.issuer)
        if not parts.hostname or not (parts.scheme == "https" or _is_loopback_http(parts)):
            raise ValueError(
                "OidcPolicy.issuer must be an https URL (plain http only on 127.0.0.1, "
                f"localhost or ::1), got {self.issuer!r}"
            )
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError(
                f"OidcPolicy.issuer must have no query, fragment or credentials, got "
                f"{self.issuer!r}"
            )
        if self.issuer.endswith("/"):
            # Tokens carry the issuer verbatim; GitHub's never ends with a slash.
            raise ValueError(
                f"OidcPolicy.issuer must not end with '/' (tokens' iss does not), got "
                f"{self.issuer!r}"
            )

    def _check_audience(self) -> None:
        if not isinstance(self.audience, str) or not self.audience.strip():
            raise ValueError("OidcPolicy.audience must be a non-empty string unique to the broker")
        if self.audience.startswith(GITHUB_DEFAULT_AUDIENCE_PREFIX):
            raise ValueError(
                "OidcPolicy.audience must not be GitHub's default audience "
                f"(https://github.com/<owner>), which any job's token carries; got "
                f"{self.audience!r}"
            )

    def _check_events(self) -> None:
        if not self.allowed_events:
            raise ValueError("OidcPolicy.allowed_events must name at least one event")
        forbidden = sorted(self.allowed_events & set(FORBIDDEN_EVENTS))
        if forbidden:
            raise ValueError(
                f"OidcPolicy.allowed_events must not include {forbidden}: those runs act with "
                "the repository's rights on code it did not review"
            )
        if not all(isinstance(event, str) and event for event in self.allowed_events):
            raise ValueError("OidcPolicy.allowed_events must hold non-empty event names")


@dataclass(frozen=True)
class RunClaims:
    """What a verified token says about the job asking; the broker's only source of run ids.

    Attributes:
        repository: "owner/name", for display only (names can be recycled; ids cannot).
        repository_id: Numeric id of the repository.
        repository_owner_id: Numeric id of its owner.
        run_id: The workflow run (unchanged on re-runs).
        run_attempt: The attempt, from 1.
        event_name: The event that started the run.
        ref: The ref the run is for ("" if the token has none).
        job_workflow_ref: The job's workflow file and ref ("" if the token has none).
        actor: Who started the run ("" if the token has none).
        sha: The commit ("" if the token has none).
        jti: The token's unique id.
        expires_at: The token's `exp` (Unix seconds).
    """

    repository: str
    repository_id: int
    repository_owner_id: int
    run_id: int
    run_attempt: int
    event_name: str
    ref: str
    job_workflow_ref: str
    actor: str
    sha: str
    jti: str
    expires_at: int


def _string_claim(payload: Mapping[str, Any], name: str) -> str:
    value = payload.get(name, "")
    if not isinstance(value, str):
        raise TokenRejectedError(f"token claim {name} must be a string")
    return value


def _run_claims(payload: Mapping[str, Any]) -> RunClaims:
    """Reads the claims the broker uses, refusing any of the wrong type."""
    for name in ("exp", "iat", "nbf"):
        # PyJWT converts with int(), which also takes "123" and 1.5: insist on NumericDate.
        if isinstance(payload[name], bool) or not isinstance(payload[name], int):
            raise TokenRejectedError(f"token claim {name} must be an integer (seconds)")
    lifetime = payload["exp"] - payload["iat"]
    if not 0 < lifetime <= MAX_TOKEN_LIFETIME_SECONDS:
        raise TokenRejectedError(
            f"token lifetime (exp - iat) must be 1 to {MAX_TOKEN_LIFETIME_SECONDS} seconds; "
            "GitHub's job tokens live minutes"
        )
    jti = _string_claim(payload, "jti")
    if not jti:
        raise TokenRejectedError("token claim jti must not be empty")
    return RunClaims(
        repository=_string_claim(payload, "repository"),
        repository_id=_decimal_id("repository_id", payload["repository_id"]),
        repository_owner_id=_decimal_id("repository_owner_id", payload["repository_owner_id"]),
        run_id=_decimal_id("run_id", payload["run_id"]),
        run_attempt=_decimal_id("run_attempt", payload["run_attempt"]),
        event_name=_string_claim(payload, "event_name"),
        ref=_string_claim(payload, "ref"),
        job_workflow_ref=_string_claim(payload, "job_workflow_ref"),
        actor=_string_claim(payload, "actor"),
        sha=_string_claim(payload, "sha"),
        jti=jti,
        expires_at=payload["exp"],
    )


def _matches_any(value: str, patterns: tuple[str, ...]) -> bool:
    return not patterns or any(fnmatch.fnmatchcase(value, pattern) for pattern in patterns)


@dataclass(frozen=True)
class _ClaimRule:
    """One line of the policy: the claim, whether the policy allows its value, and why not."""

    claim: str
    allows: Callable[[OidcPolicy, RunClaims], bool]
    refusal: str


#: The stack's policy over a token's claims, one rule per claim, checked in order.
_POLICY_RULES: tuple[_ClaimRule, ...] = (
    _ClaimRule(
        "repository_id",
        lambda policy, claims: claims.repository_id == int(policy.repository_id),
        "is not the id of this stack's repository",
    ),
    _ClaimRule(
        "repository_owner_id",
        lambda policy, claims: claims.repository_owner_id == int(policy.repository_owner_id),
        "is not the id of this stack's repository owner",
    ),
    _ClaimRule(
        "event_name",
        # FORBIDDEN_EVENTS again, although the policy cannot list them: a refusal must not
        # depend on how the policy was built.
        lambda policy, claims: (
            claims.event_name in policy.allowed_events and claims.event_name not in FORBIDDEN_EVENTS
        ),
        "is not an event allowed to use GPU runners",
    ),
    _ClaimRule(
        "ref",
        lambda policy, claims: _matches_any(claims.ref, policy.allowed_refs),
        "matches none of the allowed refs",
    ),
    _ClaimRule(
        "job_workflow_ref",
        lambda policy, claims: _matches_any(claims.job_workflow_ref, policy.allowed_workflow_refs),
        "matches none of the allowed workflows",
    ),
)


def _shown(value: object) -> str:
    """A claim value for a refusal message: quoted, control characters escaped, bounded."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def _check_policy(policy: OidcPolicy, claims: RunClaims) -> None:
    """Applies `_POLICY_RULES` to verified claims.

    Raises:
        TokenForbiddenError: The first rule that refuses, naming the claim and its value.
    """
    for rule in _POLICY_RULES:
        if not rule.allows(policy, claims):
            value = getattr(claims, rule.claim)
            raise TokenForbiddenError(f"token claim {rule.claim} {_shown(value)} {rule.refusal}")


class _ReplayGuard:
    """The `jti`s of accepted tokens, each remembered until its token has expired.

    Memory stays bounded: entries are dropped once past `exp + leeway`, and the lifetime cap
    bounds how long that is. When `capacity` unexpired entries are held, new tokens are
    refused (503) rather than an entry evicted, since evicting one would let that token be
    replayed; only tokens that passed every other check get here, so filling it takes that
    many genuine tokens within their lifetime.
    """

    def __init__(self, *, capacity: int, keep_after_exp: int, clock: Callable[[], float]) -> None:
        self._capacity = capacity
        self._keep_after_exp = keep_after_exp
        self._clock = clock
        self._forget_at: dict[str, int] = {}
        self._queue: list[tuple[int, str]] = []  # heap of (forget_at, jti)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        with self._lock:
            return len(self._forget_at)

    def admit(self, jti: str, expires_at: int) -> None:
        """Records `jti` as used; refuses a `jti` already recorded and not yet forgotten.

        Raises:
            TokenRejectedError: The token was accepted before.
            VerificationUnavailableError: The store is full of unexpired tokens.
        """
        with self._lock:
            self._forget_expired(self._clock())
            if jti in self._forget_at:
                raise TokenRejectedError("token was already used (replayed jti); fetch a new one")
            if len(self._forget_at) >= self._capacity:
                raise VerificationUnavailableError(
                    "the broker holds too many unexpired tokens to check replays; retry later"
                )
            forget_at = expires_at + self._keep_after_exp
            self._forget_at[jti] = forget_at
            heapq.heappush(self._queue, (forget_at, jti))

    def _forget_expired(self, now: float) -> None:
        while self._queue and self._queue[0][0] <= now:
            forget_at, jti = heapq.heappop(self._queue)
            if self._forget_at.get(jti) == forget_at:
                del self._forget_at[jti]


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses redirects: the issuer's documents are served where discovery says."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass(frozen=True)
class _KeySet:
    keys: Mapping[str, jwt.PyJWK]  # kid -> RS256 public key
    fetched_at: float  # time.monotonic()


class _IssuerKeys:
    """The issuer's signing keys: fetched through discovery, cached, refetched under a cooldown.

    A fetch happens when no fresh key set is held (at startup, or `max_age` after the last
    fetch) or when a token names a `kid` the set lacks (the issuer rotated its keys). After a
    fetch for an unknown `kid`, and after any failed fetch, no other starts for `cooldown`
    seconds: a flood of made-up `kid`s costs the issuer one request per cooldown, and an issuer
    in an outage is not hammered either.

    Readers take the current `_KeySet` without a lock (one attribute read); fetches run one at
    a time under `_fetch_lock`.
    """

    def __init__(self, issuer: str, *, cooldown: float, timeout: float, max_age: float) -> None:
        self._issuer = issuer
        self._cooldown = cooldown
        self._timeout = timeout
        self._max_age = max_age
        self._keyset: _KeySet | None = None
        self._cooling_until = 0.0  # time.monotonic()
        self._last_error: str | None = None
        self._fetch_lock = threading.Lock()
        self._opener = urllib.request.build_opener(_NoRedirects())

    def usable(self) -> bool:
        """Whether keys are held and young enough to use."""
        return self._fresh(self._keyset)

    def key(self, kid: str) -> jwt.PyJWK:
        """The key for `kid`, refetching the set (under the cooldown) if it is unknown.

        Raises:
            VerificationUnavailableError: No usable key set (never fetched, stale, issuer
                failing), or the kid is unknown and the last fetch failed.
            TokenRejectedError: The issuer does not publish `kid`.
        """
        keyset = self._keyset
        if keyset is None or not self._fresh(keyset) or kid not in keyset.keys:
            keyset = self.refresh(kid)
        if keyset is None or not self._fresh(keyset):
            raise VerificationUnavailableError(self.unavailable_reason())
        found = keyset.keys.get(kid)
        if found is None:
            if self._last_error is not None:
                # The issuer may have rotated to this kid while we cannot reach it: retry later.
                raise VerificationUnavailableError(self.unavailable_reason())
            raise TokenRejectedError("token is signed with a key the issuer does not publish (kid)")
        return found

    def refresh(self, kid: str | None = None) -> _KeySet | None:
        """Fetches the key set if it is missing or stale, or lacks `kid`, unless cooling down.

        Args:
            kid: The key id a token names; None only makes sure a fresh set is held.

        Returns:
            The key set held afterwards (None if none was ever fetched).
        """
        with self._fetch_lock:
            # Another thread may have fetched while this one waited for the lock.
            keyset = self._keyset
            if self._fresh(keyset) and keyset is not None and (kid is None or kid in keyset.keys):
                return keyset
            now = time.monotonic()
            if now < self._cooling_until:
                return keyset
            # A fresh set that lacks the kid: this fetch is for an unknown kid.
            for_unknown_kid = self._fresh(keyset)
            try:
                keyset = _KeySet(self._fetch(), fetched_at=time.monotonic())
            except VerificationUnavailableError as e:
                self._last_error = e.reason
                self._cooling_until = now + self._cooldown
                return self._keyset
            self._keyset = keyset
            self._last_error = None
            if for_unknown_kid:
                self._cooling_until = now + self._cooldown
            return keyset

    def _fresh(self, keyset: _KeySet | None) -> bool:
        return keyset is not None and time.monotonic() - keyset.fetched_at <= self._max_age

    def unavailable_reason(self) -> str:
        """Why no key can be used now, for a 503's message."""
        why = self._last_error or "not fetched yet"
        return f"the OIDC issuer's signing keys are unavailable ({why}); retry later"

    def _fetch(self) -> dict[str, jwt.PyJWK]:
        discovery_url = self._issuer + "/.well-known/openid-configuration"
        discovery = self._get_json(discovery_url, "discovery document")
        if discovery.get("issuer") != self._issuer:
            raise VerificationUnavailableError(
                f"the discovery document names issuer {_shown(discovery.get('issuer'))}, "
                f"not {self._issuer}"
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not _is_trusted_url(jwks_uri):
            raise VerificationUnavailableError(
                f"the discovery document's jwks_uri {_shown(jwks_uri)} is not an https URL"
            )
        document = self._get_json(jwks_uri, "JWKS")
        try:
            keyset = jwt.PyJWKSet.from_dict(document)
        except jwt.PyJWTError as e:
            reason = f"the JWKS holds no usable key ({type(e).__name__})"
            raise VerificationUnavailableError(reason) from None
        keys = {
            key.key_id: key
            for key in keyset.keys
            if key.key_id and key.key_type == "RSA" and key.algorithm_name == ALGORITHM
        }
        if not keys:
            raise VerificationUnavailableError(f"the JWKS holds no {ALGORITHM} key with a kid")
        return keys

    def _get_json(self, url: str, what: str) -> dict[str, Any]:
        # The URL is the configured issuer's or its discovery's jwks_uri, both checked to be
        # https (or loopback http) by OidcPolicy and _is_trusted_url: no file: or other scheme.
        headers = {"Accept": "application/json"}
        request = urllib.request.Request(url, headers=headers)  # noqa: S310 - scheme checked
        try:
            with self._opener.open(request, timeout=self._timeout) as response:
                raw = response.read(MAX_DOCUMENT_BYTES + 1)
        except urllib.error.HTTPError as e:
            e.close()
            raise VerificationUnavailableError(f"{what} answered HTTP {e.code}") from None
        except (OSError, ValueError) as e:
            raise VerificationUnavailableError(f"{what} unreachable ({type(e).__name__})") from None
        if len(raw) > MAX_DOCUMENT_BYTES:
            raise VerificationUnavailableError(f"{what} is larger than {MAX_DOCUMENT_BYTES} bytes")
        try:
            document = json.loads(raw)
        except ValueError:
            raise VerificationUnavailableError(f"{what} is not JSON") from None
        if not isinstance(document, dict):
            raise VerificationUnavailableError(f"{what} is not a JSON object")
        return document


def _decode_refusal(error: jwt.PyJWTError, policy: OidcPolicy) -> TokenRejectedError:
    """The refusal for an error of jwt.decode; PyJWT's own messages are not shown."""
    if isinstance(error, jwt.ExpiredSignatureError):
        return TokenRejectedError("token has expired (exp)")
    if isinstance(error, jwt.ImmatureSignatureError):
        if "(iat)" in str(error):
            return TokenRejectedError("token is issued in the future (iat)")
        return TokenRejectedError("token is not valid yet (nbf)")
    if isinstance(error, jwt.InvalidAudienceError):
        return TokenRejectedError(f"token audience must be exactly {policy.audience!r}, alone")
    if isinstance(error, jwt.InvalidIssuerError):
        return TokenRejectedError(f"token issuer is not {policy.issuer}")
    if isinstance(error, jwt.MissingRequiredClaimError):
        return TokenRejectedError(f"token lacks the {error.claim} claim")
    if isinstance(error, jwt.InvalidSignatureError):
        return TokenRejectedError("token signature does not match the issuer's key")
    if isinstance(error, jwt.InvalidIssuedAtError):
        return TokenRejectedError("token claim iat must be an integer (seconds)")
    return TokenRejectedError(f"token is malformed ({type(error).__name__})")


class OidcVerifier:
    """Verifies GitHub Actions OIDC tokens against an `OidcPolicy`; safe to share by threads.

    Args:
        policy: The issuer, audience and repository to accept.
        key_refresh_cooldown: Least seconds between two fetches of the issuer's keys, however
            many unknown `kid`s arrive.
        http_timeout: Seconds allowed for each discovery or JWKS request.
        key_max_age: Seconds a fetched key set is used before it must be refetched, so that a
            key the issuer withdrew stops being trusted.
        clock: Wall-clock seconds, for forgetting used `jti`s; exp/nbf/iat are checked by
            PyJWT against the system clock.
        max_remembered_tokens: Capacity of the replay store.
    """

    def __init__(
        self,
        policy: OidcPolicy,
        *,
        key_refresh_cooldown: float = 60.0,
        http_timeout: float = 5.0,
        key_max_age: float = 3600.0,
        clock: Callable[[], float] = time.time,
        max_remembered_tokens: int = MAX_REMEMBERED_TOKENS,
    ) -> None:
        if key_refresh_cooldown < 0 or http_timeout <= 0 or key_max_age <= 0:
            raise ValueError(
                "OidcVerifier: key_refresh_cooldown must be >= 0, http_timeout and key_max_age "
                f"> 0; got {key_refresh_cooldown}, {http_timeout}, {key_max_age}"
            )
        if max_remembered_tokens < 1:
            raise ValueError(
                f"OidcVerifier: max_remembered_tokens must be at least 1, got "
                f"{max_remembered_tokens}"
            )
        self.policy = policy
        self._keys = _IssuerKeys(
            policy.issuer, cooldown=key_refresh_cooldown, timeout=http_timeout, max_age=key_max_age
        )
        self._replays = _ReplayGuard(
            capacity=max_remembered_tokens,
            keep_after_exp=policy.leeway_seconds + REPLAY_MARGIN_SECONDS,
            clock=clock,
        )

    @property
    def keys_loaded(self) -> bool:
        """Whether the issuer's keys are held and fresh (what /readyz reports)."""
        return self._keys.usable()

    @property
    def remembered_tokens(self) -> int:
        """How many used `jti`s are remembered now."""
        return len(self._replays)

    def refresh_keys(self) -> None:
        """Fetches the issuer's keys unless a fetch started within the cooldown.

        Safe to call on every readiness probe: the cooldown bounds the fetches.

        Raises:
            VerificationUnavailableError: No fresh keys are held afterwards; says why.
        """
        self._keys.refresh()
        if not self._keys.usable():
            raise VerificationUnavailableError(self._keys.unavailable_reason())

    def verify(self, token: str) -> RunClaims:
        """Verifies a token and returns the run it proves; accepts each token once.

        Args:
            token: The compact JWT from `Authorization: Bearer`.

        Returns:
            The token's run claims, after every check passed and its `jti` was recorded.

        Raises:
            TokenRejectedError: Not a valid token of the issuer for the broker (HTTP 401).
            TokenForbiddenError: Valid, but the policy refuses its repository, event or refs (403).
            VerificationUnavailableError: The token cannot be checked now (503).
        """
        key = self._keys.key(self._checked_kid(token))
        policy = self.policy
        try:
            # Every option spelled out, although most are PyJWT's defaults, so that the
            # verification does not change with the library's defaults.
            payload = jwt.decode(
                token,
                key,
                # One asymmetric algorithm, never taken from the token (RFC 8725 2.1).
                algorithms=[ALGORITHM],
                audience=policy.audience,
                issuer=policy.issuer,
                leeway=policy.leeway_seconds,
                options={
                    # The point of the exercise: the issuer's key signed this token.
                    "verify_signature": True,
                    # Only tokens requested for the broker; others are meant for other services
                    # (GitHub's default audience, the cloud's workload identity provider).
                    "verify_aud": True,
                    # Only the configured issuer: a key set is trusted for its issuer only.
                    "verify_iss": True,
                    # PyJWT checks these three only if the claim is present; `require` below
                    # makes them present.
                    "verify_exp": True,
                    "verify_nbf": True,
                    # A token issued in the future (beyond leeway) is refused, not trusted.
                    "verify_iat": True,
                    # `aud` must be the broker's audience as a single string: a token that
                    # lists a second audience could be replayed against that other service.
                    "strict_aud": True,
                    # Presence (and not null) of every claim the broker relies on; checked
                    # for type and policy below.
                    "require": list(REQUIRED_CLAIMS),
                },
            )
        except jwt.PyJWTError as e:
            raise _decode_refusal(e, policy) from None
        claims = _run_claims(payload)
        _check_policy(policy, claims)
        # Last, so that a token refused for any other reason is not burnt.
        self._replays.admit(claims.jti, claims.expires_at)
        return claims

    @staticmethod
    def _checked_kid(token: str) -> str:
        """Checks what can be checked before any key lookup; returns the header's kid."""
        if not isinstance(token, str) or not token:
            raise TokenRejectedError("no token given")
        if len(token) > MAX_TOKEN_BYTES:
            raise TokenRejectedError(f"token is larger than {MAX_TOKEN_BYTES} bytes")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejectedError("token is not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise TokenRejectedError(
                f"token algorithm {_shown(header.get('alg'))} is not {ALGORITHM}"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            raise TokenRejectedError("token header names no key id (kid)")
        return kid
