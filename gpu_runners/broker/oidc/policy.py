"""What the stack accepts: the issuer, the broker's audience, the repository and its runs."""

from __future__ import annotations

import re
import urllib.parse
from dataclasses import dataclass

from gpu_runners.contract import FORBIDDEN_EVENTS

#: The only signing algorithm accepted: GitHub signs with RS256, and naming one asymmetric
#: algorithm rules out algorithm confusion (`none`, HS256 keyed with the public key).
ALGORITHM = "RS256"
#: Clock skew allowed on exp/nbf/iat. The issue caps it at 60 s: GitHub's tokens live ~300 s.
MAX_LEEWAY_SECONDS = 60
#: Hosts on which the issuer and JWKS may be plain http (tests' local issuer only).
LOOPBACK_HOSTS = frozenset({"127.0.0.1", "localhost", "::1"})
#: GitHub's default audience is the owner's URL; any GitHub-aware service accepts it.
GITHUB_DEFAULT_AUDIENCE_PREFIX = "https://github.com/"
#: Google's workload identity providers accept, unless told otherwise, an audience naming the
#: provider (`https://iam.googleapis.com/projects/...` or `//iam.googleapis.com/...`).
WORKLOAD_IDENTITY_AUDIENCE_HOST = "iam.googleapis.com/"
#: GitHub's numeric ids as its claims carry them: ASCII digits, no sign or leading zero.
DECIMAL_ID = re.compile(r"[1-9][0-9]{0,18}")


def _is_loopback_http(parts: urllib.parse.SplitResult) -> bool:
    return parts.scheme == "http" and parts.hostname in LOOPBACK_HOSTS


def is_trusted_url(url: str) -> bool:
    """Whether a URL may serve the issuer's documents: https, or http on a loopback host."""
    parts = urllib.parse.urlsplit(url)
    return bool(parts.hostname) and (parts.scheme == "https" or _is_loopback_http(parts))


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
            if not isinstance(value, str) or DECIMAL_ID.fullmatch(value) is None:
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
        if WORKLOAD_IDENTITY_AUDIENCE_HOST in self.audience:
            raise ValueError(
                "OidcPolicy.audience must not be a workload identity provider's audience: a "
                "token for the broker must not also open the cloud project; got "
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
