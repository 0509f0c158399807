"""`OidcVerifier`: the checks a job's token passes, in order, before the broker acts for it."""

from __future__ import annotations

import time
from collections.abc import Callable

import jwt

from gpu_runners.broker.oidc.claims import RunClaims, check_policy, run_claims
from gpu_runners.broker.oidc.errors import (
    TokenRejectedError,
    VerificationUnavailableError,
    shown,
)
from gpu_runners.broker.oidc.issuer_keys import IssuerKeys
from gpu_runners.broker.oidc.policy import ALGORITHM, OidcPolicy
from gpu_runners.broker.oidc.replay import (
    MAX_REMEMBERED_TOKENS,
    REPLAY_MARGIN_SECONDS,
    ReplayGuard,
)

#: Largest token read. GitHub's are about 1-2 KiB even with custom repository properties.
MAX_TOKEN_BYTES = 8 * 1024
MAX_KID_LENGTH = 256
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
        self._keys = IssuerKeys(
            policy.issuer, cooldown=key_refresh_cooldown, timeout=http_timeout, max_age=key_max_age
        )
        self._replays = ReplayGuard(
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
        claims = run_claims(payload)
        check_policy(policy, claims)
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
        if not token.isascii():  # a compact JWT is base64url and dots only
            raise TokenRejectedError("token is not a well-formed JWT")
        try:
            header = jwt.get_unverified_header(token)
        except jwt.PyJWTError:
            raise TokenRejectedError("token is not a well-formed JWT") from None
        if header.get("alg") != ALGORITHM:
            raise TokenRejectedError(
                f"token algorithm {shown(header.get('alg'))} is not {ALGORITHM}"
            )
        kid = header.get("kid")
        if not isinstance(kid, str) or not 0 < len(kid) <= MAX_KID_LENGTH:
            raise TokenRejectedError("token header names no key id (kid)")
        return kid
