"""The broker's settings, read once from the environment the stack's broker component sets.

Every problem is collected and reported at once, each naming its variable and what is allowed,
before the server starts: a broker that starts with a wrong setting would refuse or misplace
every run instead of failing its rollout.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType
from typing import TypeVar

from gpu_runners import contract
from gpu_runners.broker.oidc import OidcPolicy
from gpu_runners.errors import UsageError
from gpu_runners.github_api import DEFAULT_API_URL
from gpu_runners.gpu_pools import GpuPool, parse_gpu_pools
from gpu_runners.run_identity import DEFAULT_SERVER_URL

T = TypeVar("T")

DEFAULT_REAPER_INTERVAL_SECONDS = 300.0
#: The cap on maxRuntimeMinutes: activeDeadlineSeconds is an int32 of seconds.
MAX_RUNTIME_MINUTES_LIMIT = (2**31 - 1) // 60
_DECIMAL_ID = re.compile(r"^[1-9][0-9]{0,18}$")
_REPOSITORY = re.compile(r"^[A-Za-z0-9-]+/[A-Za-z0-9._-]+$")


class SettingsError(UsageError):
    """One or more broker settings are missing or malformed; the message lists them all."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("broker settings: " + "; ".join(problems))
        self.problems = problems


@dataclass(frozen=True)
class BrokerSettings:
    """What the stack tells the broker.

    Attributes:
        namespace: Namespace of the GPU runner pods and their Secrets.
        image: The stack's runner image; what a run gets unless it asks for an allowed other.
        gpu_pools: The cluster's GPU pools (empty: not known, only the form is checked).
        image_pull_secret: Pull Secret of the runner image in `namespace`, or None.
        max_runtime_seconds: The stack's maxRuntimeMinutes in seconds: the longest pod life.
        repository: `owner/name` of the stack's repository (runner scope, pod annotations).
        repository_id: Its numeric id: the only repository whose tokens are accepted.
        repository_owner_id: The numeric id of its owner.
        pat_file: The mounted GitHub credential.
        api_url: GitHub REST API URL.
        server_url: GitHub web URL (links to runs).
        oidc_issuer: The `iss` of accepted tokens.
        audience: The only `aud` accepted.
        allowed_events: `event_name`s whose runs may ask.
        allowed_refs: fnmatch patterns on `ref` (empty: any).
        allowed_workflow_refs: fnmatch patterns on `job_workflow_ref` (empty: any).
        allowed_images: fnmatch patterns of images a run may ask for besides `image`.
        require_image_digests: Refuse an asked image named by tag (else its tag is resolved).
        registry_mirrors: Upstream registry host -> mirror prefix job images are pulled
            through (GKE image streaming); empty: pulled from their registries.
        gpu_cap_per_repository: Most GPUs the repository's live runner pods may hold at once.
        reaper_interval_seconds: Seconds between two reaper passes.
        max_preemption_retries: Times one run is recovered after Spot preemption of its GPU
            node (a replacement pod, or a re-run of its failed jobs); 0: never.
        port: The port the broker listens on.
    """

    namespace: str
    image: str
    gpu_pools: tuple[GpuPool, ...]
    image_pull_secret: str | None
    max_runtime_seconds: int
    repository: str
    repository_id: int
    repository_owner_id: int
    pat_file: Path
    api_url: str
    server_url: str
    oidc_issuer: str
    audience: str
    allowed_events: frozenset[str]
    allowed_refs: tuple[str, ...]
    allowed_workflow_refs: tuple[str, ...]
    allowed_images: tuple[str, ...]
    require_image_digests: bool
    registry_mirrors: Mapping[str, str]
    gpu_cap_per_repository: int
    reaper_interval_seconds: float
    port: int
    max_preemption_retries: int = contract.DEFAULT_MAX_PREEMPTION_RETRIES

    @classmethod
    def from_environ(cls, environ: Mapping[str, str]) -> BrokerSettings:
        """Reads every setting; reports every problem at once.

        Raises:
            SettingsError: Lists each missing or malformed variable and what it must be.
        """
        reader = _Reader(environ)
        settings = cls(
            namespace=reader.text(contract.ENV_NAMESPACE, default=contract.DEFAULT_NAMESPACE),
            image=reader.text(contract.ENV_IMAGE),
            gpu_pools=reader.parsed(contract.ENV_GPU_POOLS, parse_gpu_pools, ()),
            image_pull_secret=reader.text(contract.ENV_IMAGE_PULL_SECRET, default="") or None,
            max_runtime_seconds=60 * reader.integer(
                contract.ENV_MAX_RUNTIME_MINUTES, low=1, high=MAX_RUNTIME_MINUTES_LIMIT
            ),
            repository=reader.matching(contract.ENV_REPOSITORY, _REPOSITORY, "an owner/name"),
            repository_id=int(reader.matching(
                contract.ENV_REPOSITORY_ID, _DECIMAL_ID, "GitHub's numeric repository id") or 0),
            repository_owner_id=int(reader.matching(
                contract.ENV_REPOSITORY_OWNER_ID, _DECIMAL_ID, "GitHub's numeric owner id") or 0),
            pat_file=Path(reader.text(contract.ENV_PAT_FILE, default=str(
                Path(contract.BROKER_PAT_MOUNT_DIR) / contract.PAT_SECRET_KEY))),
            api_url=reader.text(contract.ENV_API_URL, default=DEFAULT_API_URL).rstrip("/"),
            server_url=reader.text(contract.ENV_SERVER_URL, default=DEFAULT_SERVER_URL),
            oidc_issuer=reader.text(contract.ENV_OIDC_ISSUER, default=contract.GITHUB_OIDC_ISSUER),
            audience=reader.text(contract.ENV_BROKER_AUDIENCE,
                                 default=contract.DEFAULT_BROKER_AUDIENCE),
            allowed_events=frozenset(reader.events(contract.ENV_ALLOWED_EVENTS)),
            allowed_refs=reader.patterns(contract.ENV_ALLOWED_REFS),
            allowed_workflow_refs=reader.patterns(contract.ENV_ALLOWED_WORKFLOW_REFS),
            allowed_images=reader.patterns(contract.ENV_ALLOWED_IMAGES),
            require_image_digests=reader.boolean(contract.ENV_REQUIRE_IMAGE_DIGESTS),
            registry_mirrors=reader.string_map(contract.ENV_REGISTRY_MIRRORS),
            gpu_cap_per_repository=reader.integer(contract.ENV_GPU_CAP_PER_REPOSITORY, low=1,
                                                  high=10_000),
            reaper_interval_seconds=float(reader.integer(
                contract.ENV_REAPER_INTERVAL_SECONDS, low=1, high=86_400,
                default=int(DEFAULT_REAPER_INTERVAL_SECONDS))),
            port=reader.integer(contract.ENV_BROKER_PORT, low=1, high=65_535,
                                default=contract.BROKER_PORT),
            max_preemption_retries=reader.integer(
                contract.ENV_MAX_PREEMPTION_RETRIES, low=0,
                high=contract.MAX_PREEMPTION_RETRIES_LIMIT,
                default=contract.DEFAULT_MAX_PREEMPTION_RETRIES),
        )
        if not reader.problems:
            try:
                settings.oidc_policy()
            except ValueError as e:
                reader.problems.append(
                    f"{contract.ENV_OIDC_ISSUER}, {contract.ENV_BROKER_AUDIENCE} or "
                    f"{contract.ENV_ALLOWED_EVENTS}: {e}")
        if reader.problems:
            raise SettingsError(reader.problems)
        return settings

    def oidc_policy(self) -> OidcPolicy:
        """The token policy these settings describe."""
        return OidcPolicy(
            issuer=self.oidc_issuer,
            audience=self.audience,
            repository_id=str(self.repository_id),
            repository_owner_id=str(self.repository_owner_id),
            allowed_events=self.allowed_events,
            allowed_refs=self.allowed_refs,
            allowed_workflow_refs=self.allowed_workflow_refs,
        )


class _Reader:
    """Reads variables, collecting problems instead of stopping at the first."""

    def __init__(self, environ: Mapping[str, str]) -> None:
        self.environ = environ
        self.problems: list[str] = []

    def text(self, name: str, *, default: str | None = None) -> str:
        value = self.environ.get(name, "").strip()
        if value:
            return value
        if default is None:
            self.problems.append(f"{name} is not set")
            return ""
        return default

    def matching(self, name: str, pattern: re.Pattern[str], what: str) -> str:
        value = self.text(name)
        if value and not pattern.match(value):
            self.problems.append(f"{name}: {value!r} is not {what}")
            return ""
        return value

    def integer(self, name: str, *, low: int, high: int, default: int | None = None) -> int:
        text = self.text(name, default=None if default is None else str(default))
        if not text:
            return low
        if not (text.isascii() and text.isdigit()) or not low <= int(text) <= high:
            self.problems.append(f"{name}: {text!r} is not an integer from {low} to {high}")
            return low
        return int(text)

    def parsed(self, name: str, parse: Callable[[str | None], T], fallback: T) -> T:
        try:
            return parse(self.environ.get(name))
        except UsageError as e:
            self.problems.append(str(e))
            return fallback

    def events(self, name: str) -> list[str]:
        text = self.environ.get(name, "").strip()
        if not text:
            return list(contract.DEFAULT_ALLOWED_EVENTS)
        events = [event.strip() for event in text.split(",") if event.strip()]
        forbidden = sorted(set(events) & set(contract.FORBIDDEN_EVENTS))
        if forbidden:
            self.problems.append(
                f"{name}: {', '.join(forbidden)} may not use GPU runners (they run with the "
                "repository's rights on code it did not review)")
        return events

    def string_map(self, name: str) -> Mapping[str, str]:
        text = self.environ.get(name, "").strip()
        if not text:
            return MappingProxyType({})
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, dict) or not all(
                isinstance(k, str) and isinstance(v, str) and k and v for k, v in value.items()):
            self.problems.append(f"{name}: {text!r} is not a JSON object of non-empty strings")
            return MappingProxyType({})
        return MappingProxyType(value)

    def boolean(self, name: str) -> bool:
        text = self.environ.get(name, "").strip().lower()
        if text not in ("", "true", "false"):
            self.problems.append(f"{name}: {text!r} is not true or false")
        return text == "true"

    def patterns(self, name: str) -> tuple[str, ...]:
        text = self.environ.get(name, "").strip()
        if not text:
            return ()
        try:
            value = json.loads(text)
        except ValueError:
            value = None
        if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
            self.problems.append(f"{name}: {text!r} is not a JSON list of non-empty patterns")
            return ()
        return tuple(value)
