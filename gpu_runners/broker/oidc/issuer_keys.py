"""The OIDC issuer's signing keys, from its discovery document, cached, refetched sparingly.

Fetched with urllib and parsed with `jwt.PyJWKSet`, not with `jwt.PyJWKClient`: that client
refetches the JWKS on every unknown `kid`, so a flood of made-up `kid`s would hammer the issuer.
"""

from __future__ import annotations

import json
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt

from gpu_runners.broker.oidc.errors import (
    TokenRejectedError,
    VerificationUnavailableError,
    shown,
)
from gpu_runners.broker.oidc.policy import ALGORITHM, is_trusted_url

#: Largest discovery or JWKS document read (GitHub's JWKS is a few KiB).
MAX_DOCUMENT_BYTES = 1024 * 1024


class _NoRedirects(urllib.request.HTTPRedirectHandler):
    """Refuses redirects: the issuer's documents are served where discovery says."""

    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        return None


@dataclass(frozen=True)
class KeySet:
    """One fetch of the issuer's JWKS: its usable keys and when it was fetched."""

    keys: Mapping[str, jwt.PyJWK]  # kid -> RS256 public key
    fetched_at: float  # time.monotonic()


class IssuerKeys:
    """The issuer's signing keys: fetched through discovery, cached, refetched under a cooldown.

    A fetch happens when no fresh key set is held (at startup, or `max_age` after the last
    fetch) or when a token names a `kid` the set lacks (the issuer rotated its keys). After a
    fetch for an unknown `kid`, and after any failed fetch, no other starts for `cooldown`
    seconds: a flood of made-up `kid`s costs the issuer one request per cooldown, and an issuer
    in an outage is not hammered either.

    Readers take the current `KeySet` without a lock (one attribute read); fetches run one at
    a time under `_fetch_lock`.

    Args:
        issuer: The issuer URL (validated by OidcPolicy), without a trailing slash.
        cooldown: Seconds without fetches after a fetch for an unknown `kid` or a failed one.
        timeout: Seconds allowed for each HTTP request.
        max_age: Seconds a fetched set is used; past that it is refetched before use.
    """

    def __init__(self, issuer: str, *, cooldown: float, timeout: float, max_age: float) -> None:
        self._issuer = issuer
        self._cooldown = cooldown
        self._timeout = timeout
        self._max_age = max_age
        self._keyset: KeySet | None = None
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

    def refresh(self, kid: str | None = None) -> KeySet | None:
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
                keyset = KeySet(self._fetch(), fetched_at=time.monotonic())
            except VerificationUnavailableError as e:
                self._last_error = e.reason
                self._cooling_until = now + self._cooldown
                return self._keyset
            self._keyset = keyset
            self._last_error = None
            if for_unknown_kid:
                self._cooling_until = now + self._cooldown
            return keyset

    def _fresh(self, keyset: KeySet | None) -> bool:
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
                f"the discovery document names issuer {shown(discovery.get('issuer'))}, "
                f"not {self._issuer}"
            )
        jwks_uri = discovery.get("jwks_uri")
        if not isinstance(jwks_uri, str) or not is_trusted_url(jwks_uri):
            raise VerificationUnavailableError(
                f"the discovery document's jwks_uri {shown(jwks_uri)} is not an https URL"
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
        # https (or loopback http) by OidcPolicy and is_trusted_url: no file: or other scheme.
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
