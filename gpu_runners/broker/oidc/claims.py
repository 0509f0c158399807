"""The claims of a verified token the broker uses, and the stack's policy over them.

The policy is a table (`POLICY_RULES`), one rule per claim, in the manner of PyPI's trusted
publishers: the repository and its owner by numeric id (a re-created repository with the same
name has another id), the event, and optionally the ref and the job's workflow. `sub` is never
used: its format varies by repository, over time, and with the owner's customisation.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gpu_runners.broker.oidc.errors import TokenForbiddenError, TokenRejectedError, shown
from gpu_runners.broker.oidc.policy import DECIMAL_ID, OidcPolicy
from gpu_runners.contract import FORBIDDEN_EVENTS

#: Longest `exp - iat` accepted. GitHub does not document its tokens' lifetime; they have been
#: observed at 300 s since 2022. An hour leaves room for GitHub to lengthen it several-fold
#: without an outage here, while a token valid for longer is not one GitHub minted for a job
#: step; it also bounds how long each accepted `jti` is remembered.
MAX_TOKEN_LIFETIME_SECONDS = 3600
#: Longest `jti` accepted (GitHub's is a 36-character UUID); bounds the replay store's memory.
MAX_JTI_LENGTH = 128


def _decimal_id(name: str, value: object) -> int:
    """Parses one of GitHub's numeric string claims strictly (positive decimal, ASCII)."""
    if not isinstance(value, str) or DECIMAL_ID.fullmatch(value) is None:
        raise TokenRejectedError(f"token claim {name} must be a positive decimal string")
    return int(value)


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


def run_claims(payload: Mapping[str, Any]) -> RunClaims:
    """Reads the claims the broker uses from a decoded payload.

    Raises:
        TokenRejectedError: A claim has the wrong type or form, or the lifetime is too long.
    """
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
    if not 0 < len(jti) <= MAX_JTI_LENGTH:
        raise TokenRejectedError(f"token claim jti must be 1 to {MAX_JTI_LENGTH} characters")
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
class ClaimRule:
    """One line of the policy: the claim, whether the policy allows its value, and why not."""

    claim: str
    allows: Callable[[OidcPolicy, RunClaims], bool]
    refusal: str


#: The stack's policy over a token's claims, one rule per claim, checked in order.
POLICY_RULES: tuple[ClaimRule, ...] = (
    ClaimRule(
        "repository_id",
        lambda policy, claims: claims.repository_id == int(policy.repository_id),
        "is not the id of this stack's repository",
    ),
    ClaimRule(
        "repository_owner_id",
        lambda policy, claims: claims.repository_owner_id == int(policy.repository_owner_id),
        "is not the id of this stack's repository owner",
    ),
    ClaimRule(
        "event_name",
        # FORBIDDEN_EVENTS again, although the policy cannot list them: a refusal must not
        # depend on how the policy was built.
        lambda policy, claims: (
            claims.event_name in policy.allowed_events and claims.event_name not in FORBIDDEN_EVENTS
        ),
        "is not an event allowed to use GPU runners",
    ),
    ClaimRule(
        "ref",
        lambda policy, claims: _matches_any(claims.ref, policy.allowed_refs),
        "matches none of the allowed refs",
    ),
    ClaimRule(
        "job_workflow_ref",
        lambda policy, claims: _matches_any(claims.job_workflow_ref, policy.allowed_workflow_refs),
        "matches none of the allowed workflows",
    ),
)


def check_policy(policy: OidcPolicy, claims: RunClaims) -> None:
    """Applies `POLICY_RULES` to verified claims.

    Raises:
        TokenForbiddenError: The first rule that refuses, naming the claim and its value.
    """
    for rule in POLICY_RULES:
        if not rule.allows(policy, claims):
            value = getattr(claims, rule.claim)
            raise TokenForbiddenError(f"token claim {rule.claim} {shown(value)} {rule.refusal}")
