"""Each token is accepted once: the `jti`s of accepted tokens, remembered until they expire."""

from __future__ import annotations

import heapq
import threading
from collections.abc import Callable

from gpu_runners.broker.oidc.errors import TokenRejectedError, VerificationUnavailableError

#: Most tokens remembered at once (see ReplayGuard).
MAX_REMEMBERED_TOKENS = 100_000
#: Extra seconds a `jti` is remembered past `exp + leeway`, so that the store never forgets a
#: token the decoder (reading the system clock a moment later) would still accept.
REPLAY_MARGIN_SECONDS = 5


class ReplayGuard:
    """The `jti`s of accepted tokens, each remembered until its token has expired.

    Memory stays bounded: entries are dropped once past `exp + leeway`, and the lifetime cap
    bounds how long that is. When `capacity` unexpired entries are held, new tokens are
    refused (503) rather than an entry evicted, since evicting one would let that token be
    replayed; only tokens that passed every other check get here, so filling it takes that
    many genuine tokens within their lifetime.

    Args:
        capacity: Most entries held.
        keep_after_exp: Seconds an entry outlives its token's `exp` (the leeway and a margin).
        clock: Wall-clock seconds, compared with `exp`.
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
