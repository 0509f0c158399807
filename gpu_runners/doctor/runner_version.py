"""How far the runner image's Actions runner is behind GitHub's releases.

The image runs the runner with `--disableupdate`. GitHub then refuses jobs to a runner that
has not taken an available update within 30 days of its release ("About self-hosted runner
updates"), so the clock starts at the first release newer than the image's, not the latest.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from gpu_runners.doctor.report import CheckResult, Status

#: Days GitHub keeps sending jobs to a runner after a newer release, when updates are disabled.
UPDATE_GRACE = timedelta(days=30)
#: Warn this long before GitHub stops sending jobs.
WARN_BEFORE = timedelta(days=7)
_VERSION = re.compile(r"^v?(\d+)\.(\d+)\.(\d+)$")
CHECK = "runner version"


@dataclass(frozen=True)
class Release:
    """A published, final release of actions/runner."""

    version: tuple[int, int, int]
    tag: str
    published_at: datetime


def parse_version(text: str) -> tuple[int, int, int] | None:
    """`2.330.0` or `v2.330.0` as a comparable tuple; None for anything else."""
    match = _VERSION.match(text.strip())
    if match is None:
        return None
    major, minor, patch = (int(part) for part in match.groups())
    return major, minor, patch


def parse_releases(items: Sequence[Mapping[str, Any]]) -> list[Release]:
    """The final releases in GitHub's release list (drafts, prereleases, odd tags dropped)."""
    releases = []
    for item in items:
        version = parse_version(str(item.get("tag_name", "")))
        published = item.get("published_at")
        if version is None or item.get("draft") or item.get("prerelease") or not published:
            continue
        moment = datetime.fromisoformat(str(published).replace("Z", "+00:00"))
        releases.append(Release(version, str(item["tag_name"]), moment))
    return releases


def check_runner_version(image_version: str | None, releases: Sequence[Release],
                         now: datetime) -> CheckResult:
    """Judges the image's runner version against the releases GitHub lists.

    Args:
        image_version: What the image's runner reports (`Runner.Listener --version`), or None
            when the probe could not tell.
        releases: From `parse_releases`.
        now: The current time, timezone-aware.

    Returns:
        PASS when current or well within the grace, WARN within WARN_BEFORE of its end,
        FAIL past it, SKIP when either side is unknown.
    """
    fix = ("rebuild the runner image with the latest RUNNER_VERSION and its SHA-256 "
           "(docker/Dockerfile) and run pulumi up")
    if image_version is None:
        return CheckResult(CHECK, Status.SKIP, "the probe pod could not tell the image's runner "
                                               "version (see the image and network checks)")
    current = parse_version(image_version)
    if current is None:
        return CheckResult(CHECK, Status.SKIP,
                           f"the image's runner reports {image_version!r}, not a version")
    if not releases:
        return CheckResult(CHECK, Status.SKIP, "GitHub listed no release of actions/runner")
    newer = [release for release in releases if release.version > current]
    latest = max(releases, key=lambda release: release.version)
    if not newer:
        return CheckResult(CHECK, Status.PASS, f"{image_version} is the latest release")
    first = min(newer, key=lambda release: release.published_at)
    deadline = first.published_at + UPDATE_GRACE
    behind = (f"{image_version}; {first.tag} was released on {first.published_at:%Y-%m-%d}, "
              f"latest {latest.tag}")
    if now >= deadline:
        return CheckResult(
            CHECK, Status.FAIL,
            f"{behind}: GitHub stopped sending jobs to this runner on {deadline:%Y-%m-%d} "
            "(updates are disabled in the image)",
            fix=fix,
        )
    days = (deadline - now).days
    if deadline - now <= WARN_BEFORE:
        return CheckResult(CHECK, Status.WARN,
                           f"{behind}: GitHub stops sending jobs in {days} day(s)", fix=fix)
    return CheckResult(CHECK, Status.PASS, f"{behind}: update due by {deadline:%Y-%m-%d}")
