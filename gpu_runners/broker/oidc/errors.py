"""The refusals of token verification, each carrying the API error code it maps to."""

from __future__ import annotations

from typing import ClassVar

from gpu_runners import broker_api


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


def shown(value: object) -> str:
    """A value for a refusal message: quoted, control characters escaped, bounded."""
    text = repr(value)
    return text if len(text) <= 200 else text[:197] + "..."
