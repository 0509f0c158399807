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
4. the stack's policy allows it, claim by claim (`claims.POLICY_RULES`): the repository and
   its owner by numeric id (a re-created repository with the same name has another id), the
   event, and optionally the ref and the job's workflow. `sub` is never used: its format
   varies by repository, over time, and with the owner's customisation;
5. its `jti` was not accepted before (each token is accepted once, until it expires).

Keys come from the issuer's discovery document (`<issuer>/.well-known/openid-configuration`
-> `jwks_uri`), cached, and refetched for an unknown `kid` at most once per cooldown. Anything
uncertain fails closed.

Errors map to the API's codes (`gpu_runners.broker_api.ERROR_STATUS`) through their `code`:
`TokenRejectedError` 401 (the token proves nothing), `TokenForbiddenError` 403 (a genuine
token the policy refuses), `VerificationUnavailableError` 503 (the issuer's keys or the replay
store are unavailable; retry later). Their `reason` is one line, safe to show the caller: it
never holds the token.

Modules: `policy` (what the stack accepts), `verifier` (the checks in order), `issuer_keys`
(discovery, JWKS, cooldown), `claims` (the run claims and the policy table), `replay` (used
`jti`s), `errors` (the refusals).
"""

from gpu_runners.broker.oidc.claims import MAX_TOKEN_LIFETIME_SECONDS, RunClaims
from gpu_runners.broker.oidc.errors import (
    TokenForbiddenError,
    TokenRejectedError,
    VerificationUnavailableError,
)
from gpu_runners.broker.oidc.policy import OidcPolicy
from gpu_runners.broker.oidc.verifier import MAX_TOKEN_BYTES, REQUIRED_CLAIMS, OidcVerifier

__all__ = [
    "MAX_TOKEN_BYTES",
    "MAX_TOKEN_LIFETIME_SECONDS",
    "REQUIRED_CLAIMS",
    "OidcPolicy",
    "OidcVerifier",
    "RunClaims",
    "TokenForbiddenError",
    "TokenRejectedError",
    "VerificationUnavailableError",
]
