"""The broker's GitHub credential: a GitHub App's installation tokens, or the mounted PAT.

`GitHubAppTokens` signs the App's JWT (RS256, PyJWT) with the private key the broker's Secret
mounts, mints installation tokens narrowed to the stack's repository and to the permissions
runner management needs, caches each until shortly before it expires and mints the next one
then; one mint runs at a time. The key file is read for every signature, so a key rotated by
`pulumi up` (the kubelet updates the mounted Secret within about a minute) signs the next
mint without a restart. `token_source_from_environ` picks the App or the PAT file from the
broker's environment.

Neither the key nor a token ever reaches a message: errors name the App, the installation
and the stack config key to fix.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.rsa import RSAPrivateKey

from gpu_runners import contract
from gpu_runners.errors import GitHubAuthError, GitHubError, UsageError
from gpu_runners.github_api import (
    DEFAULT_API_URL,
    GitHubTransport,
    PatFile,
    RetryPolicy,
    Token,
    TokenSource,
)

LOGGER = logging.getLogger(__name__)
#: Stack config keys, named in errors: what the operator changes to fix the App's set-up.
CONFIG_APP_ID = "githubAppId"
CONFIG_INSTALLATION_ID = "githubAppInstallationId"
CONFIG_PRIVATE_KEY = "githubAppPrivateKey"
#: GitHub accepts an App JWT whose `exp` is at most 10 minutes ahead; `iat` is backdated by
#: 60 s, as GitHub recommends, against clock drift between the broker and GitHub.
JWT_BACKDATE_SECONDS = 60
JWT_LIFETIME_SECONDS = 9 * 60
#: A cached installation token is replaced this long before GitHub's `expires_at`, so no
#: request (or spawn of several minutes) starts with a token about to lapse.
DEFAULT_REFRESH_MARGIN_SECONDS = 5 * 60
#: After a failed refresh, while the cached token is still good, wait this long before the
#: next attempt instead of stalling every request on a GitHub outage.
REFRESH_RETRY_SECONDS = 30.0
#: What runner management asks of an installation token (GitHub's permission names): the
#: runner endpoints, and the reaper's look-ups of workflow runs.
REPOSITORY_RUNNER_PERMISSIONS: Mapping[str, str] = {"administration": "write", "actions": "read"}
ORGANIZATION_RUNNER_PERMISSIONS: Mapping[str, str] = {
    "organization_self_hosted_runners": "write",
    "actions": "read",
}


#: What the broker's preemption recovery asks of its own installation token: re-running the
#: failed jobs of a run whose GPU runner was lost, and cancelling a run that cannot get one.
RECOVERY_PERMISSIONS: Mapping[str, str] = {"actions": "write"}


class GitHubAppError(GitHubAuthError):
    """The App's key, id or installation is wrong, or the installation lacks a permission."""


@dataclass(frozen=True)
class GitHubApp:
    """A GitHub App installation the broker acts as.

    Attributes:
        app_id: The App's client ID (GitHub's recommendation) or numeric App ID: the JWT's
            `iss`.
        installation_id: The installation on the repository or organisation.
        private_key_file: The PEM file holding one of the App's private keys.
    """

    app_id: str
    installation_id: int
    private_key_file: Path

    def describe(self) -> str:
        """How errors and token sources name it."""
        return f"GitHub App {self.app_id} installation {self.installation_id}"


@dataclass(frozen=True)
class _Minted:
    token: Token
    refresh_at: float  # clock() seconds from which the next request mints a new token
    expires_at: float  # clock() seconds at which GitHub stops accepting it


def sign_app_jwt(app: GitHubApp, now: float) -> str:
    """The App's JWT for `POST /app/installations/{id}/access_tokens`, signed with its key.

    Args:
        app: The App; its key file is read now.
        now: The current time, seconds since the epoch.

    Raises:
        GitHubAppError: The key file cannot be read or holds no RSA private key (PEM).
    """
    key = _private_key(app)
    issued = int(now) - JWT_BACKDATE_SECONDS
    claims = {"iat": issued, "exp": int(now) + JWT_LIFETIME_SECONDS, "iss": app.app_id}
    return jwt.encode(claims, key, algorithm="RS256")


def _private_key(app: GitHubApp) -> RSAPrivateKey:
    where = f"{CONFIG_PRIVATE_KEY} (file {app.private_key_file})"
    fix = (f"set it to the PEM file GitHub generated for the App: `pulumi config set --secret "
           f"{CONFIG_PRIVATE_KEY} < key.pem`, then `pulumi up`")
    try:
        pem = app.private_key_file.read_bytes()
    except OSError as e:
        raise GitHubAppError(f"{where} cannot be read: {e.strerror}") from e
    try:
        key = serialization.load_pem_private_key(pem, password=None)
    except (ValueError, TypeError, UnsupportedAlgorithm):
        # The library's message is dropped on purpose: nothing of the key reaches a log.
        raise GitHubAppError(f"{where} is not an unencrypted PEM private key: {fix}") from None
    if not isinstance(key, RSAPrivateKey):
        raise GitHubAppError(f"{where} is not an RSA key (GitHub Apps sign with RS256): {fix}")
    return key


class GitHubAppTokens:
    """Installation tokens of a GitHub App, minted on demand and cached: a `TokenSource`.

    Args:
        app: The App and its installation.
        repository_ids: Repositories the tokens are narrowed to (None: every repository of
            the installation).
        permissions: Permissions the tokens are narrowed to, GitHub's names, e.g.
            REPOSITORY_RUNNER_PERMISSIONS.
        api_url: `GITHUB_API_URL`.
        policy: Timeouts and retries of the mint request.
        clock: Seconds since the epoch; replaceable so tests can move time.
        sleep: Waits between retries.
        refresh_margin: Seconds before expiry at which a cached token is replaced.
    """

    def __init__(
        self,
        app: GitHubApp,
        *,
        repository_ids: tuple[int, ...] | None,
        permissions: Mapping[str, str],
        api_url: str = DEFAULT_API_URL,
        policy: RetryPolicy | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        refresh_margin: float = DEFAULT_REFRESH_MARGIN_SECONDS,
    ) -> None:
        self.app = app
        self._repository_ids = repository_ids
        self._permissions = dict(permissions)
        self._transport = GitHubTransport(api_url, policy=policy, sleep=sleep)
        self._clock = clock
        self._refresh_margin = refresh_margin
        self._state = threading.Lock()  # guards _minted and _retry_at
        self._minting = threading.Lock()  # one mint in flight; other callers wait for it
        self._minted: _Minted | None = None
        self._retry_at = 0.0
        #: Installation tokens minted so far (for metrics and tests).
        self.mints = 0

    def current(self) -> Token:
        """The cached installation token, or a freshly minted one when it is due.

        Raises:
            GitHubAppError: The key is revoked or malformed, the App or installation id is
                wrong, or the installation lacks a permission (nothing cached is left to use).
            GitHubError: GitHub could not be reached, and no cached token is still good.
        """
        usable = self._cached()
        if usable is not None:
            return usable
        with self._minting:
            usable = self._cached()  # another thread may have minted while this one waited
            if usable is not None:
                return usable
            with self._state:
                stale = self._minted
            try:
                minted = self._mint()
            except GitHubError as e:
                now = self._clock()
                if stale is not None and now < stale.expires_at - REFRESH_RETRY_SECONDS:
                    # The old token still works: keep the runs going and try again later, but
                    # tell the operator, who has until it expires to fix the cause.
                    LOGGER.warning("%s: refreshing the installation token failed, the current "
                                   "one stays in use for %.0f s more: %s", self.app.describe(),
                                   stale.expires_at - now, e)
                    with self._state:
                        self._retry_at = now + REFRESH_RETRY_SECONDS
                    return stale.token
                raise
            with self._state:
                self._minted, self._retry_at = minted, 0.0
            return minted.token

    def invalidate(self, rejected: Token) -> None:
        """Drops the cached token if it is `rejected` (revoked, or expired early)."""
        with self._state:
            if self._minted is not None and self._minted.token.value == rejected.value:
                self._minted, self._retry_at = None, 0.0

    def _cached(self) -> Token | None:
        now = self._clock()
        with self._state:
            minted = self._minted
            if minted is None:
                return None
            if now < minted.refresh_at or (now < self._retry_at and now < minted.expires_at):
                return minted.token
        return None

    def _mint(self) -> _Minted:
        now = self._clock()
        body: dict[str, Any] = {"permissions": self._permissions}
        if self._repository_ids is not None:
            body["repository_ids"] = list(self._repository_ids)
        path = f"/app/installations/{self.app.installation_id}/access_tokens"
        response = self._transport.request(
            "POST", path, credential=sign_app_jwt(self.app, now), body=body
        )
        if response.status != 201:
            raise self._refusal(response.status, _message(response.body))
        answer = response.body if isinstance(response.body, Mapping) else {}
        value, expires = answer.get("token"), answer.get("expires_at")
        expires_at = _epoch(expires) if isinstance(expires, str) else None
        if not isinstance(value, str) or not value or expires_at is None:
            raise GitHubError(
                f"GitHub's answer to POST {path} holds no token and expires_at "
                f"({self.app.describe()})"
            )
        with self._state:
            self.mints += 1
        # GitHub's expiry is read against this clock: a token's life is an hour, far longer
        # than any drift the refresh margin must absorb.
        refresh_at = max(now, expires_at - self._refresh_margin)
        return _Minted(Token(value, self.app.describe(), installation=True), refresh_at,
                       expires_at)

    def _refusal(self, status: int, detail: str) -> GitHubError:
        app = self.app.describe()
        said = f"({status} {detail})" if detail else f"({status})"
        if status == 401:
            return GitHubAppError(
                f"GitHub refused the JWT of {app} {said}: the private key in "
                f"{CONFIG_PRIVATE_KEY} was revoked or belongs to another App, or "
                f"{CONFIG_APP_ID} ({self.app.app_id}) is not this App's client ID or App ID. "
                f"Generate a private key in the App's settings, `pulumi config set --secret "
                f"{CONFIG_PRIVATE_KEY} < key.pem`, and `pulumi up`",
                status=status,
            )
        if status == 404:
            return GitHubAppError(
                f"GitHub knows no installation {self.app.installation_id} of GitHub App "
                f"{self.app.app_id} {said}: set {CONFIG_INSTALLATION_ID} to the number at the "
                "end of the installation's settings URL (.../settings/installations/<id>), "
                "after installing the App on the repository or organisation",
                status=status,
            )
        if status == 403:
            return GitHubAppError(
                f"GitHub refused an installation token for {app} {said}: the installation is "
                "suspended or the App may not act for this account; unsuspend it in the "
                "installation's settings",
                status=status,
            )
        if status == 422:
            wanted = ", ".join(f"{name}: {level}" for name, level in self._permissions.items())
            return GitHubAppError(
                f"GitHub would not grant {app} the permissions {wanted} on repository id(s) "
                f"{list(self._repository_ids or ())} {said}: give the App these permissions, "
                "accept them in the installation's settings, and install it on the "
                "repository",
                status=status,
            )
        return GitHubError(f"GitHub answered {status} minting a token for {app}: {detail}",
                           status=status)


def _message(body: object) -> str:
    return str(body.get("message", "")) if isinstance(body, Mapping) else ""


def _epoch(timestamp: str) -> float | None:
    """Seconds since the epoch of GitHub's ISO 8601 `expires_at` (e.g. 2026-12-03T10:00:00Z)."""
    try:
        moment = datetime.fromisoformat(timestamp)
    except ValueError:
        return None
    return moment.timestamp() if moment.tzinfo is not None else None


def token_source_from_environ(
    environ: Mapping[str, str], *, repository_id: int | None, organization: bool,
    permissions: Mapping[str, str] | None = None,
) -> TokenSource:
    """The broker's GitHub credential: its GitHub App when one is configured, else its PAT.

    The App's variables are GITHUB_APP_ID, GITHUB_APP_INSTALLATION_ID and
    GITHUB_APP_PRIVATE_KEY_FILE (set by the stack's broker component); the PAT is the file
    GITHUB_PAT_FILE names (by default the broker's credential mount).

    Args:
        environ: The broker's environment.
        repository_id: The stack's repository: installation tokens are narrowed to it (None:
            every repository the installation covers).
        organization: Whether runners register to an organisation (the Self-hosted runners
            permission) rather than to the repository (Administration).
        permissions: What an App's tokens are narrowed to, instead of the runner permissions
            (e.g. RECOVERY_PERMISSIONS); a PAT is what it is.

    Returns:
        `GitHubAppTokens` or a `PatFile`. The PAT file, or the App's key, is read once now,
        so a broker with an unusable credential fails its rollout instead of its first run.

    Raises:
        UsageError: An App variable is set but another is missing or malformed (each is
            named), or, without an App, the PAT file cannot be read or is empty.
        GitHubAppError: The App's key file cannot be read or holds no RSA private key.
    """
    names = (contract.ENV_GITHUB_APP_ID, contract.ENV_GITHUB_APP_INSTALLATION_ID,
             contract.ENV_GITHUB_APP_PRIVATE_KEY_FILE)
    values = {name: environ.get(name, "").strip() for name in names}
    api_url = (environ.get(contract.ENV_API_URL) or DEFAULT_API_URL).strip()
    if any(values.values()):
        problems = [f"{name} is not set" for name, value in values.items() if not value]
        installation = values[contract.ENV_GITHUB_APP_INSTALLATION_ID]
        if installation and not (installation.isascii() and installation.isdigit()
                                 and int(installation) > 0):
            problems.append(f"{contract.ENV_GITHUB_APP_INSTALLATION_ID}={installation!r} is "
                            "not an installation id (a positive integer)")
        if problems:
            raise UsageError(
                "GitHub App half configured: " + "; ".join(problems) + f" (set all of "
                f"{', '.join(names)}, or none of them to use the PAT in "
                f"{contract.ENV_PAT_FILE})"
            )
        app = GitHubApp(
            app_id=values[contract.ENV_GITHUB_APP_ID],
            installation_id=int(installation),
            private_key_file=Path(values[contract.ENV_GITHUB_APP_PRIVATE_KEY_FILE]),
        )
        _private_key(app)
        if permissions is None:
            permissions = (ORGANIZATION_RUNNER_PERMISSIONS if organization
                           else REPOSITORY_RUNNER_PERMISSIONS)
        return GitHubAppTokens(
            app,
            repository_ids=None if repository_id is None else (repository_id,),
            permissions=permissions,
            api_url=api_url,
        )
    pat_file = environ.get(contract.ENV_PAT_FILE, "").strip() or str(
        Path(contract.BROKER_PAT_MOUNT_DIR) / contract.PAT_SECRET_KEY)
    return PatFile(Path(pat_file), source=f"file {pat_file} ({contract.ENV_PAT_FILE})")
